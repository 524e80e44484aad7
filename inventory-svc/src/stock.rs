//! Stock rows and the ledger. Every change goes through [`apply`]: the row, its ledger
//! entry and its `inventory.stock_changed` event are written in the caller's
//! transaction, so the three always agree.

use chrono::{DateTime, Utc};
use shared::events::{Event as _, StockChanged};
use shared::messaging::{Envelope, NewEvent, Outbox};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::Supply;

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct StockRow {
    pub product_id: Uuid,
    pub seller_id: Uuid,
    pub on_hand: i64,
    pub reserved: i64,
    pub version: i64,
    pub deleted_at: Option<DateTime<Utc>>,
}

impl StockRow {
    pub fn available(&self) -> i64 {
        self.on_hand - self.reserved
    }

    pub fn supply(&self) -> Supply {
        if self.deleted_at.is_some() {
            Supply::Deleted
        } else {
            Supply::Available(self.available())
        }
    }
}

/// Who changed stock, for the ledger, and what caused the events that follow.
#[derive(Clone, Copy, Debug)]
pub enum Actor<'a> {
    User(Uuid),
    Event(&'a Envelope),
    Sweeper,
}

impl Actor<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Self::User(_) => "user",
            Self::Event(_) => "event",
            Self::Sweeper => "sweeper",
        }
    }

    fn id(&self) -> Option<Uuid> {
        match self {
            Self::User(id) => Some(*id),
            Self::Event(event) => Some(event.id),
            Self::Sweeper => None,
        }
    }

    fn event_type(&self) -> Option<&str> {
        match self {
            Self::Event(event) => Some(&event.event_type),
            _ => None,
        }
    }

    /// An event caused by this actor: in the incoming event's saga when there is one.
    pub fn cause(&self, event: NewEvent) -> NewEvent {
        match self {
            Self::Event(cause) => event.caused_by(*cause),
            _ => event,
        }
    }
}

/// What a ledger entry records a change as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Initial,
    Adjustment,
    Reservation,
    Release,
    /// A held reservation became a sale.
    Commit,
    /// Stock taken and sold at once: payment completed after the reservation was gone.
    Sale,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Initial => "initial",
            Self::Adjustment => "adjustment",
            Self::Reservation => "reservation",
            Self::Release => "release",
            Self::Commit => "commit",
            Self::Sale => "sale",
        }
    }
}

/// A change of one product's stock.
#[derive(Clone, Copy, Debug)]
pub struct Change {
    pub product_id: Uuid,
    pub on_hand_delta: i64,
    pub reserved_delta: i64,
}

/// Why a set of changes was made; one ledger entry per product changed.
#[derive(Clone, Copy, Debug)]
pub struct Entry<'a> {
    pub kind: Kind,
    pub order_id: Option<Uuid>,
    pub reason: &'a str,
    pub actor: Actor<'a>,
    /// The saga or unit the stock_changed events belong to when no event caused them.
    pub correlation_id: Uuid,
}

const COLUMNS: &str = "product_id, seller_id, on_hand, reserved, version, deleted_at";

pub async fn find(conn: &mut PgConnection, product_id: Uuid) -> sqlx::Result<Option<StockRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM stock WHERE product_id = $1"
    )))
    .bind(product_id)
    .fetch_optional(conn)
    .await
}

/// Locks the stock rows of `products` in product id order (the one lock order every
/// writer uses, so no two transactions wait for each other in a cycle) and returns
/// them as they are after every earlier writer committed.
pub async fn lock(conn: &mut PgConnection, products: &[Uuid]) -> sqlx::Result<Vec<StockRow>> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM stock WHERE product_id = ANY($1) ORDER BY product_id FOR UPDATE"
    )))
    .bind(products)
    .fetch_all(conn)
    .await
}

