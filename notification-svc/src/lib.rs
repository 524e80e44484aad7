//! notification-svc: email to customers and sellers, each sent once, with a log of what
//! was sent.
//!
//! It keeps what later mails need from other services' events (contacts from
//! `user.registered`, product names and sellers from `product.*`, orders as placed from
//! `order.created`) and mails on `user.registered` (welcome), `order.paid` (receipt to the
//! customer, a notice to each seller with their lines), `order.cancelled` and
//! `review.created`. Mail goes by SMTP when `smtp.url` is set, else into .eml files.
//! Admins list the mails sent at `GET /api/v1/admin/notifications`.

pub mod domain;
mod handlers;
pub mod mail;
pub mod notify;
mod routes;
pub mod store;

use std::sync::Arc;

use axum::extract::FromRef;
use shared::Settings;
use shared::auth::Verifier;
use shared::config::PostgresSettings;
use shared::service::{Infra, Needs, Service, Work};
use sqlx::PgPool;

pub use routes::{ApiDoc, NotificationPage, NotificationView};

/// Names the service's database (`<ns>_notification`) and queues (`<ns>.notification`).
pub const SERVICE: &str = "notification";

pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connections of the pool that records sent mails (see [`notify::Notifier`]).
const LOG_CONNECTIONS: u32 = 2;

#[derive(Clone)]
pub struct AppState {
    pool: PgPool,
    verifier: Verifier,
}

impl FromRef<AppState> for Verifier {
    fn from_ref(state: &AppState) -> Self {
        state.verifier.clone()
    }
}

pub struct Application(Service);

impl Application {
    /// Connects and migrates, checks the mail settings, starts the consumer and the
    /// relay, binds its port.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let mailer = mail::Mailer::from_settings(&settings.smtp)?;
        let needs = Needs {
            database: Some(Some(&MIGRATIONS)),
            redis: false,
        };
        let infra = Infra::connect(SERVICE, &settings, needs).await?;
        let pool = infra.pool()?.clone();
        let log = shared::db::pool(
            &PostgresSettings {
                max_connections: LOG_CONNECTIONS,
                ..settings.postgres.clone()
            },
            &shared::db::database_name(&settings, SERVICE),
        )
        .await?;
        let notifier = Arc::new(notify::Notifier {
            mailer,
            templates: mail::Templates::new(settings.smtp.templates_dir.clone()),
            log: shared::db::Warm::new(log, LOG_CONNECTIONS as usize),
        });
        let state = AppState {
            pool,
            verifier: Verifier::remote(&settings),
        };
        let work = Work {
            handlers: handlers::all(notifier),
            ..Work::default()
        };
        let service = Service::start(
            infra,
            settings.notification.port,
            routes::router(state),
            work,
        )
        .await?;
        Ok(Self(service))
    }

    pub fn port(&self) -> u16 {
        self.0.port()
    }

    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.0.run_until_stopped().await
    }
}

impl From<Application> for Service {
    fn from(app: Application) -> Self {
        app.0
    }
}
