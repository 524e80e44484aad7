//! Dead letters over HTTP, for administrators (DESIGN.md §4 "dead letters are for
//! people", §6). Every service with a database serves these routes on its own dead
//! letters; the gateway joins them across services with the same shapes.
//!
//! Ids name their owner: a dead letter is `<service>:<uuid>` (`notification:0193…`) and a
//! group `<service>:<fingerprint>`, so the gateway routes a detail, replay or discard to
//! the service that holds it without asking the others.
//!
//! | route | what |
//! |---|---|
//! | `GET /api/v1/admin/dead-letters` | groups by error fingerprint |
//! | `GET /api/v1/admin/dead-letters/messages` | the dead letters themselves |
//! | `GET /api/v1/admin/dead-letters/{id}` | one, with headers and body |
//! | `POST /api/v1/admin/dead-letters/replay` `{ids} \| {group}` | replay (paced, audited) |
//! | `DELETE /api/v1/admin/dead-letters/{id}` | discard (kept until purged, audited) |
//! | `GET /api/v1/admin/dead-letters/audit` | every replay and discard |

use std::cmp::Ordering;

use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRef, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::auth::{AuthUser, Role, Verifier};
use crate::http::{ApiError, FieldError, Json, Problem};
use crate::messaging::dead_letter::{
    AuditEntry, AuditFilter, DeadLetter, DeadLetterStore, Discard, Filter, Group, Selection, Status,
};

pub const BASE: &str = "/api/v1/admin/dead-letters";

/// Most ids one replay request may name.
pub const MAX_REPLAY_IDS: usize = 1000;

/// A group of dead letters that failed the same way in one service.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GroupView {
    /// `<service>:<fingerprint>`: pass it as `group` to list or replay the group.
    #[schema(example = "notification:3f2a9c0d41b7e6a8")]
    pub key: String,
    #[schema(example = "notification")]
    pub service: String,
    pub fingerprint: String,
    #[schema(example = "mail_receipts")]
    pub handler: String,
    /// `transient`, `permanent`, `timeout`, `malformed`, `unknown_event`,
    /// `unsupported_version` or `broker`.
    #[schema(example = "permanent")]
    pub error_kind: String,
    /// The error of the most recent member.
    pub error_message: String,
    pub count: i64,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    #[schema(example = json!(["order.paid"]))]
    pub event_types: Vec<String>,
}

impl GroupView {
    fn new(service: &str, group: Group) -> Self {
        Self {
            key: format!("{service}:{}", group.fingerprint),
            service: service.to_owned(),
            fingerprint: group.fingerprint,
            handler: group.handler,
            error_kind: group.error_kind,
            error_message: group.error_message,
            count: group.count,
            first_seen: group.first_seen,
            last_seen: group.last_seen,
            event_types: group.event_types,
        }
    }
}

/// One dead letter in a list.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MessageView {
    /// `<service>:<uuid>`.
    #[schema(example = "notification:0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b")]
    pub id: String,
    pub service: String,
    /// The message's own id (the event id); unchanged by a replay.
    pub message_id: String,
    pub event_type: Option<String>,
    /// The saga's id (the order id for order events).
    pub correlation_id: Option<String>,
    /// The group key, `<service>:<fingerprint>`.
    pub group: String,
    pub handler: String,
    pub error_kind: String,
    pub error_message: String,
    /// Failed attempts before it was dead-lettered (the last time).
    pub attempts: i32,
    pub first_failed_at: DateTime<Utc>,
    pub last_failed_at: DateTime<Utc>,
    /// `open`, `replayed` or `discarded`.
    #[schema(example = "open")]
    pub status: String,
    /// Times it reached the dead letters (more than 1: a replay failed again).
    pub dead_lettered_count: i32,
    pub replay_count: i32,
}

