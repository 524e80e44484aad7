//! Consumer runner. Each message is handled in one database transaction that also records
//! its id in `processed_messages`, so a duplicate delivery does nothing; the message is
//! acknowledged only after that transaction commits. A transient failure goes to a wait
//! queue and comes back later; a permanent failure, or a transient one out of retries, is
//! published to the dead-letter queue with headers saying what went wrong, and only then
//! acknowledged. Nothing is acknowledged unhandled.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::StreamExt as _;
use lapin::{
    BasicProperties, Channel, Confirmation,
    message::Delivery,
    options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
        BasicPublishOptions, BasicQosOptions,
    },
    types::{FieldTable, ShortString},
};
use sqlx::{Connection as _, PgConnection, PgPool};
use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;
use uuid::Uuid;

use super::outbox::{Backoff, pause};
use super::{Broker, Envelope, Topology, headers};
use crate::config::MessagingSettings;
use crate::db::Warm;
use crate::telemetry::TraceContext;

/// Handles one event type inside the consumer's transaction.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// The event type (routing key) this handler consumes, e.g. `order.created`.
    fn event_type(&self) -> &'static str;

    /// Names the handler in logs, metrics and dead-letter headers.
    fn name(&self) -> &'static str;

    /// Envelope versions this handler understands; others are dead-lettered.
    fn versions(&self) -> RangeInclusive<u32> {
        1..=1
    }

    /// Does the work in `tx`. Events to publish go to the outbox through the same `tx`.
    async fn handle(&self, tx: &mut PgConnection, event: &Envelope) -> Result<(), HandlerError>;
}

/// Whether trying again later can help.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// Database or network trouble: try again with a growing delay.
    Transient,
    /// A rule that can never pass: straight to the dead-letter queue.
    Permanent,
}

#[derive(Debug)]
pub struct HandlerError {
    pub retry: Retry,
    pub error: anyhow::Error,
}

impl HandlerError {
    pub fn transient(error: impl Into<anyhow::Error>) -> Self {
        Self {
            retry: Retry::Transient,
            error: error.into(),
        }
    }

    pub fn permanent(error: impl Into<anyhow::Error>) -> Self {
        Self {
            retry: Retry::Permanent,
            error: error.into(),
        }
    }
}

impl From<sqlx::Error> for HandlerError {
    /// Bad data, broken constraints and SQL errors will fail the same way next time;
    /// everything else (I/O, pool, serialization failures, deadlocks) may not.
    fn from(error: sqlx::Error) -> Self {
        let permanent = match &error {
            sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|code| ["22", "23", "42"].iter().any(|c| code.starts_with(c))),
            sqlx::Error::RowNotFound
            | sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::ColumnDecode { .. }
            | sqlx::Error::Decode(_)
            | sqlx::Error::TypeNotFound { .. } => true,
            _ => false,
        };
        if permanent {
            Self::permanent(error)
        } else {
            Self::transient(error)
        }
    }
}

impl From<serde_json::Error> for HandlerError {
    /// Event data that does not fit the handler's type will never fit.
    fn from(error: serde_json::Error) -> Self {
        Self::permanent(anyhow::Error::new(error).context("event data does not match its type"))
    }
}

impl From<anyhow::Error> for HandlerError {
    fn from(error: anyhow::Error) -> Self {
        Self::transient(error)
    }
}

/// Why a message was not handled, as written in the dead-letter headers.
#[derive(Clone, Debug)]
pub struct Failure {
    /// `transient`, `permanent`, `timeout`, `malformed`, `unknown_event` or
    /// `unsupported_version`.
    pub kind: &'static str,
    pub handler: String,
    pub message: String,
    pub chain: String,
}

impl Failure {
    fn retryable(&self) -> bool {
        matches!(self.kind, "transient" | "timeout")
    }

    fn new(kind: &'static str, handler: &str, error: &anyhow::Error) -> Self {
        Self {
            kind,
            handler: handler.to_owned(),
            message: error.to_string(),
            chain: error
                .chain()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\ncaused by: "),
        }
    }
}

