//! user-svc: accounts, passwords, token issuing, refresh tokens and roles.

mod domain;
mod passwords;
mod routes;
mod tokens;

use std::sync::Arc;

use anyhow::Context as _;
use axum::extract::FromRef;
use secrecy::ExposeSecret as _;
use shared::Settings;
use shared::auth::{Role, SigningKeys, Verifier};
use shared::messaging::Outbox;
use shared::service::{Infra, Needs, Service, Work};
use sqlx::PgPool;
use uuid::Uuid;

pub use routes::{AuthResponse, UserView};

/// Names the service's database (`<ns>_user`) and queues (`<ns>.user`).
pub const SERVICE: &str = "user";

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Clone)]
pub struct AppState {
    pool: PgPool,
    outbox: Outbox,
    passwords: passwords::Passwords,
    tokens: tokens::Tokens,
    verifier: Verifier,
}

impl FromRef<AppState> for Verifier {
    fn from_ref(state: &AppState) -> Self {
        state.verifier.clone()
    }
}

pub struct Application(Service);

impl Application {
    /// Connects, migrates, loads (or makes) the signing keys, ensures the first admin,
    /// binds its port.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let needs = Needs {
            database: Some(Some(&MIGRATIONS)),
            redis: false,
        };
        let infra = Infra::connect(SERVICE, &settings, needs).await?;
        let keys = Arc::new(SigningKeys::open(&settings.auth.keys_dir).with_context(|| {
            format!(
                "opening the signing keys in {} (COMMERCE__AUTH__KEYS_DIR)",
                settings.auth.keys_dir.display()
            )
        })?);
        let state = AppState {
            pool: infra.pool()?.clone(),
            outbox: infra.outbox.clone(),
            passwords: passwords::Passwords::new()?,
            tokens: tokens::Tokens::new(keys.clone(), Arc::new(settings.auth.clone())),
            verifier: Verifier::local(keys, &settings.auth),
        };
        ensure_admin(&state, &settings).await?;
        let service = Service::start(
            infra,
            settings.user.port,
            routes::router(state),
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

/// Creates the administrator named by `COMMERCE__ADMIN__EMAIL`/`PASSWORD` if absent. An
/// existing account is left as it is, and never promoted: someone could have registered
/// that address first.
async fn ensure_admin(state: &AppState, settings: &Settings) -> anyhow::Result<()> {
    let (Some(email), Some(password)) = (&settings.admin.email, &settings.admin.password) else {
        return Ok(());
    };
    let email =
        domain::Email::parse(email).map_err(|e| anyhow::anyhow!("COMMERCE__ADMIN__EMAIL {e}"))?;
    let name = domain::Name::parse("Administrator").map_err(anyhow::Error::msg)?;
    let roles: Option<Vec<String>> = sqlx::query_scalar("SELECT roles FROM users WHERE email = $1")
        .bind(email.as_str())
        .fetch_optional(&state.pool)
        .await?;
    match roles {
        Some(roles) if roles.iter().any(|r| r == Role::Admin.as_str()) => Ok(()),
        Some(_) => {
            tracing::error!(
                email = email.as_str(),
                "COMMERCE__ADMIN__EMAIL belongs to a non-admin account; it is not promoted"
            );
            Ok(())
        }
        None => {
            let password =
                domain::Password::parse(password.expose_secret(), email.as_str(), name.as_str())
                    .map_err(|e| anyhow::anyhow!("COMMERCE__ADMIN__PASSWORD {e}"))?;
            let hash = state.passwords.hash(password.expose()).await?;
            sqlx::query(
                "INSERT INTO users (id, email, name, password_hash, roles) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (email) DO NOTHING",
            )
            .bind(Uuid::now_v7())
            .bind(email.as_str())
            .bind(name.as_str())
            .bind(hash)
            .bind(Role::to_strings(&[Role::Admin]))
            .execute(&state.pool)
            .await?;
            tracing::info!(email = email.as_str(), "administrator created");
            Ok(())
        }
    }
}
