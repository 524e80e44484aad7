//! notification-svc against real PostgreSQL and RabbitMQ and a real SMTP conversation
//! (testkit's SMTP server): events are published on the namespace's exchange as the other
//! services publish them, and the tests read what arrived by SMTP (or as .eml files), the
//! dead letters and the admin API.
//!
//! The service consumes one message at a time here (`concurrency` and `prefetch` 1), so a
//! marker event published last is handled after every message published before it:
//! "nothing more arrived" is then a fact, not a guess.

use std::path::PathBuf;

use chrono::{DateTime, Duration as Span, Utc};
use lapin::{BasicProperties, Channel, Connection, options::ConfirmSelectOptions};
use notification_svc::Application;
use reqwest::StatusCode;
use serde_json::{Value, json};
use shared::Settings;
use shared::auth::{Claims, Role};
use shared::messaging::{DeadLetterStore, Topology};
use shared::service::Service;
use sqlx::PgPool;
use testkit::jwks::Jwks;
use testkit::smtp::{ReceivedMail, SmtpServer};
use testkit::{TestEnv, eventually};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// notification-svc in its own namespace, its SMTP server, and the test's hands on the
/// broker and the service's database.
struct World {
    settings: Settings,
    smtp: SmtpServer,
    base: String,
    client: reqwest::Client,
    channel: Channel,
    pool: PgPool,
    jwks: Jwks,
    stop: CancellationToken,
    service: JoinHandle<anyhow::Result<()>>,
    _amqp: Connection,
    env: TestEnv,
}

impl World {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    async fn start_with(configure: impl FnOnce(&mut Settings)) -> Self {
        let env = TestEnv::new();
        let smtp = SmtpServer::start().await;
        let jwks = Jwks::start(&env.namespace).await;
        let mut settings = env.settings();
        settings.smtp.url = Some(smtp.url().into());
        settings.auth.jwks_url = Some(jwks.url.clone());
        settings.messaging.concurrency = 1;
        settings.messaging.prefetch = 1;
        configure(&mut settings);
        env.track(&settings);

        let app = Application::build(settings.clone())
            .await
            .unwrap_or_else(|e| panic!("notification-svc starts: {e:#}"));
        let base = format!("http://127.0.0.1:{}", app.port());
        let service = Service::from(app);
        let stop = service.shutdown_token();
        let service = tokio::spawn(service.run_until_stopped());

        let amqp = env.amqp().await;
        let channel = amqp.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let pool = shared::db::pool(
            &settings.postgres,
            &shared::db::database_name(&settings, notification_svc::SERVICE),
        )
        .await
        .expect("the service's database");
        Self {
            settings,
            smtp,
            base,
            client: reqwest::Client::new(),
            channel,
            pool,
            jwks,
            stop,
            service,
            _amqp: amqp,
            env,
        }
    }

    fn topology(&self) -> Topology {
        self.env.topology(notification_svc::SERVICE)
    }

    /// Publishes an envelope as its producer's relay does (persistent, with confirms).
    async fn publish(&self, envelope: &Value) {
        let event_type = envelope["type"].as_str().expect("type");
        let id = envelope["id"].as_str().expect("id");
        let properties = BasicProperties::default()
            .with_message_id(id.into())
            .with_type(event_type.into())
            .with_content_type("application/json".into());
        testkit::publish(
            &self.channel,
            &self.topology().events_exchange(),
            event_type,
            &serde_json::to_vec(envelope).expect("json"),
            properties,
        )
        .await;
    }

    async fn publish_all(&self, envelopes: &[Value]) {
        for envelope in envelopes {
            self.publish(envelope).await;
        }
    }

    /// A user known to the service (its welcome mail received); returns its id and email.
    async fn user(&self, who: &str, role: &str) -> (Uuid, String) {
        let id = Uuid::now_v7();
        let email = format!("{who}.{}@example.com", self.env.namespace);
        self.publish(&user_registered(id, &email, who, role)).await;
        self.smtp.wait_for_to(&email, 1).await;
        (id, email)
    }

    /// Every message published so far has been handled: a marker user's welcome mail,
    /// published last, has arrived (the service takes one message at a time).
    async fn settle(&self) {
        let id = Uuid::now_v7();
        let email = format!("marker-{id}@example.com");
        self.publish(&user_registered(id, &email, "Marker", "customer"))
            .await;
        self.smtp.wait_for_to(&email, 1).await;
    }

