//! The life of a service process: connect to its database, broker and Redis; start its
//! outbox relay, consumer and dead-letter ingest; serve HTTP; and on SIGTERM or Ctrl-C
//! stop taking work, finish what is in hand, publish what it committed, then exit.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use secrecy::ExposeSecret;
use sqlx::{PgPool, migrate::Migrator};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::config::Settings;
use crate::http::{self, Check};
use crate::messaging::{
    Broker, Consumer, DeadLetterStore, Handler, Observer, Outbox, Relay, Topology,
};

/// What a service needs besides HTTP.
#[derive(Clone, Copy, Debug, Default)]
pub struct Needs {
    /// Its own database (and with it the broker, for the outbox), with these migrations.
    pub database: Option<Option<&'static Migrator>>,
    pub redis: bool,
}

/// The connections a service works with.
#[derive(Clone)]
pub struct Infra {
    /// Short name: database `<ns>_<name>`, queue `<ns>.<name>`.
    pub name: &'static str,
    pub settings: Settings,
    pub topology: Topology,
    pub outbox: Outbox,
    pub pool: Option<PgPool>,
    pub broker: Option<Broker>,
    pub redis: Option<deadpool_redis::Pool>,
}

impl Infra {
    pub async fn connect(
        name: &'static str,
        settings: &Settings,
        needs: Needs,
    ) -> anyhow::Result<Self> {
        settings.validate()?;
        let topology = Topology::new(&settings.namespace, name, &settings.messaging);
        let (pool, broker) = match needs.database {
            Some(migrations) => {
                let pool = crate::db::bootstrap(settings, name, migrations).await?;
                let broker = Broker::new(
                    settings.amqp.url.clone(),
                    format!("{}.{name}", settings.namespace),
                );
                (Some(pool), Some(broker))
            }
            None => (None, None),
        };
        let redis = if needs.redis {
            let config = deadpool_redis::Config::from_url(settings.redis.url.expose_secret());
            Some(
                config
                    .create_pool(Some(deadpool_redis::Runtime::Tokio1))
                    .context("creating the Redis pool (COMMERCE__REDIS__URL)")?,
            )
        } else {
            None
        };
        Ok(Self {
            name,
            settings: settings.clone(),
            outbox: Outbox::new(&topology),
            topology,
            pool,
            broker,
            redis,
        })
    }

    /// The service's database pool; only for services that declared one.
    pub fn pool(&self) -> anyhow::Result<&PgPool> {
        self.pool
            .as_ref()
            .with_context(|| format!("{} has no database", self.name))
    }

    /// The dead-letter store of this service's database.
    pub fn dead_letters(&self) -> anyhow::Result<DeadLetterStore> {
        Ok(DeadLetterStore::new(
            self.pool()?.clone(),
            self.topology.clone(),
        ))
    }
}

/// Everything a service runs, ready to serve.
pub struct Service {
    infra: Infra,
    listener: TcpListener,
    port: u16,
    router: Router,
    shutdown: CancellationToken,
    workers: TaskTracker,
    relay_stop: CancellationToken,
    relay: Option<JoinHandle<()>>,
}

/// A task of the service's own (a sweeper, a scheduler), given the shutdown token: it
/// should return soon after the token is cancelled, and is awaited before exit.
pub type Background =
    Box<dyn FnOnce(CancellationToken) -> futures_util::future::BoxFuture<'static, ()> + Send>;

/// What [`Service::start`] runs besides the HTTP routes.
#[derive(Default)]
pub struct Work {
    pub handlers: Vec<Arc<dyn Handler>>,
    pub observer: Option<Arc<dyn Observer>>,
    /// More for `/ready` to check, besides the service's own connections.
    pub checks: Vec<Check>,
    pub background: Vec<Background>,
}

