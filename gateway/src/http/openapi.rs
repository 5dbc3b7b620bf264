//! The OpenAPI 3.1 document: the gateway's own endpoints, described where they are written
//! (`#[utoipa::path]` on the handlers in [`crate::http`]), plus one operation per configured
//! route, built here from the routes file, because routes are data, not code.
//!
//! The same function serves `GET /openapi.json`, `gateway openapi --config FILE`, and the
//! committed `openapi/openapi.json` (a test fails when that file drifts from the example routes).

use utoipa::OpenApi;
use utoipa::openapi::path::{
    HttpMethod, Operation, OperationBuilder, ParameterBuilder, ParameterIn,
};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::{
    ContentBuilder, HeaderBuilder, RefOr, Required, ResponseBuilder, ResponsesBuilder,
};

use super::error::Problem;
use super::events::OperationEvent;
use super::responses::AcceptedBody;
use crate::config::RouteConfig;
use crate::operations::idempotency::MAX_KEY_LEN;
use crate::operations::{DeliveryState, Links, OperationView, ProgressState, RetryView, Status};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "NATS HTTP gateway",
        description = "An HTTP front door for NATS JetStream workers. Each configured route turns a request into exactly one JetStream message per Idempotency-Key and answers `202 Accepted` with a status resource (`Location`, `Retry-After`); the worker's reply is served later from any replica. Errors are RFC 9457 `application/problem+json`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        super::reads::get_operation,
        super::reads::cancel_operation,
        super::reads::get_result,
        super::failed::list_failed,
        super::batches::submit_batch,
        super::batches::get_batch,
        super::failed::redrive_operation,
        super::failed::redrive_failed,
        super::events::operation_events,
        super::health::livez,
        super::health::readyz,
    ),
    components(schemas(Problem, AcceptedBody<'static>, OperationView<'static>, OperationEvent, Status, Links, ProgressState, RetryView, DeliveryState, super::failed::FailedList<'static>, super::failed::BulkRedrive, super::failed::Redriven, super::failed::Skipped, super::failed::BulkFilter, super::batches::BatchRequest, super::batches::BatchItem, super::batches::BatchView, super::batches::BatchMember, super::batches::BatchLinks)),
    tags(
        (name = "routes", description = "The configured routes: each request becomes one JetStream message."),
        (name = "operations", description = "Status, result, events and cancellation of accepted requests."),
        (name = "batches", description = "Many requests to one route, accepted all together or not at all."),
        (name = "health", description = "Probes."),
    ),
)]
struct GatewayApi;

/// The document for these routes; `authenticated` when the routes file has an `[auth]` table.
pub fn document(routes: &[RouteConfig], authenticated: bool) -> utoipa::openapi::OpenApi {
    let mut document = GatewayApi::openapi();
    let public_paths: Vec<(String, HttpMethod)> = routes
        .iter()
        .filter(|r| r.public)
        .map(|r| (route_operation(r).0, http_method(r)))
        .collect();
    for route in routes {
        let (path, operation) = route_operation(route);
        document
            .paths
            .add_path_operation(path, vec![http_method(route)], operation);
    }
    // Every endpoint but liveness can be refused for now (overloaded, shutting down, JetStream
    // unreachable): said once here rather than on each handler.
    for (path, item) in document.paths.paths.iter_mut() {
        if path == "/livez" {
            continue;
        }
        let open = OPEN_PATHS.contains(&path.as_str());
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.patch,
            &mut item.delete,
        ];
        for operation in operations.into_iter().flatten() {
            if authenticated && !open {
                operation.responses.responses.insert(
                    "401".to_owned(),
                    problem("Credentials missing or not valid (`WWW-Authenticate` says how).")
                        .build()
                        .into(),
                );
            }
            if !open {
                operation
                    .responses
                    .responses
                    .entry("429".to_owned())
                    .or_insert_with(|| {
                        problem("The tenant is over its request rate (`rate-limited`), or at a quota (`quota-exceeded`); nothing was done.")
                            .header("Retry-After", retry_after_header())
                            .build()
                            .into()
                    });
            }
            operation.responses.responses.insert(
                "431".to_owned(),
                problem("More request headers, or larger ones, than the gateway takes.")
                    .build()
                    .into(),
            );
            operation
                .responses
                .responses
                .entry("503".to_owned())
                .or_insert_with(|| {
                    retry_later(
                        "JetStream unavailable, overloaded, or shutting down; retry after \
                         `Retry-After`.",
                    )
                    .into()
                });
            // A worker's reply of one status, replayed, is any content (`{}`: whatever its
            // type) and, for generators, bytes under `application/octet-stream`, the one "any
            // bytes" type they read (openapi-python-client omits `*/*` responses). Ranges
            // (`2XX`, `4XX`) mix replies with problems and stay unconstrained.
            for (status, response) in operation.responses.responses.iter_mut() {
                if let RefOr::T(response) = response
                    && !status.ends_with("XX")
                    && let Some(any) = response.content.get_mut("*/*")
                    && any.schema.is_none()
                {
                    *any = any_value();
                    response
                        .content
                        .insert("application/octet-stream".to_owned(), binary());
                }
            }
        }
    }
    if authenticated {
        declare_security(&mut document, &public_paths);
    }
    document
}

