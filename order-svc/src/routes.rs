//! Orders through HTTP (DESIGN.md §6): customers place, read and cancel their own
//! orders; admins read and cancel any. Another customer's order is "not found".

use axum::Router;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::auth::{AuthUser, Role};
use shared::http::{ApiError, FieldError, Json, Problem};
use uuid::Uuid;

use crate::AppState;
use crate::domain::{IdempotencyKey, OrderRequest};
use crate::orders::{self, Canceller, HistoryView, ItemView, OrderView};

pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Set on the answer to a request whose key was seen before with the same request.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// This service's part of the API document; the gateway merges it with the others'.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(place_order, list_orders, get_order, cancel_order),
    components(schemas(
        Problem, FieldError, PlaceOrderRequest, ItemRequest, PlacedOrder, ItemView,
        OrderView, HistoryView, OrderPage,
    )),
    tags((name = "orders", description = "A customer's orders and their progress through the saga"))
)]
pub struct ApiDoc;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/openapi.json",
            get(|| async { Json(<ApiDoc as utoipa::OpenApi>::openapi()) }),
        )
        .route("/api/v1/orders", post(place_order).get(list_orders))
        .route("/api/v1/orders/{id}", get(get_order))
        .route("/api/v1/orders/{id}/cancel", post(cancel_order))
        .with_state(state)
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct ItemRequest {
    #[schema(required = true, value_type = Uuid)]
    product_id: Option<String>,
    /// 1 to 1000.
    #[schema(required = true, example = 2)]
    quantity: Option<i64>,
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct PlaceOrderRequest {
    /// 1 to 50 lines, each product at most once.
    #[schema(required = true)]
    items: Option<Vec<ItemRequest>>,
    /// The payment provider's payment method id, e.g. `pm_card_visa`.
    #[schema(required = true, example = "pm_card_visa")]
    payment_method: Option<String>,
}

/// The order just placed: pending until the saga ends it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PlacedOrder {
    pub id: Uuid,
    /// `pending` for a new order; a replayed request shows the order's current status.
    pub status: String,
    pub items: Vec<ItemView>,
    pub total_cents: i64,
    pub currency: String,
    pub created_at: DateTime<Utc>,
}

impl From<OrderView> for PlacedOrder {
    fn from(order: OrderView) -> Self {
        Self {
            id: order.id,
            status: order.status,
            items: order.items,
            total_cents: order.total_cents,
            currency: order.currency,
            created_at: order.created_at,
        }
    }
}

fn accepted(order: OrderView, replayed: bool) -> Response {
    let location = format!("/api/v1/orders/{}", order.id);
    let mut response = (
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(PlacedOrder::from(order)),
    )
        .into_response();
    if replayed {
        response
            .headers_mut()
            .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
    }
    response
}

/// Places an order (customers only). The order is written `pending` and the saga
/// starts; follow it with `GET /orders/{id}`. The same `Idempotency-Key` with the same
/// request gives the same order again (202, with `Idempotent-Replayed: true`); with a
/// different request it is refused.
#[utoipa::path(
    post, path = "/api/v1/orders", tag = "orders",
    request_body = PlaceOrderRequest,
    params(("Idempotency-Key" = String, Header, description = "1 to 255 visible ASCII characters, unique per order of this customer")),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Placed (or placed before with this key)", body = PlacedOrder,
         headers(("Location" = String), ("Idempotent-Replayed" = String, description = "`true` on a replay"))),
        (status = 400, description = "Missing or bad Idempotency-Key, or not valid JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a customer", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields (listed in `errors`, e.g. `items[1].product_id`), or the key was used for another request", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn place_order(
    State(state): State<AppState>,
    caller: AuthUser,
    headers: HeaderMap,
    body: Result<Json<PlaceOrderRequest>, Problem>,
) -> Result<Response, Response> {
    caller
        .require_any(&[Role::Customer])
        .map_err(IntoResponse::into_response)?;
    let key = IdempotencyKey::parse(
        headers
            .get(IDEMPOTENCY_KEY)
            .map(|v| v.to_str().map_err(drop)),
    )
    .map_err(|message| ApiError::BadRequest(message).into_response())?;
    let Json(body) = body.map_err(IntoResponse::into_response)?;
    let items = body.items.map(|items| {
        items
            .into_iter()
            .map(|i| (i.product_id, i.quantity))
            .collect()
    });
    let request = OrderRequest::parse(items, body.payment_method.as_deref())
        .map_err(IntoResponse::into_response)?;
    let placed = orders::place(&state.pool, &state.outbox, caller.id(), &key, &request)
        .await
        .map_err(IntoResponse::into_response)?;
    Ok(accepted(placed.order, placed.replayed))
}