/// Everything about one dead letter.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DetailView {
    pub id: String,
    pub service: String,
    pub message_id: String,
    pub event_type: Option<String>,
    pub correlation_id: Option<String>,
    pub group: String,
    pub handler: String,
    pub error_kind: String,
    pub error_message: String,
    /// The error and its causes, one per line.
    pub error_chain: String,
    pub attempts: i32,
    pub first_failed_at: DateTime<Utc>,
    pub last_failed_at: DateTime<Utc>,
    pub status: String,
    pub dead_lettered_count: i32,
    pub replay_count: i32,
    /// Where the message was first published.
    pub original_exchange: String,
    pub original_routing_key: String,
    /// Every AMQP header the message carried when it was dead-lettered.
    #[schema(value_type = Object)]
    pub headers: Value,
    /// The body, pretty-printed when it is JSON.
    pub body: String,
    pub received_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub replayed_at: Option<DateTime<Utc>>,
    pub replayed_by: Option<String>,
    pub discarded_at: Option<DateTime<Utc>>,
    pub discarded_by: Option<String>,
    /// A replay was asked for and waits for its turn to be sent.
    pub replay_pending: bool,
}

fn message_view(service: &str, d: &DeadLetter) -> MessageView {
    MessageView {
        id: format!("{service}:{}", d.id),
        service: service.to_owned(),
        message_id: d.message_id.clone(),
        event_type: d.event_type.clone(),
        correlation_id: d.correlation_id.clone(),
        group: format!("{service}:{}", d.fingerprint),
        handler: d.handler.clone(),
        error_kind: d.error_kind.clone(),
        error_message: d.error_message.clone(),
        attempts: d.attempts,
        first_failed_at: d.first_failed_at,
        last_failed_at: d.last_failed_at,
        status: d.status.as_str().to_owned(),
        dead_lettered_count: d.dead_lettered_count,
        replay_count: d.replay_count,
    }
}

fn detail_view(service: &str, d: &DeadLetter, replay_pending: bool) -> DetailView {
    DetailView {
        id: format!("{service}:{}", d.id),
        service: service.to_owned(),
        message_id: d.message_id.clone(),
        event_type: d.event_type.clone(),
        correlation_id: d.correlation_id.clone(),
        group: format!("{service}:{}", d.fingerprint),
        handler: d.handler.clone(),
        error_kind: d.error_kind.clone(),
        error_message: d.error_message.clone(),
        error_chain: d.error_chain.clone(),
        attempts: d.attempts,
        first_failed_at: d.first_failed_at,
        last_failed_at: d.last_failed_at,
        status: d.status.as_str().to_owned(),
        dead_lettered_count: d.dead_lettered_count,
        replay_count: d.replay_count,
        original_exchange: d.original_exchange.clone(),
        original_routing_key: d.original_routing_key.clone(),
        headers: d.headers.clone(),
        body: d.body_pretty(),
        received_at: d.received_at,
        updated_at: d.updated_at,
        replayed_at: d.replayed_at,
        replayed_by: d.replayed_by.clone(),
        discarded_at: d.discarded_at,
        discarded_by: d.discarded_by.clone(),
        replay_pending,
    }
}

/// One replay or discard in the audit log.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditView {
    /// `<service>:<uuid>`.
    pub id: String,
    pub service: String,
    pub at: DateTime<Utc>,
    /// Who did it: the subject (user id) of the administrator's token.
    pub operator: String,
    /// `replay` or `discard`.
    pub action: String,
    /// The group asked for, if the operator named one.
    pub group: Option<String>,
    /// The dead letters asked for (for a group: its open members at that moment).
    pub requested: Vec<String>,
    /// Those replayed or discarded; the others were no longer open.
    pub affected: Vec<String>,
    /// `done` (all of them), `partial` or `nothing` (none was open).
    pub result: String,
}

fn audit_view(service: &str, entry: AuditEntry) -> AuditView {
    let ids =
        |ids: &[Uuid]| -> Vec<String> { ids.iter().map(|id| format!("{service}:{id}")).collect() };
    let result = if entry.affected.is_empty() {
        "nothing"
    } else if entry.affected.len() < entry.requested.len() {
        "partial"
    } else {
        "done"
    };
    AuditView {
        id: format!("{service}:{}", entry.id),
        service: service.to_owned(),
        at: entry.at,
        operator: entry.operator,
        action: entry.action,
        group: entry.fingerprint.map(|f| format!("{service}:{f}")),
        requested: ids(&entry.requested),
        affected: ids(&entry.affected),
        result: result.to_owned(),
    }
}

