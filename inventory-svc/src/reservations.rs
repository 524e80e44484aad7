//! Reservations for the order saga: reserve all lines or none, commit on payment, release
//! on failure, cancellation or expiry. Each function works in the caller's transaction
//! and writes its events to the outbox there.
//!
//! **Locking.** The order's `reservations` row is taken first (inserted, or locked with
//! `FOR UPDATE`): it serialises everything that happens to one order, so two deliveries
//! of the same business fact, or a cancel racing its order, see each other's result.
//! Then the order's stock rows are locked with one `SELECT … ORDER BY product_id FOR
//! UPDATE`, always in product id order, so that two orders sharing products cannot
//! deadlock. The decision is made on the locked, current rows and applied before the
//! locks are released at commit. This is correct with any number of consumer tasks and
//! replicas, since every writer of a stock row (reservations, commits, releases, the
//! sweeper, adjustments) goes through the same row lock. A conditional
//! `UPDATE … WHERE on_hand - reserved >= qty` alone would suffice for one line, but an
//! order of several lines would need a savepoint to undo the lines already taken, and
//! a multi-row `UPDATE` locks its rows in no promised order. The checks on `stock` back
//! this up: a bug fails its transaction instead of overselling.

use std::time::Duration;

use chrono::{DateTime, Utc};
use shared::events::{
    Event as _, InventoryCommitted, InventoryRejected, InventoryReleased, InventoryReserved,
    OrderCreated, Shortage, StockLine,
};
use shared::messaging::{Envelope, HandlerError, Outbox};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::{self, Decision, Lines, Supply};
use crate::stock::{self, Actor, Change, Entry, Kind};

/// How long an order may wait for a product inventory has not heard of. Every product
/// in an order had a `product.created` (order-svc prices orders from it), so an unknown
/// product usually means that event is still on its way here: the order is retried
/// (transient failure) rather than rejected, until it is this old.
pub const UNKNOWN_PRODUCT_GRACE: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// Why a reservation was released, as `inventory.released` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseReason {
    PaymentFailed,
    Cancelled,
    Expired,
}

impl ReleaseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PaymentFailed => "payment_failed",
            Self::Cancelled => "cancelled",
            Self::Expired => "expired",
        }
    }
}

/// What handling `order.created` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reserve {
    Reserved {
        expires_at: DateTime<Utc>,
    },
    Rejected {
        reason: &'static str,
    },
    /// The order was handled before (a second delivery of the same fact), or cancelled
    /// before it arrived: nothing done, nothing published.
    AlreadyKnown {
        status: String,
    },
}

/// `order.created`: reserve every line or nothing, and say which
/// (`inventory.reserved` or `inventory.rejected`).
///
/// The stock rows stay locked from `stock::lock` to the commit, so everything that can
/// be done before (claiming the order, saving its lines) is done before.
pub async fn reserve(
    conn: &mut PgConnection,
    outbox: &Outbox,
    ttl: Duration,
    event: &Envelope,
    order: &OrderCreated,
) -> Result<Reserve, HandlerError> {
    let lines = Lines::from_order(&order.lines).map_err(|problem| {
        HandlerError::permanent(anyhow::anyhow!("order {}: {problem}", order.order_id))
    })?;
    let actor = Actor::Event(event);
    let ttl_secs = ttl.as_secs_f64();
    // The database's clock, the one the sweeper compares with.
    let claimed: Option<DateTime<Utc>> = sqlx::query_scalar(
        "INSERT INTO reservations (order_id, status, expires_at) \
         VALUES ($1, 'pending', now() + make_interval(secs => $2)) \
         ON CONFLICT (order_id) DO NOTHING RETURNING expires_at",
    )
    .bind(order.order_id)
    .bind(ttl_secs)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(expires_at) = claimed else {
        let status: String =
            sqlx::query_scalar("SELECT status FROM reservations WHERE order_id = $1")
                .bind(order.order_id)
                .fetch_one(&mut *conn)
                .await?;
        let outcome = if status == "tombstone" {
            "ignored: cancelled before it arrived".to_owned()
        } else {
            format!("ignored: order already {status}")
        };
        note(conn, order.order_id, actor, &outcome).await?;
        return Ok(Reserve::AlreadyKnown { status });
    };
    save_lines(conn, order.order_id, &lines).await?;

    let rows = stock::lock(conn, &lines.product_ids()).await?;
    let supply = |product: Uuid| {
        rows.iter()
            .find(|r| r.product_id == product)
            .map_or(Supply::Unknown, stock::StockRow::supply)
    };
    let young = Utc::now() - event.occurred_at < UNKNOWN_PRODUCT_GRACE;
    match domain::decide(&lines, supply, young) {
        Decision::Wait(unseen) => Err(HandlerError::transient(anyhow::anyhow!(
            "order {}: product.created not handled yet for {unseen:?}; trying again later",
            order.order_id
        ))),
        Decision::Reject { reason, shortages } => {
            reject(conn, outbox, actor, order.order_id, reason, shortages).await?;
            Ok(Reserve::Rejected { reason })
        }
        Decision::Take => {
            let changes: Vec<Change> = lines
                .as_slice()
                .iter()
                .map(|l| Change {
                    product_id: l.product_id,
                    on_hand_delta: 0,
                    reserved_delta: l.quantity,
                })
                .collect();
            let entry = entry(Kind::Reservation, order.order_id, "order placed", actor);
            stock::apply(conn, outbox, &changes, entry).await?;
            transition(conn, order.order_id, "held", None, actor, "reserved").await?;
            let reserved = InventoryReserved {
                order_id: order.order_id,
                lines: lines.into_vec(),
                expires_at,
            };
            outbox
                .enqueue(&mut *conn, actor.cause(reserved.to_new(order.order_id)))
                .await?;
            metrics::counter!("inventory_reservations_total", "outcome" => "reserved").increment(1);
            Ok(Reserve::Reserved { expires_at })
        }
    }
}

