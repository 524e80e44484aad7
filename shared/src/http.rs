//! What every service's HTTP side shares: problem+json errors, a JSON extractor whose
//! rejections are problem+json too, the request-context middleware (request id, trace
//! context, access log, metrics) and the health, readiness and metrics routes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::{
    Router,
    extract::{FromRequest, MatchedPath, Request, State, rejection::JsonRejection},
    http::{HeaderName, HeaderValue, Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::Serialize;
use serde_json::json;

use crate::telemetry::TraceContext;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

#[derive(Clone, Debug, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// RFC 9457 problem details: every error of the API.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    #[schema(example = "about:blank")]
    pub kind: &'static str,
    #[schema(example = "Unprocessable Entity")]
    pub title: &'static str,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

impl Problem {
    pub fn new(status: StatusCode, detail: Option<String>) -> Self {
        Self {
            kind: "about:blank",
            title: status.canonical_reason().unwrap_or("Error"),
            status: status.as_u16(),
            detail,
            request_id: TraceContext::with_current(|t| t.request_id.clone()).flatten(),
            errors: Vec::new(),
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, axum::Json(self)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        response
    }
}

/// What a client may be told went wrong. Unexpected errors are logged in full and shown
/// to the client only as a request id.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("forbidden")]
    Forbidden,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

impl From<sqlx::Error> for ApiError {
    fn from(error: sqlx::Error) -> Self {
        Self::Unexpected(error.into())
    }
}

impl ApiError {
    /// A database error as the client should see it: a violation of one of the named
    /// constraints is a 409 with that constraint's message; anything else is unexpected.
    pub fn from_db(error: sqlx::Error, constraints: &[(&str, &str)]) -> Self {
        if let sqlx::Error::Database(db) = &error
            && let Some(name) = db.constraint()
            && let Some((_, message)) = constraints.iter().find(|(c, _)| *c == name)
        {
            return Self::Conflict((*message).to_owned());
        }
        Self::Unexpected(error.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, detail) = match &self {
            Self::BadRequest(m) => (StatusCode::BAD_REQUEST, Some(m.clone())),
            Self::Validation(_) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                Some("the request has invalid fields".into()),
            ),
            Self::Unauthorized(m) => (StatusCode::UNAUTHORIZED, Some((*m).to_owned())),
            Self::Forbidden => (StatusCode::FORBIDDEN, None),
            Self::NotFound(m) => (StatusCode::NOT_FOUND, Some(m.clone())),
            Self::Conflict(m) => (StatusCode::CONFLICT, Some(m.clone())),
            Self::Unprocessable(m) => (StatusCode::UNPROCESSABLE_ENTITY, Some(m.clone())),
            Self::Unavailable(m) => (StatusCode::SERVICE_UNAVAILABLE, Some(m.clone())),
            Self::Unexpected(error) => {
                tracing::error!(error = format!("{error:#}"), "unexpected error");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Some("something went wrong on our side; quote the request id".into()),
                )
            }
        };
        let unauthorized = matches!(self, Self::Unauthorized(_));
        let mut problem = Problem::new(status, detail);
        if let Self::Validation(errors) = self {
            problem.errors = errors;
        }
        let mut response = problem.into_response();
        if unauthorized {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// `axum::Json`, but a body that is not valid JSON for `T` gets a problem+json 400 (or
/// 415 without a JSON content type) that names the problem.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    axum::Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(Problem::new(
                rejection.status(),
                Some(rejection.body_text()),
            )),
        }
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

fn header_str(req: &Request, name: &HeaderName) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Request id and trace context for each request: taken from `X-Request-Id` and
/// `traceparent` when the caller sent valid ones, made up otherwise, made current for
/// the handler (so events it writes carry them) and returned on the response.
/// A time-ordered id (UUID v7) for a request that came without one. Its random part is
/// for uniqueness only, so it comes from a fast generator instead of a system call.
fn new_request_id() -> String {
    let millis = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or_default();
    let mut random = [0u8; 10];
    fastrand::fill(&mut random);
    uuid_text(uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid())
}

/// A UUID in its hyphenated lower-case form, as `to_string` gives it, without the
/// formatting machinery (a measurable share of a proxied request).
pub fn uuid_text(id: uuid::Uuid) -> String {
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    id.hyphenated().encode_lower(&mut text).to_owned()
}

/// What the request-context work needs, shared by every request.
struct Common {
    service: Arc<str>,
    timeout: Duration,
    body_limit: usize,
    metrics: RequestMetrics,
}

