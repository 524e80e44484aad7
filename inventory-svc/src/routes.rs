//! Stock through HTTP (DESIGN.md §6): read, adjust, and the ledger of every change. Only
//! the seller who owns the product, or an admin.

use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::auth::{AuthUser, Role};
use shared::http::{ApiError, FieldError, Json, Problem};
use uuid::Uuid;

use crate::AppState;
use crate::domain::{Delta, Problems, Reason};
use crate::stock::{self, Actor, Change, Entry, Kind, StockRow};

/// This service's part of the API document; the gateway merges it with the others'.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(get_stock, adjust_stock, ledger, reservation),
    components(schemas(
        Problem, FieldError, StockView, AdjustRequest, LedgerEntry, LedgerPage, ActorView,
        ReservationView, LineView, HistoryEntry,
    )),
    tags((name = "inventory", description = "Stock of a seller's products"))
)]
pub struct ApiDoc;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/openapi.json",
            get(|| async { Json(<ApiDoc as utoipa::OpenApi>::openapi()) }),
        )
        .route("/api/v1/inventory/{product_id}", get(get_stock))
        .route("/api/v1/inventory/{product_id}/adjust", post(adjust_stock))
        .route("/api/v1/inventory/{product_id}/ledger", get(ledger))
        .route(
            "/api/v1/inventory/reservations/{order_id}",
            get(reservation),
        )
        .with_state(state)
}

#[derive(Debug, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct StockView {
    pub product_id: Uuid,
    pub on_hand: i64,
    /// Held for orders not paid yet.
    pub reserved: i64,
    /// `on_hand - reserved`: what new orders can get.
    pub available: i64,
}

impl From<&StockRow> for StockView {
    fn from(row: &StockRow) -> Self {
        Self {
            product_id: row.product_id,
            on_hand: row.on_hand,
            reserved: row.reserved,
            available: row.available(),
        }
    }
}

fn product_id(path: Result<Path<Uuid>, PathRejection>) -> Result<Uuid, ApiError> {
    path.map(|Path(id)| id)
        .map_err(|_| ApiError::BadRequest("the product id in the path must be a UUID".into()))
}

/// Sellers and admins only; then the product must exist, then belong to the caller
/// (admins see every product).
fn authorize(caller: &AuthUser, row: Option<StockRow>) -> Result<StockRow, ApiError> {
    let row = row.ok_or_else(|| ApiError::NotFound("no stock for this product".into()))?;
    caller.require_owner_or_admin(row.seller_id)?;
    Ok(row)
}

