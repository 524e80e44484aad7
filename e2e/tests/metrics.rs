//! What the on-call engineer relies on (issue 6): every service's `/metrics` shows the
//! families docs/RUNBOOK.md alerts on, labelled by route template (never by raw id), and
//! one order id finds the order in the logs of every service it went through.
//!
//! All services run in this one process and share one Prometheus recorder, so each
//! `/metrics` shows every service's series; the assertions pick them by the `service`
//! label (and by this test's namespace where a label carries it).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, OnceLock};

use e2e::{Stack, StackOptions, Svc};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use testkit::eventually;
use uuid::Uuid;

const ADMIN_EMAIL: &str = "root@example.com";
const ADMIN_PASSWORD: &str = "a long admin passphrase nobody guesses";

/// Every service but user-svc, which the harness always starts.
const SERVICES: [Svc; 6] = [
    Svc::Product,
    Svc::Inventory,
    Svc::File,
    Svc::Order,
    Svc::Payment,
    Svc::Notification,
];

/// `service` label of each service with a database (and so an outbox and dead letters).
const WITH_DATABASE: [&str; 7] = [
    "user",
    "product",
    "inventory",
    "file",
    "order",
    "payment",
    "notification",
];

/// Those that consume events (and so have a queue and a dead-letter queue).
const CONSUMERS: [&str; 5] = ["product", "inventory", "order", "payment", "notification"];

struct World {
    stack: Stack,
    seller: String,
    customer: String,
    customer_email: String,
    admin: String,
}

async fn world() -> World {
    let stack = Stack::start_with(StackOptions {
        services: SERVICES.to_vec(),
        configure: Box::new(|s| {
            s.admin.email = Some(ADMIN_EMAIL.into());
            s.admin.password = Some(ADMIN_PASSWORD.into());
            // These tests poll the API; rate limits have tests of their own.
            s.gateway.rate_limit.enabled = false;
            // Little traffic; leaves PostgreSQL's connections to tests running beside.
            s.postgres.max_connections = 3;
        }),
        ..StackOptions::default()
    })
    .await;
    let (seller, _) = stack.account("sam", "seller").await;
    let (customer, _) = stack.account("carol", "customer").await;
    let login = stack.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    assert_eq!(login.status(), StatusCode::OK);
    let login: Value = login.json().await.expect("json");
    World {
        customer_email: stack.email("carol"),
        admin: login["access_token"].as_str().expect("token").to_owned(),
        stack,
        seller,
        customer,
    }
}

impl World {
    async fn call(&self, method: Method, path: &str, token: &str) -> (StatusCode, Value) {
        let response = self
            .stack
            .api(method, path)
            .bearer_auth(token)
            .send()
            .await
            .expect("request");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// A product with stock, once inventory-svc holds its stock.
    async fn product(&self) -> Uuid {
        let response = self
            .stack
            .api(Method::POST, "/products")
            .bearer_auth(&self.seller)
            .json(&json!({"name": "Teapot", "description": "Holds tea.",
                          "price_cents": 2500, "currency": "EUR", "initial_stock": 5}))
            .send()
            .await
            .expect("create product");
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Value = response.json().await.expect("json");
        let id = body["id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("id");
        eventually("inventory-svc to hold the product's stock", || async {
            let (status, _) = self
                .call(Method::GET, &format!("/inventory/{id}"), &self.seller)
                .await;
            (status == StatusCode::OK).then_some(())
        })
        .await;
        id
    }

    /// Places an order for one of `product` (paid with the simulated provider's card
    /// that succeeds) under `request_id`, once order-svc's replica knows the product.
    async fn order(&self, product: Uuid, request_id: &str) -> Uuid {
        let key = Uuid::now_v7().to_string();
        let placed = eventually("order-svc to know the product", || async {
            let response = self
                .stack
                .api(Method::POST, "/orders")
                .bearer_auth(&self.customer)
                .header("Idempotency-Key", &key)
                .header("X-Request-Id", request_id)
                .json(&json!({"items": [{"product_id": product, "quantity": 1}],
                              "payment_method": "pm_card_visa"}))
                .send()
                .await
                .expect("place order");
            let status = response.status();
            let body: Value = response.json().await.expect("json");
            match status {
                StatusCode::ACCEPTED => Some(body),
                StatusCode::UNPROCESSABLE_ENTITY => None,
                other => panic!("unexpected {other}: {body}"),
            }
        })
        .await;
        let id = placed["id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("id");
        eventually("the order to be paid", || async {
            let (status, body) = self
                .call(Method::GET, &format!("/orders/{id}"), &self.customer)
                .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            match body["status"].as_str() {
                Some("paid") => Some(()),
                Some("pending") => None,
                _ => panic!("the order did not end paid: {body}"),
            }
        })
        .await;
        id
    }

    /// Waits for the customer's receipt of an order, as notification-svc lists it.
    async fn receipt(&self) {
        let path = format!("/admin/notifications?to={}", self.customer_email);
        eventually("the customer's receipt", || async {
            let (status, body) = self.call(Method::GET, &path, &self.admin).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            body["items"]
                .as_array()?
                .iter()
                .any(|n| n["template"] == "order_receipt")
                .then_some(())
        })
        .await;
    }
}

/// One sample of the Prometheus text format.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses the text exposition format (label values quoted, with `\\`, `\"`, `\n`).
fn parse(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line}"));
        let (name, mut labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.strip_suffix('}').expect("labels close")),
            None => (series, ""),
        };
        let mut parsed = BTreeMap::new();
        while !labels.is_empty() {
            let (key, rest) = labels.split_once("=\"").expect("label=\"value\"");
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next().expect("label value closes") {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next().expect("escape").1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    (_, c) => value.push(c),
                }
            };
            parsed.insert(key.to_owned(), value);
            labels = rest[end + 1..].trim_start_matches(',');
        }
        samples.push(Sample {
            name: name.to_owned(),
            labels: parsed,
            value,
        });
    }
    samples
}