/// What every request gets: request id and trace context, a body size limit, a time
/// limit, the access log line and the HTTP metrics. The common layers run it for a
/// router's routes; the gateway runs it for the paths it proxies without a router.
#[derive(Clone)]
pub struct RequestContext(Arc<Common>);

impl RequestContext {
    pub fn new(service: &str, settings: &crate::config::HttpSettings) -> Self {
        // Installed before the first request caches its handles.
        crate::metrics::handle();
        Self(Arc::new(Common {
            service: service.into(),
            timeout: Duration::from_millis(settings.request_timeout_ms),
            body_limit: settings.body_limit_bytes,
            metrics: RequestMetrics::default(),
        }))
    }
}

/// The HTTP metric handles of each (route, method, status), looked up once: registering
/// a labelled metric builds, sorts and hashes its labels, which per request cost the
/// gateway more than parsing the request.
#[derive(Default)]
struct RequestMetrics {
    by_route: std::sync::Mutex<HashMap<Arc<str>, Vec<RouteMetrics>>>,
}

#[derive(Clone)]
struct RouteMetrics {
    method: &'static str,
    status: u16,
    requests: metrics::Counter,
    duration: metrics::Histogram,
}

impl RequestMetrics {
    fn record(&self, service: &str, route: &str, method: &Method, status: u16, elapsed: Duration) {
        let method = method_label(method);
        // One lock for the lookup and a first registration, so two requests cannot both
        // register the same series.
        let handles = {
            let mut by_route = self.by_route.lock().unwrap_or_else(|e| e.into_inner());
            let entries = match by_route.get_mut(route) {
                Some(entries) => entries,
                None => by_route.entry(Arc::from(route)).or_default(),
            };
            match entries
                .iter()
                .find(|m| m.method == method && m.status == status)
            {
                Some(found) => found.clone(),
                None => {
                    let labels = [
                        ("service", service.to_owned()),
                        ("method", method.to_owned()),
                        ("route", route.to_owned()),
                        ("status", status.to_string()),
                    ];
                    let handles = RouteMetrics {
                        method,
                        status,
                        requests: metrics::counter!("http_requests_total", &labels),
                        duration: metrics::histogram!("http_request_duration_seconds", &labels),
                    };
                    entries.push(handles.clone());
                    handles
                }
            }
        };
        handles.requests.increment(1);
        handles.duration.record(elapsed.as_secs_f64());
    }
}

/// The method as a metric label. Clients can send any token as a method; those outside
/// RFC 9110's set share one label so they cannot multiply the series.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// A refused request body up to this size is read to its end before the answer goes
/// out; a larger one gets the answer and a closed connection.
pub const DRAIN_LIMIT: usize = 64 * 1024 * 1024;

/// Reads and discards what is left of a body that was refused (at most [`DRAIN_LIMIT`]
/// bytes, for at most 5 s), as nginx's lingering close does. A client still writing it
/// then reads the 413 instead of a reset connection. A body declared larger than that
/// is not read at all.
pub async fn drain(body: axum::body::Body, declared: Option<usize>) {
    use futures_util::StreamExt as _;
    if declared.is_some_and(|length| length > DRAIN_LIMIT) {
        return;
    }
    let mut stream = body.into_data_stream();
    let mut read = 0;
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(chunk)) = stream.next().await {
            read += chunk.len();
            if read > DRAIN_LIMIT {
                break;
            }
        }
    })
    .await;
}