/// An RFC 9457 problem response.
fn problem(description: &str) -> ResponseBuilder {
    ResponseBuilder::new().description(description).content(
        "application/problem+json",
        ContentBuilder::new()
            .schema(Some(RefOr::<Schema>::Ref(
                utoipa::openapi::Ref::from_schema_name("Problem"),
            )))
            .build(),
    )
}

/// A `503` problem with `Retry-After`.
fn retry_later(description: &str) -> utoipa::openapi::Response {
    problem(description)
        .header("Retry-After", retry_after_header())
        .build()
}

fn retry_after_header() -> utoipa::openapi::Header {
    HeaderBuilder::new()
        .schema(
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                    utoipa::openapi::KnownFormat::Int64,
                )))
                .minimum(Some(0)),
        )
        .description(Some("Seconds to wait before retrying."))
        .build()
}

/// Paths every caller may use: no credentials, no rate limit.
const OPEN_PATHS: [&str; 3] = ["/livez", "/readyz", "/openapi.json"];

/// Declares API keys and bearer JWTs, required everywhere but on the open paths, and optional on
/// public routes (and on status reads, which anonymous callers of public routes make).
fn declare_security(
    document: &mut utoipa::openapi::OpenApi,
    public_paths: &[(String, HttpMethod)],
) {
    use utoipa::openapi::security::{
        ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
    };
    let components = document.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "apiKey",
        SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
    );
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("JWT")
                .build(),
        ),
    );
    let required = vec![
        SecurityRequirement::new("apiKey", Vec::<String>::new()),
        SecurityRequirement::new("bearer", Vec::<String>::new()),
    ];
    let optional = || {
        let mut optional = vec![SecurityRequirement::default()];
        optional.extend(required.iter().cloned());
        optional
    };
    document.security = Some(required.clone());
    for (path, item) in document.paths.paths.iter_mut() {
        let open = OPEN_PATHS.contains(&path.as_str());
        let reads_of_public = path.starts_with("/operations/") && !public_paths.is_empty();
        let methods = [
            (HttpMethod::Get, &mut item.get),
            (HttpMethod::Put, &mut item.put),
            (HttpMethod::Post, &mut item.post),
            (HttpMethod::Patch, &mut item.patch),
            (HttpMethod::Delete, &mut item.delete),
        ];
        for (method, operation) in methods {
            let Some(operation) = operation else { continue };
            let public = public_paths.contains(&(path.clone(), method));
            if open {
                operation.security = Some(vec![SecurityRequirement::default()]);
            } else if public || reads_of_public {
                operation.security = Some(optional());
            }
        }
    }
}

