//! The process-wide Prometheus recorder behind every service's `/metrics`, the families
//! every service shares (described here, so a scrape says what each one means), the
//! watcher that keeps the dead-letter gauges current, and the queue gauges a scrape reads
//! from the broker.
//!
//! Families are registered at zero when a service starts where their labels are known
//! then (each handler's outcomes, the outbox and dead-letter gauges), so dashboards and
//! alerts see `0`, not "absent", before the first message.

use std::sync::OnceLock;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::messaging::{Broker, Topology};

/// Latency buckets (seconds) for every `*_seconds` histogram.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How often the watcher refreshes the dead-letter gauges: a few times per usual scrape
/// interval (15 s), and cheap (two indexed counts).
pub const WATCH_INTERVAL: Duration = Duration::from_secs(5);

/// How long a scrape waits for the broker's queue depths before answering without them.
const QUEUE_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Every outcome `messages_total` counts, as labelled.
pub const MESSAGE_OUTCOMES: [&str; 5] = [
    "handled",
    "duplicate",
    "retried",
    "dead_lettered",
    "requeued",
];

/// The `kind`s of `messages_failed_total` a handler's own errors produce.
const HANDLER_FAILURE_KINDS: [&str; 4] =
    ["transient", "permanent", "timeout", "unsupported_version"];

/// The `kind`s of failures found before any handler was chosen (`handler="-"`).
const UNROUTED_FAILURE_KINDS: [&str; 2] = ["malformed", "unknown_event"];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The recorder, installed on first use. Several services in one process (tests) share it;
/// every series carries a `service` label.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is installed; /metrics will be empty");
        }
        describe();
        let upkeep = handle.clone();
        // Histograms are drained into their buckets here, not on the hot path.
        std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                }
            })
            .map(drop)
            .unwrap_or_else(|e| tracing::warn!(error = %e, "no metrics upkeep thread"));
        handle
    })
}

pub fn render() -> String {
    let handle = handle();
    handle.run_upkeep();
    handle.render()
}

/// `# HELP` lines for the shared families (docs/RUNBOOK.md explains what to do about them).
fn describe() {
    describe_counter!(
        "http_requests_total",
        "HTTP requests answered, by service, method, route template and status"
    );
    describe_histogram!(
        "http_request_duration_seconds",
        Unit::Seconds,
        "Time to answer an HTTP request, by service, method, route template and status"
    );
    describe_counter!(
        "messages_total",
        "Messages consumed, by service, handler and outcome (handled, duplicate, retried, dead_lettered, requeued)"
    );
    describe_counter!(
        "messages_failed_total",
        "Failed handling attempts, by service, handler and error kind"
    );
    describe_histogram!(
        "messages_handle_duration_seconds",
        Unit::Seconds,
        "Time from delivery to settlement of a message, by service and handler"
    );
    describe_counter!(
        "outbox_published_total",
        "Outbox rows published and confirmed by the broker"
    );
    describe_histogram!(
        "outbox_publish_delay_seconds",
        Unit::Seconds,
        "Time from an outbox row's commit to the broker's confirm"
    );
    describe_gauge!(
        "outbox_backlog",
        "Outbox rows not yet published (confirmed rows are deleted)"
    );
    describe_gauge!(
        "outbox_oldest_age_seconds",
        Unit::Seconds,
        "Age of the oldest unpublished outbox row; 0 when the outbox is empty"
    );
    describe_gauge!(
        "dead_letters_open",
        "Dead letters stored in the service's dead_letters table and neither replayed nor discarded"
    );
    describe_gauge!(
        "dead_letters_oldest_open_age_seconds",
        Unit::Seconds,
        "Time since the oldest open dead letter last failed; 0 when there is none"
    );
    describe_gauge!(
        "dead_letter_replays_pending",
        "Replays an operator asked for that the paced replayer has not yet handed to the outbox"
    );
    describe_counter!(
        "dead_letters_stored_total",
        "Messages taken from the dead-letter queue into the dead_letters table"
    );
    describe_gauge!(
        "queue_messages",
        "Messages ready in a service's broker queue (its main queue and its .dlq)"
    );
    describe_gauge!(
        "queue_consumers",
        "Consumers attached to a service's broker queue"
    );
}

/// Registers at zero every outcome and failure kind of each handler of `service`, so a
/// first dead letter shows as a rise, not as a series that appears from nowhere.
pub fn register_handlers<'a>(service: &str, handlers: impl IntoIterator<Item = &'a str>) {
    handle();
    let register = |handler: &str, kinds: &[&'static str]| {
        for outcome in MESSAGE_OUTCOMES {
            metrics::counter!("messages_total", "service" => service.to_owned(), "handler" => handler.to_owned(), "outcome" => outcome).increment(0);
        }
        for kind in kinds {
            metrics::counter!("messages_failed_total", "service" => service.to_owned(), "handler" => handler.to_owned(), "kind" => *kind).increment(0);
        }
        // Registered, not recorded: an empty histogram renders with count 0.
        drop(
            metrics::histogram!("messages_handle_duration_seconds", "service" => service.to_owned(), "handler" => handler.to_owned()),
        );
    };
    let mut consumes = false;
    for handler in handlers {
        consumes = true;
        register(handler, &HANDLER_FAILURE_KINDS);
    }
    if consumes {
        register("-", &UNROUTED_FAILURE_KINDS);
    }
}

