//! Orders: idempotent placement, reading, the customer's cancel, and the saga's events
//! applied to the order. Every change of status and the event announcing it are written
//! in one transaction, with the order's row locked, so a cancel and a saga event for one
//! order never interleave.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use shared::events::{Event as _, OrderCancelled, OrderCreated, OrderLine, OrderPaid};
use shared::http::ApiError;
use shared::messaging::{Envelope, HandlerError, Outbox};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::domain::{self, CancelReason, Facts, IdempotencyKey, OrderRequest, Outcome, Problems};
use crate::products;

pub const PENDING: &str = "pending";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct ItemView {
    pub product_id: Uuid,
    pub seller_id: Uuid,
    /// The product's name when it was ordered.
    pub name: String,
    pub quantity: i64,
    /// The price when it was ordered, in cents of the order's currency.
    pub unit_price_cents: i64,
    pub line_total_cents: i64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema, sqlx::FromRow)]
pub struct HistoryView {
    /// The event type, e.g. `inventory.reserved`, `payment.completed`, `order.paid`.
    pub event: String,
    /// When it reached order-svc (or, for the order's own events, was written).
    pub at: DateTime<Utc>,
    /// When its publisher says it happened.
    pub occurred_at: DateTime<Utc>,
    /// The reason it carries, if any: `expired` for an expiry release, a decline code…
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// One order as its customer (or an admin) sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct OrderView {
    pub id: Uuid,
    pub customer_id: Uuid,
    /// `pending`, `paid` or `cancelled`.
    pub status: String,
    /// Why it was cancelled: `out_of_stock`, `payment_declined`, `reservation_expired`
    /// or `customer_cancelled`.
    pub status_reason: Option<String>,
    pub items: Vec<ItemView>,
    pub total_cents: i64,
    pub currency: String,
    /// Every event of the order's saga that reached order-svc, in arrival order.
    pub history: Vec<HistoryView>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Clone, Debug, sqlx::FromRow)]