async fn save_lines(conn: &mut PgConnection, order_id: Uuid, lines: &Lines) -> sqlx::Result<()> {
    let products = lines.product_ids();
    let quantities: Vec<i64> = lines.as_slice().iter().map(|l| l.quantity).collect();
    sqlx::query(
        "INSERT INTO reservation_lines (order_id, product_id, quantity) \
         SELECT $1, * FROM unnest($2::uuid[], $3::bigint[])",
    )
    .bind(order_id)
    .bind(&products)
    .bind(&quantities)
    .execute(conn)
    .await
    .map(drop)
}

async fn load_lines(conn: &mut PgConnection, order_id: Uuid) -> sqlx::Result<Vec<StockLine>> {
    let rows: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT product_id, quantity FROM reservation_lines WHERE order_id = $1 \
         ORDER BY product_id",
    )
    .bind(order_id)
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(product_id, quantity)| StockLine {
            product_id,
            quantity,
        })
        .collect())
}

/// Marks the order rejected and publishes `inventory.rejected`.
async fn reject(
    conn: &mut PgConnection,
    outbox: &Outbox,
    actor: Actor<'_>,
    order_id: Uuid,
    reason: &'static str,
    shortages: Vec<Shortage>,
) -> sqlx::Result<()> {
    let outcome = format!("rejected: {reason}");
    transition(conn, order_id, "rejected", Some(reason), actor, &outcome).await?;
    let rejected = InventoryRejected {
        order_id,
        reason: reason.to_owned(),
        shortages,
    };
    outbox
        .enqueue(&mut *conn, actor.cause(rejected.to_new(order_id)))
        .await?;
    metrics::counter!("inventory_reservations_total", "outcome" => "rejected").increment(1);
    Ok(())
}

/// Moves the order to `status` and records what was done, in one statement. A rejected
/// order never held stock, so it keeps no expiry.
async fn transition(
    conn: &mut PgConnection,
    order_id: Uuid,
    status: &str,
    reason: Option<&str>,
    actor: Actor<'_>,
    outcome: &str,
) -> sqlx::Result<()> {
    let (cause, event_id) = actor_columns(actor);
    sqlx::query(
        "WITH moved AS ( \
             UPDATE reservations SET status = $2, reason = $3, updated_at = now(), \
                 expires_at = CASE WHEN $2 = 'rejected' THEN NULL ELSE expires_at END \
             WHERE order_id = $1 RETURNING order_id \
         ) \
         INSERT INTO reservation_history (id, order_id, cause, event_id, outcome) \
         SELECT $4, order_id, $5, $6, $7 FROM moved",
    )
    .bind(order_id)
    .bind(status)
    .bind(reason)
    .bind(Uuid::now_v7())
    .bind(cause)
    .bind(event_id)
    .bind(outcome)
    .execute(conn)
    .await
    .map(drop)
}

fn actor_columns<'a>(actor: Actor<'a>) -> (&'a str, Option<Uuid>) {
    match actor {
        Actor::Event(event) => (event.event_type.as_str(), Some(event.id)),
        Actor::Sweeper => ("sweeper", None),
        Actor::User(_) => ("user", None),
    }
}

/// The order's row, locked: its status and reason.
async fn lock_order(
    conn: &mut PgConnection,
    order_id: Uuid,
) -> sqlx::Result<Option<(String, Option<String>)>> {
    sqlx::query_as("SELECT status, reason FROM reservations WHERE order_id = $1 FOR UPDATE")
        .bind(order_id)
        .fetch_optional(conn)
        .await
}

