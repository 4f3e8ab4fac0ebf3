//! The command line: `canaryd serve` and its flags.
//!
//! Each setting's flag comes from `config::RawConfig`, so the flags, the TOML keys and the
//! `CANARYD_*` variables cannot drift apart.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: OTLP receivers, engine and HTTP API.
    Serve(ServeArgs),
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
            let Command::Serve(serve) = cli.command;
            serve.settings.insecure_no_auth
        };
        assert_eq!(settings(&["--insecure-no-auth"]), Some(true));
        assert_eq!(settings(&["--insecure-no-auth", "false"]), Some(false));
        assert_eq!(settings(&[]), None);
    }
}