struct OrderRow {
    id: Uuid,
    customer_id: Uuid,
    status: String,
    status_reason: Option<String>,
    total_cents: i64,
    currency: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

#[derive(Clone, Debug, sqlx::FromRow)]
struct LineRow {
    order_id: Uuid,
    product_id: Uuid,
    seller_id: Uuid,
    name: String,
    quantity: i64,
    unit_price_cents: i64,
}

#[derive(sqlx::FromRow)]
struct HistoryRow {
    order_id: Uuid,
    #[sqlx(flatten)]
    entry: HistoryView,
}

const ORDER_COLUMNS: &str =
    "id, customer_id, status, status_reason, total_cents, currency, created_at, updated_at";

/// The result of a placement.
#[derive(Debug)]
pub struct Placement {
    pub order: OrderView,
    /// The key was used before with the same request: this is that order.
    pub replayed: bool,
}

/// Places `request` for `customer_id` under `key`: a new pending order and its
/// `order.created`, or the order made earlier with the same key and request.
pub async fn place(
    pool: &PgPool,
    outbox: &Outbox,
    customer_id: Uuid,
    key: &IdempotencyKey,
    request: &OrderRequest,
) -> Result<Placement, ApiError> {
    let hash = request.fingerprint();
    let mut conn = pool.acquire().await?;
    // A retry is answered from the key alone: the catalog may have changed since.
    if let Some(order) = replay(&mut conn, customer_id, key, &hash).await? {
        return Ok(order);
    }
    let priced = price(&mut conn, request).await?;
    drop(conn);

    let order_id = Uuid::now_v7();
    shared::telemetry::record_correlation_id(order_id);
    let mut tx = pool.begin().await?;
    // Claims the key. A concurrent request holding it makes this wait for its commit,
    // then do nothing; if it rolls back, this one claims it.
    let claimed = sqlx::query(
        "INSERT INTO idempotency_keys (customer_id, key, request_hash, order_id) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (customer_id, key) DO NOTHING",
    )
    .bind(customer_id)
    .bind(key.as_str())
    .bind(&hash)
    .bind(order_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if claimed == 0 {
        tx.rollback().await?;
        let mut conn = pool.acquire().await?;
        return replay(&mut conn, customer_id, key, &hash)
            .await?
            .ok_or_else(|| anyhow::anyhow!("idempotency key claimed but not found").into());
    }

    sqlx::query(
        "INSERT INTO orders (id, customer_id, status, total_cents, currency, payment_method) \
         VALUES ($1, $2, 'pending', $3, $4, $5)",
    )
    .bind(order_id)
    .bind(customer_id)
    .bind(priced.total_cents)
    .bind(&priced.currency)
    .bind(request.payment_method().as_str())
    .execute(&mut *tx)
    .await?;
    let line_no: Vec<i32> = (0..).take(priced.lines.len()).collect();
    let product_ids: Vec<Uuid> = priced.lines.iter().map(|l| l.product_id).collect();
    let seller_ids: Vec<Uuid> = priced.lines.iter().map(|l| l.seller_id).collect();
    let names: Vec<&str> = priced.lines.iter().map(|l| l.name.as_str()).collect();
    let quantities: Vec<i64> = priced.lines.iter().map(|l| l.quantity).collect();
    let prices: Vec<i64> = priced.lines.iter().map(|l| l.unit_price_cents).collect();
    sqlx::query(
        "INSERT INTO order_lines \
             (order_id, line_no, product_id, seller_id, name, quantity, unit_price_cents) \
         SELECT $1, * FROM unnest($2::int[], $3::uuid[], $4::uuid[], $5::text[], \
             $6::bigint[], $7::bigint[])",
    )
    .bind(order_id)
    .bind(&line_no)
    .bind(&product_ids)
    .bind(&seller_ids)
    .bind(&names)
    .bind(&quantities)
    .bind(&prices)
    .execute(&mut *tx)
    .await?;
    let created_at: DateTime<Utc> =
        sqlx::query_scalar("SELECT created_at FROM orders WHERE id = $1")
            .bind(order_id)
            .fetch_one(&mut *tx)
            .await?;
    let event = OrderCreated {
        order_id,
        customer_id,
        lines: priced
            .lines
            .iter()
            .map(|l| OrderLine {
                product_id: l.product_id,
                seller_id: l.seller_id,
                quantity: l.quantity,
                unit_price_cents: l.unit_price_cents,
            })
            .collect(),
        total_cents: priced.total_cents,
        currency: priced.currency.clone(),
        payment_method: request.payment_method().as_str().to_owned(),
        created_at,
    };
    let envelope = outbox.enqueue(&mut tx, event.to_new(order_id)).await?;
    record(&mut tx, order_id, &envelope, None).await?;
    tx.commit().await?;
    tracing::info!(%order_id, %customer_id, total_cents = priced.total_cents, "order placed");
    metrics::counter!("orders_placed_total", "service" => crate::SERVICE).increment(1);

    let mut conn = pool.acquire().await?;
    let order = find(&mut conn, order_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("placed order {order_id} not found"))?;
    Ok(Placement {
        order,
        replayed: false,
    })
}

/// The order an earlier request with this key made, if any; a 422 if that request was a
/// different one.
async fn replay(
    conn: &mut PgConnection,
    customer_id: Uuid,
    key: &IdempotencyKey,
    hash: &[u8],
) -> Result<Option<Placement>, ApiError> {
    let earlier: Option<(Vec<u8>, Uuid)> = sqlx::query_as(
        "SELECT request_hash, order_id FROM idempotency_keys WHERE customer_id = $1 AND key = $2",
    )
    .bind(customer_id)
    .bind(key.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    let Some((earlier_hash, order_id)) = earlier else {
        return Ok(None);
    };
    if earlier_hash != hash {
        return Err(ApiError::Unprocessable(
            "this Idempotency-Key was already used for a different order; \
             use a new key for a new order"
                .into(),
        ));
    }
    let order = find(conn, order_id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("order {order_id} of an idempotency key not found"))?;
    Ok(Some(Placement {
        order,
        replayed: true,
    }))
}

struct PricedLine {
    product_id: Uuid,
    seller_id: Uuid,
    name: String,
    quantity: i64,
    unit_price_cents: i64,
}

struct Priced {
    lines: Vec<PricedLine>,
    total_cents: i64,
    currency: String,
}

/// Prices the request from the replica: every product known and on sale, all in one
/// currency. Errors name the line.
async fn price(conn: &mut PgConnection, request: &OrderRequest) -> Result<Priced, ApiError> {
    let known: HashMap<Uuid, products::Product> = products::find_many(conn, &request.product_ids())
        .await?
        .into_iter()
        .map(|p| (p.product_id, p))
        .collect();
    let mut problems = Problems::default();
    let mut lines = Vec::new();
    for (i, line) in request.lines().iter().enumerate() {
        let field = format!("items[{i}].product_id");
        let Some(product) = known.get(&line.product_id) else {
            problems.add(field, "there is no such product");
            continue;
        };
        let (None, Some(name), Some(price), Some(currency)) = (
            product.deleted_at,
            &product.name,
            product.price_cents,
            &product.currency,
        ) else {
            problems.add(field, "the product is no longer sold");
            continue;
        };
        lines.push((
            i,
            currency.as_str(),
            PricedLine {
                product_id: line.product_id,
                seller_id: product.seller_id,
                name: name.clone(),
                quantity: line.quantity.get(),
                unit_price_cents: price,
            },
        ));
    }
    let currencies = domain::currencies(lines.iter().map(|(_, c, _)| *c));
    if currencies.len() > 1 {
        let listed: Vec<String> = lines
            .iter()
            .map(|(i, c, _)| format!("items[{i}]: {c}"))
            .collect();
        problems.add(
            "items",
            format!(
                "all products of one order must be sold in one currency; place one order \
                 per currency ({})",
                listed.join(", ")
            ),
        );
    }
    let total = lines.iter().try_fold(0i64, |sum, (_, _, l)| {
        l.unit_price_cents
            .checked_mul(l.quantity)
            .and_then(|t| sum.checked_add(t))
    });
    if problems.is_empty() && total.is_none() {
        problems.add("items", "the order's total is too large");
    }
    problems.into_result()?;
    let (Some(total_cents), Some(currency)) = (total, currencies.first()) else {
        return Err(anyhow::anyhow!("validated order has no total or currency").into());
    };
    let currency = (*currency).to_owned();
    Ok(Priced {
        lines: lines.into_iter().map(|(_, _, l)| l).collect(),
        total_cents,
        currency,
    })
}

/// Appends `event` to the order's history; false if it is there already.
async fn record(
    conn: &mut PgConnection,
    order_id: Uuid,
    event: &Envelope,
    detail: Option<&str>,
) -> sqlx::Result<bool> {
    let inserted = sqlx::query(
        "INSERT INTO order_history (order_id, event_type, event_id, detail, occurred_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(order_id)
    .bind(&event.event_type)
    .bind(event.id)
    .bind(detail)
    .bind(event.occurred_at)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// One order with its lines and history.
pub async fn find(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<OrderView>> {
    let row: Option<OrderRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(row) => Ok(complete(conn, vec![row]).await?.pop()),
        None => Ok(None),
    }
}

/// A page of orders, newest first: one customer's, or everyone's (`customer` None).
/// `after` is the last order of the previous page.
pub async fn list(
    conn: &mut PgConnection,
    customer: Option<Uuid>,
    limit: i64,
    after: Option<Uuid>,
) -> Result<(Vec<OrderView>, Option<Uuid>), ApiError> {
    let after = match after {
        None => None,
        Some(id) => {
            let at: Option<DateTime<Utc>> = sqlx::query_scalar(
                "SELECT created_at FROM orders WHERE id = $1 \
                 AND ($2::uuid IS NULL OR customer_id = $2)",
            )
            .bind(id)
            .bind(customer)
            .fetch_optional(&mut *conn)
            .await?;
            let at = at.ok_or_else(|| {
                ApiError::BadRequest("the cursor is not one this list gave out".into())
            })?;
            Some((at, id))
        }
    };
    let mut rows: Vec<OrderRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ORDER_COLUMNS} FROM orders \
         WHERE ($1::uuid IS NULL OR customer_id = $1) \
           AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3)) \
         ORDER BY created_at DESC, id DESC LIMIT $4"
    )))
    .bind(customer)
    .bind(after.map(|(at, _)| at))
    .bind(after.map(|(_, id)| id))
    .bind(limit + 1)
    .fetch_all(&mut *conn)
    .await?;
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next = if more {
        rows.last().map(|r| r.id)
    } else {
        None
    };
    Ok((complete(conn, rows).await?, next))
}