/// What became of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Handled,
    /// Already handled before: acknowledged, nothing done.
    Duplicate,
    /// Sent to a retry wait queue.
    Retried,
    DeadLettered,
    /// Could not be parked; returned to the queue.
    Requeued,
}

/// Sees each message's fate: for measurements, and for tests that must know exactly
/// when something happened.
#[async_trait::async_trait]
pub trait Observer: Send + Sync + 'static {
    /// After the handler's transaction committed, before the acknowledgement: awaited,
    /// so what it does (say, dropping a cache entry) is done before the message counts
    /// as handled.
    async fn committed(&self, _event: &Envelope) {}

    /// After the message was settled with the broker.
    fn settled(&self, _message_id: &str, _outcome: Outcome) {}
}

enum Handled {
    Done,
    Duplicate,
}

/// Consumes a service's queue with its handlers.
pub struct Consumer {
    topology: Topology,
    broker: Broker,
    connections: Warm,
    handlers: HashMap<&'static str, Arc<dyn Handler>>,
    prefetch: u16,
    concurrency: usize,
    handler_timeout: Duration,
    observer: Option<Arc<dyn Observer>>,
}

impl Consumer {
    pub fn new(
        topology: Topology,
        broker: Broker,
        pool: PgPool,
        settings: &MessagingSettings,
        handlers: Vec<Arc<dyn Handler>>,
    ) -> anyhow::Result<Self> {
        let mut by_type = HashMap::new();
        for handler in handlers {
            let event_type = handler.event_type();
            if by_type.insert(event_type, handler).is_some() {
                anyhow::bail!("two handlers for {event_type} in {}", topology.service());
            }
        }
        // Relays bind this queue from the table too: the two must agree.
        if let Some(subscribed) = super::subscriptions::of(topology.service()) {
            let mut handled: Vec<&str> = by_type.keys().copied().collect();
            let mut listed = subscribed.to_vec();
            handled.sort_unstable();
            listed.sort_unstable();
            if handled != listed {
                anyhow::bail!(
                    "{} handles {handled:?} but messaging::subscriptions lists {listed:?}",
                    topology.service()
                );
            }
        }
        Ok(Self {
            topology,
            broker,
            connections: Warm::new(pool, settings.concurrency),
            handlers: by_type,
            prefetch: settings.prefetch,
            concurrency: settings.concurrency,
            handler_timeout: Duration::from_millis(settings.handler_timeout_ms),
            observer: None,
        })
    }

