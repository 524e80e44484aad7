//! The life of a service process: connect to its database, broker and Redis; start its
//! outbox relay, consumer and dead-letter ingest; serve HTTP; and on SIGTERM or Ctrl-C
//! stop taking work, finish what is in hand, publish what it committed, then exit.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::Request;
use axum::response::Response;
use axum::serve::Listener;
use futures_util::future::{BoxFuture, Either};
use secrecy::ExposeSecret;
use sqlx::{PgPool, migrate::Migrator};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
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
    /// HTTP event loops, the first included.
    event_loops: usize,
}

/// A task of the service's own (a sweeper, a scheduler), given the shutdown token: it
/// should return soon after the token is cancelled, and is awaited before exit.
pub type Background =
    Box<dyn FnOnce(CancellationToken) -> futures_util::future::BoxFuture<'static, ()> + Send>;

/// Something put in front of a service's router, holding the router with the common
/// layers on: the gateway answers the paths it proxies itself, without routing them
/// through axum, and hands every other request to the router.
pub trait Front: Send + Sync + 'static {
    /// One request from the client at `peer`.
    fn call(
        &self,
        peer: SocketAddr,
        request: Request,
    ) -> BoxFuture<'static, Result<Response, Infallible>>;
}

/// Builds the front, given the router and the request context its routes run in.
pub type MakeFront = Box<dyn FnOnce(Router, http::RequestContext) -> Arc<dyn Front> + Send>;

/// What the listeners serve: the router, or a front before it. Cloned per connection,
/// so the front is shared rather than boxed anew.
#[derive(Clone)]
enum App {
    Router(Router),
    Front(Arc<dyn Front>),
}

/// One connection's requests, handed to hyper directly: no protocol sniffing, no
/// extension map made for the client's address, no service readiness to poll.
struct Connection {
    app: App,
    peer: SocketAddr,
}

impl hyper::service::Service<hyper::Request<hyper::body::Incoming>> for Connection {
    type Response = Response;
    type Error = Infallible;
    type Future = Either<
        <Router as tower::Service<Request>>::Future,
        BoxFuture<'static, Result<Response, Infallible>>,
    >;

    fn call(&self, request: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        let request = request.map(axum::body::Body::new);
        match &self.app {
            // A router is always ready; its clone is one reference count.
            App::Router(router) => Either::Left(tower::Service::call(&mut router.clone(), request)),
            App::Front(front) => Either::Right(front.call(self.peer, request)),
        }
    }
}

