//! The saga's invariants (DESIGN.md §5, docs/SAGA.md), checked with read-only SQL against
//! the databases of order-svc, payment-svc, inventory-svc and notification-svc:
//!
//! - every order ends `paid` or `cancelled`;
//! - stock never goes below zero, and per product what was supplied (initial stock and
//!   adjustments) equals what is on hand plus what paid orders bought;
//! - a paid order was captured exactly once and its reservation committed;
//! - a cancelled order holds no reservation and no captured money (a capture was
//!   refunded);
//! - a paid order mailed its customer and each of its sellers exactly once.

use std::collections::{BTreeSet, HashMap};
use std::str::FromStr as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Serialize;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use uuid::Uuid;

use crate::Target;

/// Read-only pools on the databases of the saga's services.
pub struct Databases {
    pub order: PgPool,
    pub payment: PgPool,
    pub inventory: PgPool,
    pub notification: PgPool,
}

impl Databases {
    pub async fn connect(target: &Target) -> anyhow::Result<Self> {
        Ok(Self {
            order: read_only(target, "order").await?,
            payment: read_only(target, "payment").await?,
            inventory: read_only(target, "inventory").await?,
            notification: read_only(target, "notification").await?,
        })
    }

    /// Waits until order-svc, inventory-svc and notification-svc know every product,
    /// and notification-svc every account: before that, orders would be refused or
    /// their mail held back, which is not what a benchmark measures.
    pub async fn wait_known(
        &self,
        users: &[Uuid],
        products: &[Uuid],
        deadline: Instant,
    ) -> anyhow::Result<()> {
        let want = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        let mut wait = Duration::from_millis(20);
        loop {
            let priced: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM products WHERE product_id = ANY($1) \
                 AND deleted_at IS NULL AND name IS NOT NULL",
            )
            .bind(products)
            .fetch_one(&self.order)
            .await?;
            let stocked: i64 =
                sqlx::query_scalar("SELECT count(*) FROM stock WHERE product_id = ANY($1)")
                    .bind(products)
                    .fetch_one(&self.inventory)
                    .await?;
            let named: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM products WHERE product_id = ANY($1) AND name IS NOT NULL",
            )
            .bind(products)
            .fetch_one(&self.notification)
            .await?;
            let contacts: i64 =
                sqlx::query_scalar("SELECT count(*) FROM contacts WHERE user_id = ANY($1)")
                    .bind(users)
                    .fetch_one(&self.notification)
                    .await?;
            if priced == want(products.len())
                && stocked == want(products.len())
                && named == want(products.len())
                && contacts == want(users.len())
            {
                return Ok(());
            }
            if Instant::now() + wait > deadline {
                bail!(
                    "the services did not learn of the run's accounts and products in time \
                     (order-svc knows {priced}, inventory-svc {stocked}, notification-svc \
                     {named} of {} products; notification-svc {contacts} of {} accounts)",
                    products.len(),
                    users.len()
                );
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(500));
        }
    }
}

async fn read_only(target: &Target, service: &str) -> anyhow::Result<PgPool> {
    let name = target.database(service);
    let url = target.postgres.database_url(&name);
    let options = PgConnectOptions::from_str(&url)
        .with_context(|| format!("COMMERCE__POSTGRES__URL for {name}"))?
        .application_name("commerce-bench")
        // The checker looks; it never writes.
        .options([("default_transaction_read_only", "on")]);
    PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
        .with_context(|| {
            format!(
                "connecting to database {name} (is the system running in namespace {}?)",
                target.namespace
            )
        })
}

/// What one run made: the orders of these customers, the stock of these products.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    pub customers: Vec<Uuid>,
    pub products: Vec<Uuid>,
    /// Orders the gateway accepted (202); each must exist and end.
    pub accepted: Vec<Uuid>,
}

/// One broken invariant.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Violation {
    pub invariant: &'static str,
    /// The order or product it is about.
    pub subject: Uuid,
    pub detail: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}: {}", self.invariant, self.subject, self.detail)
    }
}

