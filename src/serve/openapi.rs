//! The OpenAPI 3.1 document of the API, built from the handlers' own descriptions, and the schemas
//! of the names the engine defines (states, outcomes, metrics, modes).

use std::borrow::Cow;
use std::sync::OnceLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use canaryd_engine::judge::{GateMetric, GateOutcome, Mode, Outcome, State as CanaryState};
use serde::Serialize;
use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{OpenApi, PartialSchema, ToSchema};

use super::auth::{Access, needed};
use super::error::PROBLEM_JSON;
use super::{ErrorBody, internal};
use axum::http::Method;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "canaryd",
        description = "Judges canary versions from OpenTelemetry data. JSON under `/api/v1`; an \
            `env` query parameter selects the environment (default `default`). Event times are \
            RFC 3339 in UTC. Errors are `{\"error\": \"...\"}`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    components(schemas(ErrorBody)),
    tags(
        (name = "health", description = "Liveness, readiness, the daemon's own metrics"),
        (name = "apps", description = "What canaryd has seen and learned"),
        (name = "canary", description = "Canary analyses and declared rollouts"),
        (name = "events", description = "Events and webhook subscriptions"),
        (name = "gates", description = "Flagger's webhooks"),
        (name = "meta", description = "This description")
    )
)]
pub(super) struct ApiDoc;

/// The OpenAPI 3.1 description of `routes`, with the bearer token wherever `auth` asks for one.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = super::routes().into_openapi();
    secure(&mut doc);
    problems_as_problem_json(&mut doc);
    doc
}

/// The name of the bearer-token security scheme.
const BEARER: &str = "bearer";

/// A path's operations, with their methods.
fn operations(item: &mut PathItem) -> impl Iterator<Item = (Method, &mut Operation)> {
    [
        (Method::GET, &mut item.get),
        (Method::POST, &mut item.post),
        (Method::PUT, &mut item.put),
        (Method::DELETE, &mut item.delete),
        (Method::PATCH, &mut item.patch),
    ]
    .into_iter()
    .filter_map(|(method, operation)| Some((method, operation.as_mut()?)))
}

/// Marks every operation that `auth::needed` guards as needing the bearer token, with its 401:
/// the document and the check are one rule.
fn secure(doc: &mut utoipa::openapi::OpenApi) {
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        BEARER,
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "When `api_token` (admin) or `api_read_token` is set: every POST, PUT and \
                     DELETE needs `Authorization: Bearer <api_token>`; reading subscriptions and \
                     deliveries needs either token; Flagger's gates need either, as a bearer token \
                     or as the webhook's `metadata.token`; other reads are open. 401 without.",
                ))
                .build(),
        ),
    );
    for (path, item) in doc.paths.paths.iter_mut() {
        for (method, operation) in operations(item) {
            if needed(&method, path) == Access::Open {
                continue;
            }
            operation.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
            operation
                .responses
                .responses
                .entry("401".to_owned())
                .or_insert_with(|| {
                    ResponseBuilder::new()
                        .description("A token is set and the request lacks one that grants this")
                        .content(
                            PROBLEM_JSON,
                            ContentBuilder::new()
                                .schema(Some(Ref::from_schema_name(ErrorBody::name())))
                                .build(),
                        )
                        .into()
                });
        }
    }
}

/// Every answer whose body is an `ErrorBody` is served as `application/problem+json` (RFC 9457),
/// whatever the handler's description says by default.
fn problems_as_problem_json(doc: &mut utoipa::openapi::OpenApi) {
    let error_body = Ref::from_schema_name(ErrorBody::name());
    for item in doc.paths.paths.values_mut() {
        for (_, operation) in operations(item) {
            for response in operation.responses.responses.values_mut() {
                let RefOr::T(response) = response else { continue };
                let is_problem = response
                    .content
                    .get("application/json")
                    .is_some_and(|c| matches!(&c.schema, Some(RefOr::Ref(r)) if *r == error_body));
                if is_problem && let Some(content) = response.content.shift_remove("application/json") {
                    response.content.insert(PROBLEM_JSON.to_owned(), content);
                }
            }
        }
    }
}

