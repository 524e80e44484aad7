//! inventory-svc: stock, reservations for the order saga, and their commit or release.
//!
//! Stock rows come from `product.created`; sellers (of their own products) and admins
//! read and adjust them. `order.created` reserves all lines or none; `payment.completed`
//! commits; `payment.failed`, `order.cancelled` and the expiry sweeper release. Every
//! change is in the ledger and published as `inventory.stock_changed`.

pub mod domain;
mod handlers;
pub mod reservations;
mod routes;
pub mod stock;
mod sweeper;

use std::time::Duration;

use axum::extract::FromRef;
use shared::Settings;
use shared::auth::Verifier;
use shared::messaging::Outbox;
use shared::service::{Background, Infra, Needs, Service, Work};
use sqlx::PgPool;

pub use routes::{ApiDoc, StockView};

/// Names the service's database (`<ns>_inventory`) and queues (`<ns>.inventory`).
pub const SERVICE: &str = "inventory";

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
    /// Connects and migrates, starts the consumer, the relay and the expiry sweeper,
    /// binds its port.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let needs = Needs {
            database: Some(Some(&MIGRATIONS)),
            redis: false,
        };
        let infra = Infra::connect(SERVICE, &settings, needs).await?;
        let pool = infra.pool()?.clone();
        let state = AppState {
            pool: pool.clone(),
            outbox: infra.outbox.clone(),
            verifier: Verifier::remote(&settings),
        };
        let sweeper = sweeper::Sweeper {
            pool,
            outbox: infra.outbox.clone(),
            interval: Duration::from_millis(settings.reservations.sweep_interval_ms.max(1)),
        };
        let sweep: Background = Box::new(move |shutdown| Box::pin(sweeper.run(shutdown)));
        let work = Work {
            handlers: handlers::all(
                &infra.outbox,
                Duration::from_secs(settings.reservations.ttl_secs),
            ),
            background: vec![sweep],
            ..Work::default()
        };
        let service =
            Service::start(infra, settings.inventory.port, routes::router(state), work).await?;
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
