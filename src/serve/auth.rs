//! Who may do what: an admin token (`api_token`) for every change, a read token (`api_read_token`)
//! for what reveals targets or gates a rollout, and everything else open.
//!
//! When no token is set every request is let through (the daemon refuses to start that way on an
//! address other than loopback unless `insecure_no_auth` says so). When one is:
//! - POST, PUT, DELETE and PATCH need the admin token (re-driving parked deliveries included);
//! - reading subscriptions and their deliveries (receiver URLs, their answers) needs either;
//! - Flagger's gates need either, as a bearer token or, since Flagger cannot set headers, as the
//!   webhook's `metadata.token` (checked by the gate handlers, which see the body);
//! - approval links (`/api/v1/approvals/...`) need none: their signed token is the credential;
//! - the rest (health, metrics, apps, analyses, events, models, the dashboard) is open.
//!
//! Tokens are compared in constant time: how long a refusal takes says nothing about the token.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

use super::{ApiState, error};

/// The configured tokens.
#[derive(Clone, Debug, Default)]
pub struct Tokens {
    pub admin: Option<Arc<str>>,
    pub read: Option<Arc<str>>,
}

/// What a request may do, from least to most.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    Open,
    Read,
    Admin,
}

impl Tokens {
    /// Whether any token is set (else every request is let through).
    pub fn enforced(&self) -> bool {
        self.admin.is_some() || self.read.is_some()
    }

    /// What `sent` grants: the admin token everything, the read token reading.
    pub fn grants(&self, sent: &str) -> Access {
        let is = |token: &Option<Arc<str>>| {
            token
                .as_deref()
                .is_some_and(|t| bool::from(sent.as_bytes().ct_eq(t.as_bytes())))
        };
        // Both compared, whichever matches: the time taken does not depend on which.
        let (admin, read) = (is(&self.admin), is(&self.read));
        if admin {
            Access::Admin
        } else if read {
            Access::Read
        } else {
            Access::Open
        }
    }
}

/// The gates' paths, which may carry their token in the body instead.
pub const GATE_PATHS: [&str; 2] = ["/api/v1/gates/flagger", "/api/v1/gates/flagger/rollback"];

/// What `method path` needs.
pub fn needed(method: &Method, path: &str) -> Access {
    if path.starts_with(crate::events::approval::PATH) {
        Access::Open
    } else if GATE_PATHS.contains(&path) {
        Access::Read
    } else if matches!(
        *method,
        Method::POST | Method::PUT | Method::DELETE | Method::PATCH
    ) {
        Access::Admin
    } else if path.starts_with("/api/v1/subscriptions") {
        Access::Read
    } else {
        Access::Open
    }
}

/// The bearer token of a request, "" when it has none.
pub fn bearer(headers: &axum::http::HeaderMap) -> &str {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        // The scheme is case-insensitive (RFC 9110); the token is not.
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token.trim())
}

/// What a request was granted by its bearer token, for handlers that accept a token elsewhere.
#[derive(Clone, Copy, Debug)]
pub struct Granted(pub Access);

/// 401 with the challenge, naming the token `needed` asks for.
pub fn unauthorized(needed: Access) -> Response {
    let message = match needed {
        Access::Admin => "this request needs Authorization: Bearer <api_token>",
        _ => "this request needs Authorization: Bearer <api_read_token or api_token>",
    };
    let mut response = error(StatusCode::UNAUTHORIZED, message);
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
}

/// Lets a request through when its token grants what it needs; gate requests always go on to
/// their handler, which also looks for the token in the body.
pub async fn require_token(
    State(state): State<ApiState>,
    mut request: axum::extract::Request,
    next: Next,
) -> Response {
    let tokens = &state.tokens;
    if !tokens.enforced() {
        request.extensions_mut().insert(Granted(Access::Admin));
        return next.run(request).await;
    }
    let path = request.uri().path().to_owned();
    let needed = needed(request.method(), &path);
    let granted = tokens.grants(bearer(request.headers()));
    if granted < needed && !GATE_PATHS.contains(&path.as_str()) {
        return unauthorized(needed);
    }
    request.extensions_mut().insert(Granted(granted));
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_token_grants_its_own_access_and_no_more() {
        let tokens = Tokens {
            admin: Some("admin-secret".into()),
            read: Some("read-secret".into()),
        };
        assert_eq!(tokens.grants("admin-secret"), Access::Admin);
        assert_eq!(tokens.grants("read-secret"), Access::Read);
        assert_eq!(tokens.grants("admin-secre"), Access::Open);
        assert_eq!(tokens.grants(""), Access::Open);
        assert!(!Tokens::default().enforced());
        // No read token configured: an empty one sent grants nothing.
        let admin_only = Tokens {
            admin: Some("a".into()),
            read: None,
        };
        assert_eq!(admin_only.grants(""), Access::Open);
    }

    #[test]
    fn what_each_route_needs() {
        assert_eq!(needed(&Method::GET, "/api/v1/apps"), Access::Open);
        assert_eq!(needed(&Method::GET, "/metrics"), Access::Open);
        assert_eq!(needed(&Method::GET, "/api/v1/subscriptions"), Access::Read);
        assert_eq!(
            needed(&Method::GET, "/api/v1/subscriptions/sub_1/deliveries"),
            Access::Read
        );
        assert_eq!(needed(&Method::POST, "/api/v1/subscriptions"), Access::Admin);
        assert_eq!(
            needed(
                &Method::POST,
                "/api/v1/subscriptions/sub_1/deliveries/evt_0000000000000001/redrive"
            ),
            Access::Admin
        );
        assert_eq!(
            needed(&Method::POST, "/api/v1/subscriptions/sub_1/deliveries/redrive"),
            Access::Admin
        );
        assert_eq!(needed(&Method::PUT, "/api/v1/apps/a/rollout"), Access::Admin);
        assert_eq!(needed(&Method::POST, "/api/v1/gates/flagger"), Access::Read);
    }
}