/// `GET /openapi.json`: this API's OpenAPI document, built once.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", body = Object))
)]
pub(super) async fn openapi_json() -> Response {
    static DOC: OnceLock<Result<String, String>> = OnceLock::new();
    match DOC.get_or_init(|| openapi().to_json().map_err(|e| e.to_string())) {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json.as_str()).into_response(),
        Err(e) => internal("cannot write the OpenAPI document", e),
    }
}

/// A string schema with the given values, for names the engine defines.
fn names_schema<E: Into<serde_json::Value>>(
    description: &str,
    names: impl IntoIterator<Item = E>,
) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
        .enum_values(Some(names))
        .into()
}

/// How serde writes `value` (an enum's variant name).
fn serde_name(value: impl Serialize) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or_default()
}

/// A schema named `$name` for a set of names (`$names`, an expression yielding them), whose
/// values come from the engine's own types, so that they cannot drift from what is served.
macro_rules! names_type {
    ($(#[$doc:meta])* $ty:ident, $name:literal, $description:literal, $names:expr) => {
        $(#[$doc])*
        pub(crate) struct $ty;

        impl PartialSchema for $ty {
            fn schema() -> RefOr<Schema> {
                names_schema($description, $names)
            }
        }

        impl ToSchema for $ty {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }
        }
    };
}

names_type!(
    /// `judge::State`'s names.
    CanaryStateSchema,
    "CanaryState",
    "An analysis's state: `insufficient_data` (no verdict yet, not a failure), `healthy`, \
     `marginal` (failing at this look, not yet confirmed), `failing`, `promoted`, `rolled_back`",
    CanaryState::ALL.iter().map(|s| s.name())
);

names_type!(
    /// `judge::Outcome`'s names.
    OutcomeSchema,
    "CheckOutcome",
    "What a check concluded at the last look",
    {
        // Exhaustive, so that a new outcome does not compile until it is listed here.
        let _ = |o: Outcome| match o {
            Outcome::Pass | Outcome::InsufficientData | Outcome::Marginal | Outcome::Fail => (),
        };
        [Outcome::Pass, Outcome::InsufficientData, Outcome::Marginal, Outcome::Fail].map(Outcome::name)
    }
);

names_type!(
    /// `judge::GateOutcome`'s names.
    GateOutcomeSchema,
    "GateOutcome",
    "What a stage gate concluded",
    {
        let _ = |o: GateOutcome| match o {
            GateOutcome::Pass | GateOutcome::Pending | GateOutcome::Fail | GateOutcome::Shared => (),
        };
        GateOutcome::ALL.map(serde_name)
    }
);

names_type!(
    /// `judge::GateMetric`'s names.
    GateMetricSchema,
    "GateMetric",
    "What a stage gate measures",
    {
        let _ = |m: GateMetric| match m {
            GateMetric::ErrorRate
            | GateMetric::Availability
            | GateMetric::LatencyP50Ms
            | GateMetric::LatencyP95Ms
            | GateMetric::LatencyP99Ms => (),
        };
        [
            GateMetric::ErrorRate,
            GateMetric::Availability,
            GateMetric::LatencyP50Ms,
            GateMetric::LatencyP95Ms,
            GateMetric::LatencyP99Ms,
        ]
        .map(serde_name)
    }
);

names_type!(
    /// `judge::Mode`'s names.
    ModeSchema,
    "Mode",
    "How verdicts are acted on: `enforce`, or `shadow` (judged and sent as `dry_run`, no traffic moved)",
    {
        let _ = |m: Mode| match m {
            Mode::Enforce | Mode::Shadow => (),
        };
        [Mode::Enforce, Mode::Shadow].map(serde_name)
    }
);