pub const ENDED: &str = "every order ends paid or cancelled";
pub const STOCK_NOT_NEGATIVE: &str = "stock never below zero";
pub const STOCK_CONSERVED: &str = "supplied = on hand + sold";
pub const PAID_CAPTURED_ONCE: &str = "a paid order is captured exactly once";
pub const PAID_COMMITTED: &str = "a paid order's reservation is committed";
pub const CANCELLED_HOLDS_NOTHING: &str = "a cancelled order holds no reservation";
pub const CANCELLED_NOT_CHARGED: &str = "a cancelled order holds no captured money";
pub const MAILED_ONCE: &str = "a paid order mails its customer and each seller exactly once";

/// Checks until no invariant is broken or `settle` has passed, and returns what is
/// still broken: work that follows an order's end (mail, a void) may lag behind it.
pub async fn settled(
    dbs: &Databases,
    scope: &Scope,
    settle: Duration,
) -> anyhow::Result<Vec<Violation>> {
    let deadline = Instant::now() + settle;
    let mut wait = Duration::from_millis(50);
    loop {
        let violations = check(dbs, scope).await?;
        if violations.is_empty() || Instant::now() + wait > deadline {
            return Ok(violations);
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(1));
    }
}

/// Checks every invariant once.
pub async fn check(dbs: &Databases, scope: &Scope) -> anyhow::Result<Vec<Violation>> {
    let mut found = Vec::new();
    let orders = orders(dbs, scope).await?;
    check_ended(scope, &orders, &mut found);
    check_stock(dbs, scope, &orders, &mut found).await?;
    check_payments(dbs, &orders, &mut found).await?;
    check_reservations(dbs, &orders, &mut found).await?;
    check_mail(dbs, &orders, &mut found).await?;
    Ok(found)
}

struct Order {
    id: Uuid,
    customer: Uuid,
    status: String,
    lines: Vec<(Uuid, Uuid, i64)>,
    /// Ids of the order.paid events in its history.
    paid_events: Vec<Uuid>,
}

impl Order {
    fn paid(&self) -> bool {
        self.status == "paid"
    }
    fn cancelled(&self) -> bool {
        self.status == "cancelled"
    }
}

async fn orders(dbs: &Databases, scope: &Scope) -> anyhow::Result<Vec<Order>> {
    let rows: Vec<(Uuid, Uuid, String)> =
        sqlx::query_as("SELECT id, customer_id, status FROM orders WHERE customer_id = ANY($1)")
            .bind(&scope.customers)
            .fetch_all(&dbs.order)
            .await?;
    let ids: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    let lines: Vec<(Uuid, Uuid, Uuid, i64)> = sqlx::query_as(
        "SELECT order_id, product_id, seller_id, quantity FROM order_lines \
         WHERE order_id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&dbs.order)
    .await?;
    let paid: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "SELECT order_id, event_id FROM order_history \
         WHERE order_id = ANY($1) AND event_type = 'order.paid'",
    )
    .bind(&ids)
    .fetch_all(&dbs.order)
    .await?;
    let mut by_id: HashMap<Uuid, Order> = rows
        .into_iter()
        .map(|(id, customer, status)| {
            (
                id,
                Order {
                    id,
                    customer,
                    status,
                    lines: Vec::new(),
                    paid_events: Vec::new(),
                },
            )
        })
        .collect();
    for (order, product, seller, quantity) in lines {
        if let Some(o) = by_id.get_mut(&order) {
            o.lines.push((product, seller, quantity));
        }
    }
    for (order, event) in paid {
        if let Some(o) = by_id.get_mut(&order) {
            o.paid_events.push(event);
        }
    }
    let mut orders: Vec<Order> = by_id.into_values().collect();
    orders.sort_by_key(|o| o.id);
    Ok(orders)
}

fn check_ended(scope: &Scope, orders: &[Order], found: &mut Vec<Violation>) {
    let known: BTreeSet<Uuid> = orders.iter().map(|o| o.id).collect();
    for id in &scope.accepted {
        if !known.contains(id) {
            found.push(Violation {
                invariant: ENDED,
                subject: *id,
                detail: "accepted (202) but not in order-svc's database".into(),
            });
        }
    }
    for o in orders.iter().filter(|o| !o.paid() && !o.cancelled()) {
        found.push(Violation {
            invariant: ENDED,
            subject: o.id,
            detail: format!("still {}", o.status),
        });
    }
}

