//! A daemon as a user runs it: the real binary in its own process, on port 0, ready once its
//! addrs.json is written; signalled (SIGTERM, SIGKILL) as an operator or the kernel would.

use std::path::Path;
use std::process::{Command, Stdio};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

use super::poll_until;

pub const CANARYD: &str = env!("CARGO_BIN_EXE_canaryd");

/// `canaryd serve` on port 0 everywhere, but for the addresses `extra` sets itself.
pub fn serve(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(CANARYD);
    command.arg("serve").arg("--data-dir").arg(data_dir);
    for flag in ["--otlp-grpc-addr", "--otlp-http-addr", "--http-addr"] {
        if !extra.contains(&flag) {
            command.args([flag, "127.0.0.1:0"]);
        }
    }
    command
        .args(extra)
        .env_remove("CANARYD_CONFIG")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// A daemon process, ready (its addrs.json read).
pub struct Running {
    /// Taken by `wait`; a daemon still held when the test ends (it panicked) is killed.
    pub child: Option<std::process::Child>,
    pub addrs: serde_json::Value,
    pub http: reqwest::Client,
}

impl Running {
    pub fn start(data: &Path, extra: &[&str]) -> Running {
        Running::start_logging(data, extra, "info")
    }

    /// `start`, logging at `log` (its stderr is read only when it exits: a long run logs little,
    /// so that the pipe never fills and stalls it).
    pub fn start_logging(data: &Path, extra: &[&str], log: &str) -> Running {
        // What a killed daemon left behind must not pass for the new one's addresses.
        let _ = std::fs::remove_file(data.join("addrs.json"));
        let mut child = serve(data, extra, &[("CANARYD_LOG", log)])
            .spawn()
            .expect("spawn");
        let addrs_file = data.join("addrs.json");
        let addrs = poll_until("addrs.json", || {
            if let Some(status) = child.try_wait().expect("poll") {
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
                }
                panic!("daemon exited early ({status}): {stderr}");
            }
            let text = std::fs::read_to_string(&addrs_file).ok()?;
            Some(serde_json::from_str(&text).expect("addrs.json is whole JSON"))
        });
        Running {
            child: Some(child),
            addrs,
            http: reqwest::Client::new(),
        }
    }

    pub fn addr(&self, name: &str) -> &str {
        self.addrs[name].as_str().expect("address")
    }

    pub async fn post_traces(&self, request: &ExportTraceServiceRequest) {
        let response = self
            .http
            .post(format!("http://{}/v1/traces", self.addr("otlp_http")))
            .header("content-type", "application/x-protobuf")
            .body(prost::Message::encode_to_vec(request))
            .send()
            .await
            .expect("post");
        assert_eq!(response.status(), 200);
    }

    pub async fn get(&self, path: &str) -> String {
        let url = format!("http://{}{path}", self.addr("http"));
        let response = self.http.get(url).send().await.expect("get");
        assert!(response.status().is_success(), "{path}: {}", response.status());
        response.text().await.expect("body")
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Waits for the process to end; returns its exit code and stderr.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, std::process::Child::id)
    }

    pub fn wait(mut self) -> (Option<i32>, String) {
        let mut child = self.child.take().expect("waited once");
        let exit = poll_until("the daemon to exit", || child.try_wait().expect("poll"));
        let output = child.wait_with_output().expect("output");
        (exit.code(), String::from_utf8_lossy(&output.stderr).into_owned())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