/// What handling `payment.completed` did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Commit {
    /// The held reservation became a sale.
    Committed,
    /// The reservation was gone, and the stock was taken again and sold.
    Retaken,
    /// The reservation was gone and the stock could not be taken: `inventory.rejected`.
    Rejected { reason: &'static str },
    /// Committed or rejected before: nothing done.
    AlreadyKnown { status: String },
}

/// `payment.completed`: the order's reservation becomes a sale (`inventory.committed`).
/// If it was released meanwhile, the stock is taken again if every line can be;
/// otherwise `inventory.rejected` says so, and payment-svc refunds.
pub async fn commit(
    conn: &mut PgConnection,
    outbox: &Outbox,
    event: &Envelope,
    order_id: Uuid,
) -> Result<Commit, HandlerError> {
    let Some((status, reason)) = lock_order(conn, order_id).await? else {
        // Payment is captured only after inventory.reserved, which comes from handling
        // order.created here; so that is still on its way (or failed and is retrying).
        return Err(HandlerError::transient(anyhow::anyhow!(
            "payment completed for order {order_id}, whose order.created is not handled yet"
        )));
    };
    let actor = Actor::Event(event);
    match status.as_str() {
        "held" => {
            let lines = load_lines(conn, order_id).await?;
            let products: Vec<Uuid> = lines.iter().map(|l| l.product_id).collect();
            stock::lock(conn, &products).await?;
            let changes: Vec<Change> = lines
                .iter()
                .map(|l| Change {
                    product_id: l.product_id,
                    on_hand_delta: -l.quantity,
                    reserved_delta: -l.quantity,
                })
                .collect();
            let entry = entry(Kind::Commit, order_id, "payment completed", actor);
            stock::apply(conn, outbox, &changes, entry).await?;
            committed(conn, outbox, actor, order_id, "committed").await?;
            Ok(Commit::Committed)
        }
        "released" if reason.as_deref() == Some(ReleaseReason::Cancelled.as_str()) => {
            // Nothing is sold to a cancelled order; this makes payment-svc refund.
            reject(
                conn,
                outbox,
                actor,
                order_id,
                domain::ORDER_CANCELLED,
                vec![],
            )
            .await?;
            Ok(Commit::Rejected {
                reason: domain::ORDER_CANCELLED,
            })
        }
        "released" => {
            let lines = load_lines(conn, order_id).await?;
            let products: Vec<Uuid> = lines.iter().map(|l| l.product_id).collect();
            let rows = stock::lock(conn, &products).await?;
            let lines = Lines::new(lines.iter().map(|l| (l.product_id, l.quantity)))
                .map_err(|e| HandlerError::permanent(anyhow::anyhow!(e)))?;
            let supply = |product: Uuid| {
                rows.iter()
                    .find(|r| r.product_id == product)
                    .map_or(Supply::Unknown, stock::StockRow::supply)
            };
            match domain::decide(&lines, supply, false) {
                Decision::Take => {
                    let changes: Vec<Change> = lines
                        .as_slice()
                        .iter()
                        .map(|l| Change {
                            product_id: l.product_id,
                            on_hand_delta: -l.quantity,
                            reserved_delta: 0,
                        })
                        .collect();
                    let why = format!(
                        "payment completed after the reservation was released ({})",
                        reason.as_deref().unwrap_or("unknown")
                    );
                    let entry = entry(Kind::Sale, order_id, &why, actor);
                    stock::apply(conn, outbox, &changes, entry).await?;
                    let outcome = "committed: stock taken again";
                    committed(conn, outbox, actor, order_id, outcome).await?;
                    Ok(Commit::Retaken)
                }
                refused => {
                    let shortages = match refused {
                        Decision::Reject { shortages, .. } => shortages,
                        _ => Vec::new(),
                    };
                    // Whatever the product's state, what the buyer hears is: no stock.
                    let reason = domain::OUT_OF_STOCK;
                    reject(conn, outbox, actor, order_id, reason, shortages).await?;
                    Ok(Commit::Rejected { reason })
                }
            }
        }
        _ => {
            if status != "committed" {
                tracing::warn!(%order_id, status = status.as_str(), "payment completed for an order with no reservation; nothing to commit");
            }
            note(
                conn,
                order_id,
                actor,
                &format!("ignored: order already {status}"),
            )
            .await?;
            Ok(Commit::AlreadyKnown { status })
        }
    }
}

fn entry<'a>(kind: Kind, order_id: Uuid, reason: &'a str, actor: Actor<'a>) -> Entry<'a> {
    Entry {
        kind,
        order_id: Some(order_id),
        reason,
        actor,
        correlation_id: order_id,
    }
}

