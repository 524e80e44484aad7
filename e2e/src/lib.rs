//! The harness for tests of the whole system: real services started in this process on
//! free ports, wired to each other, in a namespace of their own.

pub mod faults;
pub mod upload;

use std::path::PathBuf;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use shared::Settings;
use shared::service::Service;
use testkit::{TcpProxy, TestEnv, eventually};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A password every test account can use: long and not guessable.
pub const PASSWORD: &str = "correct horse battery staple";

struct Running {
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Running {
    fn spawn(service: Service) -> Self {
        let stop = service.shutdown_token();
        let task = tokio::spawn(service.run_until_stopped());
        Self { stop, task }
    }
}

/// A service the harness can start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Svc {
    User,
    Product,
    Inventory,
    File,
    Order,
    Payment,
    Notification,
}

impl Svc {
    /// Every service the harness can start.
    pub const ALL: [Self; 7] = [
        Self::User,
        Self::Product,
        Self::Inventory,
        Self::File,
        Self::Order,
        Self::Payment,
        Self::Notification,
    ];

    fn settings(self, settings: &mut Settings) -> &mut shared::config::ServiceSettings {
        match self {
            Self::User => &mut settings.user,
            Self::Product => &mut settings.product,
            Self::Inventory => &mut settings.inventory,
            Self::File => &mut settings.file,
            Self::Order => &mut settings.order,
            Self::Payment => &mut settings.payment,
            Self::Notification => &mut settings.notification,
        }
    }

    /// Builds the service on a free port; returns it and its port.
    async fn build(self, settings: Settings) -> (Service, u16) {
        macro_rules! start {
            ($app:ty) => {{
                let app = <$app>::build(settings)
                    .await
                    .unwrap_or_else(|e| panic!("{self:?} starts: {e:#}"));
                let port = app.port();
                (Service::from(app), port)
            }};
        }
        match self {
            Self::User => start!(user_svc::Application),
            Self::Product => start!(product_svc::Application),
            Self::Inventory => start!(inventory_svc::Application),
            Self::File => start!(file_svc::Application),
            Self::Order => start!(order_svc::Application),
            Self::Payment => start!(payment_svc::Application),
            Self::Notification => start!(notification_svc::Application),
        }
    }
}

/// The system under test. Dropping it stops every service and removes the namespace.
pub struct Stack {
    pub settings: Settings,
    pub client: reqwest::Client,
    /// `http://127.0.0.1:<port>` of each gateway started.
    pub gateways: Vec<String>,
    /// `http://127.0.0.1:<port>` of user-svc, for calls that skip the gateway.
    pub user: String,
    pub keys_dir: PathBuf,
    running: Vec<Running>,
    /// Proxies between services and the broker, for tests that cut them off.
    broker_links: Vec<(Svc, TcpProxy)>,
    env: TestEnv,
}

/// What to start and how.
pub struct StackOptions {
    /// Started in this order after user-svc (always started: it issues the tokens).
    pub services: Vec<Svc>,
    pub gateways: usize,
    /// Changes to the settings before anything starts.
    pub configure: Box<dyn FnOnce(&mut Settings)>,
    /// These services reach the broker through a proxy the test can cut
    /// ([`Stack::broker_link`]).
    pub broker_links: Vec<Svc>,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            services: Vec::new(),
            gateways: 1,
            configure: Box::new(|_| {}),
            broker_links: Vec::new(),
        }
    }
}

impl Stack {
    pub async fn start() -> Self {
        Self::start_with(StackOptions::default()).await
    }

    /// user-svc and `services`, then the gateways.
    pub async fn with(services: &[Svc]) -> Self {
        Self::start_with(StackOptions {
            services: services.to_vec(),
            ..StackOptions::default()
        })
        .await
    }

    pub async fn start_with(options: StackOptions) -> Self {
        let env = TestEnv::new();
        let mut settings = env.settings();
        let keys_dir = std::env::temp_dir().join(format!("commerce-{}-keys", env.namespace));
        settings.auth.keys_dir = keys_dir.clone();
        (options.configure)(&mut settings);
        let mut running = Vec::new();
        let mut broker_links = Vec::new();
        for svc in options.broker_links {
            broker_links.push((svc, TcpProxy::start(env.amqp_address()).await));
        }

        let mut services = vec![Svc::User];
        services.extend(options.services.iter().filter(|s| **s != Svc::User));
        for svc in services {
            let mut own = settings.clone();
            if let Some((_, proxy)) = broker_links.iter().find(|(s, _)| *s == svc) {
                own.amqp.url = env.settings_via(proxy.address()).amqp.url;
            }
            // Boxed: the services' start futures are large, and every test awaits this one.
            let (service, port) = Box::pin(svc.build(own)).await;
            svc.settings(&mut settings).url = Some(format!("http://127.0.0.1:{port}"));
            running.push(Running::spawn(service));
        }

        let mut gateways = Vec::new();
        for _ in 0..options.gateways {
            let gateway = gateway::Application::build(settings.clone())
                .await
                .expect("gateway starts");
            gateways.push(format!("http://127.0.0.1:{}", gateway.port()));
            running.push(Running::spawn(gateway.into()));
        }
        let user = settings.user.base_url();
        Self {
            settings,
            client: reqwest::Client::new(),
            gateways,
            user,
            keys_dir,
            running,
            broker_links,
            env,
        }
    }

