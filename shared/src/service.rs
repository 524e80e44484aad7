//! The life of a service process: connect to its database, broker and Redis; start its
//! outbox relay, consumer and dead-letter ingest; serve HTTP; and on SIGTERM or Ctrl-C
//! stop taking work, finish what is in hand, publish what it committed, then exit.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::Request;
use axum::response::Response;
use futures_util::future::{BoxFuture, Either};
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
    app: App,
    shutdown: CancellationToken,
    workers: TaskTracker,
    relay_stop: CancellationToken,
    relay: Option<JoinHandle<()>>,
    /// Listeners of the event loops beyond the first.
    more_listeners: Vec<std::net::TcpListener>,
}

/// A task of the service's own (a sweeper, a scheduler), given the shutdown token: it
/// should return soon after the token is cancelled, and is awaited before exit.
pub type Background =
    Box<dyn FnOnce(CancellationToken) -> futures_util::future::BoxFuture<'static, ()> + Send>;

/// Something put in front of a service's router, holding the router with the common
/// layers on: the gateway answers the paths it proxies itself, without routing them
/// through axum, and hands every other request to the router.
pub trait Front: Send + Sync + 'static {
    fn call(&self, request: Request) -> BoxFuture<'static, Result<Response, Infallible>>;
}

/// Builds the front, given the router.
pub type MakeFront = Box<dyn FnOnce(Router) -> Arc<dyn Front> + Send>;

/// What the listeners serve: the router, or a front before it. Cloned per request, so
/// the front is shared rather than boxed anew.
#[derive(Clone)]
enum App {
    Router(Router),
    Front(Arc<dyn Front>),
}

impl tower::Service<Request> for App {
    type Response = Response;
    type Error = Infallible;
    type Future = Either<
        <Router as tower::Service<Request>>::Future,
        BoxFuture<'static, Result<Response, Infallible>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self {
            Self::Router(router) => tower::Service::<Request>::poll_ready(router, cx),
            Self::Front(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, request: Request) -> Self::Future {
        match self {
            Self::Router(router) => Either::Left(router.call(request)),
            Self::Front(front) => Either::Right(front.call(request)),
        }
    }
}

/// What [`Service::start`] runs besides the HTTP routes.
#[derive(Default)]
pub struct Work {
    pub handlers: Vec<Arc<dyn Handler>>,
    pub observer: Option<Arc<dyn Observer>>,
    /// More for `/ready` to check, besides the service's own connections.
    pub checks: Vec<Check>,
    pub background: Vec<Background>,
    /// HTTP event loops; 0 and 1 both mean one, on the runtime `run_until_stopped` is
    /// awaited on. More are each a single-threaded runtime on its own thread with its
    /// own socket on the same port (`SO_REUSEPORT`), so the kernel spreads connections
    /// over them and a connection's requests stay on one thread, as in nginx's workers.
    pub event_loops: usize,
    pub front: Option<MakeFront>,
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

        let loops = work.event_loops.max(1);
        let listener = bind(&settings.http.host, port, loops > 1)
            .await
            .with_context(|| format!("binding {}:{port}", settings.http.host))?;
        let address = listener.local_addr()?;
        let port = address.port();
        let mut more_listeners = Vec::with_capacity(loops - 1);
        for _ in 1..loops {
            let more = bind(&settings.http.host, port, true)
                .await
                .with_context(|| format!("binding {address} for another event loop"))?;
            more_listeners.push(more.into_std()?);
        }
        let router = match &infra.pool {
            Some(_) => router.merge(dead_letter_admin(&infra, address, &workers, &shutdown)?),
            None => router,
        };
        let router = http::with_common_layers(
            http::probe_routes(infra.name, checks, queue_gauges).merge(router),
            infra.name,
            &settings.http,
        );
        let app = match work.front {
            Some(front) => App::Front(front(router)),
            None => App::Router(router),
        };
        tracing::info!(service = infra.name, port, "started");
        Ok(Self {
            infra,
            listener,
            port,
            app,
            shutdown,
            workers,
            relay_stop,
            relay,
            more_listeners,
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
        let app = axum::ServiceExt::<Request>::into_make_service_with_connect_info::<
            std::net::SocketAddr,
        >(self.app);
        let mut loops = Vec::with_capacity(self.more_listeners.len());
        for (i, listener) in self.more_listeners.into_iter().enumerate() {
            let app = app.clone();
            let stopped = self.shutdown.clone().cancelled_owned();
            let stopped_tick = self.shutdown.clone();
            let thread = std::thread::Builder::new()
                .name(format!("http-loop-{}", i + 1))
                .spawn(move || -> anyhow::Result<()> {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    runtime.block_on(async move {
                        tokio::spawn(keep_timer_armed(stopped_tick));
                        let listener = TcpListener::from_std(listener)?;
                        axum::serve(listener, app)
                            .with_graceful_shutdown(stopped)
                            .await
                    })?;
                    Ok(())
                })
                .context("starting an HTTP event loop")
                .inspect_err(|_| self.shutdown.cancel())?;
            loops.push(thread);
        }
        tokio::spawn(keep_timer_armed(self.shutdown.clone()));
        let mut served = axum::serve(self.listener, app)
            .with_graceful_shutdown(stop)
            .await
            .map_err(anyhow::Error::from);
        // The HTTP side stopped (or failed): stop the other loops and the consumers too,
        // whatever the reason.
        self.shutdown.cancel();
        for thread in loops {
            let joined = tokio::task::spawn_blocking(move || thread.join()).await;
            let result = match joined {
                Ok(Ok(result)) => result,
                _ => Err(anyhow::anyhow!("an HTTP event loop panicked")),
            };
            if served.is_ok() {
                served = result;
            }
        }
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

/// Every request starts timeouts (the request's, the upstream's). Tokio wakes its
/// driver through an eventfd write whenever a new timer is due before the driver's next
/// planned wake-up (tokio-rs/tokio#5207): on an idle timer wheel that is every request.
/// A timer always due within a second keeps that wake-up near, so request timeouts of a
/// second or more cost no system call.
async fn keep_timer_armed(stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
    }
}

/// A listening socket; `shared` lets other sockets listen on the same port.
async fn bind(host: &str, port: u16, shared: bool) -> anyhow::Result<TcpListener> {
    if !shared {
        return Ok(TcpListener::bind((host, port)).await?);
    }
    let address = tokio::net::lookup_host((host, port))
        .await?
        .next()
        .with_context(|| format!("{host} has no address"))?;
    let socket = match address {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(address)?;
    Ok(socket.listen(1024)?)
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