    /// Mails to `address` whose subject starts with `prefix`.
    fn mails(&self, address: &str, prefix: &str) -> Vec<ReceivedMail> {
        self.smtp
            .messages_to(address)
            .into_iter()
            .filter(|m| m.subject().starts_with(prefix))
            .collect()
    }

    /// Rows of the notification log for an event.
    async fn logged(&self, event_id: &Value) -> i64 {
        let id: Uuid = event_id.as_str().expect("id").parse().expect("uuid");
        sqlx::query_scalar("SELECT count(*) FROM notifications WHERE event_id = $1")
            .bind(id)
            .fetch_one(&self.pool)
            .await
            .expect("count")
    }

    fn token(&self, roles: Vec<Role>) -> String {
        let claims = Claims::new(Uuid::now_v7(), roles, &self.settings.auth);
        self.jwks.keys.sign(&claims).expect("token")
    }

    async fn list(&self, token: Option<&str>, query: &str) -> (StatusCode, Value) {
        let mut request = self
            .client
            .get(format!("{}/api/v1/admin/notifications{query}", self.base));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            assert_eq!(content_type, "application/problem+json", "{body}");
        }
        (status, body)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop.cancel();
        self.service.abort();
    }
}

fn envelope(event_type: &str, source: &str, correlation_id: Uuid, data: Value) -> Value {
    json!({
        "id": Uuid::now_v7(), "type": event_type, "version": 1, "occurred_at": Utc::now(),
        "source": source, "correlation_id": correlation_id, "causation_id": null,
        "data": data,
    })
}

fn user_registered(user_id: Uuid, email: &str, name: &str, role: &str) -> Value {
    envelope(
        "user.registered",
        "user-svc",
        user_id,
        json!({"user_id": user_id, "email": email, "name": name, "roles": [role],
               "registered_at": Utc::now()}),
    )
}

fn product_created(product_id: Uuid, seller_id: Uuid, name: &str) -> Value {
    envelope(
        "product.created",
        "product-svc",
        product_id,
        json!({"product_id": product_id, "seller_id": seller_id, "name": name,
               "price_cents": 1250, "currency": "EUR", "category": null,
               "initial_stock": 10, "created_at": Utc::now() - Span::hours(1)}),
    )
}

fn product_updated(product_id: Uuid, seller_id: Uuid, name: &str, at: DateTime<Utc>) -> Value {
    envelope(
        "product.updated",
        "product-svc",
        product_id,
        json!({"product_id": product_id, "seller_id": seller_id, "name": name,
               "price_cents": 1250, "currency": "EUR", "category": null, "updated_at": at}),
    )
}

/// (product, seller, quantity, unit price in cents)
type Line = (Uuid, Uuid, i64, i64);

fn lines_json(lines: &[Line]) -> (Vec<Value>, i64) {
    let total = lines.iter().map(|(_, _, q, p)| q * p).sum();
    let lines = lines
        .iter()
        .map(|(product_id, seller_id, quantity, price)| {
            json!({"product_id": product_id, "seller_id": seller_id, "quantity": quantity,
                   "unit_price_cents": price})
        })
        .collect();
    (lines, total)
}

fn order_created(order_id: Uuid, customer_id: Uuid, lines: &[Line]) -> Value {
    let (lines, total) = lines_json(lines);
    envelope(
        "order.created",
        "order-svc",
        order_id,
        json!({"order_id": order_id, "customer_id": customer_id, "lines": lines,
               "total_cents": total, "currency": "EUR", "payment_method": "pm_card_visa",
               "created_at": Utc::now()}),
    )
}

fn order_paid(order_id: Uuid, customer_id: Uuid, lines: &[Line]) -> Value {
    let (lines, total) = lines_json(lines);
    envelope(
        "order.paid",
        "order-svc",
        order_id,
        json!({"order_id": order_id, "customer_id": customer_id, "lines": lines,
               "total_cents": total, "currency": "EUR"}),
    )
}

/// A customer, two sellers, three products (two of the first seller), and an order of
/// all three, paid.
struct Sale {
    customer: String,
    first_seller: String,
    second_seller: String,
    paid: Value,
}

