//! The reservation code against a real PostgreSQL, without the broker: many concurrent
//! transactions over shared products, racing commits and releases, sweepers racing each
//! other, and the edge cases of events arriving out of order. The saga through the
//! broker and the gateway is tested in e2e/tests/inventory.rs.

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use inventory_svc::reservations::{self, Commit, Release, ReleaseReason, Reserve};
use inventory_svc::stock;
use serde_json::json;
use shared::events::{OrderCreated, OrderLine, ProductCreated, ProductDeleted};
use shared::messaging::{Envelope, Outbox, Retry};
use sqlx::PgPool;
use testkit::TestEnv;
use tokio::task::JoinSet;
use uuid::Uuid;

const TTL: Duration = Duration::from_secs(900);

struct Db {
    _env: TestEnv,
    pool: PgPool,
    outbox: Outbox,
}

async fn db(connections: u32) -> Db {
    let env = TestEnv::new();
    let mut settings = env.settings();
    settings.postgres.max_connections = connections;
    let pool = shared::db::bootstrap(&settings, "inventory", Some(&inventory_svc::MIGRATIONS))
        .await
        .expect("the inventory database");
    let outbox = Outbox::new(&env.topology("inventory"));
    Db {
        _env: env,
        pool,
        outbox,
    }
}

fn envelope(event_type: &str, correlation_id: Uuid, data: serde_json::Value) -> Envelope {
    Envelope {
        id: Uuid::now_v7(),
        event_type: event_type.into(),
        version: 1,
        occurred_at: Utc::now(),
        source: "test".into(),
        correlation_id,
        causation_id: None,
        data,
    }
}

fn order(order_id: Uuid, lines: &[(Uuid, i64)]) -> OrderCreated {
    OrderCreated {
        order_id,
        customer_id: Uuid::now_v7(),
        lines: lines
            .iter()
            .map(|(product_id, quantity)| OrderLine {
                product_id: *product_id,
                seller_id: Uuid::nil(),
                quantity: *quantity,
                unit_price_cents: 100,
            })
            .collect(),
        total_cents: 100,
        currency: "EUR".into(),
        payment_method: "pm_card_visa".into(),
        created_at: Utc::now(),
    }
}

impl Db {
    async fn product(&self, stock: i64) -> Uuid {
        let product_id = Uuid::now_v7();
        let created = ProductCreated {
            product_id,
            seller_id: Uuid::now_v7(),
            name: "Teapot".into(),
            price_cents: 100,
            currency: "EUR".into(),
            category: None,
            initial_stock: stock,
            created_at: Utc::now(),
        };
        let event = envelope("product.created", product_id, json!(created));
        let mut tx = self.pool.begin().await.expect("tx");
        assert!(
            stock::create(&mut tx, &self.outbox, &event, &created)
                .await
                .expect("create")
        );
        tx.commit().await.expect("commit");
        product_id
    }

    async fn reserve_with(
        &self,
        order: &OrderCreated,
        event: &Envelope,
        ttl: Duration,
    ) -> Result<Reserve, shared::messaging::HandlerError> {
        let mut tx = self.pool.begin().await.expect("tx");
        let outcome = reservations::reserve(&mut tx, &self.outbox, ttl, event, order).await?;
        tx.commit().await.expect("commit");
        Ok(outcome)
    }

    async fn reserve(&self, order: &OrderCreated) -> Reserve {
        let event = envelope("order.created", order.order_id, json!(order));
        self.reserve_with(order, &event, TTL)
            .await
            .expect("handled")
    }

    /// (on_hand, reserved, version)
    async fn stock(&self, product_id: Uuid) -> (i64, i64, i64) {
        sqlx::query_as("SELECT on_hand, reserved, version FROM stock WHERE product_id = $1")
            .bind(product_id)
            .fetch_one(&self.pool)
            .await
            .expect("stock row")
    }

    async fn count(&self, sql: &'static str, id: Uuid) -> i64 {
        sqlx::query_scalar(sql)
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }

    async fn status(&self, order_id: Uuid) -> Option<String> {
        sqlx::query_scalar("SELECT status FROM reservations WHERE order_id = $1")
            .bind(order_id)
            .fetch_optional(&self.pool)
            .await
            .expect("status")
    }

