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

/// How long a wholly free page stays mapped before mimalloc gives it back to the OS. Under load,
/// the pages a request's buffers and observations free are wanted again within milliseconds:
/// given back at once (a delay of 0, as from 5b97aa2), each was unmapped and faulted in again, and
/// that cost the daemon a sixth of its CPU on the gRPC load bench (`madvise`, TLB shootdowns, page
/// faults: BENCHMARKS.md, ingest throughput). 100 ms covers that reuse.
#[cfg(not(feature = "system-allocator"))]
const PURGE_DELAY_MS: std::ffi::c_long = 100;

/// How often a thread of its own has mimalloc give back the pages left free. mimalloc purges only
/// from within an allocation or a collection, so after an ingest peak, with every thread idle,
/// freed pages would stay mapped (1.1 KB a series more at 100k on the series bench without
/// purging: BENCHMARKS.md, memory per series).
#[cfg(not(feature = "system-allocator"))]
const PURGE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Keeps the daemon's resident memory to what it uses: no transparent huge pages, and pages left
/// free given back to the OS within about a second, even while every other thread idles.
/// `MIMALLOC_ALLOW_THP` and `MIMALLOC_PURGE_DELAY` in the environment still decide when set.
fn give_freed_pages_back() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        refuse_transparent_huge_pages();
    }
    #[cfg(not(feature = "system-allocator"))]
    {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            // SAFETY: sets one of mimalloc's options, a plain integer it reads when it purges; no
            // memory is touched and any value is valid.
            unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) }
        }
        let purger = std::thread::Builder::new()
            .name("canaryd-purge".into())
            .spawn(|| {
                // mimalloc collects only from a thread whose heap is in use: this makes it so.
                std::hint::black_box(Vec::<u8>::with_capacity(64));
                loop {
                    std::thread::sleep(PURGE_EVERY);
                    purge_free_pages();
                }
            });
        if let Err(e) = purger {
            // Memory given back later is not worth refusing to start over. Logging is not set up
            // yet at this point of the start.
            eprintln!("canaryd: warning: cannot start the allocator's purging thread: {e}");
        }
    }
}

/// Gives every page that mimalloc holds free back to the OS now, whether or not its delay has run
/// out: at most once a `PURGE_EVERY`, a page about to be used again costs one fault more.
#[cfg(not(feature = "system-allocator"))]
fn purge_free_pages() {
    // SAFETY: a forced collection of the calling thread's own heap (empty but for one block),
    // which also purges mimalloc's arenas program wide; mimalloc allows it at any time and it
    // touches no memory in use.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Has Linux back this process's memory with 4 KiB pages only. mimalloc asks for huge pages
/// (2 MiB) for its arenas where the system allows them on request, as most do; a huge page is
/// resident whole once any byte of it is touched, and split only when a part of it is given back.
/// The series bench read 50 MiB less RSS with them off at 100k series (229 -> 176 MiB, 1.65 KB a
/// series) and the load bench the same spans per daemon-CPU-second (BENCHMARKS.md, memory per
/// series).
fn refuse_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: PR_SET_THP_DISABLE sets one flag of this process; its arguments are integers.
        let set = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
        if set != 0 {
            eprintln!(
                "canaryd: warning: cannot turn transparent huge pages off: {}",
                std::io::Error::last_os_error()
            );
        }
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
    use std::io::Read;

    /// This process's resident set in pages, read without allocating: an allocation on this
    /// thread could purge in its own right and hide whether the purging thread did.
    fn resident_pages() -> u64 {
        let mut text = [0u8; 256];
        let read = std::fs::File::open("/proc/self/statm")
            .and_then(|mut file| file.read(&mut text))
            .expect("read /proc/self/statm");
        // "size resident shared ...": the second field.
        let resident = text[..read]
            .split(|b| *b == b' ')
            .nth(1)
            .expect("statm has a resident field");
        resident
            .iter()
            .fold(0u64, |n, digit| n * 10 + u64::from(digit - b'0'))
    }

    /// The purge delay (its default, one second) becomes `PURGE_DELAY_MS` unless the environment
    /// sets it; transparent huge pages are off; and pages freed by a thread that then idles go
    /// back to the OS with no other thread allocating, as they would not with the delay alone.
    #[test]
    fn freed_pages_go_back_while_every_thread_idles() {
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
            PURGE_DELAY_MS
        );
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
            // SAFETY: reads one flag of this process.
            assert_eq!(unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) }, 1);
        }

        // 64 MiB in blocks of 2 MiB, each a page of its own that goes back to mimalloc's arena
        // when freed; the thread then idles, as a receiving thread does after a peak.
        const BLOCKS: usize = 32;
        const BLOCK: usize = 2 << 20;
        let page = 4096;
        let (freed, wait_freed) = std::sync::mpsc::channel();
        let (release, idle) = std::sync::mpsc::channel::<()>();
        let before = resident_pages();
        let idler = std::thread::spawn(move || {
            let blocks: Vec<Vec<u8>> = (0..BLOCKS).map(|i| vec![i as u8 + 1; BLOCK]).collect();
            let held = resident_pages();
            drop(std::hint::black_box(blocks));
            freed.send(held).expect("the test waits");
            let _ = idle.recv();
        });
        let held = wait_freed.recv().expect("the idler frees its blocks");
        let grown = held.saturating_sub(before);
        assert!(
            grown * page >= (BLOCKS * BLOCK / 2) as u64,
            "the blocks were resident: {grown} pages more"
        );
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while resident_pages() + grown / 2 > held {
            assert!(
                std::time::Instant::now() < deadline,
                "64 MiB freed still resident after 10 s: {} pages, {held} when held",
                resident_pages()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        drop(release);
        idler.join().expect("the idler ends");
    }
}