/// The document as the pretty JSON that `/openapi.json` serves and the repository commits, with
/// each route's request schema among the components (`<route>_body`, its `$defs` beside it as
/// `<route>_body.<name>`, references rewritten to match). The schemas go into the serialized
/// document because utoipa's schema type keeps only the keywords it models: hand-written glue,
/// so that a schema file reaches clients as written.
pub fn to_json(document: &utoipa::openapi::OpenApi, routes: &[RouteConfig]) -> String {
    let mut value = serde_json::to_value(document).expect("an OpenAPI document serializes");
    for route in routes {
        let Some(schema) = &route.body_schema else {
            continue;
        };
        let name = body_schema_name(route);
        let mut root = schema.document().clone();
        let mut hoisted = Vec::new();
        if let Some(object) = root.as_object_mut() {
            for key in ["$defs", "definitions"] {
                if let Some(serde_json::Value::Object(defs)) = object.remove(key) {
                    hoisted.extend(
                        defs.into_iter()
                            .map(|(def, v)| (format!("{name}.{def}"), v)),
                    );
                }
            }
        }
        let schemas = value
            .as_object_mut()
            .expect("a document is an object")
            .entry("components")
            .or_insert_with(|| serde_json::json!({}))
            .as_object_mut()
            .expect("components is an object")
            .entry("schemas")
            .or_insert_with(|| serde_json::json!({}))
            .as_object_mut()
            .expect("schemas is an object");
        for (key, mut schema) in std::iter::once((name.clone(), root)).chain(hoisted) {
            rewrite_refs(&mut schema, &name);
            schemas.insert(key, schema);
        }
    }
    serde_json::to_string_pretty(&value).expect("an OpenAPI document serializes")
}

/// The component name of a route's request schema: `orders` gives `orders_body` (route names
/// are unique and hold no dot, so no two routes, and no route and a `$def`, share one).
fn body_schema_name(route: &RouteConfig) -> String {
    format!("{}_body", route.name)
}

/// Points a schema file's own references (`#`, `#/$defs/x`, `#/properties/...`) at where its
/// parts now are in the document.
fn rewrite_refs(value: &mut serde_json::Value, name: &str) {
    match value {
        serde_json::Value::Object(object) => {
            for (key, child) in object.iter_mut() {
                match (key.as_str(), child) {
                    ("$ref", serde_json::Value::String(target)) if target.starts_with('#') => {
                        let local = &target[1..];
                        *target = match ["/$defs/", "/definitions/"]
                            .iter()
                            .find_map(|p| local.strip_prefix(p))
                        {
                            Some(def) => format!("#/components/schemas/{name}.{def}"),
                            None => format!("#/components/schemas/{name}{local}"),
                        };
                    }
                    (_, child) => rewrite_refs(child, name),
                }
            }
        }
        serde_json::Value::Array(items) => {
            items.iter_mut().for_each(|item| rewrite_refs(item, name));
        }
        _ => {}
    }
}

fn http_method(route: &RouteConfig) -> HttpMethod {
    match route.http_method().as_str() {
        "GET" => HttpMethod::Get,
        "PUT" => HttpMethod::Put,
        "PATCH" => HttpMethod::Patch,
        "DELETE" => HttpMethod::Delete,
        _ => HttpMethod::Post,
    }
}

/// An Idempotency-Key as the gateway reads it: an RFC 8941 sf-string (`"..."`, printable ASCII,
/// `\"` and `\\` escaped), or a bare value of printable ASCII that does not start with `"` (the
/// key as sent; HTTP trims its outer spaces), 1 to 255 characters.
const KEY_PATTERN: &str = r#"^("([\x20\x21\x23-\x5B\x5D-\x7E]|\\[\\"]){1,255}"|[\x21\x23-\x7E]([\x20-\x7E]{0,253}[\x21-\x7E])?)$"#;

// The pattern's bounds spell out the parser's limit.
const _: () = assert!(MAX_KEY_LEN == 255);