    /// How many events of `event_type` about `order_id` wait in the outbox.
    async fn published(&self, event_type: &str, order_id: Uuid) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM outbox WHERE event_type = $1 AND correlation_id = $2",
        )
        .bind(event_type)
        .bind(order_id.to_string())
        .fetch_one(&self.pool)
        .await
        .expect("outbox")
    }

    /// Every product's ledger adds up to its row, with one entry per version.
    async fn assert_ledger_matches(&self, product_id: Uuid) {
        let (on_hand, reserved, version) = self.stock(product_id).await;
        let sums: (i64, i64, i64, i64, i64) = sqlx::query_as(
            "SELECT coalesce(sum(on_hand_delta), 0)::bigint, \
             coalesce(sum(reserved_delta), 0)::bigint, count(*), \
             coalesce(max(version), 0), count(*) FILTER (WHERE on_hand - reserved < 0) \
             FROM stock_ledger WHERE product_id = $1",
        )
        .bind(product_id)
        .fetch_one(&self.pool)
        .await
        .expect("ledger");
        assert_eq!(
            sums,
            (on_hand, reserved, version, version, 0),
            "ledger of {product_id}"
        );
    }
}

#[tokio::test]
async fn concurrent_orders_over_shared_products_never_oversell_nor_deadlock() {
    let db = db(12).await;
    let products = [
        db.product(30).await,
        db.product(30).await,
        db.product(30).await,
    ];
    let mut orders = Vec::new();
    for _ in 0..150 {
        // Lines in random order, so a careless lock order would deadlock.
        let mut lines: Vec<(Uuid, i64)> = products
            .iter()
            .filter(|_| fastrand::bool())
            .map(|p| (*p, fastrand::i64(1..=3)))
            .collect();
        if lines.is_empty() {
            lines.push((products[fastrand::usize(..3)], 1));
        }
        fastrand::shuffle(&mut lines);
        orders.push(order(Uuid::now_v7(), &lines));
    }
    let db = std::sync::Arc::new(db);
    let mut tasks = JoinSet::new();
    for chunk in orders.chunks(15) {
        let (db, chunk) = (db.clone(), chunk.to_vec());
        tasks.spawn(async move {
            let mut outcomes = Vec::new();
            for order in chunk {
                outcomes.push((order.clone(), db.reserve(&order).await));
            }
            outcomes
        });
    }
    let mut held: HashMap<Uuid, i64> = HashMap::new();
    let mut held_orders: Vec<OrderCreated> = Vec::new();
    let (mut reserved, mut rejected) = (0, 0);
    while let Some(outcomes) = tasks.join_next().await {
        for (order, outcome) in outcomes.expect("task") {
            match outcome {
                Reserve::Reserved { .. } => {
                    reserved += 1;
                    for line in &order.lines {
                        *held.entry(line.product_id).or_default() += line.quantity;
                    }
                    assert_eq!(db.published("inventory.reserved", order.order_id).await, 1);
                    held_orders.push(order);
                }
                Reserve::Rejected { reason } => {
                    assert_eq!(reason, "out_of_stock");
                    rejected += 1;
                    assert_eq!(db.published("inventory.rejected", order.order_id).await, 1);
                    let status = db.status(order.order_id).await;
                    assert_eq!(status.as_deref(), Some("rejected"));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert_eq!(reserved + rejected, 150);
    assert!(
        reserved > 0 && rejected > 0,
        "{reserved} reserved, {rejected} rejected"
    );
    for product in products {
        let (on_hand, reserved, _) = db.stock(product).await;
        assert_eq!(on_hand, 30);
        assert_eq!(reserved, held.get(&product).copied().unwrap_or(0));
        assert!(reserved <= on_hand);
        db.assert_ledger_matches(product).await;
    }

    // Now payments complete and fail at the same time for every held order, and for
    // some both arrive: each order ends committed or released, never both.
    let mut tasks = JoinSet::new();
    for order in held_orders.clone() {
        for completed in [true, false] {
            if !completed && fastrand::u8(..3) == 0 {
                continue;
            }
            let db = db.clone();
            let order_id = order.order_id;
            tasks.spawn(async move {
                let mut tx = db.pool.begin().await.expect("tx");
                if completed {
                    let event = envelope("payment.completed", order_id, json!({}));
                    let outcome = reservations::commit(&mut tx, &db.outbox, &event, order_id)
                        .await
                        .expect("commit");
                    assert!(
                        matches!(
                            outcome,
                            Commit::Committed
                                | Commit::Retaken
                                | Commit::Rejected { .. }
                                | Commit::AlreadyKnown { .. }
                        ),
                        "{outcome:?}"
                    );
                } else {
                    let event = envelope("payment.failed", order_id, json!({}));
                    reservations::release(
                        &mut tx,
                        &db.outbox,
                        &event,
                        order_id,
                        ReleaseReason::PaymentFailed,
                    )
                    .await
                    .expect("release");
                }
                tx.commit().await.expect("commit");
            });
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("task");
    }
    let mut sold: HashMap<Uuid, i64> = HashMap::new();
    for order in &held_orders {
        let status = db.status(order.order_id).await;
        let committed = db.published("inventory.committed", order.order_id).await;
        let released = db.published("inventory.released", order.order_id).await;
        match status.as_deref() {
            Some("committed") => {
                assert_eq!(committed, 1);
                for line in &order.lines {
                    *sold.entry(line.product_id).or_default() += line.quantity;
                }
            }
            // A payment completed after the release takes the stock again; if another
            // order's took it first, it is rejected.
            Some("rejected") => assert_eq!((committed, released), (0, 1)),
            other => panic!("{} ended {other:?}", order.order_id),
        }
    }
    for product in products {
        let (on_hand, reserved, _) = db.stock(product).await;
        assert_eq!(reserved, 0);
        assert_eq!(on_hand, 30 - sold.get(&product).copied().unwrap_or(0));
        db.assert_ledger_matches(product).await;
    }
}

#[tokio::test]
async fn sweepers_on_several_replicas_release_each_expired_reservation_once() {
    let db = std::sync::Arc::new(db(8).await);
    let product = db.product(100).await;
    let mut orders = Vec::new();
    for _ in 0..40 {
        let order = order(Uuid::now_v7(), &[(product, 2)]);
        let event = envelope("order.created", order.order_id, json!(order));
        let outcome = db
            .reserve_with(&order, &event, Duration::ZERO)
            .await
            .expect("reserved");
        assert!(matches!(outcome, Reserve::Reserved { .. }));
        orders.push(order.order_id);
    }
    // One that has not expired stays.
    let keep = order(Uuid::now_v7(), &[(product, 1)]);
    db.reserve(&keep).await;

    let mut sweepers = JoinSet::new();
    for _ in 0..4 {
        let db = db.clone();
        sweepers.spawn(async move {
            let mut released = 0;
            loop {
                let mut tx = db.pool.begin().await.expect("tx");
                match reservations::expire_one(&mut tx, &db.outbox).await {
                    Ok(Some(_)) => {
                        tx.commit().await.expect("commit");
                        released += 1;
                    }
                    Ok(None) => return released,
                    Err(e) => panic!("sweeping: {e}"),
                }
            }
        });
    }
    let mut released = 0;
    while let Some(count) = sweepers.join_next().await {
        released += count.expect("sweeper");
    }
    assert_eq!(released, 40);
    for order_id in &orders {
        assert_eq!(db.status(*order_id).await.as_deref(), Some("released"));
        assert_eq!(db.published("inventory.released", *order_id).await, 1);
    }
    assert_eq!(db.status(keep.order_id).await.as_deref(), Some("held"));
    assert_eq!(db.stock(product).await.0, 100);
    assert_eq!(db.stock(product).await.1, 1);
    db.assert_ledger_matches(product).await;
}

#[tokio::test]
async fn an_order_for_a_product_not_seen_yet_waits_while_young_and_is_rejected_when_old() {
    let db = db(2).await;
    let known = db.product(5).await;
    let unseen = Uuid::now_v7();
    let young = order(Uuid::now_v7(), &[(known, 1), (unseen, 1)]);
    let event = envelope("order.created", young.order_id, json!(young));
    let error = db
        .reserve_with(&young, &event, TTL)
        .await
        .expect_err("waits for product.created");
    assert_eq!(error.retry, Retry::Transient);
    // The consumer rolls the transaction back: nothing is left of the attempt.
    assert_eq!(db.status(young.order_id).await, None);
    assert_eq!(db.stock(known).await, (5, 0, 1));

    let old = order(Uuid::now_v7(), &[(known, 1), (unseen, 1)]);
    let mut event = envelope("order.created", old.order_id, json!(old));
    event.occurred_at = Utc::now() - reservations::UNKNOWN_PRODUCT_GRACE;
    let outcome = db.reserve_with(&old, &event, TTL).await.expect("handled");
    assert_eq!(
        outcome,
        Reserve::Rejected {
            reason: "unknown_product"
        }
    );
    assert_eq!(db.stock(known).await, (5, 0, 1));

    // An order with a line of no quantity can never be reserved: a permanent failure.
    let bad = order(Uuid::now_v7(), &[(known, 0)]);
    let event = envelope("order.created", bad.order_id, json!(bad));
    let error = db.reserve_with(&bad, &event, TTL).await.expect_err("bad");
    assert_eq!(error.retry, Retry::Permanent);
}

#[tokio::test]
async fn product_events_twice_or_out_of_order_change_nothing_more() {
    let db = db(2).await;
    let product = db.product(7).await;
    let again = ProductCreated {
        product_id: product,
        seller_id: Uuid::now_v7(),
        name: "Teapot".into(),
        price_cents: 100,
        currency: "EUR".into(),
        category: None,
        initial_stock: 99,
        created_at: Utc::now(),
    };
    let event = envelope("product.created", product, json!(again));
    let mut tx = db.pool.begin().await.expect("tx");
    let created = stock::create(&mut tx, &db.outbox, &event, &again)
        .await
        .expect("create");
    tx.commit().await.expect("commit");
    assert!(!created);
    assert_eq!(db.stock(product).await, (7, 0, 1));

    // Deleted before created: the late creation does not bring it back.
    let ghost = Uuid::now_v7();
    let deleted = ProductDeleted {
        product_id: ghost,
        seller_id: Uuid::now_v7(),
        deleted_at: Utc::now(),
    };
    let mut tx = db.pool.begin().await.expect("tx");
    stock::delete(&mut tx, &deleted).await.expect("delete");
    let created = ProductCreated {
        product_id: ghost,
        initial_stock: 5,
        ..again
    };
    let event = envelope("product.created", ghost, json!(created));
    let made = stock::create(&mut tx, &db.outbox, &event, &created)
        .await
        .expect("create");
    tx.commit().await.expect("commit");
    assert!(!made);
    let outcome = db.reserve(&order(Uuid::now_v7(), &[(ghost, 1)])).await;
    assert_eq!(
        outcome,
        Reserve::Rejected {
            reason: "unknown_product"
        }
    );
}

#[tokio::test]
async fn a_release_before_its_order_leaves_a_tombstone_that_reserves_nothing() {
    let db = db(2).await;
    let product = db.product(3).await;
    let order = order(Uuid::now_v7(), &[(product, 2)]);
    let cancel = envelope("order.cancelled", order.order_id, json!({}));
    let mut tx = db.pool.begin().await.expect("tx");
    let outcome = reservations::release(
        &mut tx,
        &db.outbox,
        &cancel,
        order.order_id,
        ReleaseReason::Cancelled,
    )
    .await
    .expect("release");
    tx.commit().await.expect("commit");
    assert_eq!(outcome, Release::Tombstoned);
    assert_eq!(
        db.reserve(&order).await,
        Reserve::AlreadyKnown {
            status: "tombstone".into()
        }
    );
    assert_eq!(db.stock(product).await, (3, 0, 1));
    let published = db
        .count(
            "SELECT count(*) FROM outbox WHERE correlation_id = $1::text",
            order.order_id,
        )
        .await;
    assert_eq!(published, 0, "nothing is said about a cancelled order");
}
