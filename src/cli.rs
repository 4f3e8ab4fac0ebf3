//! The command line: `canaryd serve` and its flags, `canaryd healthcheck`, and the commands that
//! talk to a running daemon (`gate`, `rollout`, `events`; `client`).
//!
//! Each setting's flag comes from `config::RawConfig`, so the flags, the TOML keys and the
//! `CANARYD_*` variables cannot drift apart.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::client::gate::GateArgs;
use crate::client::operate::{EventsCommand, RolloutCommand};
use crate::config::RawConfig;

#[derive(Debug, Parser)]
#[command(
    name = "canaryd",
    version,
    about = "Decides whether a new version of a service is safe, from its OpenTelemetry data"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start-up: the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: OTLP receivers, engine and HTTP API.
    Serve(ServeArgs),
    /// Ask a running daemon's /healthz whether it is alive: exit 0 if it answers 2xx, 1 if not
    /// (a container's HEALTHCHECK).
    Healthcheck(HealthcheckArgs),
    /// Wait for a version's verdict and exit with it: 0 passed, 1 failed, 2 undecided at the
    /// deadline, 3 usage error or daemon unreachable (a CI/CD pipeline's gate).
    Gate(GateArgs),
    /// Declare, inspect, promote, pause, resume or abort an app's rollout.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// Read the event history, and follow it.
    #[command(subcommand)]
    Events(EventsCommand),
}

impl Command {
    /// Whether this is one of the commands that talk to a running daemon, whose usage errors
    /// exit 3 (`client::Exit`) rather than clap's 2.
    pub fn is_client(name: &str) -> bool {
        matches!(name, "gate" | "rollout" | "events")
    }
}

#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// The daemon's HTTP address, HOST:PORT; by default its http_addr setting from
    /// CANARYD_HTTP_ADDR, else 127.0.0.1:8080 (0.0.0.0 and :: are asked over loopback)
    #[arg(long)]
    pub addr: Option<String>,
    /// Seconds to wait for the answer
    #[arg(long, default_value_t = 3)]
    pub timeout_secs: u64,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file; its settings lose to CANARYD_* variables, which lose to flags.
    #[arg(long, short = 'c', env = "CANARYD_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: RawConfig,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_yes_no_setting_is_a_flag_that_takes_an_optional_value() {
        let settings = |args: &[&str]| {
            let cli = Cli::try_parse_from([&["canaryd", "serve"], args].concat()).expect("parses");
            let Command::Serve(serve) = cli.command else {
                panic!("serve parses as serve");
            };
            serve.settings.insecure_no_auth
        };
        assert_eq!(settings(&["--insecure-no-auth"]), Some(true));
        assert_eq!(settings(&["--insecure-no-auth", "false"]), Some(false));
        assert_eq!(settings(&[]), None);
    }
}
