//! Outbound reach: which addresses canaryd's own connections (webhook deliveries, HAProxy's
//! runtime API) may go to.
//!
//! A subscription's target is whatever its creator typed, so without a check canaryd would
//! connect on their behalf to the cloud's metadata service, a Docker socket or a loopback-only
//! admin port. Checking the URL's literal host is not enough: a name can resolve to any address,
//! and `0x7f000001`, `::ffff:169.254.169.254` or `64:ff9b::a9fe:a9fe` spell restricted addresses
//! in other forms. So every address a connection is about to use is checked, after resolution and
//! with embedded IPv4 addresses unwrapped, and a restricted one is used only when the
//! `outbound_allow` setting names it (a network, an address, the host name, or a unix socket's
//! path).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use ipnet::IpNet;

/// Hosts that serve cloud instance metadata under a name rather than an address.
const METADATA_HOSTS: [&str; 3] = ["metadata.google.internal", "metadata", "metadata.azure.internal"];

/// Why an address is not one canaryd reaches without being told to: `None` for a public address.
pub fn restricted(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => restricted_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => restricted_v4(v4),
            None => restricted_v6(v6),
        },
    }
}

fn restricted_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match () {
        // AWS, GCP and Azure (169.254.169.254), Alibaba (100.100.100.200), Oracle (192.0.0.192).
        _ if [[169, 254, 169, 254], [100, 100, 100, 200], [192, 0, 0, 192]].contains(&ip.octets()) => {
            "cloud-metadata"
        }
        _ if ip.is_loopback() => "loopback",
        _ if a == 0 => "unspecified",
        _ if ip.is_link_local() => "link-local",
        _ if ip.is_private() => "private",
        _ if a == 100 && (b & 0xc0) == 64 => "shared (carrier-grade NAT)",
        _ if a == 192 && b == 0 && c == 0 => "IETF protocol assignment",
        _ if a == 198 && (b & 0xfe) == 18 => "benchmarking",
        _ if ip.is_multicast() || ip.is_broadcast() || a >= 240 => "multicast or reserved",
        _ => return None,
    })
}

fn restricted_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    Some(match () {
        _ if s == [0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254] => "cloud-metadata",
        _ if ip.is_loopback() => "loopback",
        _ if ip.is_unspecified() => "unspecified",
        _ if (s[0] & 0xffc0) == 0xfe80 => "link-local",
        // Unique local (fc00::/7) and the deprecated site-local (fec0::/10).
        _ if (s[0] & 0xfe00) == 0xfc00 || (s[0] & 0xffc0) == 0xfec0 => "private",
        // The local-use NAT64 prefix embeds IPv4 addresses at a position its operator chose.
        _ if s[0] == 0x0064 && s[1] == 0xff9b && s[2] == 0x0001 => "local-use NAT64",
        // Teredo hides its client's address (obfuscated); a relay could reach anything.
        _ if s[0] == 0x2001 && s[1] == 0 => "Teredo",
        _ if ip.is_multicast() => "multicast or reserved",
        _ => return None,
    })
}

/// The IPv4 address an IPv6 one carries: IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible
/// (`::a.b.c.d`), the well-known NAT64 prefix (`64:ff9b::/96`) and 6to4 (`2002:AABB:CCDD::/48`).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    if s[..6] == [0; 6] && !ip.is_loopback() && !ip.is_unspecified() {
        return Some(tail(s[6], s[7]));
    }
    if s[..6] == [0x0064, 0xff9b, 0, 0, 0, 0] {
        return Some(tail(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return Some(tail(s[1], s[2]));
    }
    None
}

/// One entry of `outbound_allow`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Allowed {
    /// An address or a network (`10.1.2.3`, `10.0.0.0/8`, `::1/128`).
    Net(IpNet),
    /// A host name, whatever it resolves to: the operator vouches for it.
    Host(String),
    /// A unix socket (`unix:///run/haproxy/admin.sock`).
    Socket(String),
}

/// The `outbound_allow` setting: restricted targets that may be reached all the same.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutboundAllow(Vec<Allowed>);

