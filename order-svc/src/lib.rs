//! order-svc: orders, their status through the saga, and idempotent placement.
//!
//! A replica of the catalog (from product events) prices each order, so placing one
//! calls no other service. `POST /orders` writes the order `pending` and `order.created`
//! in one transaction; the saga's events (inventory.*, payment.*) are kept in the order's
//! history and decide whether it ends `paid` or `cancelled` (docs/SAGA.md).

pub mod domain;
mod handlers;
pub mod orders;
mod pending;
pub mod products;
mod routes;

use axum::extract::FromRef;
use shared::Settings;
use shared::auth::Verifier;
use shared::messaging::Outbox;
use shared::service::{Infra, Needs, Service, Work};
use sqlx::PgPool;

pub use routes::{ApiDoc, IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED};

/// Names the service's database (`<ns>_order`) and queues (`<ns>.order`).
pub const SERVICE: &str = "order";

pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Clone)]
pub struct AppState {
    pool: PgPool,
    outbox: Outbox,
    verifier: Verifier,
}

impl FromRef<AppState> for Verifier {
    fn from_ref(state: &AppState) -> Self {
        state.verifier.clone()
    }
}

pub struct Application(Service);

impl Application {
    /// Connects and migrates, starts the consumer and the relay, binds its port.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let needs = Needs {
            database: Some(Some(&MIGRATIONS)),
            redis: false,
        };
        let infra = Infra::connect(SERVICE, &settings, needs).await?;
        let state = AppState {
            pool: infra.pool()?.clone(),
            outbox: infra.outbox.clone(),
            verifier: Verifier::remote(&settings),
        };
        let work = Work {
            handlers: handlers::all(&infra.outbox),
            background: vec![pending::watcher(state.pool.clone())],
            ..Work::default()
        };
        let service =
            Service::start(infra, settings.order.port, routes::router(state), work).await?;
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
