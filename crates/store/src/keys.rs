//! The keys of schema 2's engine trees. Every string is preceded by its length (u64, big endian)
//! and a scope by a tag byte, so a key's parts read back unambiguously and the key of one scope
//! (env, app, and the app or one version) is a prefix of the keys of that scope only: a version
//! `*` or `""` is not the app, `1.2` is not a prefix of `1.20`, and evicting a version deletes
//! exactly its keys.
//!
//! Seasonal slot keys (`slots.3`) are the slot, u16 big endian, then the engine's series name
//! (`BaselineId::series_name`, which starts with `BaselineId::series_prefix` of its scope and has
//! the same property): one hour's slots of every series lie together, so the slots saved and read
//! as event time turns an hour fall in one part of the tree, not one part per series (`cargo bench
//! -p canaryd-store --bench slots`). Schema 2's first layout (`slots.2`) had the series name first
//! (`slot_of_v2`).

use canaryd_engine::features::{Feature, FeatureKey};
use canaryd_engine::{BaselineId, Scope};

const APP_SCOPE: u8 = 0;
const VERSION_SCOPE: u8 = 1;

fn put(key: &mut Vec<u8>, part: &str) {
    key.extend((part.len() as u64).to_be_bytes());
    key.extend(part.as_bytes());
}

/// Reads a key part by part.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn text(&mut self) -> Option<&'a str> {
        let (len, rest) = self.0.split_first_chunk::<8>()?;
        let len = usize::try_from(u64::from_be_bytes(*len)).ok()?;
        let (text, rest) = rest.split_at_checked(len)?;
        self.0 = rest;
        std::str::from_utf8(text).ok()
    }

    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
}

/// The key of an app's clock and catalog entry.
pub fn app(env: &str, app: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(env.len() + app.len() + 16);
    put(&mut key, env);
    put(&mut key, app);
    key
}

pub fn parse_app(key: &[u8]) -> Option<(String, String)> {
    let mut r = Reader(key);
    let parsed = (r.text()?.to_owned(), r.text()?.to_owned());
    r.0.is_empty().then_some(parsed)
}

/// The start of the key of every baseline of one scope, and of no other.
pub fn scope(env: &str, app_name: &str, scope: &Scope) -> Vec<u8> {
    let mut key = app(env, app_name);
    match scope {
        Scope::App => key.push(APP_SCOPE),
        Scope::Version(v) => {
            key.push(VERSION_SCOPE);
            put(&mut key, v);
        }
    }
    key
}

/// A baseline's key: its scope's, then the feature by name and the subject.
pub fn baseline(id: &BaselineId) -> Vec<u8> {
    let mut key = scope(&id.env, &id.app, &id.scope);
    put(&mut key, id.key.feature.name());
    put(&mut key, &id.key.subject);
    key
}

pub fn parse_baseline(key: &[u8]) -> Option<BaselineId> {
    let mut r = Reader(key);
    let env = r.text()?.to_owned();
    let app = r.text()?.to_owned();
    let scope = match r.byte()? {
        APP_SCOPE => Scope::App,
        VERSION_SCOPE => Scope::Version(r.text()?.to_owned()),
        _ => return None,
    };
    let feature = Feature::from_name(r.text()?)?;
    let subject = r.text()?;
    r.0.is_empty().then(|| BaselineId {
        env,
        app,
        scope,
        key: FeatureKey::of(feature, subject),
    })
}

/// A seasonal slot's key.
pub fn slot(series: &str, slot: u16) -> Vec<u8> {
    slot_key(series.as_bytes(), slot)
}

fn slot_key(series: &[u8], slot: u16) -> Vec<u8> {
    let mut key = Vec::with_capacity(series.len() + 2);
    key.extend(slot.to_be_bytes());
    key.extend(series);
    key
}

/// The series a seasonal slot's key names (`slot`): `None` for a key not made from a str.
pub fn series_of_slot(key: &[u8]) -> Option<&str> {
    key.get(2..).and_then(|name| std::str::from_utf8(name).ok())
}

/// The start of the keys of one slot of every baseline, and of no other slot.
pub fn slot_hour(slot: u16) -> [u8; 2] {
    slot.to_be_bytes()
}

/// The start of the keys of one slot of every baseline of one scope, and of no other.
pub fn slot_scope(env: &str, app: &str, scope: &Scope, slot: u16) -> Vec<u8> {
    self::slot(&BaselineId::series_prefix(env, app, scope), slot)
}

/// The key in `slots.3` of a key of `slots.2` (series name, then the slot): `None` for a key too
/// short to hold a slot.
pub fn slot_of_v2(key: &[u8]) -> Option<Vec<u8>> {
    let (series, slot) = key.split_last_chunk::<2>()?;
    Some(slot_key(series, u16::from_be_bytes(*slot)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(env: &str, app: &str, scope: Scope, subject: &str) -> BaselineId {
        BaselineId {
            env: env.into(),
            app: app.into(),
            scope,
            key: FeatureKey::of(Feature::OperationShare, subject),
        }
    }

    fn scopes() -> Vec<Scope> {
        let long = "v".repeat(10_000);
        let mut scopes = vec![Scope::App];
        for v in ["*", "", "1.2", "1.20", "1", "\u{1f}", "\0", &long] {
            scopes.push(Scope::Version(v.to_owned()));
        }
        scopes
    }

    #[test]
    fn keys_read_back_as_what_they_were_made_of() {
        for scope in scopes() {
            for (env, app, subject) in [
                ("prod", "shop", "GET /a"),
                ("", "", ""),
                ("a\0b", "\u{1f}", "[x]"),
            ] {
                let id = id(env, app, scope.clone(), subject);
                assert_eq!(parse_baseline(&baseline(&id)), Some(id));
            }
        }
        assert_eq!(parse_app(&app("a", "")), Some(("a".into(), "".into())));
        assert_eq!(parse_app(&app("a", "b")[..10]), None);
    }

    #[test]
    fn a_scope_prefix_starts_the_keys_of_that_scope_only() {
        let scopes = scopes();
        for a in &scopes {
            for b in &scopes {
                let key = baseline(&id("prod", "shop", b.clone(), "GET /a"));
                let slot_key = slot(&id("prod", "shop", b.clone(), "GET /a").series_name(), 7);
                assert_eq!(key.starts_with(&scope("prod", "shop", a)), a == b, "{a:?} {b:?}");
                for hour in [0, 6, 7, 8, 167] {
                    assert_eq!(
                        slot_key.starts_with(&slot_scope("prod", "shop", a, hour)),
                        a == b && hour == 7,
                        "slot {a:?} {b:?} {hour}"
                    );
                }
            }
        }
        // Neither does an app whose name continues another's.
        let other = baseline(&id("prod", "shop2", Scope::App, ""));
        assert!(!other.starts_with(&scope("prod", "shop", &Scope::App)));
    }
}
