//! The dead letters of every service as one (DESIGN.md §6, `/api/v1/admin/dead-letters`).
//! Lists are asked of every service at once, each within the upstream timeout; a service
//! that does not answer is named in `unavailable` and the others are still shown. Groups
//! are merged, sorted and paged here; message and audit pages are merged by time (every
//! service pages with the same cursor). Detail, discard and replay go to the service that
//! owns the id (`<service>:<uuid>`). Admins only, here and again in each service.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, body::Body};
use futures_util::future::join_all;
use serde::Serialize;
use serde::de::DeserializeOwned;
use shared::admin::{
    self, AuditQuery, AuditView, BASE, GroupView, ListQuery, MessageView, Page, ReplayRequest,
    ReplayResponse, Unavailable,
};
use shared::auth::{AuthError, Role};
use shared::http::{ApiError, FieldError, Json, Problem};
use shared::telemetry::TraceContext;

use crate::AppState;
use crate::proxy::Upstream;

/// Pages of groups fetched from one service at most (200 groups each).
const GROUP_PAGES: usize = 10;

#[derive(Clone)]
struct Join {
    app: AppState,
    client: reqwest::Client,
    timeout: Duration,
}

pub fn router(app: AppState) -> Router {
    let timeout = Duration::from_millis(app.settings.upstream_timeout_ms);
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap_or_default();
    let join = Arc::new(Join {
        app,
        client,
        timeout,
    });
    Router::new()
        .route(BASE, get(groups))
        .route(&format!("{BASE}/messages"), get(messages))
        .route(&format!("{BASE}/audit"), get(audit))
        .route(&format!("{BASE}/replay"), post(replay))
        .route(&format!("{BASE}/{{id}}"), get(show).delete(discard))
        .with_state(join)
}

/// The short name a service's dead-letter ids carry (`notification`).
fn short(upstream: Upstream) -> &'static str {
    admin::short_service(upstream.name())
}

fn upstream_of(service: &str) -> Option<Upstream> {
    Upstream::ALL.into_iter().find(|u| short(*u) == service)
}

fn unknown_service(field: &str, service: &str) -> ApiError {
    ApiError::Validation(vec![FieldError {
        field: field.into(),
        message: format!(
            "there is no service {service:?}; services: {}",
            Upstream::ALL.map(short).join(", ")
        ),
    }])
}

/// An answer that ends a request early (boxed: a response is large).
struct Refusal(Box<Response>);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        *self.0
    }
}

impl From<ApiError> for Refusal {
    fn from(error: ApiError) -> Self {
        Self(Box::new(error.into_response()))
    }
}

impl From<Problem> for Refusal {
    fn from(problem: Problem) -> Self {
        Self(Box::new(problem.into_response()))
    }
}

/// What the caller sent that the services need too.
struct Caller {
    headers: HeaderMap,
}

