//! Database bootstrap: each service owns `<ns>_<service>`, created if missing, with the
//! kernel's tables and the service's own migrations applied at start.

use std::time::Duration;

use anyhow::Context as _;
use sqlx::{Connection as _, PgConnection, PgPool, migrate::Migrator, postgres::PgPoolOptions};

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

pub async fn pool(settings: &PostgresSettings, database: &str) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
        .connect(&settings.database_url(database))
        .await
        .with_context(|| format!("connecting to database {database}"))
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