/// Adds lines and history to order rows, keeping their order.
async fn complete(conn: &mut PgConnection, rows: Vec<OrderRow>) -> sqlx::Result<Vec<OrderView>> {
    let ids: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let lines: Vec<LineRow> = sqlx::query_as(
        "SELECT order_id, product_id, seller_id, name, quantity, unit_price_cents \
         FROM order_lines WHERE order_id = ANY($1) ORDER BY order_id, line_no",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let history: Vec<HistoryRow> = sqlx::query_as(
        "SELECT order_id, event_type AS event, at, occurred_at, detail FROM order_history \
         WHERE order_id = ANY($1) ORDER BY order_id, seq",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut items: HashMap<Uuid, Vec<ItemView>> = HashMap::new();
    for l in lines {
        items.entry(l.order_id).or_default().push(ItemView {
            product_id: l.product_id,
            seller_id: l.seller_id,
            name: l.name,
            quantity: l.quantity,
            unit_price_cents: l.unit_price_cents,
            line_total_cents: l.unit_price_cents.saturating_mul(l.quantity),
        });
    }
    let mut histories: HashMap<Uuid, Vec<HistoryView>> = HashMap::new();
    for HistoryRow { order_id, entry } in history {
        histories.entry(order_id).or_default().push(entry);
    }
    Ok(rows
        .into_iter()
        .map(|r| OrderView {
            items: items.remove(&r.id).unwrap_or_default(),
            history: histories.remove(&r.id).unwrap_or_default(),
            id: r.id,
            customer_id: r.customer_id,
            status: r.status,
            status_reason: r.status_reason,
            total_cents: r.total_cents,
            currency: r.currency,
            created_at: r.created_at,
            updated_at: r.updated_at,
        })
        .collect())
}

async fn lock(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<OrderRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1 FOR UPDATE"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// Takes a pending order to `outcome`: its status, `order.paid` or `order.cancelled`
/// (caused by `cause` when an event decided), and the entry in its history.
async fn finish(
    conn: &mut PgConnection,
    outbox: &Outbox,
    order: &OrderRow,
    outcome: Outcome,
    cause: Option<&Envelope>,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE orders SET status = $2, status_reason = $3, updated_at = clock_timestamp() \
         WHERE id = $1",
    )
    .bind(order.id)
    .bind(outcome.status())
    .bind(outcome.reason())
    .execute(&mut *conn)
    .await?;
    let event = match outcome {
        Outcome::Paid => {
            let lines: Vec<(Uuid, Uuid, i64, i64)> = sqlx::query_as(
                "SELECT product_id, seller_id, quantity, unit_price_cents FROM order_lines \
                 WHERE order_id = $1 ORDER BY line_no",
            )
            .bind(order.id)
            .fetch_all(&mut *conn)
            .await?;
            OrderPaid {
                order_id: order.id,
                customer_id: order.customer_id,
                lines: lines
                    .into_iter()
                    .map(
                        |(product_id, seller_id, quantity, unit_price_cents)| OrderLine {
                            product_id,
                            seller_id,
                            quantity,
                            unit_price_cents,
                        },
                    )
                    .collect(),
                total_cents: order.total_cents,
                currency: order.currency.clone(),
            }
            .to_new(order.id)
        }
        Outcome::Cancelled(reason) => OrderCancelled {
            order_id: order.id,
            customer_id: order.customer_id,
            reason: reason.as_str().to_owned(),
        }
        .to_new(order.id),
    };
    let event = match cause {
        Some(cause) => event.caused_by(cause),
        None => event,
    };
    let envelope = outbox.enqueue(&mut *conn, event).await?;
    record(conn, order.id, &envelope, outcome.reason()).await?;
    Ok(())
}

/// Records how long a saga took from placement to its end. Called in the deciding
/// transaction: a commit that then fails (rare) counts one saga twice, never none.
fn observe(order: &OrderRow, outcome: Outcome) {
    let took = (Utc::now() - order.created_at)
        .to_std()
        .unwrap_or(Duration::ZERO);
    metrics::histogram!(
        "saga_duration_seconds",
        "service" => crate::SERVICE,
        "outcome" => outcome.status(),
        "reason" => outcome.reason().unwrap_or("none"),
    )
    .record(took.as_secs_f64());
}

/// Who asks to cancel an order.
pub struct Canceller {
    pub user_id: Uuid,
    pub admin: bool,
}

/// The customer's (or an admin's) cancel of a pending order. Another customer's order is
/// "not found": its existence is not revealed.
pub async fn cancel(
    pool: &PgPool,
    outbox: &Outbox,
    order_id: Uuid,
    by: &Canceller,
) -> Result<OrderView, ApiError> {
    shared::telemetry::record_correlation_id(order_id);
    let mut tx = pool.begin().await?;
    let order = lock(&mut tx, order_id)
        .await?
        .filter(|o| by.admin || o.customer_id == by.user_id)
        .ok_or_else(not_found)?;
    if order.status != PENDING {
        let why = order
            .status_reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default();
        return Err(ApiError::Conflict(format!(
            "the order is already {}{why}; only a pending order can be cancelled",
            order.status
        )));
    }
    let outcome = Outcome::Cancelled(CancelReason::CustomerCancelled);
    finish(&mut tx, outbox, &order, outcome, None).await?;
    tx.commit().await?;
    observe(&order, outcome);
    tracing::info!(%order_id, by = %by.user_id, "order cancelled on request");
    let mut conn = pool.acquire().await?;
    find(&mut conn, order_id).await?.ok_or_else(not_found)
}

pub fn not_found() -> ApiError {
    ApiError::NotFound("there is no such order".into())
}

/// What a saga event did to its order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// In the history; the order waits for more.
    Recorded,
    /// In the history; it decided the order.
    Decided(Outcome),
    /// In the history; the order had ended already.
    Absorbed,
    /// This very event was in the history already.
    Duplicate,
}

/// A saga event for `order_id`: kept in the history, then, while the order is pending,
/// the facts seen so far decide whether it ends.
pub async fn apply(
    conn: &mut PgConnection,
    outbox: &Outbox,
    event: &Envelope,
    order_id: Uuid,
    detail: Option<&str>,
) -> Result<Applied, HandlerError> {
    let Some(order) = lock(conn, order_id).await? else {
        // order-svc writes the order before anything can answer it, so this is a replay
        // into a database that lacks it, or a foreign event: retried, then parked.
        return Err(HandlerError::transient(anyhow::anyhow!(
            "order {order_id} is not known here"
        )));
    };
    if !record(conn, order_id, event, detail).await? {
        return Ok(Applied::Duplicate);
    }
    if order.status != PENDING {
        return Ok(Applied::Absorbed);
    }
    let seen: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT event_type, detail FROM order_history WHERE order_id = $1 ORDER BY seq",
    )
    .bind(order_id)
    .fetch_all(&mut *conn)
    .await?;
    let facts = Facts::from_events(seen.iter().map(|(t, d)| (t.as_str(), d.as_deref())));
    let Some(outcome) = domain::decide(&facts) else {
        return Ok(Applied::Recorded);
    };
    finish(conn, outbox, &order, outcome, Some(event)).await?;
    observe(&order, outcome);
    Ok(Applied::Decided(outcome))
}
