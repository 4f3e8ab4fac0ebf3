//! The `haproxy` kind's second lever: a rollout's route kept in HAProxy maps through the runtime
//! API. Each app named in `haproxy_maps` has three maps, which `deploy/haproxy/haproxy.cfg`
//! reads: `<prefix>.split.map` (key `canary`: the canary's share of the split, in basis points),
//! `<prefix>.users.map` (the allow-listed user ids) and `<prefix>.headers.map` (one regular
//! expression per header rule, matched against the request's header block).
//!
//! Applying a route reads each map back (`show map`), changes only what differs (`set map`,
//! `add map`, `del map`, `clear map`), narrowing before widening so that a failed canary loses
//! its share before anything else, then reads the maps again: the route counts as applied only
//! once HAProxy reports exactly it. The same comparison, run at start-up and now and then, puts
//! back what an HAProxy reload (which rereads the map files) or a person changed.

use std::collections::BTreeSet;
use std::str::FromStr;
use std::time::Duration;

use canaryd_engine::judge::{HeaderMatch, Sticky};

use super::haproxy::{Endpoint, HaproxyError, command_capped};
use super::outbound::OutboundPolicy;
use crate::events::{Event, Route};

/// The value every allow-list and header entry maps to (`-m found` is what the config tests).
pub const CANARY: &str = "canary";
/// The split map's one key.
pub const SPLIT_KEY: &str = "canary";
/// The most of a `show map` answer read: a thousand users of 128 characters, with room.
const MAX_MAP_ANSWER_BYTES: u64 = 1024 * 1024;
/// The most bytes of entries sent in one `add map` payload: HAProxy reads a command and its
/// payload into one buffer (16 KB by default).
const MAX_PAYLOAD_BYTES: usize = 8 * 1024;

/// Where one app's maps are, and where the HAProxy config reading them finds a user id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapTarget {
    pub env: String,
    pub app: String,
    /// The maps' path as HAProxy loaded them, without `.split.map` and the rest.
    pub prefix: String,
    /// The header or cookie HAProxy's config hashes for the split and looks up in the
    /// allow-list; none when it reads none (each request split on its own, no allow-list).
    pub sticky: Option<Sticky>,
}

impl MapTarget {
    pub fn split_map(&self) -> String {
        format!("{}.split.map", self.prefix)
    }

    pub fn users_map(&self) -> String {
        format!("{}.users.map", self.prefix)
    }

    pub fn headers_map(&self) -> String {
        format!("{}.headers.map", self.prefix)
    }

    /// Whether HAProxy, as configured, can carry out `route`: it reads the user id where the
    /// plan says (or the plan names no sticky key and has no allow-list).
    pub fn can_route(&self, sticky: Option<&Sticky>, has_users: bool) -> Result<(), String> {
        match (sticky, &self.sticky) {
            (Some(wanted), Some(read)) if wanted != read => Err(format!(
                "the plan's sticky key is {wanted}, but HAProxy reads the user id from {read} \
                 (haproxy_maps entry for {}/{})",
                self.env, self.app
            )),
            (Some(wanted), None) => Err(format!(
                "the plan's sticky key is {wanted}, but the haproxy_maps entry for {}/{} names \
                 no key HAProxy reads (add @{wanted})",
                self.env, self.app
            )),
            (None, None) if has_users => Err(format!(
                "an allow-list needs a sticky key, and the haproxy_maps entry for {}/{} names none",
                self.env, self.app
            )),
            _ => Ok(()),
        }
    }
}

/// The `haproxy_maps` setting: `env/app=<map prefix>[@header:<name>|@cookie:<name>]`,
/// comma-separated.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HaproxyMaps(pub Vec<MapTarget>);

impl FromStr for HaproxyMaps {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut targets = Vec::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (key, rest) = entry
                .split_once('=')
                .ok_or_else(|| format!("{entry:?}: expected env/app=/path/prefix[@header:name]"))?;
            let Some((env, app)) = key
                .split_once('/')
                .filter(|(e, a)| !e.is_empty() && !a.is_empty())
            else {
                return Err(format!("{entry:?}: the left side must be env/app"));
            };
            let (prefix, sticky) = match rest.rsplit_once('@') {
                Some((prefix, sticky)) => (prefix, Some(sticky)),
                None => (rest, None),
            };
            if !prefix.starts_with('/') {
                return Err(format!(
                    "{entry:?}: the map prefix is an absolute path, as HAProxy loaded the maps"
                ));
            }
            // The path goes into runtime API commands: nothing that could end or extend one.
            if prefix
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == ';' || c == '#')
            {
                return Err(format!(
                    "{entry:?}: the map prefix cannot hold spaces, ';' or '#'"
                ));
            }
            let sticky = match sticky.map(|s| s.split_once(':')) {
                None => None,
                Some(Some(("header", name))) => Some(Sticky::Header(name.to_ascii_lowercase())),
                Some(Some(("cookie", name))) => Some(Sticky::Cookie(name.to_owned())),
                Some(_) => {
                    return Err(format!(
                        "{entry:?}: after '@', header:<name> or cookie:<name> (where HAProxy reads the user id)"
                    ));
                }
            };
            if let Some(Sticky::Header(name) | Sticky::Cookie(name)) = &sticky
                && (name.is_empty()
                    || !name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
            {
                return Err(format!("{entry:?}: {name:?} is not a header or cookie name"));
            }
            targets.push(MapTarget {
                env: env.to_owned(),
                app: app.to_owned(),
                prefix: prefix.to_owned(),
                sticky,
            });
        }
        Ok(HaproxyMaps(targets))
    }
}

