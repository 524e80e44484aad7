//! Releases reservations past their time (reason `expired`). Replicas may each run one:
//! a reservation is claimed with `FOR UPDATE SKIP LOCKED`, so each is released once, and
//! a commit racing the sweeper waits for it (or it for the commit) on the same row.

use std::time::Duration;

use shared::messaging::Outbox;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::reservations;

pub struct Sweeper {
    pub pool: PgPool,
    pub outbox: Outbox,
    pub interval: Duration,
}

impl Sweeper {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = shutdown.cancelled() => return,
            }
            match self.sweep(&shutdown).await {
                Ok(0) => {}
                Ok(released) => tracing::info!(released, "expired reservations released"),
                Err(error) => {
                    tracing::warn!(%error, "sweeping expired reservations failed; trying again next time")
                }
            }
        }
    }

    /// Releases every expired reservation it can claim, one transaction each (each
    /// locks only its own order's stock rows, in the one lock order).
    pub async fn sweep(&self, shutdown: &CancellationToken) -> sqlx::Result<usize> {
        let mut released = 0;
        while !shutdown.is_cancelled() {
            let mut tx = self.pool.begin().await?;
            let Some(order_id) = reservations::expire_one(&mut tx, &self.outbox).await? else {
                break;
            };
            tx.commit().await?;
            tracing::info!(%order_id, "reservation expired");
            released += 1;
        }
        Ok(released)
    }
}