impl RequestContext {
    /// Runs `handler` for `req` within the request's context; `route` is the matched
    /// route pattern, the metrics' and the log's `route`.
    pub async fn run<F, Fut>(&self, route: &str, req: Request, handler: F) -> Response
    where
        F: FnOnce(Request) -> Fut,
        Fut: Future<Output = Response>,
    {
        let common = &self.0;
        let started = Instant::now();
        let service = &common.service;
        let request_id = header_str(&req, &REQUEST_ID)
            .filter(|id| !id.is_empty() && id.len() <= 128 && id.is_ascii())
            .unwrap_or_else(new_request_id);
        let trace = header_str(&req, &TRACEPARENT)
            .and_then(|h| TraceContext::parse(&h))
            .map(|parent| parent.child())
            .unwrap_or_else(TraceContext::new_root)
            .with_request_id(Some(request_id.clone()));
        let method = req.method().clone();
        // `correlation_id` is filled in by a handler that knows the saga (order-svc's POST
        // /orders), so one id finds the request and every event it caused.
        let span = tracing::info_span!(
            "http",
            service = %service,
            %method,
            route = %route,
            request_id = %request_id,
            trace_id = %trace.trace_id(),
            correlation_id = tracing::field::Empty,
        );
        let traceparent = trace.traceparent();
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let limit = common.body_limit;
        // No async block around the handler: each layer of futures is one more copy of
        // the request and one more move of the handler's future.
        let mut response = if declared.is_some_and(|length| length > limit) {
            // Boxed, as a rare path, to keep every request's future small.
            let refuse = async move {
                drain(req.into_body(), declared).await;
                Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    Some(format!("the request body is larger than {limit} bytes")),
                )
                .into_response()
            };
            tracing::Instrument::instrument(Box::pin(trace.scope(refuse)), span.clone()).await
        } else {
            // Bodies without a length are cut off at the limit while they are read.
            let req =
                req.map(|body| axum::body::Body::new(http_body_util::Limited::new(body, limit)));
            let work = tokio::time::timeout(common.timeout, handler(req));
            match tracing::Instrument::instrument(trace.scope(work), span.clone()).await {
                Ok(response) => response,
                Err(_) => {
                    let mut problem = Problem::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        Some(format!(
                            "the request took longer than {} ms",
                            common.timeout.as_millis()
                        )),
                    );
                    // Outside the trace scope now: the request id is named here.
                    problem.request_id = Some(request_id.clone());
                    problem.into_response()
                }
            }
        };

        let status = response.status();
        let elapsed = started.elapsed();
        if let Ok(value) = HeaderValue::from_str(&request_id) {
            response.headers_mut().insert(REQUEST_ID, value);
        }
        if let Ok(value) = HeaderValue::from_str(&traceparent) {
            response.headers_mut().insert(TRACEPARENT, value);
        }
        let probe = is_probe(route);
        common
            .metrics
            .record(service, route, &method, status.as_u16(), elapsed);
        let _enter = span.enter();
        let elapsed_ms = elapsed.as_millis() as u64;
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), elapsed_ms, "request failed");
        } else if probe {
            // Probes come every few seconds from every orchestrator; keep them out of the way.
            tracing::debug!(status = status.as_u16(), elapsed_ms, "request");
        } else {
            tracing::info!(status = status.as_u16(), elapsed_ms, "request");
        }
        response
    }
}

/// The request context as a router's outermost layer (one middleware: each extra layer
/// is one more boxed service cloned per request).
async fn request_context(
    State(context): State<RequestContext>,
    req: Request,
    next: Next,
) -> Response {
    let matched = req.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map_or("unmatched", MatchedPath::as_str);
    context.run(route, req, |req| next.run(req)).await
}

fn is_probe(route: &str) -> bool {
    matches!(route, "/health" | "/ready" | "/metrics")
}

async fn not_found() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, Some("no such route".into()))
}

async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        Some("this route does not take that method".into()),
    )
}

/// Wraps a service's routes with what every service does the same way.
pub fn with_common_layers(
    router: Router,
    service: &str,
    settings: &crate::config::HttpSettings,
) -> Router {
    with_context(router, RequestContext::new(service, settings))
}

/// [`with_common_layers`] with a context the caller also uses elsewhere (a front).
pub fn with_context(router: Router, context: RequestContext) -> Router {
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(context, request_context))
}

/// One dependency's state for `/ready`.
#[derive(Clone)]
pub enum Check {
    Database(sqlx::PgPool),
    Broker(crate::messaging::Broker),
    Redis(deadpool_redis::Pool),
    /// Another service's `/ready` (the gateway reports every service).
    Http {
        name: &'static str,
        url: String,
        client: reqwest::Client,
    },
}

impl Check {
    fn name(&self) -> &'static str {
        match self {
            Self::Database(_) => "database",
            Self::Broker(_) => "broker",
            Self::Redis(_) => "redis",
            Self::Http { name, .. } => name,
        }
    }

    async fn run(&self) -> Result<(), String> {
        let check = async {
            match self {
                Self::Database(pool) => sqlx::query("SELECT 1")
                    .execute(pool)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string()),
                Self::Broker(broker) => broker.check().await.map_err(|e| e.to_string()),
                Self::Redis(pool) => {
                    let mut conn = pool.get().await.map_err(|e| e.to_string())?;
                    deadpool_redis::redis::cmd("PING")
                        .query_async::<String>(&mut conn)
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string())
                }
                Self::Http { url, client, .. } => {
                    let response = client.get(url).send().await.map_err(|e| e.to_string())?;
                    if response.status().is_success() {
                        Ok(())
                    } else {
                        Err(format!("answered {}", response.status()))
                    }
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(2), check)
            .await
            .unwrap_or_else(|_| Err("timed out after 2s".into()))
    }
}