/// A service that did not answer the gateway in time, or answered with an error.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Unavailable {
    pub service: String,
    pub error: String,
}

/// One page of a list. `unavailable` names the services whose part is missing (only the
/// gateway fills it).
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `cursor` for the next page; null on the last one.
    pub next_cursor: Option<String>,
    #[serde(default)]
    pub unavailable: Vec<Unavailable>,
}

impl<T> Page<T> {
    /// One service's own page: nothing can be missing from it.
    fn local(items: Vec<T>, next_cursor: Option<String>) -> Self {
        Self {
            items,
            next_cursor,
            unavailable: Vec::new(),
        }
    }
}

/// Replay a selection (`ids`) or a whole group (`group`), exactly one of them.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReplayRequest {
    /// Dead letter ids (`<service>:<uuid>`), 1 to 1000.
    pub ids: Option<Vec<String>>,
    /// A group key (`<service>:<fingerprint>`): its open members at this moment.
    pub group: Option<String>,
}

/// What a replay did. The messages are sent at the configured rate after the answer;
/// `replay_pending` on a dead letter shows one still waiting.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReplayResponse {
    /// How many dead letters were queued for replay.
    pub replayed: u64,
    /// Their ids.
    pub ids: Vec<String>,
    /// Ids asked for that were not open (already replayed, discarded, or unknown).
    pub skipped: Vec<String>,
    /// The audit entries written, one per service.
    pub audit_ids: Vec<String>,
    /// Services that did not answer: their part was not replayed.
    #[serde(default)]
    pub unavailable: Vec<Unavailable>,
}

/// Query of the group and message lists. All optional.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this service (`notification` or `notification-svc`).
    pub service: Option<String>,
    /// Only this group (`<service>:<fingerprint>`).
    pub group: Option<String>,
    /// Only this event type (`order.paid`).
    pub event_type: Option<String>,
    /// Last failure at or after this time (RFC 3339).
    pub since: Option<String>,
    /// Last failure before this time (RFC 3339).
    pub until: Option<String>,
    /// Text in the error, the message or correlation id (any case), or the body (exact).
    pub q: Option<String>,
    /// `open` (default), `replayed`, `discarded` or `all`.
    pub status: Option<String>,
    /// 1 to 200 (default 50).
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

/// Query of the audit log.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    pub service: Option<String>,
    /// Only this operator (user id).
    pub operator: Option<String>,
    /// `replay` or `discard`.
    pub action: Option<String>,
    /// 1 to 200 (default 50).
    pub limit: Option<String>,
    pub cursor: Option<String>,
}

/// A position in a list, opaque to clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cursor {
    /// Groups: how many were shown before.
    Offset(usize),
    /// Messages and audit entries: the last one shown (time, id).
    After(DateTime<Utc>, String),
}

impl Cursor {
    pub fn encode(&self) -> String {
        let text = match self {
            Self::Offset(n) => format!("o|{n}"),
            Self::After(at, key) => {
                format!(
                    "k|{}|{key}",
                    at.to_rfc3339_opts(SecondsFormat::Micros, true)
                )
            }
        };
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
    }

    pub fn decode(s: &str) -> Option<Self> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(s.trim())
            .ok()?;
        let text = String::from_utf8(bytes).ok()?;
        let mut parts = text.splitn(3, '|');
        match (parts.next()?, parts.next()?, parts.next()) {
            ("o", n, None) => n.parse().ok().map(Self::Offset),
            ("k", at, Some(key)) => DateTime::parse_from_rfc3339(at)
                .ok()
                .map(|at| Self::After(at.with_timezone(&Utc), key.to_owned())),
            _ => None,
        }
    }
}

/// The short service name: `notification-svc` and `notification` are both `notification`.
pub fn short_service(name: &str) -> &str {
    let name = name.trim();
    name.strip_suffix("-svc").unwrap_or(name)
}