impl OutboundAllow {
    /// Loopback only: what an unset `outbound_allow` means while the API itself listens on
    /// loopback, where whoever can create a subscription can already reach loopback themselves.
    pub fn loopback() -> OutboundAllow {
        OutboundAllow(
            ["127.0.0.0/8", "::1/128"]
                .iter()
                .filter_map(|net| net.parse().ok())
                .map(Allowed::Net)
                .collect(),
        )
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromStr for OutboundAllow {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let allowed = if let Some(path) = entry.strip_prefix("unix://") {
                if !path.starts_with('/') {
                    return Err(format!("{entry:?}: a unix socket is unix:///absolute/path"));
                }
                Allowed::Socket(path.to_owned())
            } else if let Ok(net) = entry.parse::<IpNet>() {
                Allowed::Net(net)
            } else if let Ok(ip) = entry.parse::<IpAddr>() {
                Allowed::Net(IpNet::from(ip))
            } else if is_host_name(entry) {
                Allowed::Host(entry.trim_end_matches('.').to_ascii_lowercase())
            } else {
                return Err(format!(
                    "{entry:?}: expected a network (10.0.0.0/8), an address, a host name or unix:///path"
                ));
            };
            entries.push(allowed);
        }
        Ok(OutboundAllow(entries))
    }
}

impl<'de> serde::Deserialize<'de> for OutboundAllow {
    /// A TOML string (`"10.0.0.0/8, hooks.internal"`) or an array of such strings.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        super::comma_separated(d)
    }
}

impl fmt::Display for OutboundAllow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for entry in &self.0 {
            if !first {
                f.write_str(", ")?;
            }
            first = false;
            match entry {
                Allowed::Net(net) => write!(f, "{net}")?,
                Allowed::Host(host) => f.write_str(host)?,
                Allowed::Socket(path) => write!(f, "unix://{path}")?,
            }
        }
        Ok(())
    }
}

fn is_host_name(text: &str) -> bool {
    let name = text.trim_end_matches('.');
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
        })
}

/// A connection canaryd would not make.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OutboundError {
    #[error("{host} is {address}, a {class} address; name it in outbound_allow to allow it")]
    Restricted {
        host: String,
        address: IpAddr,
        class: &'static str,
    },
    #[error("{host} names a cloud-metadata service; name it in outbound_allow to allow it")]
    MetadataHost { host: String },
    #[error("unix socket {path} is not named in outbound_allow")]
    Socket { path: String },
    #[error("{host} resolved to no address")]
    Unresolved { host: String },
}

/// The policy every outbound connection goes through.
#[derive(Clone, Debug, Default)]
pub struct OutboundPolicy {
    allow: OutboundAllow,
}

impl OutboundPolicy {
    pub fn new(allow: OutboundAllow) -> OutboundPolicy {
        OutboundPolicy { allow }
    }

    fn host_allowed(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.allow
            .0
            .iter()
            .any(|a| matches!(a, Allowed::Host(h) if *h == host))
    }

    fn net_allowed(&self, ip: IpAddr) -> bool {
        let unwrapped = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        self.allow
            .0
            .iter()
            .any(|a| matches!(a, Allowed::Net(net) if net.contains(&ip) || unwrapped.is_some_and(|v4| net.contains(&v4))))
    }

    /// Whether `host`, about to be connected to at `address`, may be.
    pub fn check(&self, host: &str, address: IpAddr) -> Result<(), OutboundError> {
        match restricted(address) {
            Some(class) if !self.host_allowed(host) && !self.net_allowed(address) => {
                Err(OutboundError::Restricted {
                    host: host.to_owned(),
                    address,
                    class,
                })
            }
            _ => Ok(()),
        }
    }

