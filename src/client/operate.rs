//! Operator commands: `canaryd rollout start|status|promote|pause|resume|abort` and `canaryd events
//! tail [--follow]`, each one call (or stream) of the daemon's API, printed as text or JSON.

use reqwest::Method;
use serde_json::{Value, json};

use super::gate::{Output, progress_line};
use super::{Client, ClientError, Exit, ServerArgs, query, segment};

#[derive(Debug, clap::Args)]
pub struct AppArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The environment (deployment.environment.name)
    #[arg(long, default_value = "default")]
    pub env: String,
    /// The app (service.name, `namespace/` first when set)
    #[arg(long)]
    pub app: String,
    /// text: one line; json: the daemon's answer
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

#[derive(Debug, clap::Subcommand)]
pub enum RolloutCommand {
    /// Declare a rollout: judge --canary against --stable (PUT /api/v1/apps/{app}/rollout).
    #[command(
        after_help = "Examples:\n  canaryd rollout start --app checkout --env prod --stable 1.4.2 --canary 1.5.0 --model staged\n  canaryd rollout start --app checkout --stable 1.4.2 --canary 1.5.0 --model staged \\\n      --percentages 1,10,50,100 --sticky-header x-user-id --header x-canary=always --user alice@example.com"
    )]
    Start {
        #[command(flatten)]
        app: AppArgs,
        /// The stable version
        #[arg(long)]
        stable: String,
        /// The canary's version
        #[arg(long)]
        canary: String,
        /// The analysis model (models/NAME.toml); the daemon's default when left out
        #[arg(long)]
        model: Option<String>,
        /// Replace an analysis of other versions still under way
        #[arg(long)]
        replace: bool,
        #[command(flatten)]
        traffic: Box<TrafficArgs>,
    },
    /// Show the analysis: exit 0 healthy or promoted, 1 failing or rolled back, 2 otherwise.
    #[command(after_help = "Example:\n  canaryd rollout status --app checkout --env prod --output json")]
    Status {
        #[command(flatten)]
        app: AppArgs,
    },
    /// Promote the canary now, whatever its stage.
    Promote {
        #[command(flatten)]
        app: AppArgs,
    },
    /// Keep judging, but pass no stage and fail nothing until resumed.
    Pause {
        #[command(flatten)]
        app: AppArgs,
    },
    /// Let a paused analysis act again.
    Resume {
        #[command(flatten)]
        app: AppArgs,
    },
    /// Let an analysis waiting for approval enter its next stage.
    #[command(after_help = "Example:\n  CANARYD_TOKEN=... canaryd rollout approve --app checkout --env prod")]
    Approve {
        #[command(flatten)]
        app: AppArgs,
    },
    /// Fail the canary now (its weight goes to 0).
    #[command(after_help = "Example:\n  CANARYD_TOKEN=... canaryd rollout abort --app checkout --env prod")]
    Abort {
        #[command(flatten)]
        app: AppArgs,
    },
}