#[derive(Deserialize, utoipa::IntoParams)]
struct Page {
    /// 1 to 100, default 20.
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    cursor: Option<Uuid>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OrderPage {
    pub items: Vec<OrderView>,
    /// The `cursor` for the next (older) page; null on the last page.
    pub next_cursor: Option<Uuid>,
}

/// The caller's orders, newest first (an admin sees everyone's).
#[utoipa::path(
    get, path = "/api/v1/orders", tag = "orders",
    params(Page),
    security(("bearer" = [])),
    responses(
        (status = 200, body = OrderPage),
        (status = 400, description = "Bad limit or cursor", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
    )
)]
async fn list_orders(
    State(state): State<AppState>,
    caller: AuthUser,
    query: Result<Query<Page>, QueryRejection>,
) -> Result<Json<OrderPage>, ApiError> {
    let Query(page) = query.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = page.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::BadRequest(
            "limit must be between 1 and 100".into(),
        ));
    }
    let customer = (!caller.is_admin()).then(|| caller.id());
    let mut conn = state.pool.acquire().await?;
    let (items, next_cursor) = orders::list(&mut conn, customer, limit, page.cursor).await?;
    Ok(Json(OrderPage { items, next_cursor }))
}

fn order_id(path: Result<Path<Uuid>, PathRejection>) -> Result<Uuid, ApiError> {
    path.map(|Path(id)| id)
        .map_err(|_| ApiError::BadRequest("the order id in the path must be a UUID".into()))
}

/// One order with its lines and the history of its saga.
#[utoipa::path(
    get, path = "/api/v1/orders/{id}", tag = "orders",
    params(("id" = Uuid, Path, description = "The order")),
    security(("bearer" = [])),
    responses(
        (status = 200, body = OrderView),
        (status = 400, description = "The id is not a UUID", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such order, or another customer's", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn get_order(
    State(state): State<AppState>,
    caller: AuthUser,
    path: Result<Path<Uuid>, PathRejection>,
) -> Result<Json<OrderView>, ApiError> {
    let id = order_id(path)?;
    let mut conn = state.pool.acquire().await?;
    let order = orders::find(&mut conn, id)
        .await?
        .filter(|o| caller.is_admin() || o.customer_id == caller.id())
        .ok_or_else(orders::not_found)?;
    Ok(Json(order))
}

/// Cancels a pending order (its customer or an admin). Its reservation is released and
/// its payment authorization voided by the services that hold them.
#[utoipa::path(
    post, path = "/api/v1/orders/{id}/cancel", tag = "orders",
    params(("id" = Uuid, Path, description = "The order")),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Cancelled; the compensations follow", body = OrderView),
        (status = 400, description = "The id is not a UUID", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such order, or another customer's", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The order is not pending any more", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn cancel_order(
    State(state): State<AppState>,
    caller: AuthUser,
    path: Result<Path<Uuid>, PathRejection>,
) -> Result<(StatusCode, Json<OrderView>), ApiError> {
    let id = order_id(path)?;
    let by = Canceller {
        user_id: caller.id(),
        admin: caller.is_admin(),
    };
    let order = orders::cancel(&state.pool, &state.outbox, id, &by).await?;
    Ok((StatusCode::ACCEPTED, Json(order)))
}