impl Join {
    /// 401 without a valid token, 403 unless an admin, 429 over the rate limit.
    async fn admin(&self, headers: &HeaderMap) -> Result<Caller, Refusal> {
        let (parts, ()) = {
            let mut request = axum::http::Request::new(());
            *request.headers_mut() = headers.clone();
            request.into_parts()
        };
        let claims = match self.app.verifier.verify_header(&parts).await {
            Ok(claims) => claims,
            Err(AuthError::Missing | AuthError::Invalid(_)) => {
                return Err(ApiError::Unauthorized("a valid bearer token is required").into());
            }
        };
        if !claims.roles.contains(&Role::Admin) {
            return Err(ApiError::Forbidden.into());
        }
        if let Some(limiter) = &self.app.limiter {
            let policy = self.app.settings.rate_limit.user;
            match limiter.check("user", &claims.sub.to_string(), policy).await {
                Ok(decision) if !decision.allowed => {
                    return Err(Problem::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        Some("too many requests; try again shortly".into()),
                    )
                    .into());
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "rate limit check failed; letting the request through");
                }
            }
        }
        let mut forward = HeaderMap::new();
        if let Some(auth) = headers.get(header::AUTHORIZATION) {
            forward.insert(header::AUTHORIZATION, auth.clone());
        }
        if let Some(trace) = TraceContext::current() {
            if let Ok(value) = HeaderValue::from_str(&trace.traceparent()) {
                forward.insert("traceparent", value);
            }
            if let Some(id) = trace
                .request_id
                .as_deref()
                .and_then(|id| HeaderValue::from_str(id).ok())
            {
                forward.insert("x-request-id", id);
            }
        }
        Ok(Caller { headers: forward })
    }

    fn url(
        &self,
        upstream: Upstream,
        path: &str,
        query: &[(&str, String)],
    ) -> Option<reqwest::Url> {
        let base = self.app.upstreams.get(&upstream)?;
        let mut url = reqwest::Url::parse(&format!("{base}{path}")).ok()?;
        if !query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (k, v) in query {
                pairs.append_pair(k, v);
            }
        }
        Some(url)
    }

    /// One call to one service: its status and body, or why there is none.
    async fn call(
        &self,
        caller: &Caller,
        upstream: Upstream,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&impl Serialize>,
    ) -> Result<(StatusCode, HeaderMap, axum::body::Bytes), String> {
        let url = self
            .url(upstream, path, query)
            .ok_or_else(|| "no address configured".to_owned())?;
        let mut request = self
            .client
            .request(method, url)
            .headers(caller.headers.clone())
            .timeout(self.timeout);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| {
            if e.is_timeout() {
                format!("did not answer within {} ms", self.timeout.as_millis())
            } else {
                "not reachable".to_owned()
            }
        })?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response
            .bytes()
            .await
            .map_err(|_| "its answer was cut short".to_owned())?;
        Ok((status, headers, bytes))
    }

    /// A JSON answer of one service, or an `Unavailable` saying why not.
    async fn fetch<T: DeserializeOwned>(
        &self,
        caller: &Caller,
        upstream: Upstream,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, Unavailable> {
        let unavailable = |error: String| Unavailable {
            service: short(upstream).to_owned(),
            error,
        };
        let (status, _, bytes) = self
            .call(
                caller,
                upstream,
                reqwest::Method::GET,
                path,
                query,
                None::<&()>,
            )
            .await
            .map_err(unavailable)?;
        if !status.is_success() {
            return Err(unavailable(format!(
                "answered {}{}",
                status.as_u16(),
                detail_of(&bytes)
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            )));
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| unavailable(format!("answered something that is not a page: {e}")))
    }

    /// Passes one service's answer through as it is.
    async fn relay(
        &self,
        caller: &Caller,
        upstream: Upstream,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Response {
        match self.call(caller, upstream, method, path, &[], body).await {
            Ok((status, headers, bytes)) => {
                let mut response = Response::new(Body::from(bytes));
                *response.status_mut() = status;
                if let Some(kind) = headers.get(header::CONTENT_TYPE) {
                    response
                        .headers_mut()
                        .insert(header::CONTENT_TYPE, kind.clone());
                }
                response
            }
            Err(error) => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Some(format!("{} {error}", short(upstream))),
            )
            .into_response(),
        }
    }
}

fn detail_of(bytes: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()?
        .get("detail")?
        .as_str()
        .map(str::to_owned)
}

fn query<T>(raw: Result<Query<T>, QueryRejection>) -> Result<T, Refusal> {
    raw.map(|Query(q)| q)
        .map_err(|e| ApiError::BadRequest(format!("the query string is not valid: {e}")).into())
}

/// The services a list goes to: one if the query names it (or its group does), else all.
fn targets(service: Option<&str>, group_service: Option<&str>) -> Result<Vec<Upstream>, ApiError> {
    let one = |field: &str, s: &str| upstream_of(s).ok_or_else(|| unknown_service(field, s));
    match (service, group_service) {
        (Some(s), Some(g)) if s != g => Ok(Vec::new()),
        (Some(s), _) => Ok(vec![one("service", s)?]),
        (None, Some(g)) => Ok(vec![one("group", g)?]),
        (None, None) => Ok(Upstream::ALL.to_vec()),
    }
}

fn list_pairs(q: &ListQuery) -> Vec<(&'static str, String)> {
    let fields = [
        ("service", &q.service),
        ("group", &q.group),
        ("event_type", &q.event_type),
        ("since", &q.since),
        ("until", &q.until),
        ("q", &q.q),
        ("status", &q.status),
    ];
    fields
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
        .collect()
}