/// Content that may be anything (`{}`): any JSON value, any bytes.
fn any_value() -> utoipa::openapi::Content {
    ContentBuilder::new()
        .schema(Some(Schema::Object(
            ObjectBuilder::new()
                .schema_type(utoipa::openapi::schema::SchemaType::AnyValue)
                .build(),
        )))
        .build()
}

/// Content of any type, as bytes (`type: string, format: binary`).
fn binary() -> utoipa::openapi::Content {
    ContentBuilder::new()
        .schema(Some(Schema::Object(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                    utoipa::openapi::KnownFormat::Binary,
                )))
                .build(),
        )))
        .build()
}

/// What a route's body may be, per media type.
fn body_content(body: RequestBodyBuilder, route: &RouteConfig) -> RequestBodyBuilder {
    if route.body_schema.is_some() {
        // JSON meeting the route's schema, and nothing else (the gateway checks it).
        let schema = utoipa::openapi::Ref::from_schema_name(body_schema_name(route));
        return body.required(Some(Required::True)).content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(RefOr::<Schema>::Ref(schema)))
                .build(),
        );
    }
    // A schema per media type, so that client generators make a submit function
    // (openapi-python-client skips an operation whose body has none): anything under `*/*`,
    // and bytes under `application/octet-stream`, the type generators turn into a file
    // parameter. (An `application/json` entry with `{}` makes openapi-python-client 0.29
    // emit `isinstance(body, typing.Any)`, which raises.)
    body.content("application/octet-stream", binary())
        .content("*/*", any_value())
}

