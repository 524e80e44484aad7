//! The load generator against the whole system started in this process: every order
//! ends as its kind means, the counts are those asked, and the invariants hold; and the
//! checker does see a broken invariant.

use std::time::Duration;

use bench::check::{self, Databases, MAILED_ONCE, STOCK_CONSERVED};
use bench::{Load, Options, Stop, Target};
use e2e::{Stack, Svc};
use uuid::Uuid;

async fn stack() -> (Stack, Target) {
    let stack = Stack::with(&[
        Svc::Product,
        Svc::Inventory,
        Svc::Order,
        Svc::Payment,
        Svc::Notification,
    ])
    .await;
    let target = Target {
        gateway: stack.gateway().to_owned(),
        namespace: stack.namespace().to_owned(),
        postgres: stack.settings.postgres.clone(),
    };
    (stack, target)
}

fn options(load: Load) -> Options {
    Options {
        load,
        stop: Stop::Orders(20),
        declined: 0.2,
        out_of_stock: 0.25,
        customers: 4,
        sellers: 2,
        products: 4,
        max_lines: 3,
        drain_timeout: testkit::DEADLINE,
        settle_timeout: testkit::DEADLINE,
        poll_interval: Duration::from_millis(20),
        measure_commits: false,
        progress: false,
        seed: 7,
        ..Options::default()
    }
}

fn assert_as_asked(report: &bench::Report) {
    let summary = report.summary();
    assert_eq!(report.placed, 20, "{summary}");
    assert!(report.errors.is_empty(), "{summary}");
    assert_eq!(report.finished, 20, "{summary}");
    assert_eq!(report.unfinished, 0, "{summary}");
    let outcomes: Vec<(&str, u64)> = report
        .outcomes
        .iter()
        .map(|(k, v)| (k.as_str(), *v))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("cancelled/out_of_stock", 5),
            ("cancelled/payment_declined", 4),
            ("paid", 11),
        ],
        "{summary}"
    );
    // Each order ended as its own kind means, not only the totals.
    assert_eq!(report.unexpected, 0, "{summary}");
    assert!(report.violations.is_empty(), "{summary}");
    let paid = report.latency_ms.paid.as_ref().expect("paid latencies");
    assert_eq!(paid.count, 11, "{summary}");
    assert!(paid.p50 <= paid.p99 && paid.p99 <= paid.max, "{summary}");
    assert!(summary.contains("invariants hold"), "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_loop_orders_end_as_asked_and_a_broken_invariant_is_reported() {
    let (_stack, target) = stack().await;
    let report = bench::run(&target, &options(Load::Rate(20.0)))
        .await
        .expect("the bench runs");
    assert_as_asked(&report);
    let schedule = report.schedule.as_ref().expect("open loop has a schedule");
    assert!((schedule.asked_per_s - 20.0).abs() < f64::EPSILON);
    let json = serde_json::to_value(&report).expect("json");
    assert_eq!(json["outcomes"]["paid"], 11, "{json}");
    assert_eq!(json["by_kind"]["declined"]["as_expected"], 4, "{json}");

    // Break two invariants behind the services' backs; the checker must name them.
    let dbs = Databases::connect(&target).await.expect("databases");
    let inventory = sqlx::PgPool::connect(
        &target
            .postgres
            .database_url(&format!("{}_inventory", target.namespace)),
    )
    .await
    .expect("inventory database");
    let product: Uuid = report.scope.products[0];
    sqlx::query("UPDATE stock SET on_hand = on_hand + 1 WHERE product_id = $1")
        .bind(product)
        .execute(&inventory)
        .await
        .expect("tamper with stock");
    let notification = sqlx::PgPool::connect(
        &target
            .postgres
            .database_url(&format!("{}_notification", target.namespace)),
    )
    .await
    .expect("notification database");
    sqlx::query(
        "DELETE FROM notifications WHERE id = \
         (SELECT id FROM notifications WHERE template = 'order_receipt' LIMIT 1)",
    )
    .execute(&notification)
    .await
    .expect("lose a receipt");
    let violations = check::check(&dbs, &report.scope).await.expect("check");
    assert!(
        violations
            .iter()
            .any(|v| v.invariant == STOCK_CONSERVED && v.subject == product),
        "{violations:#?}"
    );
    assert!(
        violations
            .iter()
            .any(|v| v.invariant == MAILED_ONCE && v.detail.starts_with("0 order_receipt")),
        "{violations:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closed_loop_orders_end_as_asked() {
    let (_stack, target) = stack().await;
    let report = bench::run(&target, &options(Load::Concurrency(3)))
        .await
        .expect("the bench runs");
    assert_as_asked(&report);
    assert!(report.schedule.is_none());
}
