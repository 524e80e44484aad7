//! Transactional outbox. A service writes its events into its own `outbox` table in the
//! same transaction as the state change; the relay publishes them with publisher confirms
//! and deletes what the broker confirmed. So an event is on the broker if and only if
//! its transaction committed.
//!
//! The relay wakes on `NOTIFY outbox` (sent by a trigger at commit) and also polls, so a
//! lost notification only costs latency. Rows are claimed with `FOR UPDATE SKIP LOCKED`
//! so replicas share the table. Rows are published in `seq` order on one channel; a row
//! whose publish fails stays for the next pass (duplicates are possible, loss is not).

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use lapin::{
    BasicProperties, Channel, Confirmation,
    options::BasicPublishOptions,
    types::{FieldTable, ShortString},
};
use serde_json::{Map, Value};
use sqlx::{Connection as _, PgConnection, PgPool, postgres::PgListener};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Broker, Envelope, NewEvent, Topology, headers, subscriptions};
use crate::db::Warm;
use crate::telemetry::TraceContext;

const CHANNEL: &str = "outbox";

/// Writes events into the outbox, inside the caller's transaction.
#[derive(Clone, Debug)]
pub struct Outbox {
    source: String,
    events_exchange: String,
}

/// One message as the relay will publish it.
#[derive(Clone, Debug)]
pub struct OutboxMessage {
    pub message_id: Uuid,
    /// `""` (the default exchange) addresses one queue by name.
    pub exchange: String,
    pub routing_key: String,
    pub event_type: String,
    pub correlation_id: Option<String>,
    pub headers: Map<String, Value>,
    pub body: Vec<u8>,
}

impl Outbox {
    pub fn new(topology: &Topology) -> Self {
        Self {
            source: format!("{}-svc", topology.service()),
            events_exchange: topology.events_exchange(),
        }
    }

    /// Adds `event` to the outbox in the transaction `conn` is in. It reaches the broker
    /// only if that transaction commits.
    pub async fn enqueue(
        &self,
        conn: &mut PgConnection,
        event: NewEvent,
    ) -> Result<Envelope, sqlx::Error> {
        let mut envelopes = self.enqueue_all(conn, vec![event]).await?;
        Ok(envelopes.remove(0))
    }

    /// Adds `events` to the outbox in one statement, to be published in this order.
    pub async fn enqueue_all(
        &self,
        conn: &mut PgConnection,
        events: Vec<NewEvent>,
    ) -> Result<Vec<Envelope>, sqlx::Error> {
        let trace = TraceContext::current().unwrap_or_else(TraceContext::new_root);
        let mut headers = Map::new();
        headers.insert(headers::TRACEPARENT.into(), trace.traceparent().into());
        if let Some(request_id) = &trace.request_id {
            headers.insert(headers::REQUEST_ID.into(), request_id.clone().into());
        }
        let mut messages = Vec::with_capacity(events.len());
        let mut envelopes = Vec::with_capacity(events.len());
        for event in events {
            let envelope = event.into_envelope(&self.source);
            let body = serde_json::to_vec(&envelope).map_err(|e| sqlx::Error::Encode(e.into()))?;
            messages.push(OutboxMessage {
                message_id: envelope.id,
                exchange: self.events_exchange.clone(),
                routing_key: envelope.event_type.clone(),
                event_type: envelope.event_type.clone(),
                correlation_id: Some(envelope.correlation_id.to_string()),
                headers: headers.clone(),
                body,
            });
            envelopes.push(envelope);
        }
        insert_all(conn, &messages).await?;
        Ok(envelopes)
    }
}

/// Adds a prepared message to the outbox (replays use this).
pub async fn insert(conn: &mut PgConnection, message: &OutboxMessage) -> Result<(), sqlx::Error> {
    insert_all(conn, std::slice::from_ref(message)).await
}

