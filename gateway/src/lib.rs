//! gateway: The edge of the system: the only entry point for API clients (auth, routing and rate limits arrive with the identity issue).
//!
//! Built so far: the service shell (health, readiness, metrics, graceful shutdown).

use axum::Router;
use shared::Settings;
use shared::service::{Infra, Needs, Service, Work};

/// Names the service's database (`<ns>_gateway`).
pub const SERVICE: &str = "gateway";

pub struct Application(Service);

impl Application {
    /// Connects to what the service needs, binds its port and starts its background work.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let needs = Needs {
            database: None,
            redis: true,
        };
        let infra = Infra::connect(SERVICE, &settings, needs).await?;
        let service =
            Service::start(infra, settings.gateway.port, Router::new(), Work::default()).await?;
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
