//! Layered settings: built-in defaults, an optional TOML file, then `COMMERCE__…`
//! environment variables (`__` between levels), e.g. `COMMERCE__ORDER__PORT=9000`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// Every setting of every service. Services read the parts they need.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Prefixes every database, exchange, queue and Redis key.
    pub namespace: String,
    pub environment: Environment,
    pub log: LogSettings,
    pub runtime: RuntimeSettings,
    pub http: HttpSettings,
    pub postgres: PostgresSettings,
    pub amqp: AmqpSettings,
    pub redis: RedisSettings,
    pub messaging: MessagingSettings,
    pub auth: AuthSettings,
    pub admin: AdminSettings,
    pub files: FileSettings,
    pub reservations: ReservationSettings,
    pub cache: CacheSettings,
    pub stripe: StripeSettings,
    pub smtp: SmtpSettings,
    pub payments: PaymentSettings,
    pub dead_letters: DeadLetterSettings,
    pub gateway: GatewaySettings,
    pub user: ServiceSettings,
    pub product: ServiceSettings,
    pub order: ServiceSettings,
    pub payment: ServiceSettings,
    pub inventory: ServiceSettings,
    pub notification: ServiceSettings,
    pub file: ServiceSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            namespace: "commerce".into(),
            environment: Environment::Production,
            log: LogSettings::default(),
            runtime: RuntimeSettings::default(),
            http: HttpSettings::default(),
            postgres: PostgresSettings::default(),
            amqp: AmqpSettings::default(),
            redis: RedisSettings::default(),
            messaging: MessagingSettings::default(),
            auth: AuthSettings::default(),
            admin: AdminSettings::default(),
            files: FileSettings::default(),
            reservations: ReservationSettings::default(),
            cache: CacheSettings::default(),
            stripe: StripeSettings::default(),
            smtp: SmtpSettings::default(),
            payments: PaymentSettings::default(),
            dead_letters: DeadLetterSettings::default(),
            gateway: GatewaySettings::default(),
            user: ServiceSettings::port(8081),
            product: ServiceSettings::port(8082),
            order: ServiceSettings::port(8083),
            payment: ServiceSettings::port(8084),
            inventory: ServiceSettings::port(8085),
            notification: ServiceSettings::port(8086),
            file: ServiceSettings::port(8087),
        }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Development,
    Production,
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON in production, human-readable text in development.
    Auto,
    Json,
    Text,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct LogSettings {
    pub format: LogFormat,
    /// An `EnvFilter` directive; `RUST_LOG` wins when set.
    pub filter: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Auto,
            filter: "info,sqlx=warn,lapin=warn".into(),
        }
    }
}

/// The async runtime a service runs on.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RuntimeSettings {
    /// Worker threads; 0: one per core; 1: a single-threaded runtime.
    pub worker_threads: usize,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct HttpSettings {
    /// Address every service binds to.
    pub host: String,
    pub request_timeout_ms: u64,
    pub body_limit_bytes: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            request_timeout_ms: 30_000,
            body_limit_bytes: 1024 * 1024,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct ServiceSettings {
    /// Port the service listens on (0: any free port).
    pub port: u16,
    /// Where other processes reach it; default `http://127.0.0.1:<port>`.
    pub url: Option<String>,
}

impl ServiceSettings {
    fn port(port: u16) -> Self {
        Self { port, url: None }
    }

    /// Base URL of the service, without a trailing slash.
    pub fn base_url(&self) -> String {
        self.url
            .clone()
            .unwrap_or_else(|| format!("http://127.0.0.1:{}", self.port))
            .trim_end_matches('/')
            .to_owned()
    }
}

impl Default for ServiceSettings {
    fn default() -> Self {
        Self::port(0)
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct AuthSettings {
    pub issuer: String,
    pub audience: String,
    /// Ed25519 signing keys (user-svc); the first one is made here if there is none.
    pub keys_dir: PathBuf,
    /// Where verifiers fetch public keys; default: user-svc's `/.well-known/jwks.json`.
    pub jwks_url: Option<String>,
    pub access_token_ttl_secs: u64,
    pub refresh_token_ttl_secs: u64,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            issuer: "commerce".into(),
            audience: "commerce-api".into(),
            keys_dir: PathBuf::from("./var/keys"),
            jwks_url: None,
            access_token_ttl_secs: 15 * 60,
            refresh_token_ttl_secs: 30 * 24 * 60 * 60,
        }
    }
}

/// The first administrator, created by user-svc at start if absent.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct AdminSettings {
    pub email: Option<String>,
    pub password: Option<SecretString>,
}