async fn sale(world: &World) -> Sale {
    let (customer_id, customer) = world.user("carol", "customer").await;
    let (first_id, first_seller) = world.user("sam", "seller").await;
    let (second_id, second_seller) = world.user("sue", "seller").await;
    let (teapot, cup, kettle) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    world
        .publish_all(&[
            product_created(teapot, first_id, "Teapot"),
            product_created(cup, first_id, "Cup"),
            product_created(kettle, second_id, "Kettle"),
        ])
        .await;
    let order_id = Uuid::now_v7();
    let lines = [
        (teapot, first_id, 1, 2500),
        (kettle, second_id, 1, 4000),
        (cup, first_id, 4, 350),
    ];
    Sale {
        customer,
        first_seller,
        second_seller,
        paid: order_paid(order_id, customer_id, &lines),
    }
}

#[tokio::test]
async fn a_new_user_gets_a_welcome_mail_over_smtp() {
    let world = World::start().await;
    let id = Uuid::now_v7();
    let email = format!("ada.{}@example.com", world.env.namespace);
    world
        .publish(&user_registered(id, &email, "Ada Lovelace", "customer"))
        .await;

    let mails = world.smtp.wait_for_to(&email, 1).await;
    let mail = &mails[0];
    assert_eq!(mail.subject(), "Welcome to Commerce, Ada Lovelace");
    assert_eq!(mail.from, "no-reply@commerce.localhost");
    assert_eq!(mail.to, vec![email.clone()]);
    let text = mail.text();
    assert!(text.contains("Hello Ada Lovelace,"), "{text}");
    assert!(text.contains(&email), "{text}");
    assert!(text.contains("place orders"), "{text}");
    let message_id = mail.header("Message-ID").expect("a Message-ID");
    assert!(message_id.contains(".welcome."), "{message_id}");
}

#[tokio::test]
async fn a_paid_order_mails_the_customer_a_receipt_and_each_seller_only_their_lines() {
    let world = World::start().await;
    let sale = sale(&world).await;
    world.publish(&sale.paid).await;
    world.smtp.wait_for_to(&sale.second_seller, 2).await;
    world.smtp.wait_for_to(&sale.first_seller, 2).await;
    world.smtp.wait_for_to(&sale.customer, 2).await;
    world.settle().await;

    let order_id = sale.paid["data"]["order_id"].as_str().expect("id");
    let receipts = world.mails(&sale.customer, "Your receipt");
    assert_eq!(receipts.len(), 1, "one receipt");
    assert_eq!(
        receipts[0].subject(),
        format!("Your receipt for order {order_id}")
    );
    let receipt = receipts[0].text();
    for line in [
        "1 x Teapot at 25.00 EUR = 25.00 EUR",
        "1 x Kettle at 40.00 EUR = 40.00 EUR",
        "4 x Cup at 3.50 EUR = 14.00 EUR",
        "Total paid: 79.00 EUR",
    ] {
        assert!(receipt.contains(line), "{line:?} in {receipt}");
    }

    let first = world.mails(&sale.first_seller, "Order ");
    assert_eq!(first.len(), 1, "one notice to the first seller");
    assert_eq!(
        first[0].subject(),
        format!("Order {order_id} is paid: please ship 2 products")
    );
    let notice = first[0].text();
    assert!(notice.contains("1 x Teapot"), "{notice}");
    assert!(notice.contains("4 x Cup"), "{notice}");
    assert!(!notice.contains("Kettle"), "{notice}");
    assert!(
        notice.contains("Your part of the order: 39.00 EUR"),
        "{notice}"
    );

    let second = world.mails(&sale.second_seller, "Order ");
    assert_eq!(second.len(), 1, "one notice to the second seller");
    let notice = second[0].text();
    assert!(notice.contains("1 x Kettle"), "{notice}");
    assert!(
        !notice.contains("Teapot") && !notice.contains("Cup"),
        "{notice}"
    );
    assert!(
        notice.contains("Your part of the order: 40.00 EUR"),
        "{notice}"
    );

    // Nobody else was mailed about the order.
    let about_order: Vec<_> = world
        .smtp
        .messages()
        .into_iter()
        .filter(|m| m.subject().contains(order_id))
        .collect();
    assert_eq!(about_order.len(), 3);
    assert_eq!(world.logged(&sale.paid["id"]).await, 3);
}