#[derive(Clone)]
struct Probes {
    service: Arc<str>,
    checks: Arc<[Check]>,
    queues: Option<Arc<crate::metrics::QueueGauges>>,
}

async fn health(State(probes): State<Probes>) -> Response {
    axum::Json(json!({"status": "ok", "service": &*probes.service})).into_response()
}

async fn ready(State(probes): State<Probes>) -> Response {
    let results = futures_util::future::join_all(probes.checks.iter().map(Check::run)).await;
    let mut checks = serde_json::Map::new();
    let mut ready = true;
    for (check, result) in probes.checks.iter().zip(results) {
        let value = match result {
            Ok(()) => json!({"status": "ok"}),
            Err(error) => {
                ready = false;
                json!({"status": "error", "error": error})
            }
        };
        checks.insert(check.name().into(), value);
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "service": &*probes.service,
        "checks": checks,
    });
    (status, axum::Json(body)).into_response()
}

async fn metrics_text(State(probes): State<Probes>) -> Response {
    if let Some(queues) = &probes.queues {
        queues.refresh().await;
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(),
    )
        .into_response()
}

/// `/health` (the process answers), `/ready` (each of `checks` answers) and `/metrics`
/// (with `queues` read from the broker at each scrape, for a service that consumes).
pub fn probe_routes(
    service: &str,
    checks: Vec<Check>,
    queues: Option<crate::metrics::QueueGauges>,
) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .with_state(Probes {
            service: service.into(),
            checks: checks.into(),
            queues: queues.map(Arc::new),
        })
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use axum::routing::post;
    use serde::Deserialize;
    use tower::ServiceExt as _;
    use uuid::Uuid;

    use super::*;

    #[derive(Debug, Deserialize)]
    struct Order {
        #[allow(dead_code)]
        quantity: u32,
    }

    async fn create(Json(_order): Json<Order>) -> StatusCode {
        StatusCode::CREATED
    }

    async fn broken() -> Result<(), ApiError> {
        Err(anyhow::anyhow!("connection to db-7 refused").into())
    }

    async fn invalid() -> Result<(), ApiError> {
        Err(ApiError::Validation(vec![FieldError {
            field: "quantity".into(),
            message: "must be at least 1".into(),
        }]))
    }

    async fn slow() -> StatusCode {
        tokio::time::sleep(Duration::from_secs(3600)).await;
        StatusCode::OK
    }

    fn app() -> Router {
        let routes = Router::new()
            .route("/orders", post(create))
            .route("/broken", get(broken))
            .route("/invalid", get(invalid))
            .route("/slow", get(slow));
        let settings = crate::config::HttpSettings {
            body_limit_bytes: 64,
            ..crate::config::HttpSettings::default()
        };
        with_common_layers(routes, "test", &settings)
    }

    async fn call(
        request: Request<Body>,
    ) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
        let response = app().oneshot(request).await.expect("infallible");
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        (status, headers, body)
    }

    fn post_json(body: &'static str) -> Request<Body> {
        Request::post("/orders")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body))
            .expect("request")
    }

    fn assert_problem(headers: &axum::http::HeaderMap, body: &serde_json::Value, status: u16) {
        assert_eq!(headers[header::CONTENT_TYPE], "application/problem+json");
        assert_eq!(body["status"], status);
        assert_eq!(
            body["request_id"],
            headers[REQUEST_ID].to_str().expect("ascii")
        );
    }

    #[test]
    fn uuid_text_is_the_display_form() {
        for id in [uuid::Uuid::nil(), uuid::Uuid::max(), uuid::Uuid::now_v7()] {
            assert_eq!(uuid_text(id), id.to_string());
        }
    }

    #[tokio::test]
    async fn malformed_json_is_a_problem_that_names_the_problem() {
        let (status, headers, body) = call(post_json(r#"{"quantity": "#)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_problem(&headers, &body, 400);
        assert!(
            body["detail"].as_str().is_some_and(|d| d.contains("EOF")),
            "{body}"
        );

        let (status, headers, body) = call(post_json(r#"{"quantity": "three"}"#)).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_problem(&headers, &body, 422);
        assert!(
            body["detail"]
                .as_str()
                .is_some_and(|d| d.contains("quantity")),
            "{body}"
        );

        let request = Request::post("/orders")
            .body(Body::from(r#"{"quantity": 1}"#))
            .expect("request");
        let (status, headers, body) = call(request).await;
        assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_problem(&headers, &body, 415);

        let (status, _, _) = call(post_json(r#"{"quantity": 1}"#)).await;
        assert_eq!(status, StatusCode::CREATED);
    }

    #[tokio::test]
    async fn bodies_over_the_limit_get_413_whether_declared_or_streamed() {
        let big = format!(r#"{{"quantity": 1, "padding": "{}"}}"#, "x".repeat(100));
        let declared = Request::post("/orders")
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, big.len())
            .body(Body::from(big.clone()))
            .expect("request");
        let (status, headers, body) = call(declared).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_problem(&headers, &body, 413);

        let chunks: Vec<Result<String, std::io::Error>> =
            vec![Ok(big[..50].into()), Ok(big[50..].into())];
        let streamed = Request::post("/orders")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from_stream(futures_util::stream::iter(chunks)))
            .expect("request");
        let (status, _, _) = call(streamed).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_past_the_time_limit_gets_504() {
        let request = Request::get("/slow").body(Body::empty()).expect("request");
        let (status, headers, body) = call(request).await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
        assert_problem(&headers, &body, 504);
    }

    #[tokio::test]
    async fn unexpected_errors_hide_their_cause_and_give_the_request_id() {
        let request = Request::get("/broken")
            .header(REQUEST_ID, "req-7")
            .body(Body::empty())
            .expect("request");
        let (status, headers, body) = call(request).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_problem(&headers, &body, 500);
        assert_eq!(body["request_id"], "req-7");
        assert!(!body.to_string().contains("db-7"), "{body}");
    }

    #[tokio::test]
    async fn validation_errors_list_each_field() {
        let request = Request::get("/invalid")
            .body(Body::empty())
            .expect("request");
        let (status, headers, body) = call(request).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_problem(&headers, &body, 422);
        assert_eq!(
            body["errors"],
            serde_json::json!([{"field": "quantity", "message": "must be at least 1"}])
        );
    }

    #[tokio::test]
    async fn unknown_routes_and_methods_are_problems_too() {
        let request = Request::get("/nowhere")
            .body(Body::empty())
            .expect("request");
        let (status, headers, body) = call(request).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_problem(&headers, &body, 404);

        let request = Request::delete("/orders")
            .body(Body::empty())
            .expect("request");
        let (status, headers, body) = call(request).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_problem(&headers, &body, 405);
    }

    #[tokio::test]
    async fn requests_are_counted_by_route_template_not_by_path() {
        crate::metrics::handle();
        let routes = Router::new().route("/things/{id}", get(|| async { StatusCode::NO_CONTENT }));
        let app = with_common_layers(
            routes,
            "http-metrics-unit",
            &crate::config::HttpSettings::default(),
        );
        let id = Uuid::now_v7();
        // The second request to a route is counted through the handles the first cached.
        for path in [
            format!("/things/{id}"),
            format!("/things/{}", Uuid::now_v7()),
            format!("/nowhere/{id}"),
        ] {
            let request = Request::get(path).body(Body::empty()).expect("request");
            app.clone().oneshot(request).await.expect("infallible");
        }
        let request = Request::builder()
            .method(Method::from_bytes(b"PURGE").expect("method"))
            .uri(format!("/things/{id}"))
            .body(Body::empty())
            .expect("request");
        app.clone().oneshot(request).await.expect("infallible");
        let text = crate::metrics::render();
        let labels =
            r#"{service="http-metrics-unit",method="GET",route="/things/{id}",status="204"}"#;
        assert!(
            text.contains(&format!("http_requests_total{labels} 2")),
            "{text}"
        );
        assert!(
            text.contains(&format!("http_request_duration_seconds_count{labels} 2")),
            "{text}"
        );
        assert!(
            text.contains(r#"http_requests_total{service="http-metrics-unit",method="other",route="/things/{id}",status="405"} 1"#),
            "{text}"
        );
        assert!(!text.contains("PURGE"), "{text}");
        assert!(
            text.contains(r#"http_requests_total{service="http-metrics-unit",method="GET",route="unmatched",status="404"} 1"#),
            "{text}"
        );
        assert!(!text.contains(&id.to_string()), "{text}");
    }

    #[tokio::test]
    async fn every_response_carries_a_request_id_and_a_traceparent() {
        let request = Request::get("/nowhere")
            .body(Body::empty())
            .expect("request");
        let (_, headers, _) = call(request).await;
        let generated = headers[REQUEST_ID].to_str().expect("ascii");
        assert!(Uuid::parse_str(generated).is_ok(), "{generated}");
        let traceparent = headers[TRACEPARENT].to_str().expect("ascii");
        assert!(TraceContext::parse(traceparent).is_some(), "{traceparent}");
    }
}