/// Adds prepared messages in one statement; `seq` follows their order.
pub async fn insert_all(
    conn: &mut PgConnection,
    messages: &[OutboxMessage],
) -> Result<(), sqlx::Error> {
    if messages.is_empty() {
        return Ok(());
    }
    let column = |f: fn(&OutboxMessage) -> String| messages.iter().map(f).collect::<Vec<_>>();
    sqlx::query(
        "INSERT INTO outbox (message_id, exchange, routing_key, event_type, correlation_id, \
         headers, body) \
         SELECT id, ex, rk, et, ci, h, b FROM unnest($1::uuid[], $2::text[], $3::text[], \
             $4::text[], $5::text[], $6::jsonb[], $7::bytea[]) WITH ORDINALITY \
             AS m(id, ex, rk, et, ci, h, b, n) \
         ORDER BY n",
    )
    .bind(messages.iter().map(|m| m.message_id).collect::<Vec<_>>())
    .bind(column(|m| m.exchange.clone()))
    .bind(column(|m| m.routing_key.clone()))
    .bind(column(|m| m.event_type.clone()))
    .bind(
        messages
            .iter()
            .map(|m| m.correlation_id.clone())
            .collect::<Vec<_>>(),
    )
    .bind(
        messages
            .iter()
            .map(|m| Value::Object(m.headers.clone()))
            .collect::<Vec<_>>(),
    )
    .bind(messages.iter().map(|m| m.body.clone()).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct Row {
    seq: i64,
    message_id: Uuid,
    exchange: String,
    routing_key: String,
    event_type: String,
    correlation_id: Option<String>,
    headers: Value,
    body: Vec<u8>,
    created_at: DateTime<Utc>,
}

fn properties(row: &Row) -> BasicProperties {
    let headers = match &row.headers {
        Value::Object(map) => headers::from_json(map),
        _ => FieldTable::default(),
    };
    let mut props = BasicProperties::default()
        .with_message_id(row.message_id.to_string().into())
        .with_type(ShortString::from(row.event_type.as_str()))
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_timestamp(u64::try_from(row.created_at.timestamp()).unwrap_or_default())
        .with_headers(headers);
    if let Some(correlation_id) = &row.correlation_id {
        props = props.with_correlation_id(correlation_id.as_str().into());
    }
    props
}

async fn mark_failed(
    conn: &mut PgConnection,
    seqs: &[i64],
    error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE outbox SET attempts = attempts + 1, last_error = $2 WHERE seq = ANY($1)")
        .bind(seqs)
        .bind(error)
        .execute(conn)
        .await
        .map(drop)
}

/// Publishes the outbox of one service database.
pub struct Relay {
    pool: PgPool,
    connections: Warm,
    broker: Broker,
    topology: Topology,
    service: String,
    poll_interval: Duration,
    batch_size: i64,
}

#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("broker: {0}")]
    Broker(#[from] super::BrokerError),
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
}

/// Growing pause after failures: 100 ms doubling to 10 s.
#[derive(Debug)]
pub(crate) struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(10);

    pub(crate) fn new() -> Self {
        Self { next: Self::FIRST }
    }

    pub(crate) fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    /// The pause to take now, with jitter so replicas do not retry in step.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        delay.mul_f64(0.5 + fastrand::f64() / 2.0)
    }
}

/// Waits `delay` unless shutdown comes first; true when shutdown came.
pub(crate) async fn pause(delay: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => false,
        () = shutdown.cancelled() => true,
    }
}

impl Relay {
    pub fn new(
        pool: PgPool,
        broker: Broker,
        topology: &Topology,
        poll_interval: Duration,
        batch_size: i64,
    ) -> Self {
        Self {
            connections: Warm::new(pool.clone(), 1),
            pool,
            broker,
            topology: topology.clone(),
            service: topology.service().to_owned(),
            poll_interval,
            batch_size,
        }
    }

