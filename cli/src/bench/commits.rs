//! Commits per order: measured from `pg_stat_database.xact_commit` of the namespace's
//! databases across the run, and estimated by reading the code.
//!
//! PostgreSQL publishes a busy backend's counters at most once a second and an idle
//! one's up to 10 s late (PGSTAT_IDLE_INTERVAL), so each snapshot waits that out. The
//! services also commit when nothing happens (outbox relay polls, readiness checks):
//! that background rate is measured before the run and subtracted, as are the
//! generator's own queries on order-svc's database.

use std::collections::BTreeMap;
use std::str::FromStr as _;
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions as _, PgConnection};
use tokio::time::Instant;

use crate::Target;
use crate::load::{Kind, Outcome};
use crate::setup::World;

/// The databases an order touches (user-svc and file-svc take no part).
const SAGA_SERVICES: [&str; 5] = ["order", "payment", "inventory", "notification", "product"];
/// Longer than PostgreSQL's idle flush interval (10 s).
const STATS_SETTLE: Duration = Duration::from_secs(11);
/// Window over which the background commit rate is measured.
const BACKGROUND_WINDOW: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Serialize)]
pub struct Commits {
    /// Commits of the run per database, background and the generator's own removed.
    pub per_database: BTreeMap<String, i64>,
    pub total: i64,
    /// Commits per second in the namespace's databases with no orders flowing.
    pub background_per_s: f64,
    /// Orders placed in the run.
    pub orders: u64,
    /// Measured: `total / orders`.
    pub per_order: f64,
    /// By reading the code, for the run's mix of orders (see [`estimate`]).
    pub estimated_per_order: f64,
    /// By reading the code, for a paid order of the run's average size.
    pub estimated_per_paid_order: f64,
}

/// Counters before the run, and the background rate.
pub struct Baseline {
    /// Kept from the start: a busy server may have no connection left at the end.
    conn: PgConnection,
    at: Instant,
    counts: BTreeMap<String, i64>,
    background: BTreeMap<String, f64>,
}

async fn connect(target: &Target) -> anyhow::Result<PgConnection> {
    let url = target.postgres.database_url("postgres");
    PgConnectOptions::from_str(&url)
        .context("COMMERCE__POSTGRES__URL")?
        .application_name("commerce-bench")
        .connect()
        .await
        .context("connecting to the postgres database for pg_stat_database")
}

async fn snapshot(
    conn: &mut PgConnection,
    target: &Target,
) -> anyhow::Result<BTreeMap<String, i64>> {
    let databases: Vec<String> = SAGA_SERVICES.iter().map(|s| target.database(s)).collect();
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT datname::text, xact_commit FROM pg_stat_database WHERE datname = ANY($1)",
    )
    .bind(databases)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().collect())
}

fn delta(after: &BTreeMap<String, i64>, before: &BTreeMap<String, i64>) -> BTreeMap<String, i64> {
    after
        .iter()
        .map(|(db, n)| (db.clone(), n - before.get(db).copied().unwrap_or(0)))
        .collect()
}

impl Baseline {
    pub async fn measure(target: &Target) -> anyhow::Result<Self> {
        let mut conn = connect(target).await?;
        tokio::time::sleep(STATS_SETTLE).await;
        let first = snapshot(&mut conn, target).await?;
        let t0 = Instant::now();
        tokio::time::sleep(BACKGROUND_WINDOW).await;
        let counts = snapshot(&mut conn, target).await?;
        let at = Instant::now();
        let secs = at.duration_since(t0).as_secs_f64();
        let background = delta(&counts, &first)
            .into_iter()
            .map(|(db, n)| (db, n as f64 / secs))
            .collect();
        Ok(Self {
            conn,
            at,
            counts,
            background,
        })
    }

    pub async fn finish(
        mut self,
        target: &Target,
        outcome: &Outcome,
        world: &World,
    ) -> anyhow::Result<Commits> {
        tokio::time::sleep(STATS_SETTLE).await;
        let after = snapshot(&mut self.conn, target).await?;
        let secs = Instant::now().duration_since(self.at).as_secs_f64();
        let order_db = target.database("order");
        let mut per_database = BTreeMap::new();
        for (db, n) in delta(&after, &self.counts) {
            let background = self.background.get(&db).copied().unwrap_or(0.0) * secs;
            let own = if db == order_db {
                i64::try_from(outcome.tracker_queries).unwrap_or(i64::MAX)
            } else {
                0
            };
            per_database.insert(db, n - own - background.round() as i64);
        }
        let total: i64 = per_database.values().sum();
        let orders = outcome.placed.len() as u64;
        let per_order = if orders == 0 {
            0.0
        } else {
            total as f64 / orders as f64
        };
        let sellers_in_run = world.sellers.len();
        let estimates: Vec<f64> = outcome
            .placed
            .iter()
            .map(|p| estimate(p.kind, p.lines, p.sellers) as f64)
            .collect();
        let paid: Vec<_> = outcome
            .placed
            .iter()
            .filter(|p| p.kind == Kind::Normal)
            .collect();
        let mean = |v: &[f64]| {
            if v.is_empty() {
                0.0
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        let lines = mean(&paid.iter().map(|p| p.lines as f64).collect::<Vec<_>>());
        let sellers = mean(&paid.iter().map(|p| p.sellers as f64).collect::<Vec<_>>())
            .min(sellers_in_run as f64);
        Ok(Commits {
            per_database,
            total,
            background_per_s: self.background.values().sum(),
            orders,
            per_order,
            estimated_per_order: mean(&estimates),
            estimated_per_paid_order: 18.0 + sellers + 4.0 * lines,
        })
    }
}

/// Commits one order takes, read from the code (each HTTP write transaction, each
/// consumer transaction with its inbox row, each mail's log row, and one outbox relay
/// transaction per event: the relay batches under load, so this is an upper bound).
///
/// Paid, with `lines` lines from `sellers` sellers:
/// - order-svc: POST /orders 1; consumes inventory.reserved, payment.authorized,
///   payment.completed, inventory.committed 4
/// - inventory-svc: order.created (reserve) and payment.completed (commit) 2
/// - payment-svc: order.created (authorize) and inventory.reserved (capture) 2
/// - notification-svc: order.created and order.paid 2, one log row per mail 1 + sellers
/// - product-svc: inventory.stock_changed per product at reserve and at commit 2 × lines
/// - relay: order.created, inventory.reserved, payment.authorized, payment.completed,
///   inventory.committed, order.paid, and 2 × lines stock_changed
///
/// = 18 + sellers + 4 × lines. Cancelled orders, in their usual order of events:
/// declined = 18 + 4 × lines (reserve then release); out of stock = 17 (nothing reserved).
pub fn estimate(kind: Kind, lines: usize, sellers: usize) -> usize {
    match kind {
        Kind::Normal => 18 + sellers + 4 * lines,
        Kind::Declined => 18 + 4 * lines,
        Kind::OutOfStock => 17,
    }
}
