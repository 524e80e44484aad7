//! gateway: the only entry point for API clients. Verifies tokens, applies rate limits
//! held in Redis, routes each path of DESIGN.md §6 to its service, and serves the
//! OpenAPI document of the whole API and the ops console page (`/console`).

mod admin;
mod console;
mod docs;
mod front;
mod proxy;
mod rate_limit;
mod upstream;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::response::Response;
use shared::Settings;
use shared::auth::Verifier;
use shared::config::GatewaySettings;
use shared::http::Check;
use shared::service::{Infra, Needs, Service, Work};
use tower_http::cors::{AllowOrigin, CorsLayer};

use proxy::Upstream;
pub use rate_limit::{Decision, RateLimiter};

/// Names the gateway's Redis keys (`<ns>:rl:…`).
pub const SERVICE: &str = "gateway";

/// Shared by every request; axum clones the state per request, so it is one `Arc`.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl std::ops::Deref for AppState {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}

pub struct Inner {
    upstreams: HashMap<Upstream, String>,
    targets: HashMap<Upstream, upstream::Target>,
    verifier: Verifier,
    limiter: Option<RateLimiter>,
    settings: GatewaySettings,
    trusted_proxies: Vec<IpAddr>,
    /// Body limit for everything but image uploads.
    body_limit: usize,
    docs: docs::Docs,
    upstream_metrics: proxy::UpstreamMetrics,
}

fn upstream_urls(settings: &Settings) -> HashMap<Upstream, String> {
    Upstream::ALL
        .into_iter()
        .map(|u| {
            let service = match u {
                Upstream::User => &settings.user,
                Upstream::Product => &settings.product,
                Upstream::Order => &settings.order,
                Upstream::Payment => &settings.payment,
                Upstream::Inventory => &settings.inventory,
                Upstream::Notification => &settings.notification,
                Upstream::File => &settings.file,
            };
            (u, service.base_url())
        })
        .collect()
}

/// Each route pattern of DESIGN.md §6 and the service that owns it.
const ROUTES: &[(&str, Upstream)] = &[
    ("/api/v1/auth/{*rest}", Upstream::User),
    ("/api/v1/users/{*rest}", Upstream::User),
    ("/api/v1/products", Upstream::Product),
    ("/api/v1/products/{id}", Upstream::Product),
    ("/api/v1/products/{id}/reviews", Upstream::Product),
    ("/api/v1/products/{id}/images", Upstream::File),
    ("/api/v1/categories", Upstream::Product),
    ("/api/v1/categories/{*rest}", Upstream::Product),
    ("/api/v1/files/{*rest}", Upstream::File),
    ("/api/v1/inventory/{*rest}", Upstream::Inventory),
    ("/api/v1/orders", Upstream::Order),
    ("/api/v1/orders/{*rest}", Upstream::Order),
    ("/api/v1/payments/{*rest}", Upstream::Payment),
    ("/api/v1/admin/users", Upstream::User),
    ("/api/v1/admin/notifications", Upstream::Notification),
];

/// API answers are data for programs, never documents to render or frame; the docs page
/// is a document and needs its own scripts and styles.
const API_CSP: HeaderValue = HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'");
const DOCS_CSP: HeaderValue = HeaderValue::from_static(
    "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; \
     script-src 'self'; frame-ancestors 'none'",
);

const SECURITY_HEADER_COUNT: usize = 5;