/// Splits `<service>:<rest>`; a bare `<rest>` has no service.
pub fn split_key(key: &str) -> (Option<&str>, &str) {
    match key.trim().split_once(':') {
        Some((service, rest)) => (Some(short_service(service)), rest),
        None => (None, key.trim()),
    }
}

/// A list query checked: what the store needs, and which service it is limited to.
#[derive(Clone, Debug, Default)]
pub struct ParsedList {
    pub service: Option<String>,
    /// (service, fingerprint)
    pub group: Option<(Option<String>, String)>,
    pub filter: Filter,
    pub limit: usize,
    pub cursor: Option<Cursor>,
}

fn limit_of(raw: Option<&str>, errors: &mut Vec<FieldError>) -> usize {
    match raw.map(str::trim).filter(|s| !s.is_empty()) {
        None => 50,
        Some(raw) => match raw.parse::<usize>() {
            Ok(n) if (1..=200).contains(&n) => n,
            _ => {
                errors.push(field("limit", "must be a whole number from 1 to 200"));
                50
            }
        },
    }
}

fn field(name: &str, message: &str) -> FieldError {
    FieldError {
        field: name.into(),
        message: message.into(),
    }
}

fn time_of(name: &str, raw: Option<&str>, errors: &mut Vec<FieldError>) -> Option<DateTime<Utc>> {
    let raw = raw.map(str::trim).filter(|s| !s.is_empty())?;
    match DateTime::parse_from_rfc3339(raw) {
        Ok(t) => Some(t.with_timezone(&Utc)),
        Err(_) => {
            errors.push(field(
                name,
                "must be an RFC 3339 time, e.g. 2026-01-31T12:00:00Z",
            ));
            None
        }
    }
}

fn non_empty(raw: Option<&String>) -> Option<String> {
    raw.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

impl ListQuery {
    /// Checks every parameter; all problems are reported at once (422).
    pub fn parse(&self) -> Result<ParsedList, ApiError> {
        let mut errors = Vec::new();
        let service = non_empty(self.service.as_ref()).map(|s| short_service(&s).to_owned());
        if let Some(s) = &service
            && !is_service_name(s)
        {
            errors.push(field("service", "is not a service name"));
        }
        let group = non_empty(self.group.as_ref()).map(|g| {
            let (service, fingerprint) = split_key(&g);
            (service.map(str::to_owned), fingerprint.to_owned())
        });
        if group.as_ref().is_some_and(|(_, f)| f.is_empty()) {
            errors.push(field(
                "group",
                "must be a group key, <service>:<fingerprint>",
            ));
        }
        let status = match non_empty(self.status.as_ref()).as_deref() {
            None | Some("open") => Some(Status::Open),
            Some("all") => None,
            Some(other) => match Status::parse(other) {
                Some(status) => Some(status),
                None => {
                    errors.push(field("status", "must be open, replayed, discarded or all"));
                    None
                }
            },
        };
        let since = time_of("since", self.since.as_deref(), &mut errors);
        let until = time_of("until", self.until.as_deref(), &mut errors);
        let limit = limit_of(self.limit.as_deref(), &mut errors);
        let cursor = match non_empty(self.cursor.as_ref()) {
            None => None,
            Some(raw) => match Cursor::decode(&raw) {
                Some(c) => Some(c),
                None => {
                    errors.push(field("cursor", "is not a cursor this API gave out"));
                    None
                }
            },
        };
        if !errors.is_empty() {
            return Err(ApiError::Validation(errors));
        }
        let text = non_empty(self.q.as_ref());
        Ok(ParsedList {
            service,
            filter: Filter {
                status,
                fingerprint: group.as_ref().map(|(_, f)| f.clone()),
                event_type: non_empty(self.event_type.as_ref()),
                since,
                until,
                text,
                after: None,
                limit: None,
            },
            group,
            limit,
            cursor,
        })
    }
}

/// The parsed audit query: (service, filter without paging, limit, cursor).
pub struct ParsedAudit {
    pub service: Option<String>,
    pub filter: AuditFilter,
    pub limit: usize,
    pub cursor: Option<Cursor>,
}

impl AuditQuery {
    pub fn parse(&self) -> Result<ParsedAudit, ApiError> {
        let mut errors = Vec::new();
        let service = non_empty(self.service.as_ref()).map(|s| short_service(&s).to_owned());
        if let Some(s) = &service
            && !is_service_name(s)
        {
            errors.push(field("service", "is not a service name"));
        }
        let action = non_empty(self.action.as_ref());
        if action
            .as_deref()
            .is_some_and(|a| !matches!(a, "replay" | "discard"))
        {
            errors.push(field("action", "must be replay or discard"));
        }
        let limit = limit_of(self.limit.as_deref(), &mut errors);
        let cursor = match non_empty(self.cursor.as_ref()) {
            None => None,
            Some(raw) => match Cursor::decode(&raw) {
                Some(c @ Cursor::After(..)) => Some(c),
                _ => {
                    errors.push(field("cursor", "is not a cursor this API gave out"));
                    None
                }
            },
        };
        if !errors.is_empty() {
            return Err(ApiError::Validation(errors));
        }
        Ok(ParsedAudit {
            service,
            filter: AuditFilter {
                operator: non_empty(self.operator.as_ref()),
                action,
                after: None,
                limit: None,
            },
            limit,
            cursor,
        })
    }
}

fn is_service_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 40
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// Groups in display order: largest first, then most recent, then by key.
pub fn sort_groups(groups: &mut [GroupView]) {
    groups.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then(b.last_seen.cmp(&a.last_seen))
            .then(a.key.cmp(&b.key))
    });
}