/// Applies `changes` to rows the caller has locked, writes one ledger entry and one
/// `inventory.stock_changed` per product, and returns the new states. The table's
/// checks refuse any result with negative stock or more reserved than on hand: a bug
/// fails its transaction instead of overselling.
pub async fn apply(
    conn: &mut PgConnection,
    outbox: &Outbox,
    changes: &[Change],
    entry: Entry<'_>,
) -> sqlx::Result<Vec<StockChanged>> {
    let products: Vec<Uuid> = changes.iter().map(|c| c.product_id).collect();
    let on_hand: Vec<i64> = changes.iter().map(|c| c.on_hand_delta).collect();
    let reserved: Vec<i64> = changes.iter().map(|c| c.reserved_delta).collect();
    let ids: Vec<Uuid> = changes.iter().map(|_| Uuid::now_v7()).collect();
    let changed: Vec<(Uuid, i64, i64, i64)> = sqlx::query_as(
        "WITH change AS ( \
             SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::bigint[], $4::uuid[]) \
                 AS c(product_id, on_hand_delta, reserved_delta, entry_id) \
         ), updated AS ( \
             UPDATE stock s SET on_hand = s.on_hand + c.on_hand_delta, \
                 reserved = s.reserved + c.reserved_delta, \
                 version = s.version + 1, updated_at = now() \
             FROM change c WHERE s.product_id = c.product_id \
             RETURNING s.product_id, s.on_hand, s.reserved, s.version, \
                 c.on_hand_delta, c.reserved_delta, c.entry_id \
         ), ledger AS ( \
             INSERT INTO stock_ledger (id, product_id, version, kind, on_hand_delta, \
                 reserved_delta, on_hand, reserved, order_id, reason, actor_kind, actor_id, \
                 event_type) \
             SELECT entry_id, product_id, version, $5, on_hand_delta, reserved_delta, \
                 on_hand, reserved, $6, $7, $8, $9, $10 FROM updated \
         ) \
         SELECT product_id, on_hand, reserved, version FROM updated ORDER BY product_id",
    )
    .bind(&products)
    .bind(&on_hand)
    .bind(&reserved)
    .bind(&ids)
    .bind(entry.kind.as_str())
    .bind(entry.order_id)
    .bind(entry.reason)
    .bind(entry.actor.kind())
    .bind(entry.actor.id())
    .bind(entry.actor.event_type())
    .fetch_all(&mut *conn)
    .await?;
    if changed.len() != changes.len() {
        // Callers change only rows they hold locked; a missing one is a bug.
        return Err(sqlx::Error::RowNotFound);
    }
    let events: Vec<StockChanged> = changed
        .into_iter()
        .map(|(product_id, on_hand, reserved, version)| StockChanged {
            product_id,
            on_hand,
            reserved,
            available: on_hand - reserved,
            version,
        })
        .collect();
    let messages = events
        .iter()
        .map(|event| entry.actor.cause(event.to_new(entry.correlation_id)))
        .collect();
    outbox.enqueue_all(&mut *conn, messages).await?;
    Ok(events)
}

/// `product.created`: the product's stock row with its initial stock (version 1). A
/// second delivery of the same fact, or one after `product.deleted`, changes nothing.
pub async fn create(
    conn: &mut PgConnection,
    outbox: &Outbox,
    event: &Envelope,
    product: &shared::events::ProductCreated,
) -> sqlx::Result<bool> {
    // Starts at version 0 and empty, so the initial stock is a change like any other.
    let created = sqlx::query(
        "INSERT INTO stock (product_id, seller_id, on_hand, version) VALUES ($1, $2, 0, 0) \
         ON CONFLICT (product_id) DO NOTHING",
    )
    .bind(product.product_id)
    .bind(product.seller_id)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if created == 0 {
        return Ok(false);
    }
    let change = Change {
        product_id: product.product_id,
        on_hand_delta: product.initial_stock,
        reserved_delta: 0,
    };
    let entry = Entry {
        kind: Kind::Initial,
        order_id: None,
        reason: "initial stock",
        actor: Actor::Event(event),
        correlation_id: product.product_id,
    };
    apply(conn, outbox, &[change], entry).await?;
    Ok(true)
}

/// `product.deleted`: no new reservations; the row and its ledger stay. Arriving before
/// `product.created`, it leaves a deleted, empty row, so that the late creation is
/// ignored.
pub async fn delete(
    conn: &mut PgConnection,
    product: &shared::events::ProductDeleted,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO stock (product_id, seller_id, on_hand, version, deleted_at) \
         VALUES ($1, $2, 0, 0, $3) \
         ON CONFLICT (product_id) DO UPDATE \
         SET deleted_at = COALESCE(stock.deleted_at, EXCLUDED.deleted_at), updated_at = now()",
    )
    .bind(product.product_id)
    .bind(product.seller_id)
    .bind(product.deleted_at)
    .execute(conn)
    .await
    .map(drop)
}