/// Serves HTTP/1.1 on every connection `listener` accepts until `stop` completes; then
/// stops accepting, lets each connection finish the request in hand, and returns when
/// all have closed.
async fn serve_http<L>(mut listener: L, app: App, stop: impl Future<Output = ()>)
where
    L: Listener<Io = TcpStream, Addr = SocketAddr>,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut stop = std::pin::pin!(stop);
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut stop => break,
        };
        no_delay(&io);
        let connection = hyper::server::conn::http1::Builder::new().serve_connection(
            hyper_util::rt::TokioIo::new(io),
            Connection {
                app: app.clone(),
                peer,
            },
        );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, %peer, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
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
    /// awaited on. More are each a single-threaded runtime on its own thread; the first
    /// loop accepts and hands connections to the others in turn, and a connection's
    /// requests stay on one thread, as in nginx's workers.
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
            // Built first: it refuses handlers that disagree with the subscription table,
            // and then nothing should have started.
            let handler_names: Vec<&'static str> = work.handlers.iter().map(|h| h.name()).collect();
            let consumer = if work.handlers.is_empty() {
                None
            } else {
                Some(Consumer::new(
                    infra.topology.clone(),
                    broker.clone(),
                    pool.clone(),
                    &settings.messaging,
                    work.handlers,
                )?)
            };
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
            workers.spawn(crate::messaging::inbox::run_purger(
                pool.clone(),
                Duration::from_secs(u64::from(settings.messaging.inbox_retention_days) * 86_400),
                Duration::from_secs(3_600),
                shutdown.child_token(),
            ));
            crate::metrics::register_handlers(infra.name, handler_names);
            workers.spawn(crate::metrics::watch(
                pool.clone(),
                infra.topology.service().to_owned(),
                shutdown.child_token(),
            ));
            if let Some(mut consumer) = consumer {
                queue_gauges = Some(crate::metrics::QueueGauges::new(
                    broker.clone(),
                    &infra.topology,
                ));
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

        let listener = TcpListener::bind((settings.http.host.as_str(), port))
            .await
            .with_context(|| format!("binding {}:{port}", settings.http.host))?;
        let address = listener.local_addr()?;
        let port = address.port();
        let router = match &infra.pool {
            Some(_) => router.merge(dead_letter_admin(&infra, address, &workers, &shutdown)?),
            None => router,
        };
        let context = http::RequestContext::new(infra.name, &settings.http);
        let router = http::with_context(
            http::probe_routes(infra.name, checks, queue_gauges).merge(router),
            context.clone(),
        );
        let app = match work.front {
            Some(front) => App::Front(front(router, context)),
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
            event_loops: work.event_loops.max(1),
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
        let app = self.app;
        let mut others = Vec::with_capacity(self.event_loops - 1);
        let mut loops = Vec::with_capacity(self.event_loops - 1);
        for i in 1..self.event_loops {
            let (handoff, connections) = mpsc::unbounded_channel();
            others.push(handoff);
            let app = app.clone();
            let stopped = self.shutdown.clone().cancelled_owned();
            let stopped_tick = self.shutdown.clone();
            let thread = std::thread::Builder::new()
                .name(format!("http-loop-{i}"))
                .spawn(move || -> anyhow::Result<()> {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    runtime.block_on(async move {
                        tokio::spawn(keep_timer_armed(stopped_tick));
                        serve_http(Handed(connections), app, stopped).await;
                    });
                    Ok(())
                })
                .context("starting an HTTP event loop")
                .inspect_err(|_| self.shutdown.cancel())?;
            loops.push(thread);
        }
        tokio::spawn(keep_timer_armed(self.shutdown.clone()));
        let listener = Spreading {
            listener: self.listener,
            others,
            next: 0,
        };
        serve_http(listener, app, stop).await;
        // The first loop stopped, on a signal or the token: stop the other loops and the
        // consumers too.
        self.shutdown.cancel();
        let mut served = Ok(());
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

/// A connection the first event loop hands to another.
type Handoff = (std::net::TcpStream, SocketAddr);

/// The first event loop's listener: it accepts every connection and keeps every n-th,
/// handing the others in turn to the other loops. With a socket per loop
/// (`SO_REUSEPORT`) the kernel spread connections by a hash, and a few long-lived ones
/// (a load balancer's, a benchmark's) could land 63/37 on two loops, the busier one
/// then queueing requests while the other had time to spare.
struct Spreading {
    listener: TcpListener,
    others: Vec<mpsc::UnboundedSender<Handoff>>,
    next: usize,
}

impl Listener for Spreading {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            let (io, address) = Listener::accept(&mut self.listener).await;
            let turn = self.next;
            self.next = (turn + 1) % (self.others.len() + 1);
            let Some(other) = turn.checked_sub(1).and_then(|i| self.others.get(i)) else {
                return (io, address);
            };
            match io.into_std() {
                Ok(stream) => match other.send((stream, address)) {
                    Ok(()) => {}
                    // That loop has stopped: this one serves the connection.
                    Err(mpsc::error::SendError((stream, address))) => {
                        match TcpStream::from_std(stream) {
                            Ok(io) => return (io, address),
                            Err(error) => tracing::warn!(%error, "taking a connection back"),
                        }
                    }
                },
                Err(error) => tracing::warn!(%error, "handing a connection to another event loop"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// Another event loop's listener: the connections the first loop hands over.
struct Handed(mpsc::UnboundedReceiver<Handoff>);

impl Listener for Handed {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            let Some((stream, address)) = self.0.recv().await else {
                // The first loop has stopped accepting; shutdown ends this one.
                return std::future::pending().await;
            };
            // Registers the connection with this loop's reactor.
            match TcpStream::from_std(stream) {
                Ok(io) => return (io, address),
                Err(error) => tracing::warn!(%error, "taking over a connection"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Err(std::io::Error::other("a loop of handed-over connections"))
    }
}

/// Answers go out as soon as they are written, as with nginx's `tcp_nodelay`.
fn no_delay(io: &TcpStream) {
    if let Err(error) = io.set_nodelay(true) {
        tracing::debug!(%error, "TCP_NODELAY on an accepted connection");
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

/// The body of every service's `main`: settings, the runtime they ask for, logs, build,
/// serve. One worker thread gets a single-threaded runtime: no thread wakes another to
/// share work, which on a machine shared by several services costs more than it gains.
pub fn main<A, F, Fut>(build: F) -> anyhow::Result<()>
where
    F: FnOnce(Settings) -> Fut,
    Fut: Future<Output = anyhow::Result<A>>,
    A: Into<Service>,
{
    let settings = Settings::load()?;
    let runtime = match settings.runtime.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        n => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if n > 1 {
                builder.worker_threads(n);
            }
            builder.enable_all().build()?
        }
    };
    runtime.block_on(serve(settings, build))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_are_handed_to_the_other_loops_in_turn_and_kept_once_a_loop_stops() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (handoff, mut handed) = mpsc::unbounded_channel();
        let mut spreading = Spreading {
            listener,
            others: vec![handoff],
            next: 0,
        };
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(address).await.expect("connect"));
        }
        let clients: Vec<SocketAddr> = clients
            .iter()
            .map(|c| c.local_addr().expect("addr"))
            .collect();
        let mut kept = Vec::new();
        for _ in 0..2 {
            kept.push(Listener::accept(&mut spreading).await.1);
        }
        let mut given = Vec::new();
        while let Ok((_, peer)) = handed.try_recv() {
            given.push(peer);
        }
        assert_eq!(kept, [clients[0], clients[2]], "every other one kept");
        assert_eq!(given, [clients[1]], "the others handed over");

        drop(handed);
        let late = TcpStream::connect(address).await.expect("connect");
        let late_two = TcpStream::connect(address).await.expect("connect");
        // A connection lost on the way would leave the accept waiting: fail instead.
        let within = Duration::from_secs(10);
        let first = tokio::time::timeout(within, Listener::accept(&mut spreading))
            .await
            .expect("the first late connection")
            .1;
        let second = tokio::time::timeout(within, Listener::accept(&mut spreading))
            .await
            .expect("the second late connection")
            .1;
        assert_eq!(
            [first, second],
            [
                late.local_addr().expect("addr"),
                late_two.local_addr().expect("addr")
            ],
            "with the other loop gone, this one serves them all"
        );
    }
}
