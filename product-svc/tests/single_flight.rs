//! Concurrent cache misses for one product through the real service: one database load.
//! (Its own process under nextest, so the service's metrics are this test's alone.)

use product_svc::Application;
use shared::service::Service;
use sqlx::PgPool;
use testkit::{TestEnv, eventually};
use uuid::Uuid;

const READERS: u64 = 20;

async fn metric(client: &reqwest::Client, base: &str, name: &str) -> u64 {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains("cache=\"product\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test]
async fn concurrent_misses_for_one_product_make_one_database_load() {
    let env = TestEnv::new();
    let settings = env.settings();
    let app = Application::build(settings.clone())
        .await
        .expect("product-svc starts");
    let base = format!("http://127.0.0.1:{}", app.port());
    let service = Service::from(app);
    let stop = service.shutdown_token();
    let running = tokio::spawn(service.run_until_stopped());

    let database = settings
        .postgres
        .database_url(&format!("{}_product", env.namespace));
    let pool = PgPool::connect(&database).await.expect("database");
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO products (id, seller_id, name, description, price_cents, currency, \
         initial_stock) VALUES ($1, $2, 'Teapot', '', 4599, 'EUR', 1)",
    )
    .bind(id)
    .bind(Uuid::now_v7())
    .execute(&pool)
    .await
    .expect("a product");

    let client = reqwest::Client::new();
    let misses = metric(&client, &base, "cache_misses_total").await;
    let loads = metric(&client, &base, "cache_loads_total").await;

    // Hold every read of products until all readers have missed the cache.
    let mut lock = pool.begin().await.expect("transaction");
    sqlx::query("LOCK TABLE products IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .expect("lock");
    let readers: Vec<_> = (0..READERS)
        .map(|_| {
            let request = client.get(format!("{base}/api/v1/products/{id}")).send();
            tokio::spawn(async move {
                let response = request.await.expect("read");
                let status = response.status();
                (status, response.text().await.expect("body"))
            })
        })
        .collect();
    // A reader counts its miss and joins (or starts) the load in one step, without
    // yielding in between: once all misses are counted, all readers are in a load.
    eventually("every reader to miss the cache", || async {
        (metric(&client, &base, "cache_misses_total").await == misses + READERS).then_some(())
    })
    .await;
    lock.commit().await.expect("unlock");

    let mut bodies = Vec::new();
    for reader in readers {
        let (status, body) = reader.await.expect("reader");
        assert_eq!(status, reqwest::StatusCode::OK, "{body}");
        bodies.push(body);
    }
    assert!(
        bodies
            .iter()
            .all(|b| b == &bodies[0] && b.contains("Teapot"))
    );
    assert_eq!(
        metric(&client, &base, "cache_loads_total").await,
        loads + 1,
        "{READERS} concurrent misses, one database load"
    );

    stop.cancel();
    running.await.expect("task").expect("clean stop");
    pool.close().await;
}