impl RolloutCommand {
    pub fn server(&self) -> &ServerArgs {
        match self {
            RolloutCommand::Start { app, .. }
            | RolloutCommand::Status { app }
            | RolloutCommand::Promote { app }
            | RolloutCommand::Pause { app }
            | RolloutCommand::Resume { app }
            | RolloutCommand::Approve { app }
            | RolloutCommand::Abort { app } => &app.server,
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum EventsCommand {
    /// Print the stored events (oldest first), and with --follow each new one as it is emitted.
    #[command(
        after_help = "Example:\n  canaryd events tail --env prod --app checkout --follow --output json"
    )]
    Tail(TailArgs),
}

#[derive(Debug, clap::Args)]
pub struct TailArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Only this environment's events
    #[arg(long)]
    pub env: Option<String>,
    /// Only this app's events
    #[arg(long)]
    pub app: Option<String>,
    /// How many of the latest stored events to print first
    #[arg(long, default_value_t = 20)]
    pub last: usize,
    /// Keep printing new events as they are emitted (across daemon restarts)
    #[arg(long)]
    pub follow: bool,
    /// text: one line per event; json: one CloudEvent per line
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// A declared rollout's traffic plan: each part given replaces the model's.
#[derive(Debug, Default, clap::Args)]
pub struct TrafficArgs {
    /// The canary's percentage in each of the model's stages, comma-separated (replaces the
    /// stages' weights)
    #[arg(long, value_delimiter = ',')]
    percentages: Option<Vec<f64>>,
    /// The header carrying a request's user id: the split hashes users, one user stays on one
    /// version
    #[arg(long, conflicts_with = "sticky_cookie")]
    sticky_header: Option<String>,
    /// The cookie carrying a request's user id (instead of --sticky-header)
    #[arg(long)]
    sticky_cookie: Option<String>,
    /// A header that always sends a request to the canary, NAME=VALUE; repeat for more
    #[arg(long = "header", value_parser = header_rule)]
    headers: Vec<(String, String)>,
    /// A user id that always reaches the canary; repeat for more
    #[arg(long = "user")]
    users: Vec<String>,
    /// A file of user ids that always reach the canary, one per line (blank lines and lines
    /// starting with # skipped)
    #[arg(long)]
    users_file: Option<std::path::PathBuf>,
}

fn header_rule(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?}: expected NAME=VALUE")),
    }
}

impl TrafficArgs {
    /// The request's `traffic` object: null when no part is given; an unreadable users file is
    /// a usage error.
    fn plan(&self) -> Result<serde_json::Value, String> {
        let mut plan = serde_json::Map::new();
        if let Some(percentages) = &self.percentages {
            plan.insert("percentages".into(), json!(percentages));
        }
        if let Some(name) = &self.sticky_header {
            plan.insert("sticky".into(), json!({ "header": name }));
        }
        if let Some(name) = &self.sticky_cookie {
            plan.insert("sticky".into(), json!({ "cookie": name }));
        }
        if !self.headers.is_empty() {
            let rules: Vec<_> = self
                .headers
                .iter()
                .map(|(name, value)| json!({ "name": name, "value": value }))
                .collect();
            plan.insert("headers".into(), json!(rules));
        }
        let mut users = self.users.clone();
        if let Some(path) = &self.users_file {
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("--users-file {}: {e}", path.display()))?;
            users.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_owned),
            );
        }
        if !users.is_empty() {
            plan.insert("users".into(), json!(users));
        }
        Ok(if plan.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::Value::Object(plan)
        })
    }
}

/// Runs a rollout command; its exit code.
pub async fn rollout(command: RolloutCommand, client: Client) -> Exit {
    let (app, answer) = match &command {
        RolloutCommand::Start {
            app,
            stable,
            canary,
            model,
            replace,
            traffic,
        } => {
            let traffic = match traffic.plan() {
                Ok(plan) => plan,
                Err(e) => {
                    eprintln!("canaryd rollout start: {e}");
                    return Exit::Usage;
                }
            };
            let body = json!({"stable_version": stable, "canary_version": canary, "model": model, "replace": replace, "traffic": traffic});
            (
                app,
                client
                    .call(Method::PUT, &app_path(app, "rollout"), Some(&body))
                    .await,
            )
        }
        RolloutCommand::Status { app } => (app, client.get(&app_path(app, "canary")).await),
        RolloutCommand::Promote { app } => (app, operate(&client, app, "promote").await),
        RolloutCommand::Pause { app } => (app, operate(&client, app, "pause").await),
        RolloutCommand::Resume { app } => (app, operate(&client, app, "resume").await),
        RolloutCommand::Approve { app } => (app, operate(&client, app, "approve").await),
        RolloutCommand::Abort { app } => (app, operate(&client, app, "abort").await),
    };
    let view: Value = match answer {
        Ok(view) => view,
        Err(e) => return failed(e, app.output),
    };
    let version = view["canary_version"].as_str().unwrap_or_default();
    match app.output {
        Output::Json => println!("{view}"),
        Output::Text => println!(
            "{} {} in {} against {}: {}",
            app.app,
            version,
            app.env,
            view["stable_version"].as_str().unwrap_or("?"),
            progress_line(Some(&view), version)
        ),
    }
    match (&command, view["state"].as_str()) {
        (RolloutCommand::Status { .. }, Some("healthy" | "promoted")) => Exit::Passed,
        (RolloutCommand::Status { .. }, Some("failing" | "rolled_back")) => Exit::Failed,
        (RolloutCommand::Status { .. }, _) => Exit::Undecided,
        _ => Exit::Passed,
    }
}