/// One page of sorted groups by offset.
pub fn page_groups(
    groups: Vec<GroupView>,
    limit: usize,
    cursor: Option<&Cursor>,
) -> (Vec<GroupView>, Option<String>) {
    let start = match cursor {
        Some(Cursor::Offset(n)) => *n,
        _ => 0,
    };
    let total = groups.len();
    let items: Vec<GroupView> = groups.into_iter().skip(start).take(limit).collect();
    let end = start + items.len();
    let next = (end < total).then(|| Cursor::Offset(end).encode());
    (items, next)
}

/// Something listed newest first by (time, id).
pub trait Keyed {
    fn sort_key(&self) -> (DateTime<Utc>, &str);
}

impl Keyed for MessageView {
    fn sort_key(&self) -> (DateTime<Utc>, &str) {
        (self.last_failed_at, &self.id)
    }
}

impl Keyed for AuditView {
    fn sort_key(&self) -> (DateTime<Utc>, &str) {
        (self.at, &self.id)
    }
}

fn newest_first<T: Keyed>(a: &T, b: &T) -> Ordering {
    let (at_a, key_a) = a.sort_key();
    let (at_b, key_b) = b.sort_key();
    at_b.cmp(&at_a).then_with(|| key_b.cmp(key_a))
}

/// Merges pages of several services, each newest first and asked with the same cursor
/// and `limit`, into one page. `more`: some service said it had more.
pub fn merge_pages<T: Keyed>(
    parts: Vec<Vec<T>>,
    more: bool,
    limit: usize,
) -> (Vec<T>, Option<String>) {
    let mut all: Vec<T> = parts.into_iter().flatten().collect();
    all.sort_by(newest_first);
    let has_more = more || all.len() > limit;
    all.truncate(limit);
    let next = if has_more {
        all.last().map(|last| {
            let (at, key) = last.sort_key();
            Cursor::After(at, key.to_owned()).encode()
        })
    } else {
        None
    };
    (all, next)
}

#[derive(Clone)]
struct AdminState {
    store: DeadLetterStore,
    verifier: Verifier,
}

impl FromRef<AdminState> for Verifier {
    fn from_ref(state: &AdminState) -> Self {
        state.verifier.clone()
    }
}

/// This service's dead-letter routes (see the module docs). `store` should be the one
/// whose replayer runs in this process, so a replay asked here starts at once.
pub fn router(store: DeadLetterStore, verifier: Verifier) -> Router {
    Router::new()
        .route(BASE, get(list_groups))
        .route(&format!("{BASE}/messages"), get(list_messages))
        .route(&format!("{BASE}/audit"), get(audit_log))
        .route(&format!("{BASE}/replay"), post(replay))
        .route(&format!("{BASE}/{{id}}"), get(show).delete(discard))
        .with_state(AdminState { store, verifier })
}