async fn groups(
    State(join): State<Arc<Join>>,
    headers: HeaderMap,
    raw: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, Refusal> {
    let caller = join.admin(&headers).await?;
    let q = query(raw)?;
    let parsed = q.parse()?;
    let group_service = parsed.group.as_ref().and_then(|(s, _)| s.as_deref());
    let targets = targets(parsed.service.as_deref(), group_service)?;
    let pairs = list_pairs(&q);
    let results = join_all(targets.iter().map(|&upstream| {
        let (join, caller, pairs) = (&join, &caller, &pairs);
        async move {
            let mut all: Vec<GroupView> = Vec::new();
            let mut cursor: Option<String> = None;
            for _ in 0..GROUP_PAGES {
                let mut query = pairs.clone();
                query.push(("limit", "200".into()));
                if let Some(c) = &cursor {
                    query.push(("cursor", c.clone()));
                }
                let page: Page<GroupView> = join.fetch(caller, upstream, BASE, &query).await?;
                all.extend(page.items);
                cursor = page.next_cursor;
                if cursor.is_none() {
                    break;
                }
            }
            Ok::<_, Unavailable>(all)
        }
    }))
    .await;
    let mut all = Vec::new();
    let mut unavailable = Vec::new();
    for result in results {
        match result {
            Ok(groups) => all.extend(groups),
            Err(u) => unavailable.push(u),
        }
    }
    admin::sort_groups(&mut all);
    let (items, next_cursor) = admin::page_groups(all, parsed.limit, parsed.cursor.as_ref());
    Ok(Json(Page {
        items,
        next_cursor,
        unavailable,
    })
    .into_response())
}

/// Asks every target for the same page and merges the answers by time.
async fn merged<T: DeserializeOwned + admin::Keyed>(
    join: &Join,
    caller: &Caller,
    targets: &[Upstream],
    path: &str,
    query: &[(&str, String)],
    limit: usize,
) -> Page<T> {
    let results = join_all(
        targets
            .iter()
            .map(|&upstream| join.fetch::<Page<T>>(caller, upstream, path, query)),
    )
    .await;
    let mut parts = Vec::new();
    let mut more = false;
    let mut unavailable = Vec::new();
    for result in results {
        match result {
            Ok(page) => {
                more |= page.next_cursor.is_some();
                parts.push(page.items);
            }
            Err(u) => unavailable.push(u),
        }
    }
    let (items, next_cursor) = admin::merge_pages(parts, more, limit);
    Page {
        items,
        next_cursor,
        unavailable,
    }
}

async fn messages(
    State(join): State<Arc<Join>>,
    headers: HeaderMap,
    raw: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Response, Refusal> {
    let caller = join.admin(&headers).await?;
    let q = query(raw)?;
    let parsed = q.parse()?;
    if matches!(parsed.cursor, Some(admin::Cursor::Offset(_))) {
        return Err(ApiError::Validation(vec![FieldError {
            field: "cursor".into(),
            message: "is not a cursor of this list".into(),
        }])
        .into());
    }
    let group_service = parsed.group.as_ref().and_then(|(s, _)| s.as_deref());
    let targets = targets(parsed.service.as_deref(), group_service)?;
    let mut pairs = list_pairs(&q);
    pairs.push(("limit", parsed.limit.to_string()));
    if let Some(cursor) = &parsed.cursor {
        pairs.push(("cursor", cursor.encode()));
    }
    let page: Page<MessageView> = merged(
        &join,
        &caller,
        &targets,
        &format!("{BASE}/messages"),
        &pairs,
        parsed.limit,
    )
    .await;
    Ok(Json(page).into_response())
}

async fn audit(
    State(join): State<Arc<Join>>,
    headers: HeaderMap,
    raw: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Response, Refusal> {
    let caller = join.admin(&headers).await?;
    let q = query(raw)?;
    let parsed = q.parse()?;
    let targets = targets(parsed.service.as_deref(), None)?;
    let mut pairs: Vec<(&str, String)> = [
        ("service", &q.service),
        ("operator", &q.operator),
        ("action", &q.action),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
    .collect();
    pairs.push(("limit", parsed.limit.to_string()));
    if let Some(cursor) = &parsed.cursor {
        pairs.push(("cursor", cursor.encode()));
    }
    let page: Page<AuditView> = merged(
        &join,
        &caller,
        &targets,
        &format!("{BASE}/audit"),
        &pairs,
        parsed.limit,
    )
    .await;
    Ok(Json(page).into_response())
}

/// The service that owns `<service>:<uuid>`.
fn owner(id: &str) -> Result<Upstream, ApiError> {
    match admin::split_key(id) {
        (Some(service), rest) if !rest.is_empty() => upstream_of(service).ok_or_else(|| {
            ApiError::NotFound(format!("no service {service:?} holds dead letters"))
        }),
        _ => Err(ApiError::BadRequest(format!(
            "{id:?} is not a dead letter id: they look like <service>:<uuid>"
        ))),
    }
}

/// `id` as a path segment (the `:` stays; anything odd is escaped).
fn segment(id: &str) -> String {
    id.chars()
        .flat_map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':') {
                vec![c.to_string()]
            } else {
                c.to_string()
                    .bytes()
                    .map(|b| format!("%{b:02X}"))
                    .collect::<Vec<_>>()
            }
        })
        .collect()
}

async fn show(
    State(join): State<Arc<Join>>,
    Path(id): Path<String>,
    request: Request,
) -> Result<Response, Refusal> {
    one(&join, &id, request.headers(), reqwest::Method::GET).await
}

async fn discard(
    State(join): State<Arc<Join>>,
    Path(id): Path<String>,
    request: Request,
) -> Result<Response, Refusal> {
    one(&join, &id, request.headers(), reqwest::Method::DELETE).await
}

async fn one(
    join: &Join,
    id: &str,
    headers: &HeaderMap,
    method: reqwest::Method,
) -> Result<Response, Refusal> {
    let caller = join.admin(headers).await?;
    let upstream = owner(id)?;
    let path = format!("{BASE}/{}", segment(id));
    Ok(join
        .relay(&caller, upstream, method, &path, None::<&()>)
        .await)
}

/// The ids of a replay request by owning service, or the problems with them.
fn by_owner(ids: &[String]) -> Result<Vec<(Upstream, Vec<String>)>, ApiError> {
    let mut errors = Vec::new();
    let mut owners: Vec<(Upstream, Vec<String>)> = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        match owner(id) {
            Ok(upstream) => match owners.iter_mut().find(|(u, _)| *u == upstream) {
                Some((_, list)) => list.push(id.clone()),
                None => owners.push((upstream, vec![id.clone()])),
            },
            Err(error) => errors.push(FieldError {
                field: format!("ids[{i}]"),
                message: error.to_string(),
            }),
        }
    }
    if errors.is_empty() {
        Ok(owners)
    } else {
        Err(ApiError::Validation(errors))
    }
}