#[derive(sqlx::FromRow)]
struct StockRow {
    product_id: Uuid,
    on_hand: i64,
    reserved: i64,
    /// Initial stock plus adjustments.
    supplied: Option<i64>,
    /// Every change the ledger holds, added up.
    ledger_sum: Option<i64>,
    /// The lowest on hand the ledger ever showed.
    min_on_hand: Option<i64>,
    /// The lowest reserved or available the ledger ever showed.
    min_other: Option<i64>,
}

async fn check_stock(
    dbs: &Databases,
    scope: &Scope,
    orders: &[Order],
    found: &mut Vec<Violation>,
) -> anyhow::Result<()> {
    // Per product: now, supplied, the ledger's own sum, and the lowest it ever showed.
    let rows: Vec<StockRow> = sqlx::query_as(
        "SELECT s.product_id, s.on_hand, s.reserved, \
                 (SELECT sum(on_hand_delta) FROM stock_ledger l WHERE l.product_id = s.product_id \
                     AND kind IN ('initial', 'adjustment'))::bigint AS supplied, \
                 (SELECT sum(on_hand_delta) FROM stock_ledger l \
                     WHERE l.product_id = s.product_id)::bigint AS ledger_sum, \
                 (SELECT min(on_hand) FROM stock_ledger l WHERE l.product_id = s.product_id) \
                     AS min_on_hand, \
                 (SELECT min(least(reserved, on_hand - reserved)) FROM stock_ledger l \
                     WHERE l.product_id = s.product_id) AS min_other \
             FROM stock s WHERE s.product_id = ANY($1)",
    )
    .bind(&scope.products)
    .fetch_all(&dbs.inventory)
    .await?;
    let mut sold: HashMap<Uuid, i64> = HashMap::new();
    for o in orders.iter().filter(|o| o.paid()) {
        for (product, _, quantity) in &o.lines {
            *sold.entry(*product).or_default() += quantity;
        }
    }
    for product in &scope.products {
        if !rows.iter().any(|r| r.product_id == *product) {
            found.push(Violation {
                invariant: STOCK_CONSERVED,
                subject: *product,
                detail: "no stock row in inventory-svc".into(),
            });
        }
    }
    for StockRow {
        product_id: product,
        on_hand,
        reserved,
        supplied,
        ledger_sum,
        min_on_hand,
        min_other,
    } in rows
    {
        let supplied = supplied.unwrap_or(0);
        let sold = sold.get(&product).copied().unwrap_or(0);
        if on_hand < 0 || reserved < 0 || on_hand < reserved {
            found.push(Violation {
                invariant: STOCK_NOT_NEGATIVE,
                subject: product,
                detail: format!("on hand {on_hand}, reserved {reserved}"),
            });
        }
        if min_on_hand.unwrap_or(0) < 0 || min_other.unwrap_or(0) < 0 {
            found.push(Violation {
                invariant: STOCK_NOT_NEGATIVE,
                subject: product,
                detail: format!(
                    "the ledger went as low as on hand {}, reserved or available {}",
                    min_on_hand.unwrap_or(0),
                    min_other.unwrap_or(0)
                ),
            });
        }
        if supplied != on_hand + sold {
            found.push(Violation {
                invariant: STOCK_CONSERVED,
                subject: product,
                detail: format!(
                    "supplied {supplied} (initial + adjustments) but on hand {on_hand} + \
                     sold in paid orders {sold} = {}",
                    on_hand + sold
                ),
            });
        }
        if ledger_sum != Some(on_hand) {
            found.push(Violation {
                invariant: STOCK_CONSERVED,
                subject: product,
                detail: format!(
                    "on hand {on_hand} but the stock ledger's changes add up to {}",
                    ledger_sum.unwrap_or(0)
                ),
            });
        }
    }
    Ok(())
}