impl<'de> serde::Deserialize<'de> for HaproxyMaps {
    /// A TOML string or an array of such strings.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        super::comma_separated(d)
    }
}

impl HaproxyMaps {
    pub fn find(&self, env: &str, app: &str) -> Option<&MapTarget> {
        self.0.iter().find(|t| t.env == env && t.app == app)
    }
}

/// The regular expression of a header rule, as the headers map keeps it: the header's line in
/// HAProxy's header block (`req.hdrs`, names in lower case, lines ended by CR LF), the value
/// exact. It holds no backslash and no space, which the runtime API would strip or split on;
/// the value's characters that mean something to a regular expression are bracketed.
pub fn header_pattern(rule: &HeaderMatch) -> String {
    let literal = |text: &str| -> String {
        text.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_~!%&,/:=@".contains(c) {
                    c.to_string()
                } else {
                    format!("[{c}]")
                }
            })
            .collect()
    };
    format!(
        "(^|[[:cntrl:]]){}:[[:blank:]]*{}[[:blank:]]*[[:cntrl:]]",
        literal(&rule.name.to_ascii_lowercase()),
        literal(&rule.value)
    )
}

/// What the maps should hold for a route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    /// The canary's share in basis points (0 to 10,000).
    pub share: u32,
    pub users: BTreeSet<String>,
    pub headers: BTreeSet<String>,
}

impl Wanted {
    pub fn of(route: &Route) -> Wanted {
        Wanted {
            share: (route.percent.clamp(0.0, 100.0) * 100.0).round() as u32,
            users: route.users.iter().cloned().collect(),
            headers: route.headers.iter().map(header_pattern).collect(),
        }
    }
}

/// What acting on `event` through the maps means: `None` when it carries no route (or is a dry
/// run) or its app has no maps; else the target and the route, or why HAProxy cannot carry it.
pub fn plan<'a>(
    event: &'a Event,
    maps: &'a HaproxyMaps,
) -> Option<Result<(&'a MapTarget, &'a Route), HaproxyError>> {
    let route = event.data.traffic.as_ref()?;
    if event.data.dry_run {
        return None;
    }
    let target = maps.find(&event.data.env, &event.data.app)?;
    Some(
        target
            .can_route(route.sticky.as_ref(), !route.users.is_empty())
            .map(|()| (target, route))
            .map_err(HaproxyError::Unroutable),
    )
}

/// A map's entries as HAProxy reports them: (key, value), in its order.
pub async fn show(
    endpoint: &Endpoint,
    policy: &OutboundPolicy,
    map: &str,
    timeout: Duration,
) -> Result<Vec<(String, String)>, HaproxyError> {
    let line = format!("show map {map}");
    let answer = command_capped(endpoint, policy, &line, timeout, MAX_MAP_ANSWER_BYTES).await?;
    let mut entries = Vec::new();
    for row in answer.lines().filter(|l| !l.trim().is_empty()) {
        // `<id> <key> <value>`: the id is a pointer (0x...); a key may hold spaces (a header
        // pattern set by hand), a value this lever writes never does.
        let parsed = row
            .split_once(' ')
            .filter(|(id, _)| id.starts_with("0x"))
            .and_then(|(_, rest)| rest.rsplit_once(' '));
        match parsed {
            Some((key, value)) => entries.push((key.to_owned(), value.to_owned())),
            None => {
                return Err(HaproxyError::Refused {
                    command: line,
                    answer: row.to_owned(),
                });
            }
        }
    }
    Ok(entries)
}

/// Sends a command whose success is an empty answer.
async fn run(
    endpoint: &Endpoint,
    policy: &OutboundPolicy,
    line: String,
    timeout: Duration,
) -> Result<(), HaproxyError> {
    let answer = command_capped(endpoint, policy, &line, timeout, super::haproxy::MAX_ANSWER_BYTES).await?;
    if answer.is_empty() {
        Ok(())
    } else {
        // The first line only: a payload command echoes nothing of its payload.
        let command = line.lines().next().unwrap_or_default().to_owned();
        Err(HaproxyError::Refused { command, answer })
    }
}