fn admin(caller: &AuthUser) -> Result<String, ApiError> {
    caller.require_any(&[Role::Admin])?;
    Ok(caller.id().to_string())
}

fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| ApiError::BadRequest(format!("the query string is not valid: {e}")))
}

/// True when the request is limited to another service (then this one has nothing).
fn other_service(store: &DeadLetterStore, service: Option<&str>) -> bool {
    service.is_some_and(|s| s != store.service())
}

/// Groups of dead letters by error fingerprint, largest first.
#[utoipa::path(
    get, path = "/api/v1/admin/dead-letters", tag = "dead letters",
    params(ListQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, body = Page<GroupView>, description = "Groups; `unavailable` lists services that did not answer"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    )
)]
async fn list_groups(
    State(state): State<AdminState>,
    caller: AuthUser,
    raw: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Page<GroupView>>, ApiError> {
    admin(&caller)?;
    let parsed = query(raw)?.parse()?;
    let store = &state.store;
    let group_service = parsed.group.as_ref().and_then(|(s, _)| s.as_deref());
    if other_service(store, parsed.service.as_deref()) || other_service(store, group_service) {
        return Ok(Json(Page::local(Vec::new(), None)));
    }
    let mut groups: Vec<GroupView> = store
        .groups_matching(&parsed.filter)
        .await?
        .into_iter()
        .map(|g| GroupView::new(store.service(), g))
        .collect();
    sort_groups(&mut groups);
    let (items, next_cursor) = page_groups(groups, parsed.limit, parsed.cursor.as_ref());
    Ok(Json(Page::local(items, next_cursor)))
}

/// Dead letters, most recent failure first.
#[utoipa::path(
    get, path = "/api/v1/admin/dead-letters/messages", tag = "dead letters",
    params(ListQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, body = Page<MessageView>),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    )
)]
async fn list_messages(
    State(state): State<AdminState>,
    caller: AuthUser,
    raw: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Page<MessageView>>, ApiError> {
    admin(&caller)?;
    let parsed = query(raw)?.parse()?;
    let store = &state.store;
    let group_service = parsed.group.as_ref().and_then(|(s, _)| s.as_deref());
    if other_service(store, parsed.service.as_deref()) || other_service(store, group_service) {
        return Ok(Json(Page::local(Vec::new(), None)));
    }
    let mut filter = parsed.filter;
    filter.after = match parsed.cursor {
        Some(Cursor::After(at, key)) => Some((at, key)),
        Some(Cursor::Offset(_)) => {
            return Err(ApiError::Validation(vec![field(
                "cursor",
                "is not a cursor of this list",
            )]));
        }
        None => None,
    };
    // One more than asked tells whether there is a next page.
    filter.limit = Some(parsed.limit as i64 + 1);
    let rows = store.list(&filter).await?;
    let more = rows.len() > parsed.limit;
    let views = rows
        .iter()
        .map(|d| message_view(store.service(), d))
        .collect();
    let (items, next_cursor) = merge_pages(vec![views], more, parsed.limit);
    Ok(Json(Page::local(items, next_cursor)))
}

/// The audit log of replays and discards, newest first.
#[utoipa::path(
    get, path = "/api/v1/admin/dead-letters/audit", tag = "dead letters",
    params(AuditQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, body = Page<AuditView>),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    )
)]
async fn audit_log(
    State(state): State<AdminState>,
    caller: AuthUser,
    raw: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<Page<AuditView>>, ApiError> {
    admin(&caller)?;
    let parsed = query(raw)?.parse()?;
    let store = &state.store;
    if other_service(store, parsed.service.as_deref()) {
        return Ok(Json(Page::local(Vec::new(), None)));
    }
    let mut filter = parsed.filter;
    filter.after = match parsed.cursor {
        Some(Cursor::After(at, key)) => Some((at, key)),
        _ => None,
    };
    filter.limit = Some(parsed.limit as i64 + 1);
    let entries = store.audit(&filter).await?;
    let more = entries.len() > parsed.limit;
    let views = entries
        .into_iter()
        .map(|e| audit_view(store.service(), e))
        .collect();
    let (items, next_cursor) = merge_pages(vec![views], more, parsed.limit);
    Ok(Json(Page::local(items, next_cursor)))
}

/// The uuid of `<service>:<uuid>` (or a bare uuid) held by this service.
fn own_id(store: &DeadLetterStore, raw: &str) -> Result<Uuid, ApiError> {
    let (service, id) = split_key(raw);
    let id: Uuid = id.parse().map_err(|_| {
        ApiError::BadRequest(format!(
            "{raw:?} is not a dead letter id (<service>:<uuid>)"
        ))
    })?;
    match service {
        Some(s) if s != store.service() => Err(ApiError::NotFound(format!(
            "dead letter {raw} belongs to {s}, not {}",
            store.service()
        ))),
        _ => Ok(id),
    }
}

fn path_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(id)| id)
        .map_err(|_| ApiError::BadRequest("the dead letter id in the path is not valid".into()))
}

