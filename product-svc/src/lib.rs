//! product-svc: the catalog. Products, the category tree, search and keyset pagination,
//! availability and images kept from inventory-svc's and file-svc's events, reviews by
//! customers who bought the product, and a Redis read-aside cache in front of it all.

mod cache;
mod domain;
mod events;
mod flight;
mod routes;
mod store;

use std::sync::Arc;

use axum::extract::FromRef;
use shared::Settings;
use shared::auth::Verifier;
use shared::messaging::{Handler, Outbox};
use shared::service::{Infra, Needs, Service, Work};
use sqlx::PgPool;

pub use store::{ProductPage, ProductView};

/// Names the service's database (`<ns>_product`), queues (`<ns>.product`) and metrics.
pub const SERVICE: &str = "product";

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Clone)]
pub struct AppState {
    pool: PgPool,
    outbox: Outbox,
    verifier: Verifier,
    cache: cache::Cache,
}

impl FromRef<AppState> for Verifier {
    fn from_ref(state: &AppState) -> Self {
        state.verifier.clone()
    }
}

pub struct Application(Service);

impl Application {
    /// Connects, migrates, binds its port and starts its consumer (stock, images,
    /// purchases) and the cache's retry of undelivered invalidations.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let needs = Needs {
            database: Some(Some(&MIGRATIONS)),
            redis: true,
        };
        let infra = Infra::connect(SERVICE, &settings, needs).await?;
        let cache = cache::Cache::new(&settings, infra.redis.clone());
        let state = AppState {
            pool: infra.pool()?.clone(),
            outbox: infra.outbox.clone(),
            verifier: Verifier::remote(&settings),
            cache: cache.clone(),
        };
        let handlers: Vec<Arc<dyn Handler>> = vec![
            Arc::new(events::Stock),
            Arc::new(events::Images),
            Arc::new(events::Purchases),
        ];
        let retries = cache.clone();
        let work = Work {
            handlers,
            observer: Some(Arc::new(events::InvalidateAfterCommit(cache))),
            background: vec![Box::new(move |stop| Box::pin(retries.run_retries(stop)))],
            ..Work::default()
        };
        let service =
            Service::start(infra, settings.product.port, routes::router(state), work).await?;
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