/// One configured route: its path (OpenAPI syntax) and its operation.
fn route_operation(route: &RouteConfig) -> (String, Operation) {
    let string = || ObjectBuilder::new().schema_type(Type::String);
    let mut operation = OperationBuilder::new()
        .tags(Some(["routes"]))
        .operation_id(Some(format!("submit_{}", route.name)))
        .summary(Some(format!("Submit to route `{}`", route.name)))
        .description(Some(format!(
            "Accepted once per Idempotency-Key into JetStream (`{}.req.{}.…`); the answer is `202` \
             with the operation, or, with `Prefer: wait=N`{}, the worker's reply if it comes in \
             time. A retry with the same key and request is answered from the same operation \
             (`Idempotent-Replayed: true`). Results are kept {} and due within {}.",
            handlers::contract::DEFAULT_PREFIX,
            route.name,
            match route.wait {
                Some(wait) => format!(
                    " (this route waits {} by default)",
                    humantime::format_duration(wait)
                ),
                None => String::new(),
            },
            humantime::format_duration(route.retention),
            humantime::format_duration(route.timeout),
        )));
    let mut path = String::new();
    for segment in route.path.split('/').skip(1) {
        path.push('/');
        match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(name) => {
                let name = name.trim_start_matches('*');
                path.push_str(&format!("{{{name}}}"));
                operation = operation.parameter(
                    ParameterBuilder::new()
                        .name(name)
                        .parameter_in(ParameterIn::Path)
                        .required(Required::True)
                        .schema(Some(string())),
                );
            }
            None => path.push_str(segment),
        }
    }
    let key_required = if route.require_idempotency_key {
        Required::True
    } else {
        Required::False
    };
    operation = operation
        .parameter(
            ParameterBuilder::new()
                .name("Idempotency-Key")
                .parameter_in(ParameterIn::Header)
                .required(key_required)
                .description(Some(
                    "The request's idempotency key (IETF draft): an sf-string such as \
                     `\"8e03978e-40d5\"`, or a token. Without it the gateway assigns one and \
                     returns it.",
                ))
                .schema(Some(string().pattern(Some(KEY_PATTERN)))),
        )
        .parameter(
            ParameterBuilder::new()
                .name("Prefer")
                .parameter_in(ParameterIn::Header)
                .description(Some(
                    "RFC 7240: `respond-async`, and `wait=N` to get the result itself if it comes \
                     within N seconds.",
                ))
                .schema(Some(string())),
        )
        .parameter(
            ParameterBuilder::new()
                .name("Callback-Url")
                .parameter_in(ParameterIn::Header)
                .description(Some(
                    "Where to POST the signed completion webhook (Standard Webhooks); must name \
                     an allowed receiver (scheme, host, port, path under the allowed one).",
                ))
                .schema(Some(string().format(Some(
                    utoipa::openapi::SchemaFormat::Custom("uri".to_owned()),
                )))),
        );
    if let Some(max_delay) = route.max_delay {
        let ahead = humantime::format_duration(max_delay);
        operation = operation
            .parameter(
                ParameterBuilder::new()
                    .name("Delay")
                    .parameter_in(ParameterIn::Header)
                    .description(Some(format!(
                        "Start no sooner than this many seconds from now (at most {ahead}); the \
                         operation is `scheduled` until then and its timeout counts from then."
                    )))
                    .schema(Some(string().pattern(Some("^[0-9]+$")))),
            )
            .parameter(
                ParameterBuilder::new()
                    .name("Not-Before")
                    .parameter_in(ParameterIn::Header)
                    .description(Some(format!(
                        "Start no sooner than this time (an HTTP-date or RFC 3339; at most \
                         {ahead} ahead); instead of `Delay`."
                    )))
                    .schema(Some(string())),
            );
    }
    operation = operation.parameter(
        ParameterBuilder::new()
            .name("Start-By")
            .parameter_in(ParameterIn::Header)
            .description(Some(
                "Not started by this time (an HTTP-date or RFC 3339, after the start and before \
                 the deadline), the operation ends `expired` (`not-started`) without running.",
            ))
            .schema(Some(string())),
    );
    if !matches!(http_method(route), HttpMethod::Get | HttpMethod::Delete) {
        let body = RequestBodyBuilder::new().description(Some(format!(
            "Forwarded to the worker byte for byte, with its content type; at most {} bytes.",
            route.max_body.0
        )));
        operation = operation.request_body(Some(body_content(body, route).build()));
    }
    let header = |description: &str| {
        HeaderBuilder::new()
            .schema(string())
            .description(Some(description))
            .build()
    };
    let any = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content("*/*", ContentBuilder::new().build())
    };
    let responses = ResponsesBuilder::new()
        .response(
            "202",
            ResponseBuilder::new()
                .description("Accepted (or found: the same key and request seen before).")
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(RefOr::<Schema>::Ref(
                            utoipa::openapi::Ref::from_schema_name("Accepted"),
                        )))
                        .build(),
                )
                .header("Location", header("The status resource, `/operations/{id}`."))
                .header(
                    "Retry-After",
                    header("Seconds until a status read is worth making (from the route's backlog)."),
                )
                .header("Idempotency-Key", header("The key in effect (sent or assigned)."))
                .header(
                    "Idempotent-Replayed",
                    header("`true` when the answer comes from an earlier request with this key."),
                )
                .header(
                    "Preference-Applied",
                    header("`respond-async` when asked for; `wait=N` when the wait was honoured."),
                ),
        )
        .response(
            "2XX",
            any("The worker's reply, when `Prefer: wait` saw it in time (with `Location` and `Preference-Applied`)."),
        )
        .response(
            "400",
            problem("Malformed Idempotency-Key or Content-Type, Callback-Url not allowed, a start the route cannot take (`invalid-start`), or an unreadable body."),
        )
        .response(
            "408",
            problem("The body did not arrive within the gateway's body read timeout."),
        )
        .response("413", problem("Body over the route's limit, or over the NATS server's max_payload."))
        .response(
            "422",
            problem("The Idempotency-Key was used before for a different request (`operation_id` names it, except for anonymous callers)."),
        )
        .response(
            "4XX",
            any("The worker's reply when it was a client error and `Prefer: wait` saw it in time."),
        )
        .response(
            "507",
            problem("JetStream has no room for the request (`insufficient-storage`); nothing was stored. Retry after `Retry-After` with the same key.")
                .header("Retry-After", retry_after_header())
                .build(),
        )
        .response(
            "503",
            retry_later(
                "JetStream did not confirm (`outcome-unknown`: retry with the same key, sent in \
                 `Idempotency-Key` when the gateway assigned it), is unavailable, the gateway is \
                 overloaded, or it is shutting down. Nothing is lost by retrying.",
            ),
        )
        .response(
            "5XX",
            any("The worker's reply when it was a server error and `Prefer: wait` saw it in time."),
        )
        .build();
    let mut responses = responses;
    if route.body_schema.is_some() {
        responses.responses.insert(
            "400".to_owned(),
            problem(
                "Malformed Idempotency-Key or Content-Type, Callback-Url not allowed, a start the \
                 route cannot take (`invalid-start`), or a body that is not JSON or breaks the \
                 route's schema (`invalid-body`, with `errors`: where and why).",
            )
            .build()
            .into(),
        );
        responses.responses.insert(
            "415".to_owned(),
            problem("The body is not JSON (`application/json`, or a type ending in `+json`).")
                .build()
                .into(),
        );
    }
    (path, operation.responses(responses).build())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `openapi/openapi.json` is the document of the example routes (`gateway/config/dev.toml`);
    /// regenerate it with
    /// `cargo run -p gateway -- openapi --config gateway/config/dev.toml > openapi/openapi.json`.
    #[test]
    fn the_committed_document_is_the_generated_one() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let routes = crate::config::load_routes(&root.join("config/dev.toml")).unwrap();
        let generated = to_json(&document(&routes, false), &routes);
        let committed = std::fs::read_to_string(root.join("../openapi/openapi.json")).unwrap();
        assert!(
            committed.trim_end() == generated.trim_end(),
            "openapi/openapi.json is stale; regenerate it with `cargo run -p gateway -- openapi \
             --config gateway/config/dev.toml > openapi/openapi.json`"
        );
    }

    #[test]
    fn route_paths_become_openapi_paths_with_their_parameters() {
        let route: RouteConfig = toml::from_str(
            r#"
            name = "files"
            method = "PUT"
            path = "/files/{bucket}/{*key}"
            require_idempotency_key = true
            "#,
        )
        .unwrap();
        let (path, operation) = route_operation(&route);
        assert_eq!(path, "/files/{bucket}/{key}");
        let names: Vec<_> = operation
            .parameters
            .unwrap()
            .into_iter()
            .map(|p| (p.name, p.required == Required::True))
            .collect();
        assert_eq!(
            names,
            [
                ("bucket".to_owned(), true),
                ("key".to_owned(), true),
                ("Idempotency-Key".to_owned(), true),
                ("Prefer".to_owned(), false),
                ("Callback-Url".to_owned(), false),
                ("Start-By".to_owned(), false),
            ]
        );
        assert!(operation.request_body.is_some());
    }

    #[test]
    fn the_key_pattern_matches_what_the_parser_accepts() {
        let regex = regex::Regex::new(KEY_PATTERN).expect("the pattern compiles");
        let pattern = |key: &str| regex.is_match(key);
        for (key, ok) in [
            (r#""abc""#, true),
            (r#"" spaced ""#, true),
            (r#""with \"quote\"""#, true),
            ("token-1", true),
            ("8e03978e-40d5-43e8-bc93-6894a57f9324", true),
            ("bare with spaces", true),
            (r#""""#, false),
            (r#""bad"tail"#, false),
            (r#""unterminated"#, false),
            ("caf\u{e9}", false),
            (format!("\"{}\"", "k".repeat(255)).as_str(), true),
            (format!("\"{}\"", "k".repeat(256)).as_str(), false),
            ("k".repeat(255).as_str(), true),
            ("k".repeat(256).as_str(), false),
        ] {
            assert_eq!(pattern(key), ok, "{key}");
            let parsed = crate::operations::idempotency::parse_key([key]);
            assert_eq!(parsed.is_ok(), ok, "{key}");
        }
    }
}
