//! A rollout's traffic plan: who reaches the canary besides its stage's share, and what keeps
//! one user on one version.
//!
//! The plan is data the judge carries, not judges: it rides in the analysis's copy of its model
//! (so it survives a restart with the analysis) and in the canary events that move traffic, where
//! the traffic levers read it. Its names and values end up in HAProxy map keys, regular
//! expressions and Kubernetes objects, so they are held to a character set that every lever can
//! carry verbatim.

use serde::{Deserialize, Serialize};

use super::model::{Model, ModelError, bad};

/// The most users an allow-list holds: a plan travels in every event that moves traffic.
pub const MAX_USERS: usize = 1_000;
/// The most header rules a plan holds.
pub const MAX_HEADERS: usize = 16;
/// The longest user id or header value.
pub const MAX_VALUE_LEN: usize = 128;
/// The longest header or cookie name.
pub const MAX_NAME_LEN: usize = 64;

/// The plan a model gives its rollouts (`[traffic]`), or a declared rollout's own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Traffic {
    /// Where a request carries its user's id, so that the percentage split hashes users, not
    /// requests: one user stays on one version. Without it each request is split on its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky: Option<Sticky>,
    /// Requests carrying any of these headers always reach the canary (while it is not failed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    /// User ids (as the sticky key carries them) that always reach the canary (while it is not
    /// failed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<String>,
}

/// Where a request's user id is: `{ header = "x-user-id" }` or `{ cookie = "uid" }`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Sticky {
    Header(String),
    Cookie(String),
}

impl std::fmt::Display for Sticky {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sticky::Header(name) => write!(f, "header:{name}"),
            Sticky::Cookie(name) => write!(f, "cookie:{name}"),
        }
    }
}

/// A request header that sends a request to the canary: exact value, name in any case.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    pub value: String,
}

/// What a rollout's declaration changes of its model's plan: each part given replaces the
/// model's; `percentages` replaces its stages' weights, one per stage.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficRequest {
    #[serde(default)]
    pub percentages: Option<Vec<f64>>,
    #[serde(default)]
    pub sticky: Option<Sticky>,
    #[serde(default)]
    pub headers: Option<Vec<HeaderMatch>>,
    #[serde(default)]
    pub users: Option<Vec<String>>,
}

/// The characters of a user id or header value: URL-safe text and the punctuation of e-mail
/// addresses and tokens, nothing a lever's own syntax gives a meaning to (space, quote,
/// backslash, brackets, `;`, `#`).
fn value_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~+/=:@!$%&*,()".contains(c)
}

/// The characters of a header name (lower case) or cookie name: a subset of HTTP's token.
fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_.".contains(c)
}

fn check_name(field: &str, name: &str) -> Result<(), ModelError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(bad(
            field,
            format!("a name of 1 to {MAX_NAME_LEN} characters is needed"),
        ));
    }
    if let Some(c) = name.chars().find(|c| !name_char(*c)) {
        return Err(bad(
            field,
            format!("{name:?} holds {c:?}: names are letters, digits, '-', '_' and '.'"),
        ));
    }
    Ok(())
}

fn check_value(field: &str, value: &str) -> Result<(), ModelError> {
    if value.is_empty() || value.len() > MAX_VALUE_LEN {
        return Err(bad(
            field,
            format!("a value of 1 to {MAX_VALUE_LEN} characters is needed"),
        ));
    }
    if let Some(c) = value.chars().find(|c| !value_char(*c)) {
        return Err(bad(
            field,
            format!(
                "{value:?} holds {c:?}: values are letters, digits and -._~+/=:@!$%&*,() \
                 (every traffic lever can carry these verbatim)"
            ),
        ));
    }
    Ok(())
}

impl Traffic {
    /// Whether the plan says nothing: every request is split by the stage's share alone.
    pub fn is_empty(&self) -> bool {
        self.sticky.is_none() && self.headers.is_empty() && self.users.is_empty()
    }