    /// Base URL of a started service, for calls that skip the gateway.
    pub fn url(&self, svc: Svc) -> String {
        let mut settings = self.settings.clone();
        svc.settings(&mut settings).base_url()
    }

    /// Registers an account with `role`; returns its access token and id.
    pub async fn account(&self, who: &str, role: &str) -> (String, uuid::Uuid) {
        let body = self.register(&self.email(who), role).await;
        let token = body["access_token"].as_str().expect("token").to_owned();
        let id = body["user"]["id"]
            .as_str()
            .and_then(|id| id.parse().ok())
            .expect("id");
        (token, id)
    }

    /// The proxy between `svc` and the broker (named in [`StackOptions::broker_links`]).
    pub fn broker_link(&self, svc: Svc) -> &TcpProxy {
        self.broker_links
            .iter()
            .find(|(s, _)| *s == svc)
            .map(|(_, proxy)| proxy)
            .unwrap_or_else(|| panic!("{svc:?} was not started behind a broker link"))
    }

    pub fn namespace(&self) -> &str {
        &self.env.namespace
    }

    pub fn env(&self) -> &TestEnv {
        &self.env
    }

    /// The first gateway.
    pub fn gateway(&self) -> &str {
        &self.gateways[0]
    }

    /// A request to the first gateway, `path` under `/api/v1`.
    pub fn api(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}/api/v1{path}", self.gateway()))
    }

    /// Registers an account with `role` and returns the register response.
    pub async fn register(&self, email: &str, role: &str) -> Value {
        let response = self
            .api(Method::POST, "/auth/register")
            .json(&json!({"email": email, "password": PASSWORD, "name": "Test User", "role": role}))
            .send()
            .await
            .expect("register request");
        let status = response.status();
        let body: Value = response.json().await.expect("json");
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body
    }

    pub async fn login(&self, email: &str, password: &str) -> reqwest::Response {
        self.api(Method::POST, "/auth/login")
            .json(&json!({"email": email, "password": password}))
            .send()
            .await
            .expect("login request")
    }

    /// A unique email for this test.
    pub fn email(&self, who: &str) -> String {
        format!("{who}.{}@example.com", self.env.namespace)
    }

    /// Waits until every service answers `/ready` through the gateway's report.
    pub async fn wait_ready(&self, services: &[&str]) {
        eventually("the gateway to report the services ready", || async {
            let response = self
                .client
                .get(format!("{}/ready", self.gateway()))
                .send()
                .await
                .ok()?;
            let body: Value = response.json().await.ok()?;
            services
                .iter()
                .all(|s| body["checks"][s]["status"] == "ok")
                .then_some(())
        })
        .await;
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for running in &self.running {
            running.stop.cancel();
            running.task.abort();
        }
        let _ = std::fs::remove_dir_all(&self.keys_dir);
    }
}

/// How long tests wait for the system; generous for a busy machine.
pub const WAIT: Duration = testkit::DEADLINE;

/// A stand-in for a service, run by the test: answers every request with what it
/// received (method, path and query, headers, body length), optionally after a delay.
pub struct EchoUpstream {
    pub url: String,
    task: JoinHandle<()>,
}

impl EchoUpstream {
    pub async fn start(delay: Duration) -> Self {
        use axum::body::Body;
        use axum::extract::Request;
        use http_body_util::BodyExt as _;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let app = axum::Router::new().fallback(move |request: Request| async move {
            tokio::time::sleep(delay).await;
            let (parts, body) = request.into_parts();
            let headers: serde_json::Map<String, Value> = parts
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or("<binary>"))))
                .collect();
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes().len())
                .unwrap_or(usize::MAX);
            let echo = json!({
                "method": parts.method.as_str(),
                "uri": parts.uri.to_string(),
                "headers": headers,
                "body_bytes": bytes,
            });
            axum::response::Response::builder()
                .header("content-type", "application/json")
                .body(Body::from(echo.to_string()))
                .expect("response")
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, task }
    }
}

impl Drop for EchoUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
