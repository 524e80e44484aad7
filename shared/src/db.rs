//! Database bootstrap: each service owns `<ns>_<service>`, created if missing, with the
//! kernel's tables and the service's own migrations applied at start.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Once, Weak};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sqlx::{
    Connection as _, PgConnection, PgPool, Postgres, migrate::Migrator, pool::PoolConnection,
    postgres::PgPoolOptions,
};

use crate::config::{PostgresSettings, Settings};

/// The kernel's tables (outbox, inbox, dead letters); versions below 1000 are reserved
/// for them, services use timestamps.
static KERNEL: Migrator = sqlx::migrate!("./migrations");

/// Postgres "duplicate_database": someone else created it first.
const DUPLICATE_DATABASE: &str = "42P04";

pub fn database_name(settings: &Settings, service: &str) -> String {
    format!("{}_{}", settings.namespace, service)
}

async fn maintenance_connection(settings: &PostgresSettings) -> anyhow::Result<PgConnection> {
    let url = settings.database_url("postgres");
    PgConnection::connect(&url)
        .await
        .context("connecting to PostgreSQL (COMMERCE__POSTGRES__URL)")
}

/// Creates the database if it does not exist.
pub async fn ensure_database(settings: &PostgresSettings, name: &str) -> anyhow::Result<()> {
    let mut conn = maintenance_connection(settings).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&mut conn)
            .await?;
    if !exists {
        // Names are checked by Settings::validate: [a-z0-9_] only.
        let create = format!(r#"CREATE DATABASE "{name}""#);
        match sqlx::query(sqlx::AssertSqlSafe(create))
            .execute(&mut conn)
            .await
        {
            Ok(_) => tracing::info!(database = name, "created database"),
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(DUPLICATE_DATABASE) => {}
            Err(e) => return Err(e).with_context(|| format!("creating database {name}")),
        }
    }
    conn.close().await?;
    Ok(())
}

/// Drops the database, closing other sessions on it (tests and teardown).
pub async fn drop_database(settings: &PostgresSettings, name: &str) -> anyhow::Result<()> {
    let mut conn = maintenance_connection(settings).await?;
    let drop = format!(r#"DROP DATABASE IF EXISTS "{name}" WITH (FORCE)"#);
    sqlx::query(sqlx::AssertSqlSafe(drop))
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    Ok(())
}

/// A connection idle longer than this is pinged before it is handed out. One back from
/// use moments ago is not: under load that ping was a round trip to the server for every
/// checkout, and a connection that broke since fails its first statement, which callers
/// already treat as transient (retried).
const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

pub async fn pool(settings: &PostgresSettings, database: &str) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > PING_AFTER_IDLE {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .connect(&settings.database_url(database))
        .await
        .with_context(|| format!("connecting to database {database}"))
}

/// Connections a busy loop (a consumer, a relay) keeps between uses instead of handing
/// them back: the pool pings every connection it takes back, a round trip to the server
/// per message. At most `keep` are kept, none unused for longer than [`PING_AFTER_IDLE`],
/// so the pool's other users are not starved and a connection that may have broken while
/// idle goes back through the pool's check. Nor more than half the pool: a task that
/// found none kept waits on the pool, and is served only by connections the others give
/// back beyond what is kept.
#[derive(Clone)]
pub struct Warm {
    inner: Arc<WarmInner>,
}

struct WarmInner {
    pool: PgPool,
    keep: usize,
    /// Oldest first.
    idle: Mutex<VecDeque<(PoolConnection<Postgres>, Instant)>>,
    trimming: Once,
}

impl Warm {
    pub fn new(pool: PgPool, keep: usize) -> Self {
        let keep = keep.min(pool.options().get_max_connections() as usize / 2);
        Self {
            inner: Arc::new(WarmInner {
                pool,
                keep,
                idle: Mutex::new(VecDeque::new()),
                trimming: Once::new(),
            }),
        }
    }

    /// The connection given back last, if still warm; else one from the pool.
    pub async fn take(&self) -> Result<PoolConnection<Postgres>, sqlx::Error> {
        let warm = lock(&self.inner.idle).pop_back();
        match warm {
            Some((conn, since)) if since.elapsed() <= PING_AFTER_IDLE => Ok(conn),
            stale => {
                drop(stale);
                self.inner.pool.acquire().await
            }
        }
    }

    /// Keeps a connection whose last use succeeded, for the next [`Warm::take`]. A
    /// connection that failed is dropped instead, so the pool checks it.
    pub fn give_back(&self, conn: PoolConnection<Postgres>) {
        self.start_trimming();
        let mut idle = lock(&self.inner.idle);
        if idle.len() < self.inner.keep {
            idle.push_back((conn, Instant::now()));
        }
    }

    /// Connections kept now.
    pub fn kept(&self) -> usize {
        lock(&self.inner.idle).len()
    }

    /// Returns the connections unused for too long to the pool, until the last handle
    /// is dropped.
    fn start_trimming(&self) {
        self.inner.trimming.call_once(|| {
            let weak: Weak<WarmInner> = Arc::downgrade(&self.inner);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(PING_AFTER_IDLE);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(inner) = weak.upgrade() else { break };
                    let stale: Vec<_> = {
                        let mut idle = lock(&inner.idle);
                        let fresh = idle
                            .iter()
                            .position(|(_, since)| since.elapsed() <= PING_AFTER_IDLE)
                            .unwrap_or(idle.len());
                        idle.drain(..fresh).collect()
                    };
                    drop(stale);
                }
            });
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing here can be left half-updated by a panic: take the data as it is.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Applies the kernel's migrations and then the service's own, in version order.
pub async fn migrate(pool: &PgPool, service: Option<&Migrator>) -> anyhow::Result<()> {
    let mut migrations: Vec<_> = KERNEL.iter().cloned().collect();
    if let Some(service) = service {
        anyhow::ensure!(
            service.iter().all(|m| m.version >= 1000),
            "service migration versions must be >= 1000 (use timestamps)"
        );
        migrations.extend(service.iter().cloned());
    }
    Migrator::with_migrations(migrations)
        .run(pool)
        .await
        .context("running migrations")
}

/// Creates the service's database if needed, connects and migrates it.
pub async fn bootstrap(
    settings: &Settings,
    service: &str,
    migrations: Option<&Migrator>,
) -> anyhow::Result<PgPool> {
    let name = database_name(settings, service);
    ensure_database(&settings.postgres, &name).await?;
    let pool = pool(&settings.postgres, &name).await?;
    migrate(&pool, migrations).await?;
    Ok(pool)
}