#[tokio::test]
async fn every_event_delivered_twice_still_mails_each_recipient_once() {
    let world = World::start().await;
    let (customer_id, customer) = world.user("dora", "customer").await;
    let seller_id = Uuid::now_v7();
    let seller = format!("seth.{}@example.com", world.env.namespace);
    let product = Uuid::now_v7();
    let order_id = Uuid::now_v7();
    let lines = [(product, seller_id, 2, 1000)];
    let events = [
        user_registered(seller_id, &seller, "Seth", "seller"),
        product_created(product, seller_id, "Lamp"),
        order_created(order_id, customer_id, &lines),
        order_paid(order_id, customer_id, &lines),
    ];
    for event in &events {
        world.publish(event).await;
        world.publish(event).await;
        // The same fact again as a new message (another id): the inbox cannot tell.
        let mut renewed = event.clone();
        renewed["id"] = json!(Uuid::now_v7());
        world.publish(&renewed).await;
    }
    world.settle().await;

    assert_eq!(world.mails(&seller, "Welcome").len(), 1);
    assert_eq!(world.mails(&seller, "Order ").len(), 1);
    assert_eq!(world.mails(&customer, "Your receipt").len(), 1);
    assert_eq!(world.logged(&events[3]["id"]).await, 2);
}

#[tokio::test]
async fn a_refused_send_is_retried_and_delivered_once() {
    let world = World::start().await;
    world.smtp.fail_next(1, 451);
    let id = Uuid::now_v7();
    let email = format!("eve.{}@example.com", world.env.namespace);
    let registered = user_registered(id, &email, "Eve", "customer");
    world.publish(&registered).await;

    world.smtp.wait_for_to(&email, 1).await;
    world.settle().await;
    assert_eq!(world.smtp.refused(), 1, "the first attempt was refused");
    assert_eq!(world.mails(&email, "Welcome").len(), 1);
    assert_eq!(world.logged(&registered["id"]).await, 1);

    let metrics = world
        .client
        .get(format!("{}/metrics", world.base))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    // At least: other tests of this process (under `cargo test`) add to the same counters.
    for (name, at_least) in [
        ("notification_failures_total", 1.0),
        ("notifications_sent_total", 1.0),
    ] {
        let value: f64 = metrics
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains("template=\"welcome\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(value >= at_least, "{name} = {value} in\n{metrics}");
    }
}

#[tokio::test]
async fn a_send_refused_on_every_attempt_is_dead_lettered_after_the_last_retry() {
    let world = World::start().await;
    let email = format!("una.{}@example.com", world.env.namespace);
    world.smtp.fail_recipient(&email, usize::MAX, 550);
    let registered = user_registered(Uuid::now_v7(), &email, "Una", "customer");
    world.publish(&registered).await;

    let message_id = registered["id"].as_str().expect("id").to_owned();
    let (kind, attempts, error): (String, i32, String) =
        eventually("the dead letter of the refused welcome", || async {
            sqlx::query_as(
                "SELECT error_kind, attempts, error_message FROM dead_letters \
                 WHERE message_id = $1",
            )
            .bind(&message_id)
            .fetch_optional(&world.pool)
            .await
            .expect("dead letters")
        })
        .await;
    assert_eq!(kind, "transient");
    let tries = world.settings.messaging.retry_delays_ms.len() + 1;
    assert_eq!(usize::try_from(attempts).expect("count"), tries);
    assert!(
        error.contains("SMTP server did not take the mail"),
        "{error}"
    );
    assert_eq!(world.smtp.refused(), tries, "one refusal per attempt");
    assert!(world.smtp.messages_to(&email).is_empty());
    assert_eq!(world.logged(&registered["id"]).await, 0);
}

#[tokio::test]
async fn an_unreachable_smtp_server_is_retried_until_dead_lettered() {
    // A port nothing listens on: connection refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("smtp://{}", closed.local_addr().expect("address"));
    drop(closed);
    let world = World::start_with(move |s| s.smtp.url = Some(url.into())).await;
    let registered = user_registered(Uuid::now_v7(), "vic@example.com", "Vic", "customer");
    world.publish(&registered).await;

    let message_id = registered["id"].as_str().expect("id").to_owned();
    let kind: String = eventually("the dead letter of the unsent welcome", || async {
        sqlx::query_scalar("SELECT error_kind FROM dead_letters WHERE message_id = $1")
            .bind(&message_id)
            .fetch_optional(&world.pool)
            .await
            .expect("dead letters")
    })
    .await;
    assert_eq!(kind, "transient");
    assert_eq!(world.logged(&registered["id"]).await, 0);
}

#[tokio::test]
async fn a_seller_send_failing_then_succeeding_does_not_mail_the_customer_twice() {
    let world = World::start().await;
    let sale = sale(&world).await;
    // The customer's receipt goes first and is accepted; the first seller's notice is
    // refused once, which fails the handler and retries the whole event.
    world.smtp.fail_recipient(&sale.first_seller, 1, 450);
    world.publish(&sale.paid).await;

    world
        .smtp
        .wait_until("the first seller's notice after its retry", |m| {
            m.iter()
                .any(|m| m.is_to(&sale.first_seller) && m.subject().starts_with("Order "))
        })
        .await;
    world.settle().await;
    assert_eq!(world.smtp.refused(), 1);
    assert_eq!(world.mails(&sale.customer, "Your receipt").len(), 1);
    assert_eq!(world.mails(&sale.first_seller, "Order ").len(), 1);
    assert_eq!(world.mails(&sale.second_seller, "Order ").len(), 1);
    assert_eq!(world.logged(&sale.paid["id"]).await, 3);
}

#[tokio::test]
async fn a_mail_waits_for_its_recipients_contact_to_arrive() {
    // Retries long enough for the contact published right after to be there.
    let world = World::start_with(|s| {
        s.messaging.retry_delays_ms = vec![100, 200, 400, 800, 1_600, 3_200, 6_400]
    })
    .await;
    let (customer_id, customer) = world.user("fay", "customer").await;
    let seller_id = Uuid::now_v7();
    let seller = format!("gil.{}@example.com", world.env.namespace);
    let product = Uuid::now_v7();
    let order_id = Uuid::now_v7();
    let paid = order_paid(order_id, customer_id, &[(product, seller_id, 1, 999)]);
    world
        .publish_all(&[product_created(product, seller_id, "Vase"), paid.clone()])
        .await;
    world
        .publish(&user_registered(seller_id, &seller, "Gil", "seller"))
        .await;

    let notices = world.smtp.wait_for_to(&seller, 2).await;
    assert!(
        notices
            .iter()
            .any(|m| m.text().contains("1 x Vase at 9.99 EUR")),
        "{:?}",
        notices.iter().map(ReceivedMail::text).collect::<Vec<_>>()
    );
    world.settle().await;
    assert_eq!(world.mails(&customer, "Your receipt").len(), 1);
    assert_eq!(world.mails(&seller, "Order ").len(), 1);
}

#[tokio::test]
async fn a_cancelled_order_tells_the_customer_why() {
    let world = World::start().await;
    let (customer_id, customer) = world.user("hal", "customer").await;
    let seller_id = Uuid::now_v7();
    let product = Uuid::now_v7();
    let order_id = Uuid::now_v7();
    world
        .publish_all(&[
            product_created(product, seller_id, "Chair"),
            order_created(order_id, customer_id, &[(product, seller_id, 3, 2000)]),
            envelope(
                "order.cancelled",
                "order-svc",
                order_id,
                json!({"order_id": order_id, "customer_id": customer_id,
                       "reason": "payment_declined"}),
            ),
        ])
        .await;

    let mails = world.smtp.wait_for_to(&customer, 2).await;
    let mail = mails
        .iter()
        .find(|m| m.subject().contains("cancelled"))
        .expect("a cancellation");
    assert_eq!(
        mail.subject(),
        format!("Your order {order_id} was cancelled")
    );
    let text = mail.text();
    assert!(
        text.contains("was cancelled because your payment was declined."),
        "{text}"
    );
    assert!(text.contains("3 x Chair"), "{text}");
    assert!(text.contains("60.00 EUR"), "{text}");
}

#[tokio::test]
async fn a_review_is_mailed_to_the_products_seller_and_late_updates_do_not_rename() {
    let world = World::start().await;
    let (customer_id, customer) = world.user("ivy", "customer").await;
    let (seller_id, seller) = world.user("jon", "seller").await;
    let product = Uuid::now_v7();
    let now = Utc::now();
    let order_id = Uuid::now_v7();
    world
        .publish_all(&[
            product_created(product, seller_id, "Old name"),
            product_updated(product, seller_id, "Newest name", now),
            // Older than the update above: arrives late and must change nothing.
            product_updated(product, seller_id, "Stale name", now - Span::minutes(5)),
            order_paid(order_id, customer_id, &[(product, seller_id, 1, 500)]),
            envelope(
                "review.created",
                "product-svc",
                product,
                json!({"review_id": Uuid::now_v7(), "product_id": product,
                       "product_name": "Newest name", "seller_id": seller_id,
                       "customer_id": customer_id, "rating": 4, "body": "Sturdy.",
                       "created_at": now}),
            ),
        ])
        .await;

    let mails = world.smtp.wait_for_to(&seller, 3).await;
    let review = mails
        .iter()
        .find(|m| m.subject().contains("review"))
        .expect("a review mail");
    assert_eq!(review.subject(), "New 4-star review of Newest name");
    let text = review.text();
    assert!(text.contains("★★★★☆ (4 of 5)"), "{text}");
    assert!(text.contains("Sturdy."), "{text}");

    let receipts = world.smtp.wait_for_to(&customer, 2).await;
    let receipt = receipts
        .iter()
        .find(|m| m.subject().starts_with("Your receipt"))
        .expect("a receipt")
        .text();
    assert!(receipt.contains("1 x Newest name"), "{receipt}");
}

#[tokio::test]
async fn a_missing_template_dead_letters_the_event_and_a_replay_after_the_fix_sends_it() {
    let dir = std::env::temp_dir().join(format!("notification-templates-{}", Uuid::now_v7()));
    std::fs::create_dir_all(&dir).expect("template dir");
    // Only the welcome mail: the operator forgot the others.
    std::fs::write(
        dir.join("welcome.txt"),
        "{% block subject %}Hi {{ name }}{% endblock %}{% block text %}Welcome!{% endblock %}",
    )
    .expect("template");
    let templates = dir.clone();
    let world = World::start_with(move |s| s.smtp.templates_dir = Some(templates)).await;
    let sale = sale(&world).await;
    world.publish(&sale.paid).await;

    let message_id = sale.paid["id"].as_str().expect("id").to_owned();
    let (id, kind, error): (Uuid, String, String) =
        eventually("the order.paid dead letter", || async {
            sqlx::query_as(
                "SELECT id, error_kind, error_message FROM dead_letters WHERE message_id = $1",
            )
            .bind(&message_id)
            .fetch_optional(&world.pool)
            .await
            .expect("dead letters")
        })
        .await;
    assert_eq!(kind, "permanent");
    assert!(error.contains("order_receipt.txt"), "{error}");
    assert!(error.contains("seller_order_notice.txt"), "{error}");
    world.settle().await;
    assert!(world.mails(&sale.customer, "Your receipt").is_empty());
    assert_eq!(world.logged(&sale.paid["id"]).await, 0);

    // The operator adds the templates and replays the message.
    for name in ["order_receipt", "seller_order_notice"] {
        std::fs::write(
            dir.join(format!("{name}.txt")),
            "{% block subject %}Paid: {{ order.id }}{% endblock %}\
             {% block text %}{% for l in lines %}{{ l.product_name }}\n{% endfor %}{% endblock %}",
        )
        .expect("template");
    }
    let store = DeadLetterStore::new(world.pool.clone(), world.topology());
    assert_eq!(store.replay(&[id], "test").await.expect("replay"), 1);
    world.smtp.wait_for_to(&sale.second_seller, 2).await;
    world.smtp.wait_for_to(&sale.first_seller, 2).await;
    world.smtp.wait_for_to(&sale.customer, 2).await;
    world.settle().await;
    assert_eq!(world.mails(&sale.customer, "Paid: ").len(), 1);
    assert_eq!(world.logged(&sale.paid["id"]).await, 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn without_an_smtp_url_mail_is_written_as_eml_files() {
    let world = World::start_with(|s| s.smtp.url = None).await;
    let dir = world.settings.smtp.dir.clone();
    let email = format!("kim.{}@example.com", world.env.namespace);
    world
        .publish(&user_registered(Uuid::now_v7(), &email, "Kim", "seller"))
        .await;

    // A mail is written to a `.partial` file first, then renamed: wait for the rename.
    let files: Vec<PathBuf> = eventually("an .eml file", || async {
        let files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        let written = files
            .iter()
            .any(|f| f.extension().is_some_and(|e| e == "eml"));
        written.then_some(files)
    })
    .await;
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(
        files[0].extension().and_then(|e| e.to_str()),
        Some("eml"),
        "{files:?}"
    );
    let mail = ReceivedMail {
        from: String::new(),
        to: Vec::new(),
        data: std::fs::read(&files[0]).expect("read"),
    };
    assert_eq!(mail.subject(), "Welcome to Commerce, Kim");
    assert!(mail.header("To").expect("To").contains(&email));
    assert!(
        mail.text().contains("list products for sale"),
        "{}",
        mail.text()
    );
    assert!(world.smtp.messages().is_empty(), "nothing went by SMTP");
}

#[tokio::test]
async fn admins_list_the_mails_sent_newest_first_and_others_are_refused() {
    let world = World::start().await;
    let (_, first) = world.user("lea", "customer").await;
    let (_, second) = world.user("max", "customer").await;
    let admin = world.token(vec![Role::Admin]);

    // A mail is recorded just after the SMTP server took it.
    let body = eventually("both welcome mails in the log", || async {
        let (status, body) = world.list(Some(&admin), "").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        (body["items"].as_array().map_or(0, Vec::len) == 2).then_some(body)
    })
    .await;
    let items = body["items"].as_array().expect("items");
    assert_eq!(items.len(), 2, "{body}");
    assert_eq!(items[0]["to"], second.as_str());
    assert_eq!(items[1]["to"], first.as_str());
    assert_eq!(items[0]["template"], "welcome");
    assert_eq!(items[0]["subject"], "Welcome to Commerce, max");
    assert_eq!(items[0]["event_type"], "user.registered");
    assert!(items[0]["event_id"].as_str().is_some());
    let times: Vec<DateTime<Utc>> = items
        .iter()
        .map(|i| {
            i["sent_at"]
                .as_str()
                .expect("time")
                .parse()
                .expect("RFC 3339")
        })
        .collect();
    assert!(times[0] >= times[1]);
    assert_eq!(body["next_cursor"], Value::Null);

    // Filter by recipient, any case.
    let query = format!("?to={}", first.to_uppercase());
    let (status, body) = world.list(Some(&admin), &query).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let items = body["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "{body}");
    assert_eq!(items[0]["to"], first.as_str());

    // Pages.
    let (_, page) = world.list(Some(&admin), "?limit=1").await;
    assert_eq!(page["items"][0]["to"], second.as_str());
    let cursor = page["next_cursor"].as_str().expect("a next page");
    let (_, page) = world
        .list(Some(&admin), &format!("?limit=1&cursor={cursor}"))
        .await;
    assert_eq!(page["items"][0]["to"], first.as_str());
    assert_eq!(page["next_cursor"], Value::Null);

    // Bad queries.
    let (status, body) = world.list(Some(&admin), "?limit=0").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["errors"][0]["field"], "limit");
    let (status, body) = world.list(Some(&admin), "?cursor=nope").await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["errors"][0]["field"], "cursor");
    let (status, _) = world.list(Some(&admin), "?limit=many").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Not an admin.
    for roles in [vec![Role::Customer], vec![Role::Seller]] {
        let token = world.token(roles);
        let (status, body) = world.list(Some(&token), "").await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        assert_eq!(body["status"], 403);
    }
    let (status, _) = world.list(None, "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // The route is in the document the gateway merges.
    let document: Value = world
        .client
        .get(format!("{}/openapi.json", world.base))
        .send()
        .await
        .expect("openapi")
        .json()
        .await
        .expect("json");
    assert!(
        document["paths"]["/api/v1/admin/notifications"]["get"].is_object(),
        "{document}"
    );
}
