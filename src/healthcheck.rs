//! `canaryd healthcheck`: asks a running daemon's `/healthz` whether it is alive, for a container's
//! `HEALTHCHECK` or a supervisor's probe, from the daemon's own binary (a slim image has no curl).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// Why the daemon was not found healthy.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("{0} is not an address (HOST:PORT)")]
    BadAddress(String),
    #[error("cannot start a runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot build an HTTP client: {0}")]
    Client(reqwest::Error),
    #[error("no answer from {url}: {source}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("{url} answered {status}")]
    Unhealthy { url: String, status: u16 },
}

/// The address to probe: `addr` as given, or where the daemon listens (`CANARYD_HTTP_ADDR`, which
/// a container sets), or the default `127.0.0.1:8080`. A daemon listening on every interface
/// (`0.0.0.0`, `::`) is asked over loopback.
pub fn target(addr: Option<&str>, http_addr_env: Option<&str>) -> Result<SocketAddr, HealthError> {
    let text = addr.or(http_addr_env).unwrap_or("127.0.0.1:8080");
    let mut parsed: SocketAddr = text
        .parse()
        .map_err(|_| HealthError::BadAddress(text.to_owned()))?;
    if parsed.ip().is_unspecified() {
        parsed.set_ip(match parsed.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
        });
    }
    Ok(parsed)
}

/// GETs `/healthz` at `addr` within `timeout`: Ok on a 2xx answer.
pub async fn probe(addr: SocketAddr, timeout: Duration) -> Result<(), HealthError> {
    let url = format!("http://{addr}/healthz");
    // Only the daemon's own address: no proxy from the environment, no redirects.
    let client = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .build()
        .map_err(HealthError::Client)?;
    let response = client
        .get(&url)
        .send()
        .await
        .map_err(|source| HealthError::Unreachable {
            url: url.clone(),
            source,
        })?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(HealthError::Unhealthy {
            url,
            status: response.status().as_u16(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_comes_from_the_flag_then_the_daemons_setting_and_every_interface_is_loopback() {
        let addr = |flag, env| target(flag, env).expect("address").to_string();
        assert_eq!(addr(None, None), "127.0.0.1:8080");
        assert_eq!(addr(None, Some("0.0.0.0:9000")), "127.0.0.1:9000");
        assert_eq!(addr(Some("10.1.2.3:80"), Some("0.0.0.0:9000")), "10.1.2.3:80");
        assert_eq!(addr(Some("[::]:8080"), None), "[::1]:8080");
        let message = target(Some("localhost"), None).expect_err("no port").to_string();
        assert!(message.contains("localhost"), "{message}");
    }
}
