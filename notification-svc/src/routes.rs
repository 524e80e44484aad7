//! The notification log through HTTP (DESIGN.md §6): the mails sent, for admins.

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::routing::get;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::auth::{AuthUser, Role};
use shared::http::{ApiError, FieldError, Json, Problem};
use uuid::Uuid;

use crate::AppState;

/// This service's part of the API document; the gateway merges it with the others'.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(list_notifications),
    components(schemas(Problem, FieldError, NotificationView, NotificationPage)),
    tags((name = "notifications", description = "Mail sent to customers and sellers"))
)]
pub struct ApiDoc;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/openapi.json",
            get(|| async { Json(<ApiDoc as utoipa::OpenApi>::openapi()) }),
        )
        .route("/api/v1/admin/notifications", get(list_notifications))
        .with_state(state)
}

#[derive(Deserialize, utoipa::IntoParams)]
struct ListQuery {
    /// Only mails to this address (case-insensitive).
    to: Option<String>,
    /// 1 to 200, default 50.
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// One mail sent.
#[derive(Debug, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct NotificationView {
    pub id: Uuid,
    /// The recipient's address.
    pub to: String,
    /// `welcome`, `order_receipt`, `seller_order_notice`, `order_cancelled` or
    /// `review_created`.
    pub template: String,
    pub subject: String,
    /// The event that called for the mail.
    pub event_id: Uuid,
    pub event_type: String,
    pub sent_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NotificationPage {
    pub items: Vec<NotificationView>,
    /// The `cursor` for the next (older) page; null on the last page.
    pub next_cursor: Option<String>,
}

/// Mails sent, newest first, a page at a time.
#[utoipa::path(
    get, path = "/api/v1/admin/notifications", tag = "notifications",
    params(ListQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, body = NotificationPage),
        (status = 400, description = "Bad query: limit not a number, cursor not from a page", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields (listed in `errors`)", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn list_notifications(
    State(state): State<AppState>,
    caller: AuthUser,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<NotificationPage>, ApiError> {
    caller.require_any(&[Role::Admin])?;
    let Query(query) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let mut errors = Vec::new();
    let limit = query.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        errors.push(FieldError {
            field: "limit".into(),
            message: "must be between 1 and 200".into(),
        });
    }
    let cursor = match query.cursor.as_deref() {
        None => None,
        Some(c) => match c.parse::<Uuid>() {
            Ok(id) => Some(id),
            Err(_) => {
                errors.push(FieldError {
                    field: "cursor".into(),
                    message: "must be the next_cursor of a previous page".into(),
                });
                None
            }
        },
    };
    let to = query.to.as_deref().map(str::trim).filter(|t| !t.is_empty());
    if !errors.is_empty() {
        return Err(ApiError::Validation(errors));
    }
    // Ids are UUIDv7 made when the send was recorded: their order is the sending order.
    let mut rows: Vec<NotificationView> = sqlx::query_as(
        "SELECT id, to_address AS \"to\", template, subject, event_id, event_type, sent_at \
         FROM notifications \
         WHERE ($1::text IS NULL OR lower(to_address) = lower($1)) \
           AND ($2::uuid IS NULL OR id < $2) \
         ORDER BY id DESC LIMIT $3",
    )
    .bind(to)
    .bind(cursor)
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next_cursor = if more {
        rows.last().map(|r| r.id.to_string())
    } else {
        None
    };
    Ok(Json(NotificationPage {
        items: rows,
        next_cursor,
    }))
}