struct Scrape(Vec<Sample>);

impl Scrape {
    /// The samples of `name` whose labels include `labels`.
    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.0
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|l| l == v))
            })
            .collect()
    }

    /// The sum of those samples; fails the test when there is none.
    fn total(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found = self.find(name, labels);
        assert!(!found.is_empty(), "no {name} with {labels:?}");
        found.iter().map(|s| s.value).sum()
    }
}

async fn scrape(client: &reqwest::Client, base: &str) -> Scrape {
    let response = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(response.status(), StatusCode::OK, "{base}/metrics");
    let content_type = response.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    Scrape(parse(&response.text().await.expect("text")))
}

#[tokio::test]
async fn every_service_shows_the_families_operators_alert_on() {
    let world = world().await;
    let stack = &world.stack;
    let product = world.product().await;
    let order = world.order(product, &Uuid::now_v7().to_string()).await;

    // A little traffic to each service, some of it with ids in the path.
    let missing_file = Uuid::now_v7();
    for (path, token, expected) in [
        (
            format!("/products/{product}"),
            &world.customer,
            StatusCode::OK,
        ),
        (
            format!("/products/{product}"),
            &world.customer,
            StatusCode::OK,
        ),
        ("/users/me".to_owned(), &world.customer, StatusCode::OK),
        (
            format!("/files/{missing_file}"),
            &world.customer,
            StatusCode::NOT_FOUND,
        ),
        (
            format!("/payments/{order}"),
            &world.customer,
            StatusCode::OK,
        ),
        (
            format!("/inventory/{product}"),
            &world.seller,
            StatusCode::OK,
        ),
        (
            "/admin/notifications".to_owned(),
            &world.admin,
            StatusCode::OK,
        ),
    ] {
        let (status, body) = world.call(Method::GET, &path, token).await;
        assert_eq!(status, expected, "GET {path}: {body}");
    }

    let client = &stack.client;
    let ns = stack.namespace();
    let mut bases = vec![stack.gateway().to_owned(), stack.user.clone()];
    bases.extend(SERVICES.iter().map(|svc| stack.url(*svc)));
    let mut scrapes = Vec::new();
    for base in &bases {
        scrapes.push(scrape(client, base).await);
    }
    // Consumers attach and welcome mails go out on their own time: scrape until this
    // stack's consumers and first mails show.
    let m = eventually(
        "the metrics to show this stack's consumers and mail",
        || async {
            let m = scrape(client, &stack.url(Svc::Notification)).await;
            let at_least_one = |name: &str, labels: &[(&str, &str)]| {
                m.find(name, labels).iter().any(|s| s.value >= 1.0)
            };
            let consuming = CONSUMERS.iter().all(|service| {
                let queue = format!("{ns}.{service}");
                at_least_one(
                    "queue_consumers",
                    &[("service", service), ("queue", &queue)],
                )
            });
            let mailed = at_least_one("notifications_sent_total", &[("template", "welcome")]);
            (consuming && mailed).then_some(m)
        },
    )
    .await;

    // HTTP: every service, labelled by route template and status, with latencies.
    let http_keys: BTreeSet<&str> = ["service", "method", "route", "status"].into();
    for service in WITH_DATABASE.iter().chain(&["gateway"]) {
        let series = m.find("http_requests_total", &[("service", service)]);
        assert!(!series.is_empty(), "no http_requests_total of {service}");
        for s in series {
            let keys: BTreeSet<&str> = s.labels.keys().map(String::as_str).collect();
            assert_eq!(keys, http_keys, "{s:?}");
        }
    }
    let ids = [product, order, missing_file].map(|id| id.to_string());
    for s in m.0.iter().filter(|s| s.name.starts_with("http_request")) {
        let route = &s.labels["route"];
        assert!(
            route == "unmatched" || route.starts_with('/'),
            "route {route:?} is not a template"
        );
        for segment in route.split('/') {
            assert!(
                Uuid::parse_str(segment).is_err(),
                "a raw id in route {route:?}"
            );
        }
        assert!(!ids.iter().any(|id| route.contains(id.as_str())), "{s:?}");
    }
    for (service, method, route, status) in [
        ("gateway", "POST", "/api/v1/orders", "202"),
        ("gateway", "GET", "/api/v1/orders/{*rest}", "200"),
        ("gateway", "GET", "/api/v1/products/{id}", "200"),
        ("order", "POST", "/api/v1/orders", "202"),
        ("order", "GET", "/api/v1/orders/{id}", "200"),
        ("product", "GET", "/api/v1/products/{id}", "200"),
        ("product", "POST", "/api/v1/products", "201"),
        ("inventory", "GET", "/api/v1/inventory/{product_id}", "200"),
        ("file", "GET", "/api/v1/files/{id}", "404"),
        ("payment", "GET", "/api/v1/payments/{order_id}", "200"),
        ("user", "GET", "/api/v1/users/me", "200"),
        ("user", "POST", "/api/v1/auth/register", "201"),
        ("notification", "GET", "/api/v1/admin/notifications", "200"),
    ] {
        let labels = [
            ("service", service),
            ("method", method),
            ("route", route),
            ("status", status),
        ];
        assert!(m.total("http_requests_total", &labels) >= 1.0, "{labels:?}");
        assert!(
            m.total("http_request_duration_seconds_count", &labels) >= 1.0,
            "{labels:?}"
        );
        let mut inf = labels.to_vec();
        inf.push(("le", "+Inf"));
        assert!(
            m.total("http_request_duration_seconds_bucket", &inf) >= 1.0,
            "{inf:?}"
        );
    }

    // Messages: every outcome of every handler is there from the start; the saga's
    // services handled some.
    for service in CONSUMERS {
        let handlers: BTreeSet<&str> = m
            .find("messages_total", &[("service", service)])
            .iter()
            .map(|s| s.labels["handler"].as_str())
            .collect();
        assert!(handlers.len() > 1, "{service} has handlers: {handlers:?}");
        for handler in handlers {
            for outcome in shared::metrics::MESSAGE_OUTCOMES {
                m.total(
                    "messages_total",
                    &[
                        ("service", service),
                        ("handler", handler),
                        ("outcome", outcome),
                    ],
                );
            }
            m.total(
                "messages_handle_duration_seconds_count",
                &[("service", service), ("handler", handler)],
            );
        }
        m.total(
            "messages_failed_total",
            &[("service", service), ("kind", "permanent")],
        );
        m.total(
            "messages_failed_total",
            &[("service", service), ("kind", "malformed")],
        );
    }
    for service in ["inventory", "payment", "order", "notification"] {
        let handled = m.total(
            "messages_total",
            &[("service", service), ("outcome", "handled")],
        );
        assert!(handled >= 1.0, "{service} handled {handled}");
    }

    // Outbox and dead letters: gauges of every service with a database.
    for service in WITH_DATABASE {
        for gauge in [
            "outbox_backlog",
            "outbox_oldest_age_seconds",
            "dead_letters_open",
            "dead_letters_oldest_open_age_seconds",
        ] {
            let value = m.total(gauge, &[("service", service)]);
            assert!(value >= 0.0, "{gauge} of {service} is {value}");
        }
        m.total("outbox_published_total", &[("service", service)]);
    }
    assert!(m.total("outbox_published_total", &[("service", "order")]) >= 1.0);

    // Broker queues of this stack (their names carry its namespace).
    for service in CONSUMERS {
        let main = format!("{ns}.{service}");
        let dlq = format!("{main}.dlq");
        let consumers = m.total(
            "queue_consumers",
            &[("service", service), ("queue", main.as_str())],
        );
        assert!(consumers >= 1.0, "{main} has {consumers} consumers");
        let depth = m.total(
            "queue_messages",
            &[("service", service), ("queue", dlq.as_str())],
        );
        assert!(depth >= 0.0, "{dlq} holds {depth}");
    }

    // Stuck orders, the saga's duration, the catalog cache, mail sent.
    for gauge in ["orders_pending", "orders_oldest_pending_age_seconds"] {
        let value = m.total(gauge, &[("service", "order")]);
        assert!(value >= 0.0, "{gauge} is {value}");
    }
    let sagas = m.total(
        "saga_duration_seconds_count",
        &[("service", "order"), ("outcome", "paid")],
    );
    assert!(sagas >= 1.0, "{sagas} paid sagas timed");
    for cache in ["cache_hits_total", "cache_misses_total"] {
        m.total(cache, &[("service", "product"), ("cache", "product")]);
    }
    let reads = m.total("cache_hits_total", &[("service", "product")])
        + m.total("cache_misses_total", &[("service", "product")]);
    assert!(reads >= 1.0, "product reads went through the cache");
    assert!(m.total("notifications_sent_total", &[("template", "welcome")]) >= 1.0);

    // Every service answers /metrics with the same families (they share this process).
    for (base, scrape) in bases.iter().zip(&scrapes) {
        assert!(
            !scrape.find("http_requests_total", &[]).is_empty(),
            "{base}/metrics has no HTTP series"
        );
        assert!(
            !scrape.find("outbox_backlog", &[]).is_empty(),
            "{base}/metrics has no outbox series"
        );
    }
}