    /// Checks every part; the error names the first bad field under `prefix` (`traffic`).
    pub fn validate(&self, prefix: &str) -> Result<(), ModelError> {
        if let Some(sticky) = &self.sticky {
            let (kind, name) = match sticky {
                Sticky::Header(name) => ("header", name),
                Sticky::Cookie(name) => ("cookie", name),
            };
            check_name(&format!("{prefix}.sticky.{kind}"), name)?;
        }
        if self.headers.len() > MAX_HEADERS {
            return Err(bad(
                format!("{prefix}.headers"),
                format!("at most {MAX_HEADERS} header rules, not {}", self.headers.len()),
            ));
        }
        for (i, h) in self.headers.iter().enumerate() {
            check_name(&format!("{prefix}.headers[{i}].name"), &h.name)?;
            check_value(&format!("{prefix}.headers[{i}].value"), &h.value)?;
            if self.headers[..i].contains(h) {
                return Err(bad(
                    format!("{prefix}.headers[{i}]"),
                    "the same rule is given twice",
                ));
            }
        }
        if self.users.len() > MAX_USERS {
            return Err(bad(
                format!("{prefix}.users"),
                format!("at most {MAX_USERS} users, not {}", self.users.len()),
            ));
        }
        if !self.users.is_empty() && self.sticky.is_none() {
            return Err(bad(
                format!("{prefix}.users"),
                format!("an allow-list needs {prefix}.sticky to say where a request carries its user id"),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, user) in self.users.iter().enumerate() {
            check_value(&format!("{prefix}.users[{i}]"), user)?;
            if !seen.insert(user.as_str()) {
                return Err(bad(
                    format!("{prefix}.users[{i}]"),
                    format!("{user:?} is listed twice"),
                ));
            }
        }
        Ok(())
    }

    /// The plan with header names in lower case (HTTP's names are case-insensitive; levers
    /// compare them as written).
    pub fn normalized(mut self) -> Traffic {
        if let Some(Sticky::Header(name)) = &mut self.sticky {
            name.make_ascii_lowercase();
        }
        for h in &mut self.headers {
            h.name.make_ascii_lowercase();
        }
        self
    }
}

impl Model {
    /// This model with a declared rollout's plan laid over its own: the parts given replace the
    /// model's, `percentages` its stages' weights (a stage named for its weight, "5%", renamed
    /// with it). The result is validated as a whole; errors name `traffic.<field>`.
    pub fn with_traffic(&self, request: &TrafficRequest) -> Result<Model, ModelError> {
        let mut model = self.clone();
        if let Some(percentages) = &request.percentages {
            if percentages.len() != model.stages.len() {
                return Err(bad(
                    "traffic.percentages",
                    format!(
                        "model {:?} has {} stages; give one percentage per stage, not {}",
                        model.name,
                        model.stages.len(),
                        percentages.len()
                    ),
                ));
            }
            let mut last = 0.0;
            for (i, (stage, &p)) in model.stages.iter_mut().zip(percentages).enumerate() {
                if !(p > 0.0 && p <= 100.0) {
                    return Err(bad(
                        format!("traffic.percentages[{i}]"),
                        format!("must be in (0, 100], not {p}"),
                    ));
                }
                if p < last {
                    return Err(bad(
                        format!("traffic.percentages[{i}]"),
                        format!("{p} is below the previous stage's {last}"),
                    ));
                }
                last = p;
                if stage.name == format!("{}%", stage.weight) {
                    stage.name = format!("{p}%");
                }
                stage.weight = p;
            }
        }
        if let Some(sticky) = &request.sticky {
            model.traffic.sticky = Some(sticky.clone());
        }
        if let Some(headers) = &request.headers {
            model.traffic.headers = headers.clone();
        }
        if let Some(users) = &request.users {
            model.traffic.users = users.clone();
        }
        model.traffic.validate("traffic")?;
        model.traffic = model.traffic.normalized();
        model.validate()?;
        Ok(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::judge::model::Stage;

    fn staged() -> Model {
        let stage = |w: f64| Stage {
            name: format!("{w}%"),
            weight: w,
            observe_s: 60,
            gates: Vec::new(),
            approval: false,
        };
        Model {
            name: "staged".into(),
            stages: vec![stage(5.0), stage(20.0), stage(50.0)],
            ..crate::judge::checks::tests::decision::model()
        }
    }

    fn field_of(result: Result<Model, ModelError>) -> String {
        result.expect_err("refused").field
    }

    #[test]
    fn a_declared_plan_replaces_the_parts_it_gives() {
        let mut model = staged();
        model.traffic.headers = vec![HeaderMatch {
            name: "x-canary".into(),
            value: "always".into(),
        }];
        let planned = model
            .with_traffic(&TrafficRequest {
                percentages: Some(vec![1.0, 10.0, 100.0]),
                sticky: Some(Sticky::Header("X-User-Id".into())),
                users: Some(vec!["alice@example.com".into(), "u-42".into()]),
                headers: None,
            })
            .expect("valid");
        let weights: Vec<f64> = planned.stages.iter().map(|s| s.weight).collect();
        assert_eq!(weights, [1.0, 10.0, 100.0]);
        assert_eq!(
            planned.stages[2].name, "100%",
            "a stage named for its weight is renamed"
        );
        assert_eq!(planned.traffic.sticky, Some(Sticky::Header("x-user-id".into())));
        assert_eq!(
            planned.traffic.headers, model.traffic.headers,
            "not given: the model's"
        );
        assert_eq!(planned.traffic.users.len(), 2);
        assert_eq!(
            model.with_traffic(&TrafficRequest::default()).expect("valid"),
            model,
            "an empty request changes nothing"
        );
    }

    #[test]
    fn every_bad_part_is_named() {
        let model = staged();
        let sticky = || Some(Sticky::Cookie("uid".into()));
        let cases: Vec<(TrafficRequest, &str)> = vec![
            (
                TrafficRequest {
                    percentages: Some(vec![5.0, 20.0]),
                    ..Default::default()
                },
                "traffic.percentages",
            ),
            (
                TrafficRequest {
                    percentages: Some(vec![5.0, 0.0, 50.0]),
                    ..Default::default()
                },
                "traffic.percentages[1]",
            ),
            (
                TrafficRequest {
                    percentages: Some(vec![5.0, 50.0, 20.0]),
                    ..Default::default()
                },
                "traffic.percentages[2]",
            ),
            (
                TrafficRequest {
                    percentages: Some(vec![5.0, 20.0, f64::NAN]),
                    ..Default::default()
                },
                "traffic.percentages[2]",
            ),
            (
                TrafficRequest {
                    users: Some(vec!["alice".into()]),
                    ..Default::default()
                },
                "traffic.users",
            ),
            (
                TrafficRequest {
                    sticky: sticky(),
                    users: Some(vec!["alice".into(), "bob smith".into()]),
                    ..Default::default()
                },
                "traffic.users[1]",
            ),
            (
                TrafficRequest {
                    sticky: sticky(),
                    users: Some(vec!["alice".into(), "alice".into()]),
                    ..Default::default()
                },
                "traffic.users[1]",
            ),
            (
                TrafficRequest {
                    sticky: sticky(),
                    users: Some((0..=MAX_USERS).map(|i| format!("u{i}")).collect()),
                    ..Default::default()
                },
                "traffic.users",
            ),
            (
                TrafficRequest {
                    sticky: Some(Sticky::Header("x user".into())),
                    ..Default::default()
                },
                "traffic.sticky.header",
            ),
            (
                TrafficRequest {
                    headers: Some(vec![HeaderMatch {
                        name: "x-canary".into(),
                        value: "a;b".into(),
                    }]),
                    ..Default::default()
                },
                "traffic.headers[0].value",
            ),
            (
                TrafficRequest {
                    headers: Some(vec![HeaderMatch {
                        name: String::new(),
                        value: "on".into(),
                    }]),
                    ..Default::default()
                },
                "traffic.headers[0].name",
            ),
        ];
        for (request, field) in cases {
            assert_eq!(field_of(model.with_traffic(&request)), field, "{request:?}");
        }
        let unstaged = crate::judge::checks::tests::decision::model();
        assert_eq!(
            field_of(unstaged.with_traffic(&TrafficRequest {
                percentages: Some(vec![10.0]),
                ..Default::default()
            })),
            "traffic.percentages"
        );
    }

    #[test]
    fn a_plan_reads_from_a_model_file_and_an_empty_one_is_not_written() {
        let text = r#"
[traffic]
sticky = { header = "x-user-id" }
headers = [{ name = "x-canary", value = "always" }]
users = ["alice", "bob"]
"#;
        let model: Model = toml::from_str(text).expect("parses");
        assert_eq!(model.traffic.sticky, Some(Sticky::Header("x-user-id".into())));
        assert_eq!(model.traffic.users, ["alice", "bob"]);
        model.traffic.validate("traffic").expect("valid");
        let plain = serde_json::to_value(staged()).expect("json");
        assert!(
            plain.get("traffic").is_none(),
            "a model without a plan is stored as before: {plain}"
        );
    }
}
