//! Reservations per second for single-product orders, with the real reservation code
//! against PostgreSQL: each reservation is the transaction the `order.created` handler
//! runs in (BEGIN, the inbox row, `reservations::reserve`, COMMIT). Two shapes of
//! demand: every order for ONE hot product (all reservations queue on one row lock),
//! and orders spread over 1,000 products. Workers run a closed loop, one reservation in
//! flight each, at several concurrency levels; each level runs in a namespace of its
//! own. The broker is not involved: events stay in the outbox (no relay runs).
//!
//!     cargo bench -p inventory-svc --bench reservations
//!
//! Environment: BENCH_CONCURRENCY (a list; default 1,8,32), BENCH_SECONDS (measured per
//! level, default 10), BENCH_WARMUP_SECONDS (default 2).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use inventory_svc::reservations::{self, Reserve};
use shared::events::{OrderCreated, OrderLine, ProductCreated};
use shared::messaging::{Envelope, Outbox};
use sqlx::PgPool;
use testkit::TestEnv;
use uuid::Uuid;

const TTL: Duration = Duration::from_secs(900);
/// Enough that no order is ever short: this measures reserving, not rejecting.
const STOCK: i64 = 1_000_000_000_000;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy, Debug)]
enum Demand {
    Hot,
    Spread(usize),
}

impl Demand {
    fn products(self) -> usize {
        match self {
            Self::Hot => 1,
            Self::Spread(n) => n,
        }
    }

    fn label(self) -> String {
        match self {
            Self::Hot => "one hot product".into(),
            Self::Spread(n) => format!("spread over {n} products"),
        }
    }
}

fn envelope(event_type: &str, correlation_id: Uuid, data: serde_json::Value) -> Envelope {
    Envelope {
        id: Uuid::now_v7(),
        event_type: event_type.into(),
        version: 1,
        occurred_at: Utc::now(),
        source: "bench".into(),
        correlation_id,
        causation_id: None,
        data,
    }
}

async fn create_products(pool: &PgPool, outbox: &Outbox, n: usize) -> anyhow::Result<Vec<Uuid>> {
    let mut products = Vec::with_capacity(n);
    let mut tx = pool.begin().await?;
    for _ in 0..n {
        let created = ProductCreated {
            product_id: Uuid::now_v7(),
            seller_id: Uuid::now_v7(),
            name: "Teapot".into(),
            price_cents: 1250,
            currency: "EUR".into(),
            category: None,
            initial_stock: STOCK,
            created_at: Utc::now(),
        };
        let event = envelope(
            "product.created",
            created.product_id,
            serde_json::to_value(&created)?,
        );
        inventory_svc::stock::create(&mut tx, outbox, &event, &created).await?;
        products.push(created.product_id);
    }
    tx.commit().await?;
    Ok(products)
}

/// One order.created handled as the consumer handles it.
async fn reserve_one(pool: &PgPool, outbox: &Outbox, product_id: Uuid) -> anyhow::Result<Reserve> {
    let order = OrderCreated {
        order_id: Uuid::now_v7(),
        customer_id: Uuid::now_v7(),
        lines: vec![OrderLine {
            product_id,
            seller_id: Uuid::nil(),
            quantity: 1,
            unit_price_cents: 1250,
        }],
        total_cents: 1250,
        currency: "EUR".into(),
        payment_method: "pm_card_visa".into(),
        created_at: Utc::now(),
    };
    let event = envelope(
        "order.created",
        order.order_id,
        serde_json::to_value(&order)?,
    );
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO processed_messages (message_id, handler) VALUES ($1, $2)")
        .bind(event.id)
        .bind("reserve_stock")
        .execute(&mut *tx)
        .await?;
    let outcome = reservations::reserve(&mut tx, outbox, TTL, &event, &order)
        .await
        .map_err(|e| e.error)?;
    tx.commit().await?;
    Ok(outcome)
}

struct Row {
    demand: Demand,
    concurrency: usize,
    per_second: f64,
    p50: Duration,
    p99: Duration,
    count: usize,
    consistent: bool,
}

async fn run(
    demand: Demand,
    concurrency: usize,
    warmup: Duration,
    measure: Duration,
) -> anyhow::Result<Row> {
    let env = TestEnv::new();
    let mut settings = env.settings();
    settings.postgres.max_connections = u32::try_from(concurrency)? + 2;
    let pool =
        shared::db::bootstrap(&settings, "inventory", Some(&inventory_svc::MIGRATIONS)).await?;
    let outbox = Outbox::new(&env.topology("inventory"));
    let products = Arc::new(create_products(&pool, &outbox, demand.products()).await?);

    let started = Instant::now();
    let measure_from = started + warmup;
    let until = measure_from + measure;
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (pool, outbox, products) = (pool.clone(), outbox.clone(), products.clone());
        workers.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let product = products[fastrand::usize(..products.len())];
                let begun = Instant::now();
                if begun >= until {
                    return Ok::<_, anyhow::Error>(latencies);
                }
                let outcome = reserve_one(&pool, &outbox, product).await?;
                anyhow::ensure!(matches!(outcome, Reserve::Reserved { .. }), "{outcome:?}");
                if begun >= measure_from {
                    latencies.push(begun.elapsed());
                }
            }
        });
    }
    let mut latencies = Vec::new();
    while let Some(done) = workers.join_next().await {
        latencies.extend(done??);
    }
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];

    // Every reservation that committed is held, and no row holds more than it has.
    let (held, reserved, oversold): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM reservations WHERE status = 'held'), \
         (SELECT coalesce(sum(reserved), 0)::bigint FROM stock), \
         (SELECT count(*) FROM stock WHERE reserved > on_hand)",
    )
    .fetch_one(&pool)
    .await?;
    pool.close().await;
    Ok(Row {
        demand,
        concurrency,
        per_second: latencies.len() as f64 / measure.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
        count: latencies.len(),
        consistent: held == reserved && oversold == 0,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn main() -> anyhow::Result<()> {
    let levels: Vec<usize> = std::env::var("BENCH_CONCURRENCY")
        .unwrap_or_else(|_| "1,8,32".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let measure = Duration::from_secs(env_or("BENCH_SECONDS", 10));
    let warmup = Duration::from_secs(env_or("BENCH_WARMUP_SECONDS", 2));
    let runtime = tokio::runtime::Runtime::new()?;
    let mut rows = Vec::new();
    for demand in [Demand::Hot, Demand::Spread(1000)] {
        for &concurrency in &levels {
            eprintln!("{} at concurrency {concurrency}…", demand.label());
            rows.push(runtime.block_on(run(demand, concurrency, warmup, measure))?);
        }
    }
    println!();
    println!(
        "| demand | concurrency | reservations/s | p50 ms | p99 ms | measured | held = reserved, none oversold |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|");
    for row in &rows {
        println!(
            "| {} | {} | {:.0} | {} | {} | {} | {} |",
            row.demand.label(),
            row.concurrency,
            row.per_second,
            ms(row.p50),
            ms(row.p99),
            row.count,
            if row.consistent { "yes" } else { "NO" },
        );
    }
    anyhow::ensure!(rows.iter().all(|r| r.consistent), "an invariant failed");
    Ok(())
}