/// What applying a route changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Runtime API commands that changed something; 0 when HAProxy already held the route.
    pub changes: usize,
}

/// The keys of `entries` (all mapping to `CANARY`; an entry with another value is wrong).
fn keys_of(entries: &[(String, String)]) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut right = BTreeSet::new();
    let mut wrong = BTreeSet::new();
    for (key, value) in entries {
        if value == CANARY {
            right.insert(key.clone());
        } else {
            wrong.insert(key.clone());
        }
    }
    (right, wrong)
}

/// What one key map needs to hold exactly `wanted` (each key mapping to `CANARY`), from one
/// reading of it: the keys to remove (all of them at once when none is kept) and to add.
struct KeyDiff {
    clear: bool,
    extra: Vec<String>,
    missing: Vec<String>,
}

impl KeyDiff {
    fn of(held: &[(String, String)], wanted: &BTreeSet<String>) -> KeyDiff {
        let (right, wrong) = keys_of(held);
        let extra: Vec<String> = right.difference(wanted).chain(wrong.iter()).cloned().collect();
        KeyDiff {
            clear: !extra.is_empty() && wanted.iter().all(|k| !right.contains(k)),
            extra,
            missing: wanted.difference(&right).cloned().collect(),
        }
    }

    /// Removes what must go; the number of commands that changed something.
    async fn narrow(
        &self,
        endpoint: &Endpoint,
        policy: &OutboundPolicy,
        map: &str,
        timeout: Duration,
    ) -> Result<usize, HaproxyError> {
        if self.clear {
            // Nothing to keep: one command empties it.
            run(endpoint, policy, format!("clear map {map}"), timeout).await?;
            return Ok(1);
        }
        for key in &self.extra {
            run(endpoint, policy, format!("del map {map} {key}"), timeout).await?;
        }
        Ok(self.extra.len())
    }

    /// Adds what is missing, in payloads; the number of commands that changed something.
    async fn widen(
        &self,
        endpoint: &Endpoint,
        policy: &OutboundPolicy,
        map: &str,
        timeout: Duration,
    ) -> Result<usize, HaproxyError> {
        let mut changes = 0;
        let mut payload = String::new();
        for (i, key) in self.missing.iter().enumerate() {
            payload.push_str(&format!("{key} {CANARY}\n"));
            if payload.len() >= MAX_PAYLOAD_BYTES || i + 1 == self.missing.len() {
                run(endpoint, policy, format!("add map {map} <<\n{payload}"), timeout).await?;
                payload.clear();
                changes += 1;
            }
        }
        Ok(changes)
    }
}

/// The split's share as HAProxy holds it: `None` when the key is absent.
async fn held_share(
    endpoint: &Endpoint,
    policy: &OutboundPolicy,
    map: &str,
    timeout: Duration,
) -> Result<Option<String>, HaproxyError> {
    let held = show(endpoint, policy, map, timeout).await?;
    Ok(held.into_iter().find(|(k, _)| k == SPLIT_KEY).map(|(_, v)| v))
}

async fn set_share(
    endpoint: &Endpoint,
    policy: &OutboundPolicy,
    map: &str,
    share: u32,
    held: Option<&str>,
    timeout: Duration,
) -> Result<usize, HaproxyError> {
    match held {
        Some(v) if v == share.to_string() => Ok(0),
        Some(_) => run(
            endpoint,
            policy,
            format!("set map {map} {SPLIT_KEY} {share}"),
            timeout,
        )
        .await
        .map(|()| 1),
        None => run(
            endpoint,
            policy,
            format!("add map {map} {SPLIT_KEY} {share}"),
            timeout,
        )
        .await
        .map(|()| 1),
    }
}