    /// The check that needs no resolution: a literal address, or a cloud-metadata name. Names
    /// are checked again on every address they resolve to, at connect time.
    pub fn check_host(&self, host: &url::Host<&str>) -> Result<(), OutboundError> {
        match *host {
            url::Host::Ipv4(v4) => self.check(&v4.to_string(), IpAddr::V4(v4)),
            url::Host::Ipv6(v6) => self.check(&v6.to_string(), IpAddr::V6(v6)),
            url::Host::Domain(name) => {
                let bare = name.trim_end_matches('.').to_ascii_lowercase();
                match bare.parse::<IpAddr>() {
                    Ok(ip) => self.check(name, ip),
                    Err(_) if METADATA_HOSTS.contains(&bare.as_str()) && !self.host_allowed(name) => {
                        Err(OutboundError::MetadataHost {
                            host: name.to_owned(),
                        })
                    }
                    Err(_) => Ok(()),
                }
            }
        }
    }

    /// The same check on a host as written in a `host:port` (`10.0.0.1`, `[::1]`, a name): the
    /// literal address, when it is one.
    pub fn check_host_text(&self, host: &str) -> Result<Option<IpAddr>, OutboundError> {
        match host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            Ok(ip) => self.check(host, ip).map(|()| Some(ip)),
            Err(_) => self.check_host(&url::Host::Domain(host)).map(|()| None),
        }
    }

    /// Whether the unix socket at `path` may be connected to.
    pub fn check_socket(&self, path: &Path) -> Result<(), OutboundError> {
        let text = path.to_string_lossy();
        if self
            .allow
            .0
            .iter()
            .any(|a| matches!(a, Allowed::Socket(p) if *p == text))
        {
            Ok(())
        } else {
            Err(OutboundError::Socket {
                path: text.into_owned(),
            })
        }
    }

    /// Resolves `host:port` and keeps the addresses the policy allows; an error when none is
    /// left, naming the first refused. Connecting only to what this returns is what makes a
    /// name that resolves to a restricted address (or alternates between one and a public
    /// address) harmless.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, std::io::Error> {
        if let Some(ip) = self.check_host_text(host).map_err(refused)? {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let mut allowed = Vec::new();
        let mut first_refusal = None;
        for addr in tokio::net::lookup_host((host, port)).await? {
            match self.check(host, addr.ip()) {
                Ok(()) => allowed.push(addr),
                Err(e) => {
                    first_refusal.get_or_insert(e);
                }
            }
        }
        match (allowed.is_empty(), first_refusal) {
            (false, _) => Ok(allowed),
            (true, Some(e)) => Err(refused(e)),
            (true, None) => Err(refused(OutboundError::Unresolved {
                host: host.to_owned(),
            })),
        }
    }
}

fn refused(e: OutboundError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::PermissionDenied, e)
}