    /// Publishes until `shutdown`, then makes one last pass so events committed by work
    /// that finished during shutdown are not left behind.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut listener = None;
        let mut channel = None;
        let mut backoff = Backoff::new();
        // The backlog gauges are there from the start, and kept current while the broker
        // is down too: that is when they matter.
        self.record_backlog().await;
        metrics::counter!("outbox_published_total", "service" => self.service.clone()).increment(0);
        let mut last_gauge = Instant::now();
        loop {
            if listener.is_none() {
                listener = self.listen().await;
            }
            if let Some(l) = listener.as_mut() {
                // Wake-ups already queued are answered by the pass that follows.
                while l.next_buffered().is_some() {}
            }
            let drained = self.drain(&mut channel).await;
            if last_gauge.elapsed() >= self.poll_interval {
                self.record_backlog().await;
                last_gauge = Instant::now();
            }
            match drained {
                Ok(()) => backoff.reset(),
                Err(error) => {
                    channel = None;
                    tracing::warn!(%error, service = %self.service, "outbox relay: publish failed; will retry");
                    if pause(backoff.next_delay(), &shutdown).await {
                        break;
                    }
                    continue;
                }
            }
            let woken = async {
                match listener.as_mut() {
                    Some(l) => {
                        if let Err(error) = l.recv().await {
                            tracing::debug!(%error, "outbox listener lost; polling until it is back");
                            listener = None;
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = woken => {}
                () = tokio::time::sleep(self.poll_interval) => {}
            }
        }
        if let Err(error) = self.drain(&mut channel).await {
            tracing::warn!(%error, service = %self.service, "outbox relay: final pass failed; rows stay for the next start");
        }
        if let Some(channel) = channel {
            let _ = channel.close(200, "relay stopped".into()).await;
        }
    }

    async fn listen(&self) -> Option<PgListener> {
        let mut listener = PgListener::connect_with(&self.pool).await.ok()?;
        listener.listen(CHANNEL).await.ok()?;
        Some(listener)
    }

    /// Publishes batches until the outbox holds nothing this relay can claim.
    async fn drain(&self, channel: &mut Option<Channel>) -> Result<(), RelayError> {
        loop {
            let claimed = self.publish_batch(channel).await?;
            if claimed < self.batch_size {
                return Ok(());
            }
        }
    }

    async fn publish_batch(&self, channel: &mut Option<Channel>) -> Result<i64, RelayError> {
        // The rows are deleted as they are claimed; the delete commits only once the
        // broker confirmed every one of them.
        let mut conn = self.connections.take().await?;
        let mut tx = conn.begin().await?;
        let mut rows: Vec<Row> = sqlx::query_as(
            "DELETE FROM outbox WHERE seq IN \
             (SELECT seq FROM outbox ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED) \
             RETURNING seq, message_id, exchange, routing_key, event_type, correlation_id, \
             headers, body, created_at",
        )
        .bind(self.batch_size)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            tx.rollback().await?;
            self.connections.give_back(conn);
            return Ok(0);
        }
        rows.sort_unstable_by_key(|r| r.seq);
        let claimed = i64::try_from(rows.len()).unwrap_or(i64::MAX);
        let (published, failed) = match self.publish_rows(&rows, channel).await {
            Ok(results) => results,
            Err(error) => {
                // The rows stay; say why, for whoever looks at a growing outbox.
                tx.rollback().await?;
                let all: Vec<i64> = rows.iter().map(|r| r.seq).collect();
                mark_failed(&mut *self.pool.acquire().await?, &all, &error.to_string()).await?;
                return Err(error);
            }
        };
        if failed.is_empty() {
            tx.commit().await?;
            self.connections.give_back(conn);
        } else {
            // Rare (a refused or unroutable message): keep the refused rows, drop the rest.
            tx.rollback().await?;
            let mut tx = self.pool.begin().await?;
            sqlx::query("DELETE FROM outbox WHERE seq = ANY($1)")
                .bind(&published)
                .execute(&mut *tx)
                .await?;
            for (seq, error) in &failed {
                mark_failed(&mut tx, &[*seq], error).await?;
            }
            tx.commit().await?;
        }

        let now = Utc::now();
        for row in rows.iter().filter(|r| published.contains(&r.seq)) {
            let age = (now - row.created_at).to_std().unwrap_or_default();
            metrics::histogram!("outbox_publish_delay_seconds", "service" => self.service.clone())
                .record(age.as_secs_f64());
        }
        metrics::counter!("outbox_published_total", "service" => self.service.clone())
            .increment(published.len() as u64);
        if !failed.is_empty() {
            tracing::warn!(service = %self.service, failed = ?failed, "outbox relay: some rows were not published; they stay");
            // Do not spin on rows that keep failing: the next pass waits for a wake-up.
            return Ok(0);
        }
        Ok(claimed)
    }

    /// Publishes `rows` in order on one channel, then collects the confirms. Returns the
    /// rows the broker took and those it refused.
    async fn publish_rows(
        &self,
        rows: &[Row],
        channel: &mut Option<Channel>,
    ) -> Result<(Vec<i64>, Vec<(i64, &'static str)>), RelayError> {
        let ch = match channel {
            Some(ch) if ch.status().connected() => ch,
            _ => {
                let fresh = self.broker.confirm_channel().await?;
                // The exchange (publishing to a missing one closes the channel) and every
                // subscriber's queue, so a broker that lost its definitions keeps events
                // for subscribers that have not declared their queues again yet.
                self.topology.declare_subscribers(&fresh).await?;
                channel.insert(fresh)
            }
        };
        // The whole batch goes out before the first confirm is awaited: one round trip.
        let mut pending = Vec::with_capacity(rows.len());
        for row in rows {
            let options = BasicPublishOptions {
                // A message addressed to one queue must reach it, and so must an event
                // some service subscribes to; one nobody handles may go nowhere.
                mandatory: row.exchange.is_empty()
                    || subscriptions::is_subscribed(&row.routing_key),
                ..BasicPublishOptions::default()
            };
            let confirm = ch
                .basic_publish(
                    row.exchange.as_str().into(),
                    row.routing_key.as_str().into(),
                    options,
                    &row.body,
                    properties(row),
                )
                .await?;
            pending.push(confirm);
        }
        let mut published = Vec::with_capacity(rows.len());
        let mut failed = Vec::new();
        let mut unroutable = false;
        for (row, confirm) in rows.iter().zip(pending) {
            match confirm.await? {
                Confirmation::Ack(None) => published.push(row.seq),
                Confirmation::Ack(Some(_)) => {
                    failed.push((row.seq, "unroutable: no queue bound"));
                    unroutable = true;
                }
                Confirmation::Nack(_) => failed.push((row.seq, "refused by the broker (nack)")),
                Confirmation::NotRequested => failed.push((row.seq, "no publisher confirm")),
            }
        }
        if unroutable {
            // The broker lost queues this relay declared: declare them again on a new
            // channel before the kept rows go out again.
            if let Some(stale) = channel.take() {
                let _ = stale.close(200, "redeclaring".into()).await;
            }
        }
        Ok((published, failed))
    }

    async fn record_backlog(&self) {
        let row: Result<(i64, Option<f64>), _> = sqlx::query_as(
            "SELECT count(*), EXTRACT(EPOCH FROM now() - min(created_at))::float8 FROM outbox",
        )
        .fetch_one(&self.pool)
        .await;
        // On a database error the gauges keep their last value; /ready reports the database.
        if let Ok((backlog, oldest)) = row {
            metrics::gauge!("outbox_backlog", "service" => self.service.clone())
                .set(backlog as f64);
            metrics::gauge!("outbox_oldest_age_seconds", "service" => self.service.clone())
                .set(oldest.unwrap_or(0.0).max(0.0));
        }
    }
}
