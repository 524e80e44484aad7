//! Retention of the inbox (`processed_messages`): a message id has to be remembered only
//! as long as another copy of the message can still arrive (a redelivery, a retry, a
//! publisher's duplicate), not forever.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::outbox::pause;

/// Rows deleted per statement, so no statement holds its locks for long.
const BATCH: i64 = 5_000;

/// Forgets the messages handled more than `retention` ago, except those that also have a
/// dead letter: a replay of that copy must still find the message handled. Returns the
/// rows removed.
pub async fn purge(pool: &PgPool, retention: Duration) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        let removed = sqlx::query(
            "DELETE FROM processed_messages WHERE message_id IN ( \
                 SELECT p.message_id FROM processed_messages p \
                 WHERE p.processed_at < now() - make_interval(secs => $1) \
                   AND NOT EXISTS ( \
                       SELECT 1 FROM dead_letters d WHERE d.message_id = p.message_id::text) \
                 LIMIT $2)",
        )
        .bind(retention.as_secs_f64())
        .bind(BATCH)
        .execute(pool)
        .await?
        .rows_affected();
        total += removed;
        if removed < BATCH as u64 {
            return Ok(total);
        }
    }
}

/// Purges every `every` until `shutdown`.
pub async fn run_purger(
    pool: PgPool,
    retention: Duration,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        match purge(&pool, retention).await {
            Ok(0) => {}
            Ok(purged) => tracing::info!(purged, "purged old inbox rows"),
            Err(error) => tracing::warn!(%error, "could not purge the inbox"),
        }
        if pause(every, &shutdown).await {
            break;
        }
    }
}