/// One dead letter with every header, its attempts and failure times, and its body.
#[utoipa::path(
    get, path = "/api/v1/admin/dead-letters/{id}", tag = "dead letters",
    params(("id" = String, Path, description = "`<service>:<uuid>`")),
    security(("bearer" = [])),
    responses(
        (status = 200, body = DetailView),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    )
)]
async fn show(
    State(state): State<AdminState>,
    caller: AuthUser,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<DetailView>, ApiError> {
    admin(&caller)?;
    let raw = path_id(path)?;
    let store = &state.store;
    let id = own_id(store, &raw)?;
    let letter = store
        .get(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no dead letter {raw}")))?;
    let pending = store.replay_pending(id).await?;
    Ok(Json(detail_view(store.service(), &letter, pending)))
}

/// Checks a replay request against this service: exactly one of ids or group; every id
/// a dead letter id of this service.
fn selection(store: &DeadLetterStore, request: ReplayRequest) -> Result<Selection, ApiError> {
    match (request.ids, request.group) {
        (Some(_), Some(_)) | (None, None) => Err(ApiError::Validation(vec![field(
            "ids",
            "give either ids (a selection) or group (a whole group), not both",
        )])),
        (Some(ids), None) => {
            if ids.is_empty() || ids.len() > MAX_REPLAY_IDS {
                return Err(ApiError::Validation(vec![field(
                    "ids",
                    "must name 1 to 1000 dead letters",
                )]));
            }
            let mut errors = Vec::new();
            let mut parsed = Vec::with_capacity(ids.len());
            for (i, raw) in ids.iter().enumerate() {
                match own_id(store, raw) {
                    Ok(id) => parsed.push(id),
                    Err(error) => errors.push(FieldError {
                        field: format!("ids[{i}]"),
                        message: error.to_string(),
                    }),
                }
            }
            if errors.is_empty() {
                Ok(Selection::Ids(parsed))
            } else {
                Err(ApiError::Validation(errors))
            }
        }
        (None, Some(group)) => {
            let (service, fingerprint) = split_key(&group);
            if fingerprint.is_empty() {
                return Err(ApiError::Validation(vec![field(
                    "group",
                    "must be a group key, <service>:<fingerprint>",
                )]));
            }
            if service.is_some_and(|s| s != store.service()) {
                return Err(ApiError::Validation(vec![field(
                    "group",
                    "is a group of another service",
                )]));
            }
            Ok(Selection::Group(fingerprint.to_owned()))
        }
    }
}

/// Replays one dead letter, a selection, or a whole group as it stands now. Each is sent
/// back to the queue of the service that failed it, at the configured rate, stamped with
/// its replay count and the operator; every replay is in the audit log.
#[utoipa::path(
    post, path = "/api/v1/admin/dead-letters/replay", tag = "dead letters",
    request_body = ReplayRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, body = ReplayResponse),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Neither or both of ids and group; an id that is not one", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn replay(
    State(state): State<AdminState>,
    caller: AuthUser,
    Json(request): Json<ReplayRequest>,
) -> Result<Json<ReplayResponse>, ApiError> {
    let operator = admin(&caller)?;
    let store = &state.store;
    let selection = selection(store, request)?;
    let outcome = store.request_replay(&selection, &operator).await?;
    let key = |id: &Uuid| store.key(*id);
    let skipped = outcome
        .requested
        .iter()
        .filter(|id| !outcome.replayed.contains(id))
        .map(key)
        .collect();
    tracing::info!(
        operator,
        replayed = outcome.replayed.len(),
        "dead letters queued for replay"
    );
    Ok(Json(ReplayResponse {
        replayed: outcome.replayed.len() as u64,
        ids: outcome.replayed.iter().map(key).collect(),
        skipped,
        audit_ids: vec![store.key(outcome.audit_id)],
        unavailable: Vec::new(),
    }))
}

