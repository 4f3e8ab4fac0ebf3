//! `canaryd-lab`: canaryd's offline tools, run against the daemon's own engine and store (the
//! `canaryd-engine` and `canaryd-store` crates; not the daemon's, whose settings the lab reads for
//! itself in `settings`).
//!
//! Kept in a crate of its own because it carries polars, which the daemon's build must not.

mod import;
mod nab;
mod settings;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "canaryd-lab", version, about = "canaryd's offline tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Teach baselines from a metric history (CSV or Parquet: timestamp, [env,] app, version,
    /// feature, value), so that a new install starts with seasonality learned. Stop the daemon
    /// that uses the data dir first.
    Import {
        /// The daemon's data dir.
        #[arg(long)]
        data_dir: PathBuf,
        /// The daemon's config file, for its baseline settings (half-lives, window length).
        #[arg(long)]
        config: Option<PathBuf>,
        /// The history file (.csv or .parquet).
        file: PathBuf,
    },
    /// Run canaryd's baseline engine, with the daemon's settings, over the Numenta Anomaly
    /// Benchmark: every <category>/<name>.csv under --data, scored to <out>/<category>/<name>.csv
    /// for NAB's scorer.
    Nab {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// A daemon config file whose baseline and anomaly settings to run instead of the
        /// defaults (`CANARYD_*` variables win over it, as in the daemon).
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("canaryd-lab: {}", causes_once(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once: many errors (the store's, polars') already end
/// with their cause's words, which `{e:#}` would repeat.
fn causes_once(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Import {
            data_dir,
            config,
            file,
        } => {
            let env = std::env::vars().collect();
            let settings = settings::read(config.as_deref(), &env)?;
            let summary = import::import(&data_dir, &file, settings.engine, settings.sled_cache_bytes)?;
            println!(
                "imported {} of {} rows into {} baselines in {}",
                summary.imported,
                summary.rows,
                summary.baselines,
                data_dir.display()
            );
            if summary.skipped > 0 {
                println!("skipped {} rows:", summary.skipped);
                for reason in &summary.reasons {
                    println!("  {reason}");
                }
            }
            Ok(())
        }
        Command::Nab { data, out, config } => {
            let env = std::env::vars().collect();
            let settings = settings::read(config.as_deref(), &env)?;
            let results = nab::run(&data, &out, &settings.engine)?;
            let rows: usize = results.iter().sum();
            println!(
                "scored {} files ({rows} rows) into {}",
                results.len(),
                out.display()
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_already_said_is_not_repeated() {
        let lock = std::io::Error::other("could not acquire lock on \"data/sled/db\"");
        let e = anyhow::Error::new(lock)
            .context("cannot open the store in data/sled: could not acquire lock on \"data/sled/db\"");
        assert_eq!(
            causes_once(&e),
            "cannot open the store in data/sled: could not acquire lock on \"data/sled/db\""
        );
        let e = anyhow::Error::new(std::io::Error::other("refused")).context("cannot connect");
        assert_eq!(causes_once(&e), "cannot connect: refused");
    }
}