/// reqwest's resolver for webhook deliveries: every name goes through the policy, so a
/// delivery never connects to an address the policy refuses, whatever the name resolves to.
pub struct GuardedResolver(pub Arc<OutboundPolicy>);

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            // The port is the URL's; reqwest puts it on the addresses it gets back.
            let addrs = policy.resolve(name.as_str(), 0).await?;
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    #[test]
    fn restricted_addresses_in_every_spelling() {
        for (address, class) in [
            ("127.0.0.1", "loopback"),
            ("127.1.2.3", "loopback"),
            ("::1", "loopback"),
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("192.168.1.1", "private"),
            ("fd12::1", "private"),
            ("169.254.169.254", "cloud-metadata"),
            ("100.100.100.200", "cloud-metadata"),
            ("fd00:ec2::254", "cloud-metadata"),
            ("169.254.1.1", "link-local"),
            ("fe80::1", "link-local"),
            ("100.64.0.1", "shared (carrier-grade NAT)"),
            // The same addresses, wrapped in IPv6.
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "cloud-metadata"),
            ("::169.254.169.254", "cloud-metadata"),
            ("64:ff9b::a9fe:a9fe", "cloud-metadata"),
            ("64:ff9b::7f00:1", "loopback"),
            ("2002:a9fe:a9fe::1", "cloud-metadata"),
            ("2002:0a00:0001::", "private"),
            ("64:ff9b:1::a9fe:a9fe", "local-use NAT64"),
            ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
            ("224.0.0.1", "multicast or reserved"),
            ("255.255.255.255", "multicast or reserved"),
            ("ff02::1", "multicast or reserved"),
        ] {
            assert_eq!(restricted(ip(address)), Some(class), "{address}");
        }
        for public in [
            "93.184.216.34",
            "2606:2800:220:1:248:1893:25c8:1946",
            "::ffff:93.184.216.34",
            "64:ff9b::5db8:d822",
        ] {
            assert_eq!(restricted(ip(public)), None, "{public}");
        }
    }

    #[test]
    fn integer_and_hex_hosts_are_the_addresses_they_spell() {
        let policy = OutboundPolicy::default();
        for url in [
            "http://2130706433/",
            "http://0x7f000001/",
            "http://0177.0.0.1/",
            "http://127.1/",
            "http://[::ffff:7f00:1]/",
        ] {
            let parsed = url::Url::parse(url).expect("a URL");
            let host = parsed.host().expect("a host");
            assert!(
                matches!(
                    policy.check_host(&host),
                    Err(OutboundError::Restricted {
                        class: "loopback",
                        ..
                    })
                ),
                "{url}"
            );
        }
        let metadata = url::Url::parse("http://Metadata.Google.Internal./x").expect("a URL");
        assert!(matches!(
            policy.check_host(&metadata.host().expect("a host")),
            Err(OutboundError::MetadataHost { .. })
        ));
    }

    #[test]
    fn the_allow_list_names_networks_hosts_and_sockets() {
        let allow: OutboundAllow = "10.0.0.0/8, 127.0.0.1, hooks.internal., unix:///run/haproxy/admin.sock"
            .parse()
            .expect("a valid list");
        let policy = OutboundPolicy::new(allow.clone());
        assert_eq!(policy.check("x", ip("10.9.8.7")), Ok(()));
        assert_eq!(
            policy.check("x", ip("::ffff:10.9.8.7")),
            Ok(()),
            "mapped forms of an allowed network"
        );
        assert_eq!(policy.check("x", ip("127.0.0.1")), Ok(()));
        assert!(
            policy.check("x", ip("127.0.0.2")).is_err(),
            "one address is not its network"
        );
        assert_eq!(
            policy.check("Hooks.Internal", ip("192.168.0.9")),
            Ok(()),
            "a named host, any address"
        );
        assert!(policy.check("other.internal", ip("192.168.0.9")).is_err());
        assert!(policy.check("x", ip("169.254.169.254")).is_err());
        assert_eq!(policy.check_socket(Path::new("/run/haproxy/admin.sock")), Ok(()));
        assert!(policy.check_socket(Path::new("/var/run/docker.sock")).is_err());
        assert_eq!(
            allow.to_string(),
            "10.0.0.0/8, 127.0.0.1/32, hooks.internal, unix:///run/haproxy/admin.sock"
        );
        for bad in ["10.0.0.0/33", "unix://relative", "not a host", "a..b"] {
            assert!(bad.parse::<OutboundAllow>().is_err(), "{bad}");
        }
        let loopback = OutboundPolicy::new(OutboundAllow::loopback());
        assert_eq!(loopback.check("localhost", ip("127.0.0.1")), Ok(()));
        assert_eq!(loopback.check("localhost", ip("::1")), Ok(()));
        assert!(loopback.check("x", ip("10.0.0.1")).is_err());
    }

    #[tokio::test]
    async fn a_name_is_checked_on_every_address_it_resolves_to() {
        let strict = OutboundPolicy::default();
        let refused = strict
            .resolve("localhost", 80)
            .await
            .expect_err("localhost is loopback");
        assert_eq!(refused.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(refused.to_string().contains("loopback"), "{refused}");
        let addrs = OutboundPolicy::new(OutboundAllow::loopback())
            .resolve("localhost", 80)
            .await
            .expect("loopback allowed");
        assert!(
            addrs.iter().all(|a| a.ip().is_loopback() && a.port() == 80),
            "{addrs:?}"
        );
        assert!(strict.resolve("[::1]", 80).await.is_err());
    }
}