/// A product's stock.
#[utoipa::path(
    get, path = "/api/v1/inventory/{product_id}", tag = "inventory",
    params(("product_id" = Uuid, Path, description = "The product")),
    security(("bearer" = [])),
    responses(
        (status = 200, body = StockView),
        (status = 400, description = "The id is not a UUID", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not the product's seller, nor an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such product", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn get_stock(
    State(state): State<AppState>,
    caller: AuthUser,
    path: Result<Path<Uuid>, PathRejection>,
) -> Result<Json<StockView>, ApiError> {
    caller.require_any(&[Role::Seller, Role::Admin])?;
    let product_id = product_id(path)?;
    let mut conn = state.pool.acquire().await?;
    let row = authorize(&caller, stock::find(&mut conn, product_id).await?)?;
    Ok(Json(StockView::from(&row)))
}

#[derive(Deserialize, utoipa::ToSchema)]
struct AdjustRequest {
    /// Units added (positive) or removed (negative); not 0.
    #[schema(example = 5)]
    delta: Option<i64>,
    /// Why, for the ledger: 1 to 200 characters.
    #[schema(example = "delivery from the supplier")]
    reason: Option<String>,
}

/// Adds or removes stock on hand. Stock on hand never drops below what is reserved.
#[utoipa::path(
    post, path = "/api/v1/inventory/{product_id}/adjust", tag = "inventory",
    params(("product_id" = Uuid, Path, description = "The product")),
    request_body = AdjustRequest,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The stock after the change", body = StockView),
        (status = 400, description = "Not valid JSON, or the id is not a UUID", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not the product's seller, nor an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such product", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The product was deleted", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields (listed in `errors`), or on hand would drop below what is reserved", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn adjust_stock(
    State(state): State<AppState>,
    caller: AuthUser,
    path: Result<Path<Uuid>, PathRejection>,
    Json(request): Json<AdjustRequest>,
) -> Result<Json<StockView>, ApiError> {
    caller.require_any(&[Role::Seller, Role::Admin])?;
    let product_id = product_id(path)?;
    let mut problems = Problems::default();
    let delta = problems.check("delta", Delta::parse(request.delta));
    let reason = problems.check("reason", Reason::parse(request.reason.as_deref()));
    problems.into_result()?;
    let (Some(delta), Some(reason)) = (delta, reason) else {
        return Err(anyhow::anyhow!("validated fields missing").into());
    };

    let mut tx = state.pool.begin().await?;
    let row = stock::lock(&mut tx, &[product_id]).await?.pop();
    let row = authorize(&caller, row)?;
    if row.deleted_at.is_some() {
        return Err(ApiError::Conflict(
            "the product was deleted; its stock can no longer change".into(),
        ));
    }
    let on_hand = row.on_hand.checked_add(delta.get()).unwrap_or(i64::MAX);
    if on_hand < row.reserved {
        let detail = if row.reserved == 0 {
            format!(
                "on hand would become {on_hand}; stock on hand cannot be negative \
                 (at most {} can be removed)",
                row.on_hand
            )
        } else {
            format!(
                "on hand would become {on_hand}, below the {} units reserved for orders \
                 not paid yet (at most {} can be removed)",
                row.reserved,
                row.available()
            )
        };
        return Err(ApiError::Unprocessable(detail));
    }
    let change = Change {
        product_id,
        on_hand_delta: delta.get(),
        reserved_delta: 0,
    };
    let entry = Entry {
        kind: Kind::Adjustment,
        order_id: None,
        reason: reason.as_str(),
        actor: Actor::User(caller.id()),
        correlation_id: product_id,
    };
    let changed = stock::apply(&mut tx, &state.outbox, &[change], entry)
        .await
        .map_err(|e| {
            ApiError::from_db(
                e,
                &[(
                    "stock_on_hand_not_negative",
                    "stock on hand cannot be negative",
                )],
            )
        })?;
    tx.commit().await?;
    let Some(changed) = changed.first() else {
        return Err(anyhow::anyhow!("adjusted row missing").into());
    };
    tracing::info!(%product_id, delta = delta.get(), version = changed.version, "stock adjusted");
    Ok(Json(StockView {
        product_id,
        on_hand: changed.on_hand,
        reserved: changed.reserved,
        available: changed.available,
    }))
}

#[derive(Deserialize, utoipa::IntoParams)]
struct Page {
    /// 1 to 200, default 50.
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    cursor: Option<i64>,
}

/// Who made a change: a user (adjustments), an event (its id and type), or the sweeper
/// that releases expired reservations.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ActorView {
    /// `user`, `event` or `sweeper`.
    pub kind: String,
    /// The user's id or the event's id.
    pub id: Option<Uuid>,
    pub event_type: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LedgerEntry {
    pub id: Uuid,
    /// The stock's version after this change.
    pub version: i64,
    /// `initial`, `adjustment`, `reservation`, `release`, `commit` or `sale`.
    pub kind: String,
    pub on_hand_delta: i64,
    pub reserved_delta: i64,
    /// Stock after the change.
    pub on_hand: i64,
    pub reserved: i64,
    pub available: i64,
    pub order_id: Option<Uuid>,
    pub reason: String,
    pub actor: ActorView,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LedgerPage {
    pub items: Vec<LedgerEntry>,
    /// The `cursor` for the next (older) page; null on the last page.
    pub next_cursor: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct LedgerRow {
    id: Uuid,
    version: i64,
    kind: String,
    on_hand_delta: i64,
    reserved_delta: i64,
    on_hand: i64,
    reserved: i64,
    order_id: Option<Uuid>,
    reason: String,
    actor_kind: String,
    actor_id: Option<Uuid>,
    event_type: Option<String>,
    at: DateTime<Utc>,
}

impl From<LedgerRow> for LedgerEntry {
    fn from(row: LedgerRow) -> Self {
        Self {
            id: row.id,
            version: row.version,
            kind: row.kind,
            on_hand_delta: row.on_hand_delta,
            reserved_delta: row.reserved_delta,
            on_hand: row.on_hand,
            reserved: row.reserved,
            available: row.on_hand - row.reserved,
            order_id: row.order_id,
            reason: row.reason,
            actor: ActorView {
                kind: row.actor_kind,
                id: row.actor_id,
                event_type: row.event_type,
            },
            at: row.at,
        }
    }
}

/// Every change of a product's stock, newest first, a page at a time.
#[utoipa::path(
    get, path = "/api/v1/inventory/{product_id}/ledger", tag = "inventory",
    params(("product_id" = Uuid, Path, description = "The product"), Page),
    security(("bearer" = [])),
    responses(
        (status = 200, body = LedgerPage),
        (status = 400, description = "Bad id or query", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not the product's seller, nor an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such product", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn ledger(
    State(state): State<AppState>,
    caller: AuthUser,
    path: Result<Path<Uuid>, PathRejection>,
    query: Result<Query<Page>, QueryRejection>,
) -> Result<Json<LedgerPage>, ApiError> {
    caller.require_any(&[Role::Seller, Role::Admin])?;
    let product_id = product_id(path)?;
    let Query(page) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = page.limit.unwrap_or(50).clamp(1, 200);
    let mut conn = state.pool.acquire().await?;
    authorize(&caller, stock::find(&mut conn, product_id).await?)?;
    let mut rows: Vec<LedgerRow> = sqlx::query_as(
        "SELECT id, version, kind, on_hand_delta, reserved_delta, on_hand, reserved, order_id, \
         reason, actor_kind, actor_id, event_type, at FROM stock_ledger \
         WHERE product_id = $1 AND ($2::bigint IS NULL OR version < $2) \
         ORDER BY version DESC LIMIT $3",
    )
    .bind(product_id)
    .bind(page.cursor)
    .bind(limit + 1)
    .fetch_all(&mut *conn)
    .await?;
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next_cursor = if more {
        rows.last().map(|r| r.version)
    } else {
        None
    };
    Ok(Json(LedgerPage {
        items: rows.into_iter().map(LedgerEntry::from).collect(),
        next_cursor,
    }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LineView {
    pub product_id: Uuid,
    pub quantity: i64,
}

/// What inventory did with one event of the order's saga.
#[derive(Debug, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct HistoryEntry {
    /// The event type, or `sweeper` for an expiry.
    pub cause: String,
    pub event_id: Option<Uuid>,
    /// e.g. `reserved`, `rejected: out_of_stock`, `released: expired`, `committed`,
    /// `ignored: order already held`.
    pub outcome: String,
    pub at: DateTime<Utc>,
}

/// Inventory's view of one order, for people following a saga.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ReservationView {
    pub order_id: Uuid,
    /// `held`, `committed`, `released`, `rejected`, or `tombstone` (cancelled before
    /// order.created arrived).
    pub status: String,
    /// Why it was released or rejected.
    pub reason: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
    /// The order's lines (one per product); stock is held for them only while the
    /// status is `held`. Empty for a tombstone.
    pub lines: Vec<LineView>,
    pub history: Vec<HistoryEntry>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// An order's reservation and what inventory did with each event of its saga.
#[utoipa::path(
    get, path = "/api/v1/inventory/reservations/{order_id}", tag = "inventory",
    params(("order_id" = Uuid, Path, description = "The order")),
    security(("bearer" = [])),
    responses(
        (status = 200, body = ReservationView),
        (status = 400, description = "The id is not a UUID", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an administrator", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No event of this order reached inventory", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn reservation(
    State(state): State<AppState>,
    caller: AuthUser,
    path: Result<Path<Uuid>, PathRejection>,
) -> Result<Json<ReservationView>, ApiError> {
    caller.require_any(&[Role::Admin])?;
    let order_id = path
        .map(|Path(id)| id)
        .map_err(|_| ApiError::BadRequest("the order id in the path must be a UUID".into()))?;
    let mut conn = state.pool.acquire().await?;
    type Row = (
        String,
        Option<String>,
        Option<DateTime<Utc>>,
        DateTime<Utc>,
        DateTime<Utc>,
    );
    let row: Option<Row> = sqlx::query_as(
        "SELECT status, reason, expires_at, created_at, updated_at FROM reservations \
         WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((status, reason, expires_at, created_at, updated_at)) = row else {
        return Err(ApiError::NotFound(
            "no event of this order reached inventory".into(),
        ));
    };
    let lines: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT product_id, quantity FROM reservation_lines WHERE order_id = $1 \
         ORDER BY product_id",
    )
    .bind(order_id)
    .fetch_all(&mut *conn)
    .await?;
    let history: Vec<HistoryEntry> = sqlx::query_as(
        "SELECT cause, event_id, outcome, at FROM reservation_history WHERE order_id = $1 \
         ORDER BY at, id",
    )
    .bind(order_id)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Json(ReservationView {
        order_id,
        status,
        reason,
        expires_at,
        lines: lines
            .into_iter()
            .map(|(product_id, quantity)| LineView {
                product_id,
                quantity,
            })
            .collect(),
        history,
        created_at,
        updated_at,
    }))
}
