//! The gauges that say whether orders are stuck: how many are pending and how old the
//! oldest is. A saga normally ends in seconds; an order pending longer than the
//! reservation TTL means a step is not happening (docs/RUNBOOK.md).

use shared::service::Background;
use sqlx::PgPool;

use crate::SERVICE;

/// Refreshes `orders_pending` and `orders_oldest_pending_age_seconds` until shutdown.
pub fn watcher(pool: PgPool) -> Background {
    metrics::describe_gauge!("orders_pending", "Orders whose saga has not ended");
    metrics::describe_gauge!(
        "orders_oldest_pending_age_seconds",
        metrics::Unit::Seconds,
        "Age of the oldest pending order; 0 when there is none"
    );
    Box::new(move |shutdown| {
        Box::pin(async move {
            let mut tick = tokio::time::interval(shared::metrics::WATCH_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                record(&pool).await;
            }
        })
    })
}

async fn record(pool: &PgPool) {
    // Served by the partial index `orders_pending`.
    let row: Result<(i64, Option<f64>), _> = sqlx::query_as(
        "SELECT count(*), EXTRACT(EPOCH FROM now() - min(created_at))::float8 \
         FROM orders WHERE status = 'pending'",
    )
    .fetch_one(pool)
    .await;
    match row {
        Ok((pending, oldest)) => {
            metrics::gauge!("orders_pending", "service" => SERVICE).set(pending as f64);
            metrics::gauge!("orders_oldest_pending_age_seconds", "service" => SERVICE)
                .set(oldest.unwrap_or(0.0).max(0.0));
        }
        // The gauges keep their last value; /ready reports the database.
        Err(error) => tracing::debug!(%error, "could not count pending orders"),
    }
}