/// Image uploads (file-svc).
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct FileSettings {
    /// Where images and thumbnails are stored.
    pub dir: PathBuf,
    /// Largest upload accepted.
    pub max_bytes: u64,
    /// Largest image accepted, in pixels (width × height): bigger is refused before
    /// decoding, so a small file declaring a huge image cannot exhaust memory.
    pub max_pixels: u64,
    /// Longest side of a thumbnail.
    pub thumbnail_size: u32,
}

impl Default for FileSettings {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("./var/files"),
            max_bytes: 10 * 1024 * 1024,
            max_pixels: 40_000_000,
            thumbnail_size: 256,
        }
    }
}

/// Stock reservations (inventory-svc).
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct ReservationSettings {
    /// A reservation not committed within this time is released.
    pub ttl_secs: u64,
    /// How often the sweeper looks for expired reservations.
    pub sweep_interval_ms: u64,
}

impl Default for ReservationSettings {
    fn default() -> Self {
        Self {
            ttl_secs: 15 * 60,
            sweep_interval_ms: 1_000,
        }
    }
}

/// The catalog's read-aside cache in Redis (product-svc).
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct CacheSettings {
    pub enabled: bool,
    /// Product detail entries live this long unless a change removes them first.
    pub product_ttl_secs: u64,
    /// List pages live this long unless a change removes them first.
    pub list_ttl_secs: u64,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            product_ttl_secs: 300,
            list_ttl_secs: 60,
        }
    }
}

/// Stripe (payment-svc). Without a secret key the simulated provider is used.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct StripeSettings {
    pub secret_key: Option<SecretString>,
    /// Base URL of the Stripe API (e.g. a local fake in tests); unset: Stripe's own.
    pub api_base: Option<String>,
    /// Verifies the signature of webhook calls; unset: the webhook route refuses them.
    pub webhook_secret: Option<SecretString>,
}

/// Outgoing mail (notification-svc).
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct SmtpSettings {
    /// `smtp://`, `smtps://` or `smtp://…?tls=required` URL with optional credentials;
    /// unset: each mail is written as an .eml file under `dir`.
    pub url: Option<SecretString>,
    /// The From address of every mail.
    pub from: String,
    /// Where .eml files go when no SMTP URL is set.
    pub dir: PathBuf,
    /// When set, mail templates are read from here (one file per template), so wording
    /// changes without a rebuild; unset: the built-in ones.
    pub templates_dir: Option<PathBuf>,
}

impl Default for SmtpSettings {
    fn default() -> Self {
        Self {
            url: None,
            from: "Commerce <no-reply@commerce.localhost>".into(),
            dir: PathBuf::from("./var/mail"),
            templates_dir: None,
        }
    }
}

/// Payment timing (payment-svc).
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct PaymentSettings {
    /// Timeout of one call to the payment provider; a timeout is retried like any
    /// transient failure, with the same idempotency key.
    pub provider_timeout_ms: u64,
}

impl Default for PaymentSettings {
    fn default() -> Self {
        Self {
            provider_timeout_ms: 10_000,
        }
    }
}

/// Dead-letter administration (every service with a database).
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct DeadLetterSettings {
    /// A discarded dead letter is kept (shown as discarded) this long, then purged.
    pub retention_days: u32,
    /// Replayed messages sent per second at most, per service instance, so replaying a
    /// large group does not flood the service.
    pub replay_rate_per_sec: f64,
}

impl Default for DeadLetterSettings {
    fn default() -> Self {
        Self {
            retention_days: 30,
            replay_rate_per_sec: 50.0,
        }
    }
}