/// Discards an open dead letter: it leaves the open list, is kept as discarded for the
/// retention period, then purged. Discarding one already discarded changes nothing.
#[utoipa::path(
    delete, path = "/api/v1/admin/dead-letters/{id}", tag = "dead letters",
    params(("id" = String, Path, description = "`<service>:<uuid>`")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Discarded"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "It was replayed", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn discard(
    State(state): State<AdminState>,
    caller: AuthUser,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let operator = admin(&caller)?;
    let raw = path_id(path)?;
    let store = &state.store;
    let id = own_id(store, &raw)?;
    match store.discard_one(id, &operator).await? {
        Discard::Discarded => {
            tracing::info!(operator, dead_letter = %raw, "dead letter discarded");
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        Discard::AlreadyDiscarded => Ok(StatusCode::NO_CONTENT.into_response()),
        Discard::Replayed => Err(ApiError::Conflict(format!(
            "dead letter {raw} was replayed; only an open dead letter can be discarded"
        ))),
        Discard::NotFound => Err(ApiError::NotFound(format!("no dead letter {raw}"))),
    }
}

/// The dead-letter part of the API document (served whole by the gateway).
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(list_groups, list_messages, audit_log, show, replay, discard),
    components(schemas(
        GroupView, MessageView, DetailView, AuditView, Unavailable, Page<GroupView>,
        Page<MessageView>, Page<AuditView>, ReplayRequest, ReplayResponse, Problem, FieldError,
    )),
    tags((name = "dead letters", description = "Messages the services gave up on: inspect, replay, discard (administrators)"))
)]
pub struct ApiDoc;

/// [`ApiDoc`] as JSON, for the gateway's merged document.
pub fn openapi_json() -> Value {
    serde_json::to_value(<ApiDoc as utoipa::OpenApi>::openapi()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_survive_the_round_trip_and_garbage_is_refused() {
        let at = Utc::now();
        for cursor in [
            Cursor::Offset(40),
            Cursor::After(
                at,
                "notification:0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b".into(),
            ),
        ] {
            let decoded = Cursor::decode(&cursor.encode()).expect("decodes");
            match (&cursor, &decoded) {
                (Cursor::After(a, k), Cursor::After(b, l)) => {
                    assert_eq!(a.timestamp_micros(), b.timestamp_micros());
                    assert_eq!(k, l);
                }
                _ => assert_eq!(cursor, decoded),
            }
        }
        assert_eq!(Cursor::decode("not a cursor"), None);
    }

    #[test]
    fn keys_name_their_service() {
        assert_eq!(
            split_key("notification-svc:abc"),
            (Some("notification"), "abc")
        );
        assert_eq!(split_key("abc"), (None, "abc"));
    }

    #[test]
    fn bad_list_parameters_are_all_reported() {
        let query = ListQuery {
            status: Some("gone".into()),
            since: Some("yesterday".into()),
            limit: Some("0".into()),
            cursor: Some("x".into()),
            ..ListQuery::default()
        };
        match query.parse() {
            Err(ApiError::Validation(errors)) => {
                let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
                assert_eq!(fields, ["status", "since", "limit", "cursor"]);
            }
            other => panic!("expected a validation error, got {other:?}"),
        }
    }
}