impl Service {
    /// Binds the listener on the given port (0: any free one) and starts the relay, the
    /// consumer and the dead-letter ingest. Serving starts with `run_until_stopped`.
    pub async fn start(
        infra: Infra,
        port: u16,
        router: Router,
        work: Work,
    ) -> anyhow::Result<Self> {
        crate::metrics::handle();
        let settings = &infra.settings;
        let shutdown = CancellationToken::new();
        let workers = TaskTracker::new();
        let relay_stop = CancellationToken::new();
        let mut relay = None;
        let mut checks = Vec::new();
        let mut queue_gauges = None;

        if let (Some(pool), Some(broker)) = (&infra.pool, &infra.broker) {
            checks.push(Check::Database(pool.clone()));
            checks.push(Check::Broker(broker.clone()));
            let relay_task = Relay::new(
                pool.clone(),
                broker.clone(),
                &infra.topology,
                Duration::from_millis(settings.messaging.outbox_poll_interval_ms),
                settings.messaging.outbox_batch_size,
            );
            relay = Some(tokio::spawn(relay_task.run(relay_stop.clone())));
            crate::metrics::register_handlers(infra.name, work.handlers.iter().map(|h| h.name()));
            workers.spawn(crate::metrics::watch(
                pool.clone(),
                infra.topology.service().to_owned(),
                shutdown.child_token(),
            ));
            if !work.handlers.is_empty() {
                queue_gauges = Some(crate::metrics::QueueGauges::new(
                    broker.clone(),
                    &infra.topology,
                ));
            }

            if !work.handlers.is_empty() {
                let mut consumer = Consumer::new(
                    infra.topology.clone(),
                    broker.clone(),
                    pool.clone(),
                    &settings.messaging,
                    work.handlers,
                )?;
                if let Some(observer) = work.observer {
                    consumer = consumer.observer(observer);
                }
                consumer.declare().await.context(
                    "declaring the service's queues (is RabbitMQ up? COMMERCE__AMQP__URL)",
                )?;
                workers.spawn(Arc::new(consumer).run(shutdown.child_token()));
                let store = Arc::new(infra.dead_letters()?);
                workers.spawn(store.run_ingest(broker.clone(), shutdown.child_token()));
            }
        } else if !work.handlers.is_empty() {
            anyhow::bail!("{} has event handlers but no database", infra.name);
        }
        if let Some(redis) = &infra.redis {
            checks.push(Check::Redis(redis.clone()));
        }
        checks.extend(work.checks);
        for task in work.background {
            workers.spawn(task(shutdown.child_token()));
        }

        let address = (settings.http.host.as_str(), port);
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("binding {}:{port}", settings.http.host))?;
        let address = listener.local_addr()?;
        let port = address.port();
        let router = match &infra.pool {
            Some(_) => router.merge(dead_letter_admin(&infra, address, &workers, &shutdown)?),
            None => router,
        };
        let router = http::with_common_layers(
            http::probe_routes(infra.name, checks, queue_gauges).merge(router),
            infra.name,
            &settings.http,
        );
        tracing::info!(service = infra.name, port, "started");
        Ok(Self {
            infra,
            listener,
            port,
            router,
            shutdown,
            workers,
            relay_stop,
            relay,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Cancelling it stops the service as SIGTERM would.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Serves until SIGTERM, Ctrl-C or the shutdown token; then drains in order: HTTP
    /// requests and messages in hand finish, the relay publishes what they committed,
    /// connections close.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let shutdown = self.shutdown.clone();
        let stop = async move {
            tokio::select! {
                () = os_signal() => tracing::info!("shutdown signal received"),
                () = shutdown.cancelled() => {}
            }
            shutdown.cancel();
        };
        let app = self
            .router
            .into_make_service_with_connect_info::<std::net::SocketAddr>();
        let served = axum::serve(self.listener, app)
            .with_graceful_shutdown(stop)
            .await;
        // The HTTP side stopped (or failed): stop consumers too, whatever the reason.
        self.shutdown.cancel();
        self.workers.close();
        self.workers.wait().await;
        self.relay_stop.cancel();
        if let Some(relay) = self.relay {
            let _ = relay.await;
        }
        if let Some(broker) = &self.infra.broker {
            broker.close().await;
        }
        if let Some(pool) = &self.infra.pool {
            pool.close().await;
        }
        tracing::info!(service = self.infra.name, "stopped");
        served.context("serving HTTP")
    }
}

/// The dead-letter admin routes of a service with a database, and the tasks behind
/// them: the paced replayer and the purge of discarded dead letters.
fn dead_letter_admin(
    infra: &Infra,
    address: std::net::SocketAddr,
    workers: &TaskTracker,
    shutdown: &CancellationToken,
) -> anyhow::Result<Router> {
    let settings = &infra.settings;
    let store = infra.dead_letters()?;
    workers.spawn(Arc::new(store.clone()).run_replayer(
        settings.dead_letters.replay_rate_per_sec,
        Duration::from_millis(settings.messaging.outbox_poll_interval_ms),
        shutdown.child_token(),
    ));
    workers.spawn(Arc::new(store.clone()).run_purger(
        Duration::from_secs(u64::from(settings.dead_letters.retention_days) * 86_400),
        Duration::from_secs(3_600),
        shutdown.child_token(),
    ));
    let mut verifier_settings = settings.clone();
    // user-svc issues the tokens: it checks them against its own key set, wherever it
    // listens (in tests its port is only known now).
    if infra.name == "user" && verifier_settings.auth.jwks_url.is_none() {
        let ip = match address.ip() {
            ip if ip.is_unspecified() => std::net::IpAddr::from([127, 0, 0, 1]),
            ip => ip,
        };
        let own = std::net::SocketAddr::new(ip, address.port());
        verifier_settings.auth.jwks_url = Some(format!("http://{own}/.well-known/jwks.json"));
    }
    Ok(crate::admin::router(
        store,
        crate::auth::Verifier::remote(&verifier_settings),
    ))
}

async fn os_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

/// The body of every service's `main`: settings, logs, build, serve.
pub async fn main<A, F, Fut>(build: F) -> anyhow::Result<()>
where
    F: FnOnce(Settings) -> Fut,
    Fut: Future<Output = anyhow::Result<A>>,
    A: Into<Service>,
{
    serve(Settings::load()?, build).await
}

/// Logs, build and serve with settings already loaded.
pub async fn serve<A, F, Fut>(settings: Settings, build: F) -> anyhow::Result<()>
where
    F: FnOnce(Settings) -> Fut,
    Fut: Future<Output = anyhow::Result<A>>,
    A: Into<Service>,
{
    crate::telemetry::init(&settings);
    let service: Service = build(settings).await?.into();
    service.run_until_stopped().await
}