/// The logs, as the production JSON format writes them, of everything in this process.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let installed =
            shared::telemetry::init_json_with_writer("info,sqlx=warn,lapin=warn", move || {
                Sink(sink.clone())
            });
        assert!(
            installed,
            "another log subscriber is installed (is TEST_LOG set?)"
        );
        logs
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn one_order_id_finds_the_order_in_every_service_s_logs() {
    let logs = captured_logs();
    let world = world().await;
    let product = world.product().await;
    let request_id = format!("metrics-e2e-{}", Uuid::now_v7());
    let order = world.order(product, &request_id).await;
    world.receipt().await;

    let text = String::from_utf8(logs.lock().expect("logs").clone()).expect("utf-8");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let order_id = order.to_string();
    // What `grep '"correlation_id":"<order id>"'` finds.
    let about_order: Vec<&Value> = lines
        .iter()
        .filter(|l| l["span"]["correlation_id"] == order_id.as_str())
        .collect();
    let services: BTreeSet<&str> = about_order
        .iter()
        .filter_map(|l| l["span"]["service"].as_str())
        .collect();
    for service in ["order", "inventory", "payment", "notification"] {
        assert!(
            services.contains(service),
            "no log line of {service} carries correlation_id {order_id}; found {services:?}"
        );
    }
    // The placing request: its access log line names the order and the request id.
    let placed = about_order.iter().find(|l| {
        l["span"]["name"] == "http"
            && l["span"]["route"] == "/api/v1/orders"
            && l["span"]["service"] == "order"
            && l["status"] == 202
    });
    let placed =
        placed.unwrap_or_else(|| panic!("no access log of POST /orders: {about_order:#?}"));
    assert_eq!(placed["span"]["request_id"], request_id.as_str());
    // The request id crossed the gateway and reached the consumers of order.created.
    assert!(
        lines
            .iter()
            .any(|l| l["span"]["service"] == "gateway"
                && l["span"]["request_id"] == request_id.as_str()),
        "no gateway log line with request id {request_id}"
    );
    let consumed = about_order
        .iter()
        .find(|l| l["span"]["service"] == "inventory" && l["span"]["event_type"] == "order.created")
        .unwrap_or_else(|| {
            panic!("inventory-svc logged nothing about order.created of {order_id}")
        });
    assert_eq!(consumed["span"]["request_id"], request_id.as_str());
    assert!(consumed["span"]["event_id"].is_string(), "{consumed}");
}
