//! Signed approval links: a stage that waits for a person's approval goes out in its event with
//! two URLs, to approve and to abort, that work without an API token, for a limited time, once.
//!
//! A link's token is the claim it makes (which analysis, which stage, which wait, which action,
//! until when) and an HMAC-SHA256 of it under the daemon's approval key, both base64url. The key is
//! 32 random bytes made at the first start and kept in `<data_dir>/approval.key` (owner-only), so
//! links outlive restarts and one daemon's links mean nothing to another. A tampered token fails
//! the MAC; an expired one its `expires`; and a used one its wait: the claim names the event time
//! the analysis began waiting, and once a link (either of the pair) has been used the analysis no
//! longer waits there, so the engine refuses the claim (checked on its thread, with the action).

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use canaryd_engine::judge::AnalysisView;
use canaryd_engine::observation::EventTime;

use super::{Approval, Stage};

/// What a link may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Approve,
    Abort,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Approve => "approve",
            Action::Abort => "abort",
        }
    }
}

/// What a link claims.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub env: String,
    pub app: String,
    pub canary: String,
    /// The index of the stage waiting to be entered.
    pub stage: usize,
    /// When (event time) the analysis began to wait: binds the link to this one wait.
    pub waiting_since: EventTime,
    pub action: Action,
    /// Unix seconds (wall clock) after which the link no longer works.
    pub expires: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LinkError {
    #[error("this link is not one canaryd made, or it was changed")]
    Tampered,
    #[error("this link expired at {0} (unix seconds)")]
    Expired(u64),
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read or write the approval key {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "the approval key {path} is not 32 bytes: remove it to make a new one (links already sent stop working)"
    )]
    Size { path: PathBuf },
    #[error("cannot make an approval key: {0}")]
    Random(getrandom::Error),
}

/// Makes and checks approval links.
#[derive(Clone)]
pub struct Approvals {
    key: [u8; 32],
    /// Where people reach the API: links are `{public_url}/api/v1/approvals/{token}`.
    public_url: String,
    ttl_secs: u64,
}

impl std::fmt::Debug for Approvals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Approvals")
            .field("public_url", &self.public_url)
            .field("ttl_secs", &self.ttl_secs)
            .finish_non_exhaustive()
    }
}

/// The path approval links live under.
pub const PATH: &str = "/api/v1/approvals/";

type HmacSha256 = Hmac<Sha256>;

impl Approvals {
    /// The daemon's approvals, with the key in `data_dir` (made there on first use).
    pub fn open(data_dir: &Path, public_url: &str, ttl_secs: u64) -> Result<Approvals, KeyError> {
        let path = data_dir.join("approval.key");
        let key = match std::fs::read(&path) {
            Ok(bytes) => {
                <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Size { path: path.clone() })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                getrandom::fill(&mut key).map_err(KeyError::Random)?;
                write_private(&path, &key).map_err(|source| KeyError::Io {
                    path: path.clone(),
                    source,
                })?;
                key
            }
            Err(source) => return Err(KeyError::Io { path, source }),
        };
        Ok(Approvals::with_key(key, public_url, ttl_secs))
    }

    pub fn with_key(key: [u8; 32], public_url: &str, ttl_secs: u64) -> Approvals {
        Approvals {
            key,
            public_url: public_url.trim_end_matches('/').to_owned(),
            ttl_secs,
        }
    }

    /// The links of an analysis that waits for approval (None when it does not), valid for the
    /// configured time from `now_unix`.
    pub fn links(
        &self,
        view: &AnalysisView,
        stages: &[canaryd_engine::judge::Stage],
        now_unix: u64,
    ) -> Option<Approval> {
        let waiting_since = view.awaiting_approval?;
        let index = view.stage.as_ref().map_or(0, |s| s.index + 1);
        let next = stages.get(index)?;
        let expires = now_unix.saturating_add(self.ttl_secs);
        let url = |action| {
            let claim = Claim {
                env: view.env.clone(),
                app: view.app.clone(),
                canary: view.canary_version.clone(),
                stage: index,
                waiting_since,
                action,
                expires,
            };
            format!("{}{PATH}{}", self.public_url, self.sign(&claim))
        };
        Some(Approval {
            stage: Stage {
                index: index as u32,
                name: next.name.clone(),
                weight: next.weight.round() as u32,
            },
            approve_url: Some(url(Action::Approve)),
            abort_url: Some(url(Action::Abort)),
            expires_at: humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(expires),
            )
            .to_string(),
        })
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes a key of any length: a 32-byte key is never refused.
        <HmacSha256 as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"))
    }

    /// The token of a claim.
    pub fn sign(&self, claim: &Claim) -> String {
        let body = serde_json::to_vec(claim).unwrap_or_default();
        let mut mac = self.mac();
        mac.update(&body);
        let tag = mac.finalize().into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&body),
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// The claim of a token made by this daemon and not expired at `now_unix`.
    pub fn verify(&self, token: &str, now_unix: u64) -> Result<Claim, LinkError> {
        let (body, tag) = token.split_once('.').ok_or(LinkError::Tampered)?;
        let body = URL_SAFE_NO_PAD.decode(body).map_err(|_| LinkError::Tampered)?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| LinkError::Tampered)?;
        let mut mac = self.mac();
        mac.update(&body);
        // Constant time: how long a refusal takes says nothing about the right tag.
        mac.verify_slice(&tag).map_err(|_| LinkError::Tampered)?;
        let claim: Claim = serde_json::from_slice(&body).map_err(|_| LinkError::Tampered)?;
        if now_unix >= claim.expires {
            return Err(LinkError::Expired(claim.expires));
        }
        Ok(claim)
    }
}

