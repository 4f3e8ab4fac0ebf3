//! The `canaryd` binary: parse the command line, resolve the config, set up logging, run.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

use canaryd::cli::{Cli, Command, HealthcheckArgs, ServeArgs};
use canaryd::config::{Config, RawConfig};

/// Decoding OTLP allocates every attribute key and value: under load, glibc's malloc and free took
/// about 45% of the daemon's CPU (perf, BENCHMARKS.md). mimalloc's thread-local free lists make
/// those small, short-lived allocations cheap.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(args) => serve(args),
        Command::Healthcheck(args) => healthcheck(args),
    }
}

fn healthcheck(args: HealthcheckArgs) -> ExitCode {
    let http_addr = std::env::var("CANARYD_HTTP_ADDR").ok();
    let probed = canaryd::healthcheck::target(args.addr.as_deref(), http_addr.as_deref()).and_then(|addr| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(canaryd::healthcheck::HealthError::Runtime)?;
        runtime.block_on(canaryd::healthcheck::probe(
            addr,
            std::time::Duration::from_secs(args.timeout_secs),
        ))
    });
    match probed {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("canaryd healthcheck: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let config = match Config::load(args.config.as_deref(), &env, args.settings) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("canaryd: bad configuration: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&config.log))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    for var in RawConfig::unknown_env_vars(&env) {
        if var != "CANARYD_CONFIG" {
            tracing::warn!(variable = %var, "ignoring an environment variable that names no setting");
        }
    }
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The daemon's errors say their cause in their own words: `{e}`, not the `{e:#}` chain,
            // which would say it twice.
            tracing::error!("{e}");
            eprintln!("canaryd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(canaryd::daemon::run_until_signal(config))?;
    Ok(())
}
