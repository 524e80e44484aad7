//! Test support: each test gets its own namespace (databases, exchanges, queues) that is
//! removed when the test ends, even when it panics; polling with a deadline; a broker
//! observer; and a TCP proxy that can cut a service off from the broker.

pub mod jwks;
mod proxy;
pub mod smtp;
pub mod stripe;

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties,
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};
use secrecy::ExposeSecret as _;
use shared::{
    Settings,
    messaging::{Topology, subscriptions::SUBSCRIPTIONS},
};

pub use proxy::TcpProxy;

/// How long a test waits for something that should happen before failing.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// One test's namespace. Dropping it deletes everything made under it.
pub struct TestEnv {
    pub namespace: String,
    settings: Settings,
    /// Retry delays services of this namespace were started with besides the namespace's
    /// own and the defaults: their wait queues are named by delay.
    extra_retry_delays: Mutex<BTreeSet<u64>>,
    /// Only the test that made the namespace removes it.
    owner: bool,
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl TestEnv {
    pub fn new() -> Self {
        let suffix: String = (0..10).map(|_| fastrand::lowercase()).collect();
        Self::with_namespace(format!("t{suffix}"), true)
    }

    /// The namespace another process of the same test made; left in place on drop.
    pub fn attach(namespace: &str) -> Self {
        Self::with_namespace(namespace.to_owned(), false)
    }

    fn with_namespace(namespace: String, owner: bool) -> Self {
        shared::telemetry::init_for_tests();
        let mut settings = Settings {
            namespace: namespace.clone(),
            ..Settings::default()
        };
        settings.postgres.max_connections = 5;
        settings.messaging.retry_delays_ms = vec![50, 100, 200];
        settings.messaging.outbox_poll_interval_ms = 200;
        settings.files.dir = std::env::temp_dir().join(format!("commerce-{namespace}-files"));
        settings.smtp.dir = std::env::temp_dir().join(format!("commerce-{namespace}-mail"));
        settings.gateway.port = 0;
        for service in [
            &mut settings.user,
            &mut settings.product,
            &mut settings.order,
            &mut settings.payment,
            &mut settings.inventory,
            &mut settings.notification,
            &mut settings.file,
        ] {
            service.port = 0;
        }
        Self {
            namespace,
            settings,
            extra_retry_delays: Mutex::default(),
            owner,
        }
    }

    /// Makes cleanup also delete the retry wait queues of `settings`, for a test that
    /// starts a service with retry delays of its own.
    pub fn track(&self, settings: &Settings) {
        if let Ok(mut extra) = self.extra_retry_delays.lock() {
            extra.extend(settings.messaging.retry_delays_ms.iter().copied());
        }
    }

    /// Settings of this namespace: every port 0, fast retries, small pools.
    pub fn settings(&self) -> Settings {
        self.settings.clone()
    }

    /// A connection straight to the broker, for the test's own eyes and hands.
    pub async fn amqp(&self) -> Connection {
        Connection::connect(
            self.settings.amqp.url.expose_secret(),
            ConnectionProperties::default(),
        )
        .await
        .expect("the test connects to RabbitMQ")
    }

    /// The broker's host and port, as the settings name them.
    pub fn amqp_address(&self) -> std::net::SocketAddr {
        let url = self.settings.amqp.url.expose_secret();
        let authority = url
            .split_once("://")
            .map_or(url, |(_, rest)| rest)
            .split('/')
            .next()
            .unwrap_or_default();
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
        std::net::ToSocketAddrs::to_socket_addrs(host_port)
            .ok()
            .and_then(|mut addrs| addrs.next())
            .expect("the AMQP URL names a reachable host:port")
    }

    /// These settings with the broker reached through `address` (a [`TcpProxy`]).
    pub fn settings_via(&self, address: std::net::SocketAddr) -> Settings {
        let mut settings = self.settings();
        let url = self.settings.amqp.url.expose_secret();
        let original = self.amqp_address().to_string();
        let rewritten = url.replacen(&original, &address.to_string(), 1);
        assert_ne!(
            &rewritten, url,
            "AMQP URL {url} must name the broker as {original}"
        );
        settings.amqp.url = rewritten.into();
        settings
    }

    pub fn topology(&self, service: &str) -> Topology {
        Topology::new(&self.namespace, service, &self.settings.messaging)
    }

    /// A pool on one service's database (created if missing, kernel tables migrated).
    pub async fn database(&self, service: &str) -> sqlx::PgPool {
        shared::db::bootstrap(&self.settings, service, None)
            .await
            .expect("the test creates its database")
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if !self.owner {
            return;
        }
        let namespace = self.namespace.clone();
        let settings = self.settings.clone();
        let tracked: Vec<u64> = self
            .extra_retry_delays
            .lock()
            .map(|extra| extra.iter().copied().collect())
            .unwrap_or_default();
        let _ = std::fs::remove_dir_all(&settings.files.dir);
        let _ = std::fs::remove_dir_all(&settings.smtp.dir);
        // Own thread and runtime: this also runs while a failed test unwinds.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for cleanup");
            runtime.block_on(drop_namespace(&namespace, &settings, tracked))
        });
        match cleanup.join() {
            Ok(Ok(())) => {}
            Ok(Err(error)) => eprintln!("cleanup of {} failed: {error:#}", self.namespace),
            Err(_) => eprintln!("cleanup of {} panicked", self.namespace),
        }
    }
}