    pub fn observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = Some(observer);
        self
    }

    pub fn routing_keys(&self) -> Vec<&'static str> {
        let mut keys: Vec<_> = self.handlers.keys().copied().collect();
        keys.sort_unstable();
        keys
    }

    /// Declares the queue and its bindings now, so events published from here on reach
    /// this service even before it starts consuming.
    pub async fn declare(&self) -> anyhow::Result<()> {
        let channel = self.broker.channel().await?;
        self.topology
            .declare_consumer(&channel, &self.routing_keys())
            .await?;
        channel.close(200, "declared".into()).await?;
        Ok(())
    }

    /// Consumes until `shutdown`: then takes no new message, finishes those in hand, and
    /// returns. Broker or channel loss is followed by a reconnect with growing delay.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = Backoff::new();
        while !shutdown.is_cancelled() {
            let started = Instant::now();
            match self.clone().session(&shutdown).await {
                Ok(()) => break,
                Err(error) => {
                    if started.elapsed() > Duration::from_secs(30) {
                        backoff.reset();
                    }
                    tracing::warn!(%error, queue = %self.topology.queue(), "consumer stopped; reconnecting");
                    if pause(backoff.next_delay(), &shutdown).await {
                        break;
                    }
                }
            }
        }
    }

    async fn session(self: Arc<Self>, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let channel = self.broker.channel().await?;
        self.topology
            .declare_consumer(&channel, &self.routing_keys())
            .await?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await?;
        let publisher = self.broker.confirm_channel().await?;
        let tag = format!("{}.{}", self.topology.queue(), Uuid::new_v4().simple());
        let mut deliveries = channel
            .basic_consume(
                self.topology.queue().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tracing::info!(queue = %self.topology.queue(), keys = ?self.routing_keys(), "consuming");

        let in_flight = TaskTracker::new();
        let permits = Arc::new(Semaphore::new(self.concurrency));
        let result = loop {
            let permit = tokio::select! {
                biased;
                () = shutdown.cancelled() => break Ok(()),
                permit = permits.clone().acquire_owned() => permit?,
            };
            let next = tokio::select! {
                biased;
                () = shutdown.cancelled() => break Ok(()),
                next = deliveries.next() => next,
            };
            match next {
                Some(Ok(delivery)) => {
                    let this = self.clone();
                    let publisher = publisher.clone();
                    in_flight.spawn(async move {
                        this.process(delivery, &publisher).await;
                        drop(permit);
                    });
                }
                Some(Err(error)) => break Err(error.into()),
                None => break Err(anyhow::anyhow!("the broker cancelled the consumer")),
            }
        };
        // Stop deliveries, finish what is in hand; closing the channel returns any
        // prefetched message not started to the queue.
        let _ = channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await;
        in_flight.close();
        in_flight.wait().await;
        let _ = channel.close(200, "consumer stopped".into()).await;
        let _ = publisher.close(200, "consumer stopped".into()).await;
        result
    }

    async fn process(&self, delivery: Delivery, publisher: &Channel) {
        let started = Instant::now();
        let service = self.topology.service().to_owned();
        // One span for everything about this message, its retry or dead-lettering
        // included: taken from the AMQP properties, so a body that does not parse is
        // found by its correlation id too. `handle` fills in the rest.
        let props = &delivery.properties;
        let span = tracing::info_span!(
            "handle",
            service = %service,
            handler = tracing::field::Empty,
            event_type = props.kind().as_ref().map_or("-", |k| k.as_str()),
            event_id = %message_id(&delivery),
            correlation_id = props.correlation_id().as_ref().map_or("-", |c| c.as_str()),
            trace_id = tracing::field::Empty,
            request_id = tracing::field::Empty,
        );
        self.settle(delivery, publisher, &service, started)
            .instrument(span)
            .await;
    }

    async fn settle(
        &self,
        delivery: Delivery,
        publisher: &Channel,
        service: &str,
        started: Instant,
    ) {
        let service = service.to_owned();
        let (handler, outcome, settled) = match self.handle(&delivery).await {
            Ok((name, handled)) => {
                let outcome = match handled {
                    Handled::Done => Outcome::Handled,
                    Handled::Duplicate => Outcome::Duplicate,
                };
                let ack = delivery.acker.ack(BasicAckOptions::default()).await;
                (name.to_owned(), outcome, ack)
            }
            Err(failure) => match self.reroute(&delivery, &failure, publisher).await {
                Ok(outcome) => {
                    metrics::counter!("messages_failed_total", "service" => service.clone(), "handler" => failure.handler.clone(), "kind" => failure.kind).increment(1);
                    let ack = delivery.acker.ack(BasicAckOptions::default()).await;
                    (failure.handler, outcome, ack)
                }
                Err(error) => {
                    tracing::error!(%error, "could not park a failed message; returning it to the queue");
                    let requeue = BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    };
                    let nack = delivery.acker.nack(requeue).await;
                    (failure.handler, Outcome::Requeued, nack)
                }
            },
        };
        let outcome_label = match outcome {
            Outcome::Handled => "handled",
            Outcome::Duplicate => "duplicate",
            Outcome::Retried => "retried",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Requeued => "requeued",
        };
        metrics::histogram!("messages_handle_duration_seconds", "service" => service.clone(), "handler" => handler.clone())
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("messages_total", "service" => service, "handler" => handler, "outcome" => outcome_label)
            .increment(1);
        match settled {
            Ok(_) => {
                if let Some(observer) = &self.observer {
                    observer.settled(&message_id(&delivery), outcome);
                }
            }
            // The broker will deliver it again; the inbox makes that harmless.
            Err(error) => {
                tracing::warn!(%error, "could not settle a message; it will be redelivered");
            }
        }
    }

    /// Handles one delivery; on success returns the handler's name.
    async fn handle(&self, delivery: &Delivery) -> Result<(&'static str, Handled), Failure> {
        let envelope: Envelope = serde_json::from_slice(&delivery.data).map_err(|e| {
            Failure::new(
                "malformed",
                "-",
                &anyhow::Error::new(e).context("message body is not an event envelope"),
            )
        })?;
        let handler = self
            .handlers
            .get(envelope.event_type.as_str())
            .ok_or_else(|| {
                Failure::new(
                    "unknown_event",
                    "-",
                    &anyhow::anyhow!("no handler for event type {:?}", envelope.event_type),
                )
            })?;
        let name = handler.name();
        if !handler.versions().contains(&envelope.version) {
            return Err(Failure::new(
                "unsupported_version",
                name,
                &anyhow::anyhow!(
                    "{} version {} is not supported (supported: {:?})",
                    envelope.event_type,
                    envelope.version,
                    handler.versions()
                ),
            ));
        }

        let props_headers = delivery.properties.headers().clone().unwrap_or_default();
        let trace = headers::get_str(&props_headers, headers::TRACEPARENT)
            .and_then(|h| TraceContext::parse(&h))
            .map(|parent| parent.child())
            .unwrap_or_else(TraceContext::new_root)
            .with_request_id(headers::get_str(&props_headers, headers::REQUEST_ID));
        let span = tracing::Span::current();
        span.record("handler", name);
        span.record("trace_id", tracing::field::display(trace.trace_id()));
        span.record("request_id", trace.request_id.as_deref().unwrap_or("-"));

        let work = async {
            let mut conn = self.connections.take().await?;
            let failed = match conn.begin_with(begin_and_record(envelope.id, name)).await {
                Ok(mut tx) => {
                    handler.handle(&mut tx, &envelope).await?;
                    tx.commit().await?;
                    None
                }
                Err(error) => Some(error),
            };
            let Some(error) = failed else {
                self.connections.give_back(conn);
                return Ok::<_, HandlerError>(Handled::Done);
            };
            // The insert failed after the BEGIN: end the aborted transaction before the
            // connection is used again.
            sqlx::raw_sql("ROLLBACK").execute(&mut *conn).await?;
            if is_unique_violation(&error) {
                self.connections.give_back(conn);
                Ok(Handled::Duplicate)
            } else {
                Err(error.into())
            }
        };
        let result = tokio::time::timeout(self.handler_timeout, trace.scope(work)).await;
        if let Ok(Ok(Handled::Done)) = &result
            && let Some(observer) = &self.observer
        {
            observer.committed(&envelope).await;
        }
        match result {
            Ok(Ok(Handled::Done)) => {
                tracing::debug!("handled");
                Ok((name, Handled::Done))
            }
            Ok(Ok(Handled::Duplicate)) => {
                tracing::info!("duplicate delivery; already handled");
                Ok((name, Handled::Duplicate))
            }
            Ok(Err(error)) => {
                let kind = match error.retry {
                    Retry::Transient => "transient",
                    Retry::Permanent => "permanent",
                };
                tracing::warn!(error = format!("{:#}", error.error), kind, "handler failed");
                Err(Failure::new(kind, name, &error.error))
            }
            Err(_) => {
                tracing::warn!(timeout = ?self.handler_timeout, "handler timed out");
                Err(Failure::new(
                    "timeout",
                    name,
                    &anyhow::anyhow!("handler did not finish within {:?}", self.handler_timeout),
                ))
            }
        }
    }

    /// Sends a failed message to a retry wait queue or to the dead-letter queue, with
    /// publisher confirms. Returns where it went.
    async fn reroute(
        &self,
        delivery: &Delivery,
        failure: &Failure,
        publisher: &Channel,
    ) -> anyhow::Result<Outcome> {
        let original = delivery.properties.headers().clone().unwrap_or_default();
        let attempts = headers::get_i64(&original, headers::ATTEMPTS).unwrap_or(0) + 1;
        let now = Utc::now().to_rfc3339_opts(SecondsFormat::Micros, true);
        let first_failure = headers::get_str(&original, headers::FIRST_FAILURE_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map_or_else(
                || now.clone(),
                |t| t.to_rfc3339_opts(SecondsFormat::Micros, true),
            );

        let mut table = FieldTable::default();
        for (key, value) in original.inner() {
            // The broker's own bookkeeping grows on every round trip; ours is the record.
            if key.as_str() != "x-death" && key.as_str() != "x-delivery-count" {
                table.insert(key.clone(), value.clone());
            }
        }
        if !original.contains_key(headers::ORIGINAL_ROUTING_KEY) {
            table.insert(
                headers::ORIGINAL_EXCHANGE.into(),
                headers::text(delivery.exchange.as_str()),
            );
            table.insert(
                headers::ORIGINAL_ROUTING_KEY.into(),
                headers::text(delivery.routing_key.as_str()),
            );
        }
        for (key, value) in [
            (headers::SERVICE, self.topology.service()),
            (headers::HANDLER, failure.handler.as_str()),
            (headers::ERROR_KIND, failure.kind),
            (headers::ERROR_MESSAGE, failure.message.as_str()),
            (headers::ERROR_CHAIN, failure.chain.as_str()),
            (headers::FIRST_FAILURE_AT, first_failure.as_str()),
            (headers::LAST_FAILURE_AT, now.as_str()),
        ] {
            table.insert(key.into(), headers::text(value));
        }
        table.insert(
            headers::ATTEMPTS.into(),
            lapin::types::AMQPValue::LongLongInt(attempts),
        );

        let delays = self.topology.retry_delays();
        let retry_index = usize::try_from(attempts - 1).unwrap_or(usize::MAX);
        let (exchange, routing_key, outcome) = match delays.get(retry_index) {
            Some(delay) if failure.retryable() => (
                String::new(),
                self.topology.retry_queue(*delay),
                Outcome::Retried,
            ),
            _ => (
                self.topology.dead_letter_exchange(),
                self.topology.service().to_owned(),
                Outcome::DeadLettered,
            ),
        };
        let mut props = BasicProperties::default()
            .with_message_id(message_id(delivery).into())
            .with_delivery_mode(2)
            .with_content_type(
                delivery
                    .properties
                    .content_type()
                    .clone()
                    .unwrap_or_else(|| ShortString::from("application/json")),
            )
            .with_headers(table);
        if let Some(kind) = delivery.properties.kind() {
            props = props.with_type(kind.clone());
        }
        if let Some(correlation_id) = delivery.properties.correlation_id() {
            props = props.with_correlation_id(correlation_id.clone());
        }
        let confirm = publisher
            .basic_publish(
                exchange.as_str().into(),
                routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &delivery.data,
                props,
            )
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(None) => {}
            Confirmation::Ack(Some(_)) => anyhow::bail!("no queue for {exchange:?}/{routing_key}"),
            Confirmation::Nack(_) | Confirmation::NotRequested => {
                anyhow::bail!("the broker did not confirm the message to {routing_key}")
            }
        }
        if outcome == Outcome::DeadLettered {
            tracing::error!(kind = failure.kind, handler = %failure.handler, error = %failure.message, attempts, "message dead-lettered");
        } else {
            tracing::info!(
                kind = failure.kind,
                attempts,
                routing_key,
                "message will be retried"
            );
        }
        Ok(outcome)
    }
}

/// The message's id, or for a message that came without one, the hash of its body.
/// Opens the transaction and records the message as handled in one round trip: a
/// simple query cannot bind parameters, so the values are literals (a UUID and a
/// handler name from the code). A duplicate fails on the primary key.
fn begin_and_record(id: Uuid, handler: &'static str) -> sqlx::AssertSqlSafe<String> {
    let handler = handler.replace('\'', "''");
    sqlx::AssertSqlSafe(format!(
        "BEGIN; INSERT INTO processed_messages (message_id, handler) VALUES ('{id}', '{handler}')"
    ))
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.is_unique_violation())
}

fn message_id(delivery: &Delivery) -> String {
    delivery
        .properties
        .message_id()
        .as_ref()
        .map_or_else(|| body_id(&delivery.data), |id| id.as_str().to_owned())
}

/// A stable id for a message that came without one: the hash of its body.
pub(crate) fn body_id(body: &[u8]) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(body);
    format!("sha256:{}", crate::hex(&digest[..16]))
}
