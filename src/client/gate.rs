//! `canaryd gate`: a pipeline step that waits for a version's verdict and exits with it.
//!
//! The verdict of `--version` is read from the app's analysis when it is about that version, else
//! from the last final event about it (`promoted`, `failed`, `rolled_back`, `ended`), so a gate run
//! after the fact still knows. With `--wait` it follows the app's Watch stream from the last event
//! it read (none missed between the two), re-reads the analysis on each event about the version
//! and every couple of seconds for the progress line, and reconnects with backoff when the daemon
//! goes away (a restart mid-analysis loses nothing: the stream resumes after the last id seen).

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::time::Instant;

use super::{Client, ClientError, Exit, ServerArgs, query, segment};

/// How the result is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Exit codes: 0 passed (promoted), 1 failed or rolled back, 2 timed out or still \
undecided (insufficient data) at the deadline, or the rollout ended without a verdict, 3 usage error \
or daemon unreachable after retries.

Examples:
  canaryd gate --server http://canaryd:8080 --env prod --app checkout --version 1.5.0 --wait --timeout 45m
  CANARYD_TOKEN=... canaryd gate --app checkout --version 1.5.0 --output json"
)]
pub struct GateArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The environment (deployment.environment.name)
    #[arg(long, default_value = "default")]
    pub env: String,
    /// The app (service.name, `namespace/` first when set)
    #[arg(long)]
    pub app: String,
    /// The canary's version (service.version)
    #[arg(long)]
    pub version: String,
    /// Follow the analysis until its verdict is final (else report it as it is now)
    #[arg(long)]
    pub wait: bool,
    /// With --wait: how long to wait for a final verdict
    #[arg(long, default_value = "30m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// text: a progress line and a summary; json: the final verdict with every check's evidence
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// A version's verdict, as far as it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Passed,
    Failed,
    /// Its rollout ended (replaced or deleted) without a verdict.
    Ended,
    /// Not final yet.
    Pending,
}

/// The final event types, and what each says of its version.
fn verdict_of_event(event_type: &str) -> Option<Verdict> {
    match event_type {
        "canaryd.canary.promoted" => Some(Verdict::Passed),
        "canaryd.canary.failed" | "canaryd.canary.rolled_back" => Some(Verdict::Failed),
        "canaryd.canary.ended" => Some(Verdict::Ended),
        _ => None,
    }
}

/// The verdict of `version` from the app's analysis (when it is about that version) and the last
/// final event about it.
pub fn judge(version: &str, analysis: Option<&Value>, last_final: Option<&Value>) -> Verdict {
    if let Some(a) = analysis
        && a["canary_version"] == version
    {
        return match a["state"].as_str() {
            Some("promoted") => Verdict::Passed,
            Some("failing" | "rolled_back") => Verdict::Failed,
            _ => Verdict::Pending,
        };
    }
    last_final
        .and_then(|e| e["type"].as_str())
        .and_then(verdict_of_event)
        .unwrap_or(Verdict::Pending)
}

/// What the gate knows: the analysis, the last final event about the version, and the id to
/// resume the stream after.
struct Known {
    analysis: Option<Value>,
    last_final: Option<Value>,
    last_id: String,
}

/// Every event of the app, oldest first, page by page: the last final one about `version`, and
/// the last id.
async fn history(
    client: &Client,
    env: &str,
    app: &str,
    version: &str,
) -> Result<(Option<Value>, String), ClientError> {
    let (mut last_final, mut since) = (None, String::new());
    loop {
        let mut pairs = vec![("env", env), ("app", app), ("limit", "1000")];
        if !since.is_empty() {
            pairs.push(("since", since.as_str()));
        }
        let page: Value = client.get(&format!("/api/v1/events?{}", query(&pairs))).await?;
        let events = page["events"].as_array().cloned().unwrap_or_default();
        for event in &events {
            if event["data"]["version"] == version
                && event["type"].as_str().and_then(verdict_of_event).is_some()
            {
                last_final = Some(event.clone());
            }
        }
        match page["last_id"].as_str() {
            Some(id) if events.len() == 1000 => since = id.to_owned(),
            Some(id) => return Ok((last_final, id.to_owned())),
            None => return Ok((last_final, since)),
        }
    }
}