/// One rate-limit policy: a sustained rate with a burst allowance (GCRA).
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub struct RateLimit {
    pub per_minute: u32,
    pub burst: u32,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct RateLimitSettings {
    pub enabled: bool,
    /// Calls without a token, per client address.
    pub anonymous: RateLimit,
    /// Calls with a valid token, per user.
    pub user: RateLimit,
    /// Login and register, per client address (and login per email too).
    pub auth: RateLimit,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            anonymous: RateLimit {
                per_minute: 600,
                burst: 100,
            },
            user: RateLimit {
                per_minute: 1200,
                burst: 200,
            },
            auth: RateLimit {
                per_minute: 20,
                burst: 10,
            },
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct GatewaySettings {
    pub port: u16,
    pub url: Option<String>,
    /// A service answering slower than this gets the client a 504.
    pub upstream_timeout_ms: u64,
    /// Request bodies for image uploads; other requests use `http.body_limit_bytes`.
    pub upload_limit_bytes: usize,
    /// Origins allowed by CORS; empty: no cross-origin access.
    pub cors_origins: Vec<String>,
    pub rate_limit: RateLimitSettings,
    /// Trust `X-Forwarded-For` from these peer addresses (a load balancer in front).
    pub trusted_proxies: Vec<String>,
    /// Event loops, each a thread of its own with its own connections, like nginx's
    /// workers; 0: one per core.
    pub event_loops: usize,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            port: 8080,
            url: None,
            upstream_timeout_ms: 10_000,
            upload_limit_bytes: 10 * 1024 * 1024,
            cors_origins: Vec::new(),
            rate_limit: RateLimitSettings::default(),
            trusted_proxies: Vec::new(),
            event_loops: 0,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct PostgresSettings {
    /// The server; each service appends its own database `<ns>_<service>`.
    pub url: SecretString,
    pub max_connections: u32,
    pub acquire_timeout_ms: u64,
}

impl Default for PostgresSettings {
    fn default() -> Self {
        Self {
            url: SecretString::from("postgres://postgres@127.0.0.1:5432"),
            max_connections: 10,
            acquire_timeout_ms: 5_000,
        }
    }
}

impl PostgresSettings {
    /// Connection URL of one database on the configured server.
    pub fn database_url(&self, database: &str) -> String {
        let server = self.url.expose_secret();
        let (base, query) = match server.split_once('?') {
            Some((base, query)) => (base, Some(query)),
            None => (server, None),
        };
        // Drop a database already named in the URL: the server is what we want.
        let base = match base.find("://").map(|i| i + 3) {
            Some(authority) => match base[authority..].find('/') {
                Some(slash) => &base[..authority + slash],
                None => base,
            },
            None => base,
        };
        match query {
            Some(query) => format!("{base}/{database}?{query}"),
            None => format!("{base}/{database}"),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct AmqpSettings {
    pub url: SecretString,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            url: SecretString::from("amqp://guest:guest@127.0.0.1:5672/%2f"),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct RedisSettings {
    pub url: SecretString,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: SecretString::from("redis://127.0.0.1:6379"),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct MessagingSettings {
    /// Unacknowledged deliveries the broker may push to one consumer.
    pub prefetch: u16,
    /// Messages one service instance handles at the same time.
    pub concurrency: usize,
    /// Delay before each retry of a transiently failing message; its length is the
    /// number of retries before the message is dead-lettered.
    pub retry_delays_ms: Vec<u64>,
    /// A handler running longer than this fails transiently.
    pub handler_timeout_ms: u64,
    /// Redeliveries (crashes before ack) after which the broker dead-letters a message.
    pub delivery_limit: u32,
    /// Outbox relay: how often it looks for rows when no notification arrives.
    pub outbox_poll_interval_ms: u64,
    /// Outbox relay: rows published per confirmed batch.
    pub outbox_batch_size: i64,
    /// A handled message's id is kept this long in the inbox, so a copy arriving later
    /// is known as a duplicate; then it is purged (dead-lettered ones stay). Far longer
    /// than the retries and redeliveries of a message.
    pub inbox_retention_days: u32,
}

impl Default for MessagingSettings {
    fn default() -> Self {
        Self {
            prefetch: 32,
            concurrency: 16,
            retry_delays_ms: vec![1_000, 5_000, 30_000, 120_000, 600_000],
            handler_timeout_ms: 30_000,
            delivery_limit: 20,
            outbox_poll_interval_ms: 1_000,
            outbox_batch_size: 100,
            inbox_retention_days: 30,
        }
    }
}

impl MessagingSettings {
    pub fn retry_delays(&self) -> Vec<Duration> {
        self.retry_delays_ms
            .iter()
            .copied()
            .map(Duration::from_millis)
            .collect()
    }
}

/// Where the optional settings file is looked for.
fn settings_file() -> Option<PathBuf> {
    match std::env::var_os("COMMERCE_CONFIG") {
        Some(path) => Some(PathBuf::from(path)),
        None => {
            let default = PathBuf::from("commerce.toml");
            default.exists().then_some(default)
        }
    }
}

impl Settings {
    /// Defaults, then `$COMMERCE_CONFIG` (or `./commerce.toml` if present), then the
    /// environment.
    pub fn load() -> anyhow::Result<Self> {
        Self::load_from(settings_file(), None)
    }

    /// As [`load`](Self::load), with the environment given as a map (`None`: the process
    /// environment).
    pub fn load_from(
        file: Option<PathBuf>,
        environment: Option<config::Map<String, String>>,
    ) -> anyhow::Result<Self> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let settings: Settings = builder
            .add_source(
                config::Environment::with_prefix("COMMERCE")
                    .prefix_separator("__")
                    .separator("__")
                    .list_separator(",")
                    .with_list_parse_key("messaging.retry_delays_ms")
                    .with_list_parse_key("gateway.cors_origins")
                    .with_list_parse_key("gateway.trusted_proxies")
                    .try_parsing(true)
                    .source(environment),
            )
            .build()
            .context("reading settings")?
            .try_deserialize()
            .context("invalid settings (check the COMMERCE__… environment variables)")?;
        settings.validate()?;
        Ok(settings)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        let ns = &self.namespace;
        let valid = !ns.is_empty()
            && ns.len() <= 40
            && ns.starts_with(|c: char| c.is_ascii_lowercase())
            && ns
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        anyhow::ensure!(
            valid,
            "COMMERCE__NAMESPACE must be 1-40 characters of a-z, 0-9 and _, starting with a \
             letter (it names databases and queues); got {ns:?}"
        );
        anyhow::ensure!(
            self.messaging.concurrency > 0 && self.messaging.prefetch > 0,
            "COMMERCE__MESSAGING__CONCURRENCY and COMMERCE__MESSAGING__PREFETCH must be positive"
        );
        anyhow::ensure!(
            self.messaging.outbox_batch_size > 0,
            "COMMERCE__MESSAGING__OUTBOX_BATCH_SIZE must be positive"
        );
        anyhow::ensure!(
            self.messaging.inbox_retention_days > 0,
            "COMMERCE__MESSAGING__INBOX_RETENTION_DAYS must be at least 1: a copy of a \
             message arriving after its id is purged would be handled again"
        );
        anyhow::ensure!(
            self.dead_letters.replay_rate_per_sec > 0.0,
            "COMMERCE__DEAD_LETTERS__REPLAY_RATE_PER_SEC must be positive"
        );
        Ok(())
    }

    pub fn is_development(&self) -> bool {
        self.environment == Environment::Development
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_url_replaces_any_database_in_the_server_url() {
        let mut pg = PostgresSettings::default();
        assert_eq!(
            pg.database_url("commerce_order"),
            "postgres://postgres@127.0.0.1:5432/commerce_order"
        );
        pg.url = SecretString::from("postgres://u:p@db:5433/postgres?sslmode=require");
        assert_eq!(
            pg.database_url("x_user"),
            "postgres://u:p@db:5433/x_user?sslmode=require"
        );
    }

    fn env(vars: &[(&str, &str)]) -> Option<config::Map<String, String>> {
        Some(
            vars.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn environment_overrides_defaults_at_any_level() {
        let settings = Settings::load_from(
            None,
            env(&[
                ("COMMERCE__NAMESPACE", "staging"),
                ("COMMERCE__ORDER__PORT", "9083"),
                ("COMMERCE__MESSAGING__RETRY_DELAYS_MS", "100,200"),
                (
                    "COMMERCE__POSTGRES__URL",
                    "postgres://app:pw-hunter2@db:5432",
                ),
                ("COMMERCE__ENVIRONMENT", "development"),
            ]),
        )
        .expect("valid settings");
        assert_eq!(settings.namespace, "staging");
        assert_eq!(settings.order.port, 9083);
        assert_eq!(settings.gateway.port, 8080, "untouched defaults stay");
        assert_eq!(settings.messaging.retry_delays_ms, [100, 200]);
        assert!(settings.is_development());
        assert!(
            !format!("{settings:?}").contains("pw-hunter2"),
            "secrets stay out of Debug"
        );
    }

    #[test]
    fn bad_values_fail_with_a_message_naming_the_setting() {
        let error = Settings::load_from(None, env(&[("COMMERCE__ORDER__PORT", "http")]))
            .expect_err("not a port");
        assert!(format!("{error:#}").contains("port"), "{error:#}");
        let error = Settings::load_from(None, env(&[("COMMERCE__NAMESPACE", "My-Shop")]))
            .expect_err("not a namespace");
        assert!(
            format!("{error:#}").contains("COMMERCE__NAMESPACE"),
            "{error:#}"
        );
    }

    #[test]
    fn namespace_must_be_safe_for_database_names() {
        let mut settings = Settings::default();
        settings.validate().expect("default is valid");
        for bad in ["", "Commerce", "a-b", "1abc", "a;drop"] {
            settings.namespace = bad.into();
            assert!(settings.validate().is_err(), "{bad:?} accepted");
        }
    }
}