/// Security headers on every response that does not set its own, besides the CSP. A
/// static: a `const` array would be built and dropped at each use.
static SECURITY_HEADERS: [(HeaderName, HeaderValue); SECURITY_HEADER_COUNT] = [
    (
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    ),
    (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
    (
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    ),
    (
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=63072000; includeSubDomains"),
    ),
    (
        HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    ),
];

/// Headers the gateway adds to a proxied answer: the rate limit's three, the security
/// headers and the request context's request id and trace context.
const ADDED_RESPONSE_HEADERS: usize = 3 + SECURITY_HEADER_COUNT + 1 + 2;

/// The security headers a response does not set itself; `docs` for the docs page.
fn security_headers(response: &mut Response, docs: bool) {
    let headers = response.headers_mut();
    let csp = if docs { DOCS_CSP } else { API_CSP };
    for (name, value) in &SECURITY_HEADERS {
        headers.entry(name).or_insert_with(|| value.clone());
    }
    headers
        .entry(header::CONTENT_SECURITY_POLICY)
        .or_insert(csp);
}

fn cors(settings: &GatewaySettings) -> anyhow::Result<Option<CorsLayer>> {
    if settings.cors_origins.is_empty() {
        return Ok(None);
    }
    let origins = settings
        .cors_origins
        .iter()
        .map(|o| HeaderValue::from_str(o).with_context(|| format!("CORS origin {o:?}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(origins))
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PATCH,
                Method::DELETE,
                Method::OPTIONS,
            ])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("idempotency-key"),
                HeaderName::from_static("x-request-id"),
            ])
            .expose_headers([
                HeaderName::from_static("x-request-id"),
                HeaderName::from_static("ratelimit-limit"),
                HeaderName::from_static("ratelimit-remaining"),
                HeaderName::from_static("ratelimit-reset"),
                header::RETRY_AFTER,
                header::ETAG,
                header::LOCATION,
            ])
            .max_age(Duration::from_secs(600)),
    ))
}

pub struct Application(Service);

impl Application {
    pub async fn build(mut settings: Settings) -> anyhow::Result<Self> {
        // The upload limit is enforced per route by the proxy; the outer layer only
        // guards against anything larger.
        let body_limit = settings.http.body_limit_bytes;
        settings.http.body_limit_bytes = body_limit.max(settings.gateway.upload_limit_bytes);
        let needs = Needs {
            database: None,
            redis: true,
        };
        let infra = Infra::connect(SERVICE, &settings, needs).await?;
        let upstreams = upstream_urls(&settings);
        let trusted_proxies = settings
            .gateway
            .trusted_proxies
            .iter()
            .map(|a| {
                a.parse()
                    .with_context(|| format!("trusted proxy {a:?} is not an IP address"))
            })
            .collect::<anyhow::Result<Vec<IpAddr>>>()?;
        let limiter = if settings.gateway.rate_limit.enabled {
            let url = secrecy::ExposeSecret::expose_secret(&settings.redis.url);
            Some(
                RateLimiter::new(url, &settings.namespace)
                    .context("COMMERCE__REDIS__URL is not a Redis URL")?,
            )
        } else {
            None
        };
        let probe = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap_or_default();
        let checks = Upstream::ALL
            .into_iter()
            .map(|u| Check::Http {
                name: u.name(),
                url: format!("{}/ready", upstreams[&u]),
                client: probe.clone(),
            })
            .collect();
        let targets = upstreams
            .iter()
            .map(|(u, base)| Ok((*u, upstream::Target::parse(base)?)))
            .collect::<anyhow::Result<_>>()?;
        let proxied = front::ProxiedRoutes::new(ROUTES)?;
        let state = AppState(Arc::new(Inner {
            docs: docs::Docs::new(upstreams.clone(), probe),
            upstreams,
            targets,
            verifier: Verifier::remote(&settings),
            limiter,
            settings: settings.gateway.clone(),
            trusted_proxies,
            body_limit,
            upstream_metrics: proxy::UpstreamMetrics::default(),
        }));
        let mut router = admin::router(state.clone())
            .merge(console::router())
            .merge(docs::router(state.clone()));
        let cors = cors(&settings.gateway)?;
        if let Some(cors) = &cors {
            router = router.layer(cors.clone());
        }
        let event_loops = match settings.gateway.event_loops {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        };
        let front: shared::service::MakeFront = Box::new(move |router, context| {
            front::Front::shared(state, context, proxied, router, cors)
        });
        let work = Work {
            checks,
            event_loops,
            front: Some(front),
            ..Work::default()
        };
        let service = Service::start(infra, settings.gateway.port, router, work).await?;
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