async fn committed(
    conn: &mut PgConnection,
    outbox: &Outbox,
    actor: Actor<'_>,
    order_id: Uuid,
    outcome: &str,
) -> sqlx::Result<()> {
    transition(conn, order_id, "committed", None, actor, outcome).await?;
    outbox
        .enqueue(
            &mut *conn,
            actor.cause(InventoryCommitted { order_id }.to_new(order_id)),
        )
        .await?;
    metrics::counter!("inventory_reservations_total", "outcome" => "committed").increment(1);
    Ok(())
}

/// What a release did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Release {
    Released,
    /// order.created has not arrived: remembered, so that it reserves nothing.
    Tombstoned,
    /// Committed, released or rejected before: nothing to give back.
    AlreadyKnown {
        status: String,
    },
}

/// `payment.failed` or `order.cancelled`: give the order's stock back
/// (`inventory.released`). Before its `order.created`, leave a tombstone instead.
pub async fn release(
    conn: &mut PgConnection,
    outbox: &Outbox,
    event: &Envelope,
    order_id: Uuid,
    reason: ReleaseReason,
) -> Result<Release, HandlerError> {
    let tombstoned = sqlx::query(
        "INSERT INTO reservations (order_id, status, reason) VALUES ($1, 'tombstone', $2) \
         ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(order_id)
    .bind(reason.as_str())
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if tombstoned == 1 {
        let outcome = format!("tombstone: {} before order.created", reason.as_str());
        note(conn, order_id, Actor::Event(event), &outcome).await?;
        return Ok(Release::Tombstoned);
    }
    let Some((status, _)) = lock_order(conn, order_id).await? else {
        return Err(HandlerError::transient(anyhow::anyhow!(
            "order {order_id} vanished while being released"
        )));
    };
    if status != "held" {
        let outcome = format!("ignored: order already {status}");
        note(conn, order_id, Actor::Event(event), &outcome).await?;
        return Ok(Release::AlreadyKnown { status });
    }
    release_held(conn, outbox, Actor::Event(event), order_id, reason).await?;
    Ok(Release::Released)
}

/// Gives back the stock of a held reservation whose row the caller has locked.
pub async fn release_held(
    conn: &mut PgConnection,
    outbox: &Outbox,
    actor: Actor<'_>,
    order_id: Uuid,
    reason: ReleaseReason,
) -> sqlx::Result<()> {
    let lines = load_lines(conn, order_id).await?;
    let products: Vec<Uuid> = lines.iter().map(|l| l.product_id).collect();
    stock::lock(conn, &products).await?;
    let changes: Vec<Change> = lines
        .iter()
        .map(|l| Change {
            product_id: l.product_id,
            on_hand_delta: 0,
            reserved_delta: -l.quantity,
        })
        .collect();
    let entry = entry(Kind::Release, order_id, reason.as_str(), actor);
    stock::apply(conn, outbox, &changes, entry).await?;
    let outcome = format!("released: {}", reason.as_str());
    transition(
        conn,
        order_id,
        "released",
        Some(reason.as_str()),
        actor,
        &outcome,
    )
    .await?;
    let released = InventoryReleased {
        order_id,
        reason: reason.as_str().to_owned(),
    };
    outbox
        .enqueue(&mut *conn, actor.cause(released.to_new(order_id)))
        .await?;
    metrics::counter!("inventory_reservations_total", "outcome" => "released", "reason" => reason.as_str())
        .increment(1);
    Ok(())
}

/// Releases one reservation past its time, if any is free to take (another replica's
/// sweeper skips the rows this one holds). Returns the order released.
pub async fn expire_one(conn: &mut PgConnection, outbox: &Outbox) -> sqlx::Result<Option<Uuid>> {
    let order_id: Option<Uuid> = sqlx::query_scalar(
        "SELECT order_id FROM reservations WHERE status = 'held' AND expires_at <= now() \
         ORDER BY expires_at LIMIT 1 FOR UPDATE SKIP LOCKED",
    )
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(order_id) = order_id {
        release_held(
            conn,
            outbox,
            Actor::Sweeper,
            order_id,
            ReleaseReason::Expired,
        )
        .await?;
    }
    Ok(order_id)
}

/// Records what was done with one event of the order's saga (or by the sweeper).
async fn note(
    conn: &mut PgConnection,
    order_id: Uuid,
    actor: Actor<'_>,
    outcome: &str,
) -> sqlx::Result<()> {
    let (cause, event_id) = actor_columns(actor);
    sqlx::query(
        "INSERT INTO reservation_history (id, order_id, cause, event_id, outcome) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(Uuid::now_v7())
    .bind(order_id)
    .bind(cause)
    .bind(event_id)
    .bind(outcome)
    .execute(conn)
    .await
    .map(drop)
}