async fn replay(
    State(join): State<Arc<Join>>,
    headers: HeaderMap,
    body: Result<Json<ReplayRequest>, Problem>,
) -> Result<Response, Refusal> {
    let caller = join.admin(&headers).await?;
    let Json(request) = body?;
    let path = format!("{BASE}/replay");
    let plan: Vec<(Upstream, ReplayRequest)> = match (&request.ids, &request.group) {
        (Some(ids), None) if !ids.is_empty() && ids.len() <= admin::MAX_REPLAY_IDS => {
            by_owner(ids)?
                .into_iter()
                .map(|(u, ids)| {
                    (
                        u,
                        ReplayRequest {
                            ids: Some(ids),
                            group: None,
                        },
                    )
                })
                .collect()
        }
        (None, Some(group)) => match owner(group) {
            Ok(upstream) => vec![(upstream, request.clone())],
            Err(_) => {
                return Err(ApiError::Validation(vec![FieldError {
                    field: "group".into(),
                    message: "must be a group key, <service>:<fingerprint>".into(),
                }])
                .into());
            }
        },
        // Neither, both, or a bad number of ids: the service says which.
        _ => match request.ids.as_ref().and_then(|ids| ids.first()) {
            Some(first) => vec![(owner(first)?, request.clone())],
            None => vec![(Upstream::ALL[0], request.clone())],
        },
    };
    // One owner: its answer is the answer, errors included.
    if let [(upstream, request)] = plan.as_slice() {
        return Ok(join
            .relay(
                &caller,
                *upstream,
                reqwest::Method::POST,
                &path,
                Some(request),
            )
            .await);
    }
    let results = join_all(plan.iter().map(|(upstream, request)| {
        let (join, caller, path) = (&join, &caller, &path);
        async move {
            let unavailable = |error: String| Unavailable {
                service: short(*upstream).to_owned(),
                error,
            };
            let (status, _, bytes) = join
                .call(
                    caller,
                    *upstream,
                    reqwest::Method::POST,
                    path,
                    &[],
                    Some(request),
                )
                .await
                .map_err(unavailable)?;
            if !status.is_success() {
                return Err(unavailable(format!(
                    "answered {}{}",
                    status.as_u16(),
                    detail_of(&bytes)
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default()
                )));
            }
            serde_json::from_slice::<ReplayResponse>(&bytes)
                .map_err(|e| unavailable(format!("answered something unexpected: {e}")))
        }
    }))
    .await;
    let mut total = ReplayResponse::default();
    for result in results {
        match result {
            Ok(part) => {
                total.replayed += part.replayed;
                total.ids.extend(part.ids);
                total.skipped.extend(part.skipped);
                total.audit_ids.extend(part.audit_ids);
            }
            Err(u) => total.unavailable.push(u),
        }
    }
    Ok(Json(total).into_response())
}
