//! inventory-svc: Stock, reservations, and their commit or release.
//!
//! Built so far: the service shell (health, readiness, metrics, graceful shutdown, outbox relay).

use axum::Router;
use shared::Settings;
use shared::service::{Infra, Needs, Service, Work};

/// Names the service's database (`<ns>_inventory`) and queues (`<ns>.inventory`).
pub const SERVICE: &str = "inventory";

pub struct Application(Service);

impl Application {
    /// Connects to what the service needs, binds its port and starts its background work.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let needs = Needs {
            database: Some(None),
            redis: false,
        };
        let infra = Infra::connect(SERVICE, &settings, needs).await?;
        let service = Service::start(
            infra,
            settings.inventory.port,
            Router::new(),
            Work::default(),
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
