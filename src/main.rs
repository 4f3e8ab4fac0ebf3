//! The `canaryd` binary: parse the command line, resolve the config, set up logging, run.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

use canaryd::cli::{Cli, Command, HealthcheckArgs, ServeArgs};
use canaryd::client::{Client, Exit, ServerArgs, gate, operate};
use canaryd::config::{Config, RawConfig};

/// Decoding OTLP allocates every attribute key and value: under load, glibc's malloc and free took
/// about 45% of the daemon's CPU (perf, BENCHMARKS.md). mimalloc's thread-local free lists make
/// those small, short-lived allocations cheap. The `system-allocator` feature leaves it out, so
/// that a heap profiler that wraps malloc (heaptrack) sees every allocation.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its `mimalloc.h`, version 3, which `libmimalloc-sys` builds;
/// the binding names no constant for it). A test holds it to the option's default.
#[cfg(not(feature = "system-allocator"))]
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Has the allocator give pages back to the OS as soon as they are wholly free, not a second
/// later and only once the thread that freed them allocates again. After an ingest peak the
/// receiving threads idle with the pages they freed: the series bench read 1.1 KB a series more
/// at 100k with the delay (BENCHMARKS.md, memory per series), and the load bench no cost for it.
/// `MIMALLOC_PURGE_DELAY` in the environment still decides when set.
fn give_freed_pages_back() {
    #[cfg(not(feature = "system-allocator"))]
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's options, a plain integer it reads when it purges; no
        // memory is touched and any value is valid.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
    }
}

/// Has mimalloc take back the blocks other threads freed into this thread's pages, and give the
/// pages so emptied to the OS: called as a runtime worker goes idle. The engine's thread frees
/// what the receiving threads allocated (each request's observations); mimalloc returns such
/// blocks to their page only when the page's own thread next allocates or collects, so a worker
/// left idle after an ingest peak held pages that were all but free. The series bench read
/// 0.28 KB a series less at 100k with it, and the load bench's spans per daemon-CPU-second were
/// within their runs' spread (BENCHMARKS.md, memory per series).
fn collect_freed_blocks() {
    // SAFETY: a collection of the calling thread's own heap (not forced), which mimalloc allows
    // at any time; it touches no memory the caller holds.
    #[cfg(not(feature = "system-allocator"))]
    unsafe {
        libmimalloc_sys::mi_collect(false)
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let client = std::env::args()
                .nth(1)
                .is_some_and(|name| Command::is_client(&name));
            let usage = e.use_stderr();
            let _ = e.print();
            return match (usage, client) {
                (false, _) => ExitCode::SUCCESS,
                (true, true) => ExitCode::from(Exit::Usage.code()),
                (true, false) => ExitCode::from(2),
            };
        }
    };
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Healthcheck(args) => healthcheck(args),
        Command::Gate(args) => {
            let server = args.server.clone();
            client_command(&server, |client| gate::run(args, client))
        }
        Command::Rollout(command) => {
            let server = command.server().clone();
            client_command(&server, |client| operate::rollout(command, client))
        }
        Command::Events(command) => {
            let operate::EventsCommand::Tail(tail) = &command;
            let server = tail.server.clone();
            client_command(&server, |client| operate::events(command, client))
        }
    }
}

/// Runs a command against a daemon: its token from `--token-file` or `CANARYD_TOKEN`, logs
/// (retries) under `RUST_LOG`, and its exit code.
fn client_command<F, Fut>(server: &ServerArgs, run: F) -> ExitCode
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Exit>,
{
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let client = canaryd::client::token(server.token_file.as_deref(), std::env::var("CANARYD_TOKEN").ok())
        .and_then(|token| Client::new(server, token));
    let client = match client {
        Ok(client) => client,
        Err(e) => {
            eprintln!("canaryd: {e}");
            return ExitCode::from(e.exit().code());
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("canaryd: cannot start a runtime: {e}");
            return ExitCode::from(Exit::Usage.code());
        }
    };
    ExitCode::from(runtime.block_on(run(client)).code())
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
    give_freed_pages_back();
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.threads)
        .on_thread_park(collect_freed_blocks)
        .enable_all()
        .build()?;
    runtime.block_on(canaryd::daemon::run_until_signal(config))?;
    Ok(())
}

#[cfg(all(test, not(feature = "system-allocator")))]
mod tests {
    use super::*;

    /// The option set is the purge delay: its default, one second, unless the environment
    /// sets it.
    #[test]
    fn the_option_set_is_mimallocs_purge_delay() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // SAFETY: reads one of mimalloc's options.
        let delay = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(delay, 1000);
        give_freed_pages_back();
        // SAFETY: as above.
        assert_eq!(
            unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) },
            0
        );
    }
}
