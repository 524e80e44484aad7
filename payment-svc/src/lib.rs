//! payment-svc: authorize, capture, void and refund the payment of each order
//! (DESIGN.md §5, docs/SAGA.md).
//!
//! `order.created` authorizes (a PaymentIntent with manual capture); `inventory.reserved`
//! together with an authorization captures; `inventory.rejected`, `inventory.released`
//! and `order.cancelled` void a hold, or refund a capture when the stock is gone for
//! good. With `COMMERCE__STRIPE__SECRET_KEY` the provider is Stripe (async-stripe),
//! else a simulated one with Stripe's test payment methods. Stripe's webhook is served
//! at `POST /api/v1/payments/webhook`.

mod handlers;
pub mod ledger;
pub mod payments;
pub mod provider;
mod routes;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRef;
use secrecy::{ExposeSecret as _, SecretString};
use shared::Settings;
use shared::auth::Verifier;
use shared::service::{Infra, Needs, Service, Work};
use sqlx::PgPool;

pub use routes::ApiDoc;

use crate::payments::Payments;
use crate::provider::{PaymentProvider, Simulated, Stripe};

/// Names the service's database (`<ns>_payment`) and queues (`<ns>.payment`).
pub const SERVICE: &str = "payment";

pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connections of the pool that records provider calls outside handler transactions.
const LEDGER_CONNECTIONS: u32 = 2;

#[derive(Clone)]
pub struct AppState {
    pool: PgPool,
    verifier: Verifier,
    webhook_secret: Option<SecretString>,
}

impl FromRef<AppState> for Verifier {
    fn from_ref(state: &AppState) -> Self {
        state.verifier.clone()
    }
}

/// Stripe when a secret key is configured, else the simulated provider.
pub fn provider(settings: &Settings) -> anyhow::Result<Arc<dyn PaymentProvider>> {
    let timeout = Duration::from_millis(settings.payments.provider_timeout_ms.max(1));
    Ok(match &settings.stripe.secret_key {
        Some(key) => Arc::new(Stripe::new(
            key.expose_secret(),
            settings.stripe.api_base.as_deref(),
            timeout,
        )?),
        None => Arc::new(Simulated),
    })
}

pub struct Application(Service);

impl Application {
    /// Connects and migrates, starts the consumer and the relay, binds its port.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let needs = Needs {
            database: Some(Some(&MIGRATIONS)),
            redis: false,
        };
        let provider = provider(&settings)?;
        tracing::info!(provider = provider.name(), "payment provider");
        // One event may take two calls (authorize then capture or void) within the
        // consumer's time limit.
        if settings.payments.provider_timeout_ms.saturating_mul(2)
            >= settings.messaging.handler_timeout_ms
        {
            tracing::warn!(
                provider_timeout_ms = settings.payments.provider_timeout_ms,
                handler_timeout_ms = settings.messaging.handler_timeout_ms,
                "provider calls may outlast the handler: keep two of them within its timeout"
            );
        }
        let infra = Infra::connect(SERVICE, &settings, needs).await?;
        let pool = infra.pool()?.clone();
        // Its own pool: a handler holding a connection of the main pool waits on it, so
        // taking the main pool here could leave every connection waiting for another.
        let ledger = shared::db::pool(
            &shared::config::PostgresSettings {
                max_connections: LEDGER_CONNECTIONS,
                ..settings.postgres.clone()
            },
            &shared::db::database_name(&settings, SERVICE),
        )
        .await?;
        let payments = Payments {
            provider,
            outbox: infra.outbox.clone(),
            pool: ledger,
            timeout: Duration::from_millis(settings.payments.provider_timeout_ms.max(1)),
        };
        let state = AppState {
            pool,
            verifier: Verifier::remote(&settings),
            webhook_secret: settings.stripe.webhook_secret.clone(),
        };
        let work = Work {
            handlers: handlers::all(&payments),
            ..Work::default()
        };
        let service =
            Service::start(infra, settings.payment.port, routes::router(state), work).await?;
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