/// Makes `target`'s maps hold `wanted`, then reads them back.
pub async fn apply(
    endpoint: &Endpoint,
    policy: &OutboundPolicy,
    target: &MapTarget,
    wanted: &Wanted,
    timeout: Duration,
) -> Result<Applied, HaproxyError> {
    let split = target.split_map();
    let held = held_share(endpoint, policy, &split, timeout).await?;
    let held_bp = held.as_deref().and_then(|v| v.parse::<u32>().ok());
    let mut changes = 0;
    // Narrowing first: a smaller share, then the users and headers that must go.
    let narrower = held_bp.is_none_or(|h| wanted.share < h);
    if narrower {
        changes += set_share(endpoint, policy, &split, wanted.share, held.as_deref(), timeout).await?;
    }
    let lists = [
        (target.users_map(), &wanted.users),
        (target.headers_map(), &wanted.headers),
    ];
    let mut diffs = Vec::with_capacity(lists.len());
    for (map, keys) in &lists {
        diffs.push(KeyDiff::of(&show(endpoint, policy, map, timeout).await?, keys));
    }
    for ((map, _), diff) in lists.iter().zip(&diffs) {
        changes += diff.narrow(endpoint, policy, map, timeout).await?;
    }
    for ((map, _), diff) in lists.iter().zip(&diffs) {
        changes += diff.widen(endpoint, policy, map, timeout).await?;
    }
    if !narrower {
        changes += set_share(endpoint, policy, &split, wanted.share, held.as_deref(), timeout).await?;
    }
    // Read back: counts only once HAProxy reports exactly the route.
    let share = held_share(endpoint, policy, &split, timeout).await?;
    if share.as_deref() != Some(wanted.share.to_string().as_str()) {
        return Err(HaproxyError::MapNotApplied {
            map: split,
            detail: format!("share {share:?}, wanted {}", wanted.share),
        });
    }
    for (map, keys) in lists {
        let held = show(endpoint, policy, &map, timeout).await?;
        let (right, wrong) = keys_of(&held);
        if &right != keys || !wrong.is_empty() || held.len() != keys.len() {
            return Err(HaproxyError::MapNotApplied {
                map,
                detail: format!(
                    "{} entries held, {} wanted, {} missing",
                    held.len(),
                    keys.len(),
                    keys.difference(&right).count()
                ),
            });
        }
    }
    Ok(Applied { changes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_with_the_key_haproxy_reads() {
        let maps: HaproxyMaps = "prod/shop=/etc/haproxy/maps/shop@header:X-User-Id, prod/cart=/m/cart@cookie:uid, dev/shop=/m/dev"
            .parse()
            .expect("valid");
        let shop = maps.find("prod", "shop").expect("shop");
        assert_eq!(shop.users_map(), "/etc/haproxy/maps/shop.users.map");
        assert_eq!(shop.sticky, Some(Sticky::Header("x-user-id".into())));
        assert_eq!(
            maps.find("prod", "cart").expect("cart").sticky,
            Some(Sticky::Cookie("uid".into()))
        );
        assert_eq!(maps.find("dev", "shop").expect("dev").sticky, None);
        assert!(maps.find("dev", "cart").is_none());
        for bad in [
            "prod/shop",
            "prod=/m/shop",
            "prod/shop=m/shop",
            "prod/shop=/m/sh op",
            "prod/shop=/m/shop;x",
            "prod/shop=/m/shop@query:uid",
            "prod/shop=/m/shop@header:x user",
            "prod/shop=/m/shop@header:",
        ] {
            assert!(bad.parse::<HaproxyMaps>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_plan_haproxy_cannot_carry_is_refused_by_name() {
        let target: HaproxyMaps = "prod/shop=/m/shop@header:x-user-id".parse().expect("valid");
        let target = &target.0[0];
        assert!(
            target
                .can_route(Some(&Sticky::Header("x-user-id".into())), true)
                .is_ok()
        );
        assert!(target.can_route(None, false).is_ok());
        let wrong = target
            .can_route(Some(&Sticky::Cookie("uid".into())), false)
            .expect_err("another key");
        assert!(wrong.contains("header:x-user-id"), "{wrong}");
        let plain: HaproxyMaps = "prod/shop=/m/shop".parse().expect("valid");
        assert!(
            plain.0[0].can_route(None, true).is_err(),
            "an allow-list without a key"
        );
        assert!(
            plain.0[0]
                .can_route(Some(&Sticky::Header("x-user-id".into())), false)
                .is_err()
        );
    }

    #[test]
    fn header_patterns_hold_nothing_the_runtime_api_would_change() {
        let pattern = header_pattern(&HeaderMatch {
            name: "X-Canary".into(),
            value: "a.b+c*(d)$".into(),
        });
        assert_eq!(
            pattern,
            "(^|[[:cntrl:]])x-canary:[[:blank:]]*a[.]b[+]c[*][(]d[)][$][[:blank:]]*[[:cntrl:]]"
        );
        assert!(!pattern.contains(' ') && !pattern.contains('\\') && !pattern.contains(';'));
    }

    #[test]
    fn a_route_becomes_basis_points_and_keys() {
        let route = Route {
            percent: 12.345,
            sticky: Some(Sticky::Header("x-user-id".into())),
            headers: vec![HeaderMatch {
                name: "x-canary".into(),
                value: "always".into(),
            }],
            users: vec!["b".into(), "a".into()],
        };
        let wanted = Wanted::of(&route);
        assert_eq!(wanted.share, 1235);
        assert_eq!(wanted.users.iter().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(wanted.headers.len(), 1);
    }
}