/// Writes `bytes` to a new file only its owner can read, whole or not at all: written beside it
/// and renamed into place, so a crash midway never leaves a short key that stops the next start.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let partial = path.with_extension("partial");
    // What a crash in here left behind.
    match std::fs::remove_file(&partial) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&partial)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&partial, path)?;
    if let Some(dir) = path.parent() {
        // The rename itself made durable.
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Seconds since the Unix epoch, by the wall clock.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim() -> Claim {
        Claim {
            env: "prod".into(),
            app: "shop".into(),
            canary: "2.0.0".into(),
            stage: 1,
            waiting_since: 1_767_571_260_000_000_000,
            action: Action::Approve,
            expires: 2_000,
        }
    }

    #[test]
    fn a_link_verifies_until_it_expires_and_not_when_changed() {
        let approvals = Approvals::with_key([7; 32], "https://canaryd.example/", 3_600);
        let token = approvals.sign(&claim());
        assert_eq!(approvals.verify(&token, 1_999), Ok(claim()));
        assert_eq!(approvals.verify(&token, 2_000), Err(LinkError::Expired(2_000)));
        // Another action, stage or expiry under the same tag: refused.
        let (body, tag) = token.split_once('.').expect("two parts");
        let mut forged = claim();
        forged.action = Action::Abort;
        forged.expires = 9_999;
        let forged_body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).expect("json"));
        assert_eq!(
            approvals.verify(&format!("{forged_body}.{tag}"), 0),
            Err(LinkError::Tampered)
        );
        assert_eq!(
            approvals.verify(&format!("{body}.x{tag}"), 0),
            Err(LinkError::Tampered)
        );
        assert_eq!(approvals.verify("nonsense", 0), Err(LinkError::Tampered));
        // Another daemon's key: refused.
        let other = Approvals::with_key([8; 32], "https://canaryd.example/", 3_600);
        assert_eq!(other.verify(&token, 0), Err(LinkError::Tampered));
    }

    #[test]
    fn the_key_is_made_once_owner_only_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Approvals::open(dir.path(), "http://x", 60).expect("made");
        let again = Approvals::open(dir.path(), "http://x", 60).expect("read back");
        assert_eq!(first.key, again.key);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("approval.key"))
                .expect("there")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(dir.path().join("approval.key"), b"short").expect("write");
        let e = Approvals::open(dir.path(), "http://x", 60).expect_err("bad key");
        assert!(e.to_string().contains("not 32 bytes"), "{e}");
    }
}