/// The app's current analysis; None while it has none (or the app is unknown yet).
async fn analysis(client: &Client, env: &str, app: &str) -> Result<Option<Value>, ClientError> {
    let path = format!("/api/v1/apps/{}/canary?{}", segment(app), query(&[("env", env)]));
    match client.get(&path).await {
        Ok(view) => Ok(Some(view)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

/// Runs the gate; the exit code, after printing the result.
pub async fn run(args: GateArgs, client: Client) -> Exit {
    let deadline = Instant::now() + args.timeout;
    let mut progress = Progress::new(&args);
    let outcome = follow(&args, &client, deadline, &mut progress).await;
    progress.clear();
    match outcome {
        Ok((verdict, known)) => report(&args, verdict, &known, deadline),
        Err(e) => {
            let exit = e.exit();
            eprintln!("canaryd gate: {e}");
            if args.output == Output::Json {
                let answer = json!({"verdict": "error", "exit_code": exit.code(), "error": e.to_string()});
                println!("{answer}");
            }
            github_output(if exit == Exit::Usage {
                "unreachable"
            } else {
                "error"
            });
            exit
        }
    }
}

async fn follow(
    args: &GateArgs,
    client: &Client,
    deadline: Instant,
    progress: &mut Progress,
) -> Result<(Verdict, Known), ClientError> {
    let (last_final, last_id) = history(client, &args.env, &args.app, &args.version).await?;
    let mut known = Known {
        analysis: analysis(client, &args.env, &args.app).await?,
        last_final,
        last_id,
    };
    let mut verdict = judge(&args.version, known.analysis.as_ref(), known.last_final.as_ref());
    if !args.wait || verdict != Verdict::Pending {
        progress.show(known.analysis.as_ref(), &args.version, deadline);
        return Ok((verdict, known));
    }
    let mut events = client.follow(&args.env, &args.app, &known.last_id);
    let mut refresh = tokio::time::interval(Duration::from_secs(2));
    while verdict == Verdict::Pending && Instant::now() < deadline {
        progress.show(known.analysis.as_ref(), &args.version, deadline);
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            event = events.next() => {
                let event = event?;
                known.last_id = event.id.clone();
                if event.version != args.version {
                    continue;
                }
                if verdict_of_event(&event.r#type).is_some() {
                    known.last_final = serde_json::from_str(&event.cloudevent_json).ok();
                }
            },
            _ = refresh.tick() => {}
        }
        match tokio::time::timeout_at(deadline, analysis(client, &args.env, &args.app)).await {
            Ok(Ok(a)) => known.analysis = a,
            Ok(Err(e)) => return Err(e),
            Err(_) => break,
        }
        verdict = judge(&args.version, known.analysis.as_ref(), known.last_final.as_ref());
    }
    // The state it ended in, so a log never stops at a line older than the verdict (an analysis
    // can start and end between two looks).
    progress.show(known.analysis.as_ref(), &args.version, deadline);
    Ok((verdict, known))
}

/// The verdict's name, its exit code, and the reason in words.
fn conclude(
    args: &GateArgs,
    verdict: Verdict,
    known: &Known,
    deadline: Instant,
) -> (&'static str, Exit, String) {
    let about = known
        .analysis
        .as_ref()
        .filter(|a| a["canary_version"] == args.version.as_str());
    let state = about.and_then(|a| a["state"].as_str()).unwrap_or("unknown");
    match verdict {
        Verdict::Passed => ("passed", Exit::Passed, "promoted".into()),
        Verdict::Failed => (
            "failed",
            Exit::Failed,
            format!("{state}: {}", failing_reasons(known)),
        ),
        Verdict::Ended => (
            "ended",
            Exit::Undecided,
            "its rollout ended (replaced or deleted) without a verdict".into(),
        ),
        Verdict::Pending if !args.wait => ("undecided", Exit::Undecided, format!("not final yet ({state})")),
        Verdict::Pending if state == "insufficient_data" => (
            "insufficient_data",
            Exit::Undecided,
            format!(
                "still insufficient data after {}",
                humantime::format_duration(args.timeout)
            ),
        ),
        Verdict::Pending => (
            "timed_out",
            Exit::Undecided,
            format!(
                "no final verdict after {} ({state}{})",
                humantime::format_duration(args.timeout),
                if Instant::now() < deadline {
                    ""
                } else {
                    " at the deadline"
                }
            ),
        ),
    }
}

/// The failing checks and gates, or the final event's reasons.
fn failing_reasons(known: &Known) -> String {
    let mut reasons: Vec<String> = Vec::new();
    if let Some(event) = &known.last_final {
        for r in event["data"]["reasons"].as_array().into_iter().flatten() {
            reasons.push(r["message"].as_str().unwrap_or_default().to_owned());
        }
    }
    if reasons.is_empty()
        && let Some(a) = &known.analysis
    {
        for c in a["checks"].as_array().into_iter().flatten() {
            if c["outcome"] == "fail" {
                reasons.push(format!(
                    "{}: {}",
                    c["id"].as_str().unwrap_or("?"),
                    c["message"].as_str().unwrap_or("")
                ));
            }
        }
    }
    if reasons.is_empty() {
        "no reason given".into()
    } else {
        reasons.join("; ")
    }
}

fn report(args: &GateArgs, verdict: Verdict, known: &Known, deadline: Instant) -> Exit {
    let (name, exit, why) = conclude(args, verdict, known, deadline);
    let analysis = known
        .analysis
        .as_ref()
        .filter(|a| a["canary_version"] == args.version.as_str());
    match args.output {
        Output::Json => {
            let answer = json!({
                "verdict": name,
                "exit_code": exit.code(),
                "env": args.env,
                "app": args.app,
                "version": args.version,
                "reason": why,
                "state": analysis.and_then(|a| a.get("state")),
                "score": analysis.and_then(|a| a.get("score")),
                "event": known.last_final,
                "analysis": analysis,
            });
            println!("{answer}");
        }
        Output::Text => {
            println!("{} {} in {}: {name}: {why}", args.app, args.version, args.env);
        }
    }
    github_output(name);
    step_summary(args, name, &why, analysis);
    exit
}

/// `verdict=...` for the steps after this one, when run as a GitHub Actions step.
fn github_output(verdict: &str) {
    if let Some(path) = std::env::var_os("GITHUB_OUTPUT") {
        append(Path::new(&path), &format!("verdict={verdict}\n"));
    }
}

/// The checks as a markdown table in the job's summary, when run as a GitHub Actions step.
fn step_summary(args: &GateArgs, verdict: &str, why: &str, analysis: Option<&Value>) {
    let Some(path) = std::env::var_os("GITHUB_STEP_SUMMARY") else {
        return;
    };
    append(Path::new(&path), &summary_markdown(args, verdict, why, analysis));
}

fn summary_markdown(args: &GateArgs, verdict: &str, why: &str, analysis: Option<&Value>) -> String {
    let cell = |v: &Value| match v {
        Value::Null => String::new(),
        Value::Number(n) => n
            .as_f64()
            .map_or_else(|| n.to_string(), |x| format!("{}", (x * 1e4).round() / 1e4)),
        Value::String(s) => s.replace('|', "\\|").replace('\n', " "),
        other => other.to_string().replace('|', "\\|"),
    };
    let mut md = format!(
        "### canaryd gate: `{}` `{}` in `{}`: **{verdict}**\n\n{}\n\n",
        args.app,
        args.version,
        args.env,
        cell(&Value::String(why.to_owned()))
    );
    let checks = analysis.and_then(|a| a["checks"].as_array());
    if let Some(checks) = checks.filter(|c| !c.is_empty()) {
        md.push_str(
            "| check | outcome | canary | baseline | samples | message |\n|---|---|---|---|---|---|\n",
        );
        for c in checks {
            md.push_str(&format!(
                "| `{}` | {} | {} | {} | {} | {} |\n",
                cell(&c["id"]),
                cell(&c["outcome"]),
                cell(&c["canary_value"]),
                cell(&c["baseline_value"]),
                cell(&c["canary_samples"]),
                cell(&c["message"]),
            ));
        }
        md.push('\n');
    }
    md
}

fn append(path: &Path, text: &str) {
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()));
    if let Err(e) = written {
        eprintln!("canaryd gate: cannot write {}: {e}", path.display());
    }
}