fn app_path(app: &AppArgs, rest: &str) -> String {
    format!(
        "/api/v1/apps/{}/{rest}?{}",
        segment(&app.app),
        query(&[("env", &app.env)])
    )
}

async fn operate(client: &Client, app: &AppArgs, operation: &str) -> Result<Value, ClientError> {
    client
        .call(Method::POST, &app_path(app, &format!("canary/{operation}")), None)
        .await
}

fn failed(e: ClientError, output: Output) -> Exit {
    eprintln!("canaryd: {e}");
    if output == Output::Json {
        println!(
            "{}",
            json!({"error": e.to_string(), "exit_code": e.exit().code()})
        );
    }
    e.exit()
}

/// Runs `events tail`; its exit code.
pub async fn events(command: EventsCommand, client: Client) -> Exit {
    let EventsCommand::Tail(args) = command;
    match tail(&args, &client).await {
        Ok(()) => Exit::Passed,
        Err(e) => failed(e, args.output),
    }
}

async fn tail(args: &TailArgs, client: &Client) -> Result<(), ClientError> {
    let env = args.env.as_deref().unwrap_or_default();
    let app = args.app.as_deref().unwrap_or_default();
    // Every page up to the end, keeping the last `--last`: the API pages oldest first.
    let (mut kept, mut since) = (std::collections::VecDeque::new(), String::new());
    loop {
        let mut pairs = vec![("limit", "1000")];
        for (key, value) in [("env", env), ("app", app), ("since", since.as_str())] {
            if !value.is_empty() {
                pairs.push((key, value));
            }
        }
        let page: Value = client.get(&format!("/api/v1/events?{}", query(&pairs))).await?;
        let events = page["events"].as_array().cloned().unwrap_or_default();
        let full = events.len() == 1000;
        for event in events {
            kept.push_back(event);
            if kept.len() > args.last {
                kept.pop_front();
            }
        }
        if let Some(id) = page["last_id"].as_str() {
            since = id.to_owned();
        }
        if !full {
            break;
        }
    }
    for event in &kept {
        print_event(event, args.output);
    }
    if !args.follow {
        return Ok(());
    }
    let mut stream = client.follow(env, app, &since);
    loop {
        let event = stream.next().await?;
        match serde_json::from_str::<Value>(&event.cloudevent_json) {
            Ok(event) => print_event(&event, args.output),
            Err(e) => tracing::warn!(id = %event.id, "an event that is not JSON: {e}"),
        }
    }
}

fn print_event(event: &Value, output: Output) {
    match output {
        Output::Json => println!("{event}"),
        Output::Text => {
            let data = &event["data"];
            let reason = data["reasons"][0]["message"].as_str().unwrap_or_default();
            println!(
                "{} {} {} {}/{} {} {}{}",
                event["time"].as_str().unwrap_or("?"),
                event["id"].as_str().unwrap_or("?"),
                event["type"]
                    .as_str()
                    .unwrap_or("?")
                    .trim_start_matches("canaryd."),
                data["env"].as_str().unwrap_or("?"),
                data["app"].as_str().unwrap_or("?"),
                data["version"].as_str().unwrap_or("-"),
                data["state"].as_str().unwrap_or("?"),
                if reason.is_empty() {
                    String::new()
                } else {
                    format!(": {reason}")
                }
            );
        }
    }
}