async fn check_payments(
    dbs: &Databases,
    orders: &[Order],
    found: &mut Vec<Violation>,
) -> anyhow::Result<()> {
    let ids: Vec<Uuid> = orders.iter().map(|o| o.id).collect();
    let payments: HashMap<Uuid, String> =
        sqlx::query_as("SELECT order_id, status FROM payments WHERE order_id = ANY($1)")
            .bind(&ids)
            .fetch_all(&dbs.payment)
            .await?
            .into_iter()
            .collect();
    // Successful provider calls: a failed attempt is in the ledger too, with its result.
    let calls: Vec<(Uuid, String, i64)> = sqlx::query_as(
        "SELECT order_id, step, count(*) FROM payment_ledger \
         WHERE order_id = ANY($1) AND source = 'call' AND result = 'ok' \
           AND step IN ('capture', 'refund') GROUP BY order_id, step",
    )
    .bind(&ids)
    .fetch_all(&dbs.payment)
    .await?;
    let count = |order: Uuid, step: &str| {
        calls
            .iter()
            .find(|c| c.0 == order && c.1 == step)
            .map_or(0, |c| c.2)
    };
    for o in orders {
        let status = payments.get(&o.id).map_or("none", String::as_str);
        let (captures, refunds) = (count(o.id, "capture"), count(o.id, "refund"));
        if o.paid() && (status != "captured" || captures != 1 || refunds != 0) {
            found.push(Violation {
                invariant: PAID_CAPTURED_ONCE,
                subject: o.id,
                detail: format!(
                    "payment {status}, {captures} successful capture(s), {refunds} refund(s)"
                ),
            });
        }
        if o.cancelled()
            && (matches!(status, "authorized" | "captured") || captures > 1 || captures > refunds)
        {
            found.push(Violation {
                invariant: CANCELLED_NOT_CHARGED,
                subject: o.id,
                detail: format!(
                    "payment {status}, {captures} successful capture(s), {refunds} refund(s)"
                ),
            });
        }
    }
    Ok(())
}

async fn check_reservations(
    dbs: &Databases,
    orders: &[Order],
    found: &mut Vec<Violation>,
) -> anyhow::Result<()> {
    let ids: Vec<Uuid> = orders.iter().map(|o| o.id).collect();
    let reservations: HashMap<Uuid, String> =
        sqlx::query_as("SELECT order_id, status FROM reservations WHERE order_id = ANY($1)")
            .bind(&ids)
            .fetch_all(&dbs.inventory)
            .await?
            .into_iter()
            .collect();
    for o in orders {
        let status = reservations.get(&o.id).map_or("none", String::as_str);
        if o.paid() && status != "committed" {
            found.push(Violation {
                invariant: PAID_COMMITTED,
                subject: o.id,
                detail: format!("reservation {status}"),
            });
        }
        if o.cancelled() && matches!(status, "held" | "committed" | "pending") {
            found.push(Violation {
                invariant: CANCELLED_HOLDS_NOTHING,
                subject: o.id,
                detail: format!("reservation {status}"),
            });
        }
    }
    Ok(())
}

async fn check_mail(
    dbs: &Databases,
    orders: &[Order],
    found: &mut Vec<Violation>,
) -> anyhow::Result<()> {
    let events: Vec<Uuid> = orders.iter().flat_map(|o| o.paid_events.clone()).collect();
    let sent: Vec<(Uuid, Uuid, String)> = sqlx::query_as(
        "SELECT event_id, recipient_id, template FROM notifications WHERE event_id = ANY($1)",
    )
    .bind(&events)
    .fetch_all(&dbs.notification)
    .await?;
    for o in orders.iter().filter(|o| o.paid()) {
        if o.paid_events.len() != 1 {
            found.push(Violation {
                invariant: MAILED_ONCE,
                subject: o.id,
                detail: format!("{} order.paid events in its history", o.paid_events.len()),
            });
        }
        let mails: Vec<&(Uuid, Uuid, String)> = sent
            .iter()
            .filter(|m| o.paid_events.contains(&m.0))
            .collect();
        let to = |who: Uuid, template: &str| {
            mails
                .iter()
                .filter(|m| m.1 == who && m.2 == template)
                .count()
        };
        let mut expected = vec![(o.customer, "order_receipt")];
        let sellers: BTreeSet<Uuid> = o.lines.iter().map(|l| l.1).collect();
        expected.extend(sellers.iter().map(|s| (*s, "seller_order_notice")));
        for (who, template) in &expected {
            let n = to(*who, template);
            if n != 1 {
                found.push(Violation {
                    invariant: MAILED_ONCE,
                    subject: o.id,
                    detail: format!("{n} {template} mail(s) to {who}"),
                });
            }
        }
        if mails.len() > expected.len() {
            found.push(Violation {
                invariant: MAILED_ONCE,
                subject: o.id,
                detail: format!("{} mails for {} recipients", mails.len(), expected.len()),
            });
        }
    }
    Ok(())
}