/// The progress line: a live spinner line on a terminal, one line per change in a log.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    last: String,
    quiet: bool,
}

impl Progress {
    fn new(args: &GateArgs) -> Progress {
        let terminal = std::io::stderr().is_terminal();
        let bar = (terminal && args.wait).then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            bar,
            last: String::new(),
            quiet: !args.wait,
        }
    }

    fn show(&mut self, analysis: Option<&Value>, version: &str, deadline: Instant) {
        if self.quiet {
            return;
        }
        let line = progress_line(analysis, version);
        let left = deadline.saturating_duration_since(Instant::now());
        match &self.bar {
            Some(bar) => bar.set_message(format!(
                "{line} · {} left",
                humantime::format_duration(Duration::from_secs(left.as_secs()))
            )),
            None if line != self.last => eprintln!("{line}"),
            None => {}
        }
        self.last = line;
    }

    fn clear(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// Stage, weight, state and the checks' outcomes, in one line.
pub fn progress_line(analysis: Option<&Value>, version: &str) -> String {
    let Some(a) = analysis.filter(|a| a["canary_version"] == version) else {
        return format!("waiting for an analysis of {version}");
    };
    let count = |outcome: &str| {
        a["checks"]
            .as_array()
            .map_or(0, |c| c.iter().filter(|c| c["outcome"] == outcome).count())
    };
    let stage = match a["stage"].as_object() {
        Some(s) => format!(
            "stage {} of {} ({}, weight {})",
            s.get("index").and_then(Value::as_u64).unwrap_or(0) + 1,
            a["stages"].as_u64().unwrap_or(0),
            s.get("name").and_then(Value::as_str).unwrap_or("?"),
            s.get("weight").and_then(Value::as_f64).unwrap_or(0.0)
        ),
        None => "no stages".into(),
    };
    let waiting = match (a["awaiting_approval"].is_string(), a["blocked_by"].as_str()) {
        (true, _) => " · next stage awaiting approval".to_owned(),
        (false, Some(env)) => format!(" · blocked by {env}"),
        (false, None) => String::new(),
    };
    format!(
        "{stage} · {}{waiting} · checks {} passed, {} failed, {} undecided",
        a["state"].as_str().unwrap_or("?"),
        count("pass"),
        count("fail"),
        count("insufficient_data") + count("marginal"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn analysis(canary: &str, state: &str) -> Value {
        json!({"canary_version": canary, "stable_version": "1.0.0", "state": state, "stages": 2,
               "stage": {"index": 0, "name": "10%", "weight": 10.0},
               "checks": [{"id": "errors:error_ratio:fisher_exact:60", "outcome": "fail", "message": "5% | 0.1%"},
                          {"id": "latency:latency_p99_ms:exceedance:60", "outcome": "pass", "message": "ok"},
                          {"id": "baseline:error_ratio:band:60", "outcome": "insufficient_data", "message": "more"}]})
    }

    #[test]
    fn the_analysis_about_the_version_decides_else_its_last_final_event() {
        let failed_event = json!({"type": "canaryd.canary.failed", "data": {"version": "2.0.0"}});
        assert_eq!(
            judge("2.0.0", Some(&analysis("2.0.0", "promoted")), None),
            Verdict::Passed
        );
        assert_eq!(
            judge("2.0.0", Some(&analysis("2.0.0", "rolled_back")), None),
            Verdict::Failed
        );
        assert_eq!(
            judge("2.0.0", Some(&analysis("2.0.0", "healthy")), Some(&failed_event)),
            Verdict::Pending
        );
        // Another version's analysis: the history speaks for this one.
        assert_eq!(
            judge("2.0.0", Some(&analysis("3.0.0", "healthy")), Some(&failed_event)),
            Verdict::Failed
        );
        let ended = json!({"type": "canaryd.canary.ended"});
        assert_eq!(judge("2.0.0", None, Some(&ended)), Verdict::Ended);
        assert_eq!(judge("2.0.0", None, None), Verdict::Pending);
    }

    #[test]
    fn the_progress_line_counts_the_checks() {
        let line = progress_line(Some(&analysis("2.0.0", "failing")), "2.0.0");
        assert_eq!(
            line,
            "stage 1 of 2 (10%, weight 10) · failing · checks 1 passed, 1 failed, 1 undecided"
        );
        assert_eq!(progress_line(None, "2.0.0"), "waiting for an analysis of 2.0.0");
    }

    #[test]
    fn the_step_summary_is_a_markdown_table_with_cells_escaped() {
        let args = GateArgs {
            server: ServerArgs {
                server: "http://x".into(),
                grpc: None,
                token_file: None,
                retry_for: Duration::from_secs(1),
            },
            env: "prod".into(),
            app: "shop".into(),
            version: "2.0.0".into(),
            wait: true,
            timeout: Duration::from_secs(60),
            output: Output::Text,
        };
        let a = analysis("2.0.0", "failing");
        let md = summary_markdown(&args, "failed", "failing", Some(&a));
        assert!(
            md.starts_with("### canaryd gate: `shop` `2.0.0` in `prod`: **failed**"),
            "{md}"
        );
        assert!(
            md.contains("| check | outcome | canary | baseline | samples | message |"),
            "{md}"
        );
        assert!(
            md.contains("| `errors:error_ratio:fisher_exact:60` | fail |  |  |  | 5% \\| 0.1% |"),
            "{md}"
        );
        assert_eq!(md.matches("\n| `").count(), 3, "{md}");
    }
}