/// Deletes everything made under `namespace`: its databases, its exchanges, its Redis
/// keys, and the queues of every service that has a database there or is in the
/// subscription table.
/// Wait queues are named by delay, so those of every delay a service may have used go:
/// `settings`' own, `extra_delays`, and the defaults (for services started as processes
/// with them). What [`TestEnv`] does on drop; the benchmark scripts run it as
/// `drop-namespace`.
pub async fn drop_namespace(
    namespace: &str,
    settings: &Settings,
    extra_delays: impl IntoIterator<Item = u64>,
) -> anyhow::Result<()> {
    let mut settings = settings.clone();
    let mut delays: BTreeSet<u64> = settings.messaging.retry_delays_ms.iter().copied().collect();
    delays.extend(extra_delays);
    delays.extend(shared::config::MessagingSettings::default().retry_delays_ms);
    settings.messaging.retry_delays_ms = delays.into_iter().collect();
    use sqlx::Connection as _;
    let url = settings.postgres.database_url("postgres");
    let mut pg = when_slots_free(|| async { Ok(sqlx::PgConnection::connect(&url).await?) }).await?;
    let databases: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE starts_with(datname, $1)")
            .bind(format!("{namespace}_"))
            .fetch_all(&mut pg)
            .await?;
    let amqp = Connection::connect(
        settings.amqp.url.expose_secret(),
        ConnectionProperties::default(),
    )
    .await?;
    // One failure must not leave the rest behind: carry on, report the first at the end.
    let mut first_error: Option<anyhow::Error> = None;
    let mut note = |result: anyhow::Result<()>| {
        if let Err(error) = result {
            first_error.get_or_insert(error);
        }
    };
    let prefix = format!("{namespace}_");
    // Services with a database declared their queues; any relay declared the queues of
    // every subscriber in the table.
    let mut services: BTreeSet<&str> = databases
        .iter()
        .map(|database| database.trim_start_matches(&prefix))
        .collect();
    services.extend(SUBSCRIPTIONS.iter().map(|(service, _)| *service));
    for service in services {
        // A failed delete closes its channel: one channel per service.
        let result = async {
            let channel = amqp.create_channel().await?;
            Topology::new(namespace, service, &settings.messaging)
                .delete_queues(&channel)
                .await?;
            channel.close(200, "cleanup".into()).await?;
            Ok(())
        };
        note(result.await);
    }
    let result = async {
        let channel = amqp.create_channel().await?;
        Topology::new(namespace, "-", &settings.messaging)
            .delete_exchanges(&channel)
            .await?;
        channel.close(200, "cleanup".into()).await?;
        Ok(())
    };
    note(result.await);
    note(amqp.close(200, "cleanup".into()).await.map_err(Into::into));
    note(delete_redis_keys(namespace, settings.redis.url.expose_secret()).await);
    for database in &databases {
        note(when_slots_free(|| shared::db::drop_database(&settings.postgres, database)).await);
    }
    first_error.map_or(Ok(()), Err)
}

/// Deletes the namespace's Redis keys (catalog cache entries, rate-limit state): they
/// would expire by themselves, but only minutes later.
pub async fn delete_redis_keys(namespace: &str, redis_url: &str) -> anyhow::Result<()> {
    use deadpool_redis::redis::{AsyncCommands as _, Client};
    use futures_util::TryStreamExt as _;
    let mut redis = Client::open(redis_url)?
        .get_multiplexed_async_connection()
        .await?;
    let keys: Vec<String> = redis
        .scan_match::<_, String>(format!("{namespace}:*"))
        .await?
        .try_collect()
        .await?;
    for batch in keys.chunks(1000) {
        let () = redis.del(batch).await?;
    }
    Ok(())
}

/// Retries `op` while PostgreSQL is out of connection slots (SQLSTATE 53300): tests
/// running in parallel fill them for moments, and a cleanup that gave up then left its
/// databases behind.
async fn when_slots_free<T, F, Fut>(mut op: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut pause = Duration::from_millis(100);
    loop {
        match op().await {
            Err(error) if too_many_clients(&error) && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            done => return done,
        }
    }
}

fn too_many_clients(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(cause.downcast_ref::<sqlx::Error>(),
            Some(sqlx::Error::Database(db)) if db.code().as_deref() == Some("53300"))
    })
}

/// Polls `check` until it gives `Some`, failing the test after [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A private queue bound to the namespace's events exchange: what was published.
pub struct Observer {
    _connection: Connection,
    consumer: lapin::Consumer,
}

impl Observer {
    pub async fn new(env: &TestEnv, routing_keys: &[&str]) -> Self {
        let connection = env.amqp().await;
        let channel = connection.create_channel().await.expect("channel");
        let topology = env.topology("observer");
        topology
            .declare_exchanges(&channel)
            .await
            .expect("exchanges");
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("observer queue");
        for key in routing_keys {
            channel
                .queue_bind(
                    queue.name().clone(),
                    topology.events_exchange().into(),
                    (*key).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .expect("bind observer");
        }
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                "observer".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        Self {
            _connection: connection,
            consumer,
        }
    }

    /// The next message, acknowledged; fails the test after [`DEADLINE`].
    pub async fn next(&mut self) -> Delivery {
        let delivery = tokio::time::timeout(DEADLINE, self.consumer.next())
            .await
            .expect("a message within the deadline")
            .expect("the observer is consuming")
            .expect("a delivery");
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
        delivery
    }

    /// A message if one arrives within `wait`.
    pub async fn try_next(&mut self, wait: Duration) -> Option<Delivery> {
        let delivery = tokio::time::timeout(wait, self.consumer.next())
            .await
            .ok()??
            .ok()?;
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
        Some(delivery)
    }
}

/// Publishes `body` as the test's own producer would, with publisher confirms.
pub async fn publish(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) {
    let confirm = channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            Default::default(),
            body,
            properties.with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(!confirm.is_nack(), "the broker refused the message");
}

/// Ready messages in a queue (exact when nothing consumes it).
pub async fn queue_depth(channel: &Channel, queue: &str) -> u32 {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue exists")
        .message_count()
}