/// Keeps `dead_letters_open`, `dead_letters_oldest_open_age_seconds` and
/// `dead_letter_replays_pending` current until `shutdown`, also while the broker is down.
pub async fn watch(pool: PgPool, service: String, shutdown: CancellationToken) {
    handle();
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        record_dead_letters(&pool, &service).await;
    }
}

/// `queue_messages` / `queue_consumers` of a consuming service's main queue and its
/// dead-letter queue, read from the broker when `/metrics` is scraped rather than polled:
/// no broker traffic between scrapes, and never a stale depth. The DLQ is normally empty,
/// since the service's ingest moves each message into the table at once; a DLQ that fills
/// means that ingest is failing (the database, usually).
#[derive(Clone)]
pub struct QueueGauges {
    broker: Broker,
    service: String,
    queues: Vec<String>,
}

impl QueueGauges {
    pub fn new(broker: Broker, topology: &Topology) -> Self {
        Self {
            broker,
            service: topology.service().to_owned(),
            queues: vec![topology.queue(), topology.dead_letter_queue()],
        }
    }

    /// Reads the depths; on a broker that does not answer in time the gauges keep their
    /// last values and `/ready` reports the broker.
    pub async fn refresh(&self) {
        let read = record_queues(&self.broker, &self.service, &self.queues);
        if tokio::time::timeout(QUEUE_READ_TIMEOUT, read)
            .await
            .is_err()
        {
            tracing::debug!("queue depths not read: the broker did not answer in time");
        }
    }
}

async fn record_dead_letters(pool: &PgPool, service: &str) {
    // Served by the (status, fingerprint) index; open rows are few when all is well.
    let row: Result<(i64, Option<f64>), _> = sqlx::query_as(
        "SELECT count(*), EXTRACT(EPOCH FROM now() - min(last_failed_at))::float8 \
         FROM dead_letters WHERE status = 'open'",
    )
    .fetch_one(pool)
    .await;
    match row {
        Ok((open, oldest)) => {
            metrics::gauge!("dead_letters_open", "service" => service.to_owned()).set(open as f64);
            metrics::gauge!("dead_letters_oldest_open_age_seconds", "service" => service.to_owned())
                .set(oldest.unwrap_or(0.0).max(0.0));
        }
        // The gauge keeps its last value; /ready reports the database.
        Err(error) => tracing::debug!(%error, "could not count dead letters"),
    }
    let pending: Result<i64, _> = sqlx::query_scalar("SELECT count(*) FROM dead_letter_replays")
        .fetch_one(pool)
        .await;
    match pending {
        Ok(pending) => {
            metrics::gauge!("dead_letter_replays_pending", "service" => service.to_owned())
                .set(pending as f64);
        }
        Err(error) => tracing::debug!(%error, "could not count pending replays"),
    }
}

async fn record_queues(broker: &Broker, service: &str, queues: &[String]) {
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    // A passive declare of a missing queue closes the channel: one channel per pass.
    let channel = match broker.channel().await {
        Ok(channel) => channel,
        Err(error) => {
            tracing::debug!(%error, "could not read queue depths");
            return;
        }
    };
    for queue in queues {
        match channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await
        {
            Ok(declared) => {
                let labels = [("service", service.to_owned()), ("queue", queue.clone())];
                metrics::gauge!("queue_messages", &labels).set(f64::from(declared.message_count()));
                metrics::gauge!("queue_consumers", &labels)
                    .set(f64::from(declared.consumer_count()));
            }
            Err(error) => {
                tracing::debug!(%error, queue, "could not read a queue's depth");
                break;
            }
        }
    }
    if channel.status().connected() {
        let _ = channel.close(200, "queue depths read".into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handlers_are_registered_at_zero_with_every_outcome() {
        register_handlers("metrics-unit", ["thing_created"]);
        let text = render();
        for outcome in MESSAGE_OUTCOMES {
            let line = format!(
                "messages_total{{service=\"metrics-unit\",handler=\"thing_created\",outcome=\"{outcome}\"}} 0"
            );
            assert!(text.contains(&line), "{line} missing from:\n{text}");
        }
        assert!(
            text.contains("messages_handle_duration_seconds_count{service=\"metrics-unit\",handler=\"thing_created\"} 0"),
            "{text}"
        );
        assert!(
            text.contains(
                "messages_failed_total{service=\"metrics-unit\",handler=\"-\",kind=\"malformed\"} 0"
            ),
            "{text}"
        );
        assert!(text.contains("# HELP messages_total "), "{text}");
    }
}
