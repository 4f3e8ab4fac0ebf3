//! The container image, checked without a Docker engine (none runs where the tests run): the
//! Dockerfile's build step is README's, and the binary started with the image's command and
//! settings (on free ports, a temporary data dir and the repo's models) refuses to listen beyond
//! loopback without a token, starts with one, and passes the image's HEALTHCHECK, which fails once
//! the daemon is gone. The Kubernetes base's config file is a config the daemon takes
//! (`tests/sdk/test_kubernetes.py` renders and validates the manifests themselves).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use support::poll_until;

mod support;

const CANARYD: &str = env!("CARGO_BIN_EXE_canaryd");

/// What the runtime stage of the Dockerfile says.
struct Image {
    /// The build stage's `RUN cargo ...` command.
    build: String,
    env: BTreeMap<String, String>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    healthcheck: Vec<String>,
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A JSON-array (exec form) instruction's arguments.
fn exec_form(text: &str) -> Vec<String> {
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{text:?} is not exec form: {e}"))
}

fn read_image() -> Image {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    // Instructions, with continuation lines joined and comments left out.
    let mut instructions: Vec<String> = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    let mut image = Image {
        build: String::new(),
        env: BTreeMap::new(),
        entrypoint: Vec::new(),
        cmd: Vec::new(),
        healthcheck: Vec::new(),
    };
    let mut stage = 0;
    for instruction in instructions {
        let (keyword, rest) = instruction.split_once(' ').unwrap_or((&instruction, ""));
        match keyword {
            "FROM" => stage += 1,
            "RUN" if stage == 1 && rest.starts_with("cargo ") => image.build = rest.to_owned(),
            "ENV" if stage == 2 => {
                for pair in rest.split_whitespace() {
                    let (key, value) = pair.split_once('=').expect("ENV KEY=VALUE");
                    image.env.insert(key.to_owned(), value.to_owned());
                }
            }
            "ENTRYPOINT" if stage == 2 => image.entrypoint = exec_form(rest),
            "CMD" if stage == 2 => image.cmd = exec_form(rest),
            "HEALTHCHECK" if stage == 2 => {
                let (_, cmd) = rest.split_once("CMD ").expect("HEALTHCHECK ... CMD [...]");
                image.healthcheck = exec_form(cmd);
            }
            _ => {}
        }
    }
    assert_eq!(stage, 2, "a build stage and a runtime stage");
    image
}

/// The image's program with `args`, the image's settings and `env` over them, and nothing of the
/// test's own `CANARYD_*` environment.
fn run_as_image(image: &Image, args: &[String], env: &BTreeMap<String, String>) -> Command {
    let (program, rest) = args.split_first().expect("a program");
    assert_eq!(program, "canaryd", "the image runs canaryd from its PATH");
    let mut command = Command::new(CANARYD);
    command.args(rest);
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("CANARYD_")) {
        command.env_remove(key);
    }
    command
        .envs(&image.env)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// The image's settings with a temporary data dir, the repo's models and free ports on the same
/// interfaces.
fn local_settings(image: &Image, data: &Path) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("CANARYD_DATA_DIR".to_owned(), data.display().to_string());
    env.insert(
        "CANARYD_MODELS_DIR".to_owned(),
        repo().join("models").display().to_string(),
    );
    for key in [
        "CANARYD_OTLP_GRPC_ADDR",
        "CANARYD_OTLP_HTTP_ADDR",
        "CANARYD_HTTP_ADDR",
    ] {
        let addr = image
            .env
            .get(key)
            .unwrap_or_else(|| panic!("the image sets {key}"));
        let (host, _) = addr.rsplit_once(':').expect("HOST:PORT");
        env.insert(key.to_owned(), format!("{host}:0"));
    }
    env
}

#[test]
fn the_image_builds_as_readme_says() {
    let image = read_image();
    assert_eq!(image.build, "cargo build --release --locked --bin canaryd");
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README");
    assert!(
        readme.contains(&image.build),
        "README shows the image's build step `{}`",
        image.build
    );
    assert!(
        readme.contains("docker build") && readme.contains("docker run"),
        "README shows how to build and run the image"
    );
    for shipped in &image.entrypoint {
        assert_eq!(shipped, "canaryd");
    }
}

#[test]
fn the_image_refuses_an_open_api_starts_with_a_token_and_passes_its_healthcheck() {
    let image = read_image();
    let command: Vec<String> = image.entrypoint.iter().chain(&image.cmd).cloned().collect();
    assert_eq!(command, ["canaryd", "serve"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut env = local_settings(&image, &data);

    // Beyond loopback without a token: refused, naming the setting.
    let refused = run_as_image(&image, &command, &env).output().expect("runs");
    assert!(!refused.status.success(), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("api_token"), "{stderr}");

    env.insert("CANARYD_API_TOKEN".to_owned(), "image-test-token".to_owned());
    let mut daemon = run_as_image(&image, &command, &env).spawn().expect("spawn");
    let addrs: serde_json::Value = poll_until("addrs.json", || {
        assert!(
            daemon.try_wait().expect("poll").is_none(),
            "the daemon exited early"
        );
        let text = std::fs::read_to_string(data.join("addrs.json")).ok()?;
        serde_json::from_str(&text).ok()
    });
    let http = addrs["http"].as_str().expect("http address").to_owned();
    assert!(http.starts_with("0.0.0.0:"), "listens on every interface: {http}");

    // The HEALTHCHECK as the image runs it, where the daemon listens.
    let probe_env = BTreeMap::from([("CANARYD_HTTP_ADDR".to_owned(), http.clone())]);
    let probe = |env: &BTreeMap<String, String>| {
        run_as_image(&image, &image.healthcheck, env)
            .output()
            .expect("healthcheck runs")
    };
    let healthy = probe(&probe_env);
    assert!(healthy.status.success(), "{healthy:?}");

    daemon.kill().expect("kill");
    daemon.wait().expect("wait");
    let gone = probe(&probe_env);
    assert_eq!(gone.status.code(), Some(1), "{gone:?}");
    let stderr = String::from_utf8_lossy(&gone.stderr);
    assert!(stderr.contains("healthz"), "{stderr}");
}

/// The cluster's config file (deploy/kubernetes/base, the ConfigMap canaryd-config) is one the
/// daemon takes: with the Secret's token it resolves, listening where the Services point; without
/// it, it is refused as the image's settings are.
#[test]
fn the_kubernetes_config_file_is_a_daemon_config() {
    use canaryd::config::{Config, RawConfig};
    let file = repo().join("deploy/kubernetes/base/canaryd.toml");
    let with_token = BTreeMap::from([("CANARYD_API_TOKEN".to_owned(), "t".repeat(32))]);
    let config = Config::load(Some(&file), &with_token, RawConfig::default()).expect("a valid config");
    assert_eq!(config.http_addr.to_string(), "0.0.0.0:8080");
    assert_eq!(config.otlp_grpc_addr.to_string(), "0.0.0.0:4317");
    assert_eq!(config.otlp_http_addr.to_string(), "0.0.0.0:4318");
    assert_eq!(config.data_dir, Path::new("/var/lib/canaryd"));
    let image = read_image();
    assert_eq!(
        image.env.get("CANARYD_DATA_DIR").map(String::as_str),
        Some("/var/lib/canaryd"),
        "the image's volume is the cluster's data dir"
    );
    let refused = Config::load(Some(&file), &BTreeMap::new(), RawConfig::default())
        .expect_err("no token beyond loopback")
        .to_string();
    assert!(refused.contains("api_token"), "{refused}");
}
