//! payment-svc against real PostgreSQL and RabbitMQ, paying through the real
//! async-stripe client against the fake Stripe server (testkit::stripe). Saga events are
//! injected on the broker as the other services publish them; what payment-svc
//! publishes is watched by an observer queue, and what it did to money by the fake's
//! counts.

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use lapin::BasicProperties;
use lapin::types::ShortString;
use serde_json::{Value, json};
use shared::Settings;
use shared::auth::{Claims, Role};
use shared::service::Service;
use sqlx::PgPool;
use stripe_webhook::Webhook;
use testkit::jwks::Jwks;
use testkit::stripe::{self, Failure, FakeStripe, Route};
use testkit::{Observer, TestEnv, eventually};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const WEBHOOK_SECRET: &str = "whsec_test_payment_svc";
const MARKER: &str = "payment.test_marker";

/// payment-svc, the fake Stripe (unless simulated), the test's hands on the broker and
/// its eyes on every `payment.*` event.
struct World {
    stop: CancellationToken,
    url: String,
    client: reqwest::Client,
    stripe: Option<FakeStripe>,
    channel: lapin::Channel,
    _connection: lapin::Connection,
    observer: Observer,
    /// Every payment event seen so far, in arrival order.
    seen: Vec<Value>,
    /// Ids of the events injected so far.
    sent: Vec<Uuid>,
    exchange: String,
    pool: PgPool,
    settings: Settings,
    jwks: Jwks,
    _env: TestEnv,
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl World {
    /// With the fake Stripe as provider.
    async fn stripe() -> Self {
        Self::start(true, |_| {}).await
    }

    async fn start(with_stripe: bool, configure: impl FnOnce(&mut Settings)) -> Self {
        let env = TestEnv::new();
        let mut settings = env.settings();
        let stripe = if with_stripe {
            let fake = FakeStripe::start().await;
            settings.stripe.secret_key = Some(stripe::SECRET_KEY.into());
            settings.stripe.api_base = Some(fake.base_url());
            settings.stripe.webhook_secret = Some(WEBHOOK_SECRET.into());
            Some(fake)
        } else {
            None
        };
        let jwks = Jwks::start(&env.namespace).await;
        settings.auth.jwks_url = Some(jwks.url.clone());
        configure(&mut settings);
        env.track(&settings);
        let observer = Observer::new(&env, &["payment.*"]).await;
        let app = payment_svc::Application::build(settings.clone())
            .await
            .expect("payment-svc starts");
        let port = app.port();
        let service = Service::from(app);
        let stop = service.shutdown_token();
        tokio::spawn(service.run_until_stopped());
        let connection = env.amqp().await;
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(Default::default())
            .await
            .expect("publisher confirms");
        let pool = shared::db::bootstrap(
            &env.settings(),
            payment_svc::SERVICE,
            Some(&payment_svc::MIGRATIONS),
        )
        .await
        .expect("the payment database");
        Self {
            stop,
            url: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
            stripe,
            channel,
            _connection: connection,
            observer,
            seen: Vec::new(),
            sent: Vec::new(),
            exchange: env.topology("test").events_exchange(),
            pool,
            settings,
            jwks,
            _env: env,
        }
    }

    /// An access token for `user` with `role`, as user-svc would sign it.
    fn token(&self, user: Uuid, role: Role) -> String {
        let claims = Claims::new(user, vec![role], &self.settings.auth);
        self.jwks.keys.sign(&claims).expect("a token")
    }

    fn fake(&self) -> &FakeStripe {
        self.stripe
            .as_ref()
            .expect("this world pays through the fake Stripe")
    }

    /// Publishes an envelope as its producer would (message id = event id).
    async fn send(&mut self, envelope: &Value) {
        let id: Uuid = envelope["id"].as_str().expect("id").parse().expect("uuid");
        let event_type = envelope["type"].as_str().expect("type");
        let properties = BasicProperties::default()
            .with_message_id(ShortString::from(id.to_string()))
            .with_type(ShortString::from(event_type))
            .with_content_type(ShortString::from("application/json"));
        testkit::publish(
            &self.channel,
            &self.exchange,
            event_type,
            &serde_json::to_vec(envelope).expect("json"),
            properties,
        )
        .await;
        self.sent.push(id);
    }

    /// Sends and waits until payment-svc has handled it.
    async fn deliver(&mut self, envelope: &Value) {
        self.send(envelope).await;
        self.settle().await;
    }

    /// Waits until every injected event is handled and everything payment-svc decided is
    /// on the broker; then reads the observer up to a marker published after that, so
    /// `seen` holds every payment event there will be.
    async fn settle(&mut self) {
        let pool = self.pool.clone();
        let sent: Vec<Uuid> = self
            .sent
            .iter()
            .copied()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        eventually("injected events handled and outbox drained", || {
            let pool = pool.clone();
            let sent = sent.clone();
            async move {
                // A dead letter will never be handled: say why at once.
                let dead: Vec<(String, String, String)> =
                    sqlx::query_as("SELECT handler, error_kind, error_message FROM dead_letters")
                        .fetch_all(&pool)
                        .await
                        .ok()?;
                assert!(dead.is_empty(), "dead-lettered: {dead:?}");
                let handled: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM processed_messages WHERE message_id = ANY($1)",
                )
                .bind(&sent)
                .fetch_one(&pool)
                .await
                .ok()?;
                let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
                    .fetch_one(&pool)
                    .await
                    .ok()?;
                (handled == sent.len() as i64 && waiting == 0).then_some(())
            }
        })
        .await;
        let marker = Uuid::now_v7().to_string();
        testkit::publish(
            &self.channel,
            &self.exchange,
            MARKER,
            marker.as_bytes(),
            BasicProperties::default().with_message_id(ShortString::from(marker.clone())),
        )
        .await;
        loop {
            let delivery = self.observer.next().await;
            if delivery.routing_key.as_str() == MARKER {
                if delivery.data == marker.as_bytes() {
                    return;
                }
                continue;
            }
            let event: Value = serde_json::from_slice(&delivery.data).expect("event json");
            self.seen.push(event);
        }
    }

    /// The payment events of one order seen so far, by type, in order.
    fn events(&self, order_id: Uuid) -> Vec<String> {
        self.seen
            .iter()
            .filter(|e| e["data"]["order_id"] == order_id.to_string())
            .map(|e| e["type"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    fn event(&self, order_id: Uuid, event_type: &str) -> Value {
        self.seen
            .iter()
            .find(|e| e["data"]["order_id"] == order_id.to_string() && e["type"] == event_type)
            .unwrap_or_else(|| panic!("{event_type} for {order_id} in {:#?}", self.seen))
            .clone()
    }

    /// (step, result, idempotency key) of every provider call for the order.
    async fn ledger(&self, order_id: Uuid) -> Vec<(String, String, Option<String>)> {
        sqlx::query_as(
            "SELECT step, result, idempotency_key FROM payment_ledger \
             WHERE order_id = $1 AND source = 'call' ORDER BY at, id",
        )
        .bind(order_id)
        .fetch_all(&self.pool)
        .await
        .expect("ledger")
    }

    async fn status(&self, order_id: Uuid) -> String {
        sqlx::query_scalar("SELECT status FROM payments WHERE order_id = $1")
            .bind(order_id)
            .fetch_one(&self.pool)
            .await
            .expect("payment row")
    }
}

fn envelope(event_type: &str, source: &str, order_id: Uuid, data: Value) -> Value {
    json!({
        "id": Uuid::now_v7(), "type": event_type, "version": 1, "occurred_at": Utc::now(),
        "source": source, "correlation_id": order_id, "causation_id": null, "data": data,
    })
}

fn order_created(order_id: Uuid, payment_method: &str) -> Value {
    order_created_by(order_id, Uuid::now_v7(), payment_method)
}

fn order_created_by(order_id: Uuid, customer_id: Uuid, payment_method: &str) -> Value {
    envelope(
        "order.created",
        "order-svc",
        order_id,
        json!({"order_id": order_id, "customer_id": customer_id,
               "lines": [{"product_id": Uuid::now_v7(), "seller_id": Uuid::now_v7(),
                          "quantity": 2, "unit_price_cents": 1250}],
               "total_cents": 2500, "currency": "EUR", "payment_method": payment_method,
               "created_at": Utc::now()}),
    )
}

fn reserved(order_id: Uuid) -> Value {
    envelope(
        "inventory.reserved",
        "inventory-svc",
        order_id,
        json!({"order_id": order_id, "lines": [{"product_id": Uuid::now_v7(), "quantity": 2}],
               "expires_at": Utc::now() + chrono::Duration::minutes(15)}),
    )
}

fn rejected(order_id: Uuid) -> Value {
    envelope(
        "inventory.rejected",
        "inventory-svc",
        order_id,
        json!({"order_id": order_id, "reason": "out_of_stock", "shortages": []}),
    )
}

fn released(order_id: Uuid, reason: &str) -> Value {
    envelope(
        "inventory.released",
        "inventory-svc",
        order_id,
        json!({"order_id": order_id, "reason": reason}),
    )
}

fn cancelled(order_id: Uuid) -> Value {
    envelope(
        "order.cancelled",
        "order-svc",
        order_id,
        json!({"order_id": order_id, "customer_id": Uuid::now_v7(),
               "reason": "customer_cancelled"}),
    )
}

fn key(order_id: Uuid, step: &str) -> Option<String> {
    Some(format!("order-{order_id}-{step}"))
}

fn ok(order_id: Uuid, step: &str) -> (String, String, Option<String>) {
    (step.into(), "ok".into(), key(order_id, step))
}

#[tokio::test]
async fn authorized_then_reserved_captures_once() {
    let mut world = World::stripe().await;
    let order = Uuid::now_v7();
    world.deliver(&order_created(order, "pm_card_visa")).await;
    assert_eq!(world.events(order), ["payment.authorized"]);
    let authorized = world.event(order, "payment.authorized");
    assert_eq!(authorized["data"]["amount_cents"], 2500);
    assert_eq!(authorized["data"]["currency"], "EUR");
    assert_eq!(authorized["correlation_id"], order.to_string());
    let intents = world.fake().intents_for_order(order);
    assert_eq!(intents.len(), 1, "one PaymentIntent per order");
    assert_eq!(intents[0]["status"], "requires_capture");
    assert_eq!(intents[0]["capture_method"], "manual");
    assert_eq!(intents[0]["amount"], 2500);
    assert_eq!(intents[0]["currency"], "eur");

    world.deliver(&reserved(order)).await;
    assert_eq!(
        world.events(order),
        ["payment.authorized", "payment.completed"]
    );
    let completed = world.event(order, "payment.completed");
    assert_eq!(
        completed["data"]["payment_id"],
        authorized["data"]["payment_id"]
    );
    assert_eq!(completed["data"]["amount_cents"], 2500);
    let counts = world.fake().counts_for_order(order);
    assert_eq!(
        (
            counts.intents,
            counts.captures,
            counts.cancels,
            counts.refunds
        ),
        (1, 1, 0, 0)
    );
    assert_eq!(world.status(order).await, "captured");
    assert_eq!(
        world.ledger(order).await,
        [ok(order, "authorize"), ok(order, "capture")]
    );
}

#[tokio::test]
async fn reserved_before_authorized_captures_once() {
    let mut world = World::stripe().await;
    let order = Uuid::now_v7();
    world.deliver(&reserved(order)).await;
    assert!(
        world.events(order).is_empty(),
        "nothing to do before the order is known"
    );
    assert!(world.fake().intents_for_order(order).is_empty());

    world.deliver(&order_created(order, "pm_card_visa")).await;
    assert_eq!(
        world.events(order),
        ["payment.authorized", "payment.completed"]
    );
    let counts = world.fake().counts_for_order(order);
    assert_eq!((counts.intents, counts.captures), (1, 1));
    assert_eq!(
        world.ledger(order).await,
        [ok(order, "authorize"), ok(order, "capture")]
    );
}

#[tokio::test]
async fn a_declined_card_fails_with_the_decline_code_and_nothing_is_captured() {
    let mut world = World::stripe().await;
    let cases = [
        ("pm_card_chargeDeclined", "card_declined"),
        (
            "pm_card_chargeDeclinedInsufficientFunds",
            "insufficient_funds",
        ),
        ("pm_card_doesNotExist", "invalid_payment_method"),
    ];
    let mut orders = Vec::new();
    for (method, _) in cases {
        let order = Uuid::now_v7();
        world.send(&order_created(order, method)).await;
        world.send(&reserved(order)).await;
        orders.push(order);
    }
    world.settle().await;
    for (order, (method, code)) in orders.iter().zip(cases) {
        assert_eq!(world.events(*order), ["payment.failed"], "{method}");
        assert_eq!(
            world.event(*order, "payment.failed")["data"]["reason"],
            code
        );
        assert_eq!(world.fake().counts_for_order(order).captures, 0, "{method}");
        assert_eq!(world.status(*order).await, "failed");
        let ledger = world.ledger(*order).await;
        assert_eq!(ledger.len(), 1, "{method}: {ledger:?}");
        assert_eq!(ledger[0].1, "declined");
        // The declined intent (none for a payment method Stripe does not know) is kept
        // for reconciliation.
        let intent: Option<String> =
            sqlx::query_scalar("SELECT intent_id FROM payments WHERE order_id = $1")
                .bind(order)
                .fetch_one(&world.pool)
                .await
                .expect("row");
        let made = world.fake().intents_for_order(order);
        assert_eq!(made.len(), usize::from(code != "invalid_payment_method"));
        let made = made
            .first()
            .and_then(|i| i["id"].as_str())
            .map(str::to_owned);
        assert_eq!(intent, made, "{method}");
    }
}

#[tokio::test]
async fn rejected_stock_voids_the_hold_and_never_captures() {
    let mut world = World::stripe().await;
    let order = Uuid::now_v7();
    world.deliver(&order_created(order, "pm_card_visa")).await;
    world.deliver(&rejected(order)).await;
    // A late reservation (impossible in practice, harmless in any case) captures nothing.
    world.deliver(&reserved(order)).await;
    assert_eq!(
        world.events(order),
        ["payment.authorized", "payment.voided"]
    );
    let counts = world.fake().counts_for_order(order);
    assert_eq!((counts.captures, counts.cancels, counts.refunds), (0, 1, 0));
    assert_eq!(
        world.fake().intents_for_order(order)[0]["status"],
        "canceled"
    );
    assert_eq!(
        world.ledger(order).await,
        [ok(order, "authorize"), ok(order, "void")]
    );

    // Rejected before the order reached payment: nothing is ever held.
    let early = Uuid::now_v7();
    world.deliver(&rejected(early)).await;
    world.deliver(&order_created(early, "pm_card_visa")).await;
    assert!(world.events(early).is_empty(), "{:?}", world.events(early));
    assert!(world.fake().intents_for_order(early).is_empty());
    assert_eq!(world.status(early).await, "skipped");
}

#[tokio::test]
async fn captured_then_rejected_is_refunded_once() {
    let mut world = World::stripe().await;
    let order = Uuid::now_v7();
    world.deliver(&order_created(order, "pm_card_visa")).await;
    world.deliver(&reserved(order)).await;
    // The reservation expired before the capture: nothing yet, inventory decides.
    world.deliver(&released(order, "expired")).await;
    assert_eq!(
        world.events(order),
        ["payment.authorized", "payment.completed"]
    );
    // Inventory could not take the stock again.
    world.deliver(&rejected(order)).await;
    world.deliver(&rejected(order)).await;
    assert_eq!(
        world.events(order),
        [
            "payment.authorized",
            "payment.completed",
            "payment.refunded"
        ]
    );
    assert_eq!(
        world.event(order, "payment.refunded")["data"]["amount_cents"],
        2500
    );
    let counts = world.fake().counts_for_order(order);
    assert_eq!((counts.captures, counts.cancels, counts.refunds), (1, 0, 1));
    assert_eq!(world.status(order).await, "refunded");
}

#[tokio::test]
async fn a_cancel_voids_a_hold_and_refunds_a_capture() {
    let mut world = World::stripe().await;
    let held = Uuid::now_v7();
    world.deliver(&order_created(held, "pm_card_visa")).await;
    world.deliver(&cancelled(held)).await;
    world.deliver(&released(held, "cancelled")).await;
    assert_eq!(world.events(held), ["payment.authorized", "payment.voided"]);
    let counts = world.fake().counts_for_order(held);
    assert_eq!((counts.captures, counts.cancels, counts.refunds), (0, 1, 0));

    let taken = Uuid::now_v7();
    world.deliver(&order_created(taken, "pm_card_visa")).await;
    world.deliver(&reserved(taken)).await;
    world.deliver(&cancelled(taken)).await;
    assert_eq!(
        world.events(taken),
        [
            "payment.authorized",
            "payment.completed",
            "payment.refunded"
        ]
    );
    let counts = world.fake().counts_for_order(taken);
    assert_eq!((counts.captures, counts.cancels, counts.refunds), (1, 0, 1));

    // An expiry release before the authorization: nothing is held, and the payment is
    // said void so that order-svc can cancel the order.
    let expired = Uuid::now_v7();
    world.deliver(&released(expired, "expired")).await;
    world.deliver(&order_created(expired, "pm_card_visa")).await;
    assert_eq!(world.events(expired), ["payment.voided"]);
    assert!(world.fake().intents_for_order(expired).is_empty());
}

#[tokio::test]
async fn a_capture_answered_500_is_retried_with_the_same_key_and_captures_once() {
    let mut world = World::stripe().await;
    let order = Uuid::now_v7();
    world.deliver(&order_created(order, "pm_card_visa")).await;
    world
        .fake()
        .fail_next(Route::Capture, 1, Failure::Status500);
    world.deliver(&reserved(order)).await;
    assert_eq!(
        world.events(order),
        ["payment.authorized", "payment.completed"]
    );
    assert_eq!(
        world.fake().requests(Route::Capture),
        2,
        "the 500, then the retry"
    );
    assert_eq!(world.fake().counts_for_order(order).captures, 1);
    let pool = world.pool.clone();
    let ledger = eventually("the failed attempt in the ledger", || {
        let pool = pool.clone();
        async move {
            let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
                "SELECT step, result, idempotency_key FROM payment_ledger \
                 WHERE order_id = $1 AND step = 'capture' ORDER BY at",
            )
            .bind(order)
            .fetch_all(&pool)
            .await
            .ok()?;
            (rows.len() == 2).then_some(rows)
        }
    })
    .await;
    assert_eq!(
        ledger,
        [
            ("capture".into(), "transient".into(), key(order, "capture")),
            ok(order, "capture"),
        ]
    );
}

/// The capture made right after an authorization fails, so the handler's transaction
/// rolls back while the hold stays at Stripe. A release handled before the retry must
/// not leave that hold behind: the retry finds it in the ledger and voids it.
/// The retry waits 5 s, far longer than handling the release takes.
#[tokio::test]
async fn a_hold_left_by_a_rolled_back_attempt_is_voided_when_the_stock_is_released() {
    let mut world = World::start(true, |settings| {
        settings.messaging.retry_delays_ms = vec![5_000];
    })
    .await;
    let order = Uuid::now_v7();
    world.deliver(&reserved(order)).await;
    world
        .fake()
        .fail_next(Route::Capture, 1, Failure::Status500);
    let created = order_created(order, "pm_card_visa");
    world.send(&created).await;
    eventually("the failed capture", || async {
        (world.fake().requests(Route::Capture) == 1).then_some(())
    })
    .await;
    assert_eq!(
        world.fake().counts_for_order(order).intents,
        1,
        "a hold exists"
    );
    world.deliver(&released(order, "expired")).await;
    world.settle().await;

    assert_eq!(world.events(order), ["payment.voided"]);
    assert_eq!(world.status(order).await, "voided");
    let counts = world.fake().counts_for_order(order);
    assert_eq!((counts.captures, counts.cancels), (0, 1), "{counts:?}");
}

#[tokio::test]
async fn a_capture_timeout_is_retried_and_captures_once() {
    let mut world = World::start(true, |settings| {
        settings.payments.provider_timeout_ms = 1_500;
    })
    .await;
    let order = Uuid::now_v7();
    world.deliver(&order_created(order, "pm_card_visa")).await;
    // Stripe captures but the answer never arrives in time.
    world
        .fake()
        .fail_next(Route::Capture, 1, Failure::Delay(Duration::from_secs(20)));
    world.deliver(&reserved(order)).await;
    assert_eq!(
        world.events(order),
        ["payment.authorized", "payment.completed"]
    );
    assert!(world.fake().requests(Route::Capture) >= 2);
    assert_eq!(world.fake().counts_for_order(order).captures, 1);
}

#[tokio::test]
async fn every_event_delivered_twice_captures_once() {
    let mut world = World::stripe().await;
    let order = Uuid::now_v7();
    let created = order_created(order, "pm_card_visa");
    let reserved_event = reserved(order);
    for event in [&created, &reserved_event, &created, &reserved_event] {
        world.send(event).await;
    }
    // The same facts again under new ids: not caught by the inbox, only by the state.
    let mut again = created.clone();
    again["id"] = json!(Uuid::now_v7());
    world.send(&again).await;
    let mut again = reserved_event.clone();
    again["id"] = json!(Uuid::now_v7());
    world.send(&again).await;
    world.settle().await;
    assert_eq!(
        world.events(order),
        ["payment.authorized", "payment.completed"]
    );
    let counts = world.fake().counts_for_order(order);
    assert_eq!((counts.intents, counts.captures), (1, 1));
}

#[tokio::test]
async fn concurrent_events_of_many_orders_capture_each_exactly_once() {
    let mut world = World::stripe().await;
    let orders: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    for (i, order) in orders.iter().enumerate() {
        let created = order_created(*order, "pm_card_visa");
        let reserved_event = reserved(*order);
        if i % 2 == 0 {
            world.send(&reserved_event).await;
            world.send(&created).await;
        } else {
            world.send(&created).await;
            world.send(&reserved_event).await;
        }
    }
    world.settle().await;
    for order in &orders {
        let events = world.events(*order);
        assert_eq!(
            events,
            ["payment.authorized", "payment.completed"],
            "{order}"
        );
        assert_eq!(world.fake().counts_for_order(order).captures, 1, "{order}");
    }
}

#[tokio::test]
async fn the_webhook_records_signed_events_and_refuses_others() {
    let mut world = World::stripe().await;
    let order = Uuid::now_v7();
    world.deliver(&order_created(order, "pm_card_visa")).await;
    let intent = world.fake().intents_for_order(order).remove(0);
    let payload = world
        .fake()
        .event("payment_intent.amount_capturable_updated", &intent);
    let url = format!("{}/api/v1/payments/webhook", world.url);
    let post = |body: String, signature: Option<String>| {
        let mut request = world
            .client
            .post(&url)
            .header("content-type", "application/json")
            .body(body);
        if let Some(signature) = signature {
            request = request.header("stripe-signature", signature);
        }
        request.send()
    };

    let signature = Webhook::generate_test_header(&payload, WEBHOOK_SECRET, None);
    let response = post(payload.clone(), Some(signature.clone()))
        .await
        .expect("post");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body, json!({"received": true, "duplicate": false}));
    // Stripe delivers at least once: the same event again is harmless.
    let response = post(payload.clone(), Some(signature)).await.expect("post");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["duplicate"], true);
    let recorded: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT step, result, intent_id FROM payment_ledger \
         WHERE order_id = $1 AND source = 'webhook'",
    )
    .bind(order)
    .fetch_all(&world.pool)
    .await
    .expect("ledger");
    assert_eq!(
        recorded,
        [(
            "payment_intent.amount_capturable_updated".to_owned(),
            "requires_capture".to_owned(),
            intent["id"].as_str().map(str::to_owned),
        )]
    );

    // Tampered: signed, then the amount changed.
    let tampered = payload.replace("\"amount\":2500", "\"amount\":1");
    assert_ne!(tampered, payload);
    let signature = Webhook::generate_test_header(&payload, WEBHOOK_SECRET, None);
    let response = post(tampered, Some(signature)).await.expect("post");
    assert_eq!(response.status(), 400);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let problem: Value = response.json().await.expect("json");
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("Stripe-Signature")),
        "{problem}"
    );
    // Signed with another secret, unsigned, and signed too long ago.
    let other = Webhook::generate_test_header(&payload, "whsec_someone_else", None);
    assert_eq!(
        post(payload.clone(), Some(other))
            .await
            .expect("post")
            .status(),
        400
    );
    let response = post(payload.clone(), None).await.expect("post");
    assert_eq!(response.status(), 400);
    let problem: Value = response.json().await.expect("json");
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("missing"))
    );
    let old = Webhook::generate_test_header(
        &payload,
        WEBHOOK_SECRET,
        Some(Utc::now().timestamp() - 3600),
    );
    assert_eq!(post(payload, Some(old)).await.expect("post").status(), 400);
    let count: i64 =
        sqlx::query_scalar("SELECT count(*) FROM payment_ledger WHERE source = 'webhook'")
            .fetch_one(&world.pool)
            .await
            .expect("count");
    assert_eq!(count, 1, "refused calls record nothing");
}

#[tokio::test]
async fn the_simulated_provider_pays_declines_and_refuses_webhooks() {
    let mut world = World::start(false, |_| {}).await;
    let paid = Uuid::now_v7();
    let declined = Uuid::now_v7();
    let voided = Uuid::now_v7();
    world.send(&order_created(paid, "pm_card_visa")).await;
    world.send(&reserved(paid)).await;
    world
        .send(&order_created(
            declined,
            "pm_card_chargeDeclinedInsufficientFunds",
        ))
        .await;
    world.send(&order_created(voided, "pm_card_visa")).await;
    world.settle().await;
    world.deliver(&rejected(voided)).await;
    assert_eq!(
        world.events(paid),
        ["payment.authorized", "payment.completed"]
    );
    assert_eq!(world.events(declined), ["payment.failed"]);
    assert_eq!(
        world.event(declined, "payment.failed")["data"]["reason"],
        "insufficient_funds"
    );
    assert_eq!(
        world.events(voided),
        ["payment.authorized", "payment.voided"]
    );
    let provider: String = sqlx::query_scalar("SELECT provider FROM payments WHERE order_id = $1")
        .bind(paid)
        .fetch_one(&world.pool)
        .await
        .expect("row");
    assert_eq!(provider, "simulated");

    let response = world
        .client
        .post(format!("{}/api/v1/payments/webhook", world.url))
        .header("stripe-signature", "t=1,v1=00")
        .body("{}")
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 503, "no webhook secret configured");
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let response = world
        .client
        .get(format!("{}/api/v1/payments/{paid}", world.url))
        .send()
        .await
        .expect("get");
    assert_eq!(
        response.status(),
        401,
        "a payment is shown only to its customer"
    );
}

#[tokio::test]
async fn an_intent_cancelled_behind_our_back_dead_letters_the_capture_for_a_person() {
    let mut world = World::stripe().await;
    let order = Uuid::now_v7();
    world.deliver(&order_created(order, "pm_card_visa")).await;
    let intent = world.fake().intents_for_order(order).remove(0);
    // Someone cancels the intent in Stripe's dashboard.
    let cancelled = world
        .client
        .post(format!(
            "{}v1/payment_intents/{}/cancel",
            world.fake().base_url(),
            intent["id"].as_str().expect("id")
        ))
        .bearer_auth(stripe::SECRET_KEY)
        .send()
        .await
        .expect("cancel");
    assert_eq!(cancelled.status(), 200);
    let event = reserved(order);
    world.send(&event).await;
    let pool = world.pool.clone();
    let dead: (String, String, String, String) =
        eventually("the capture in the dead letters", || {
            let pool = pool.clone();
            async move {
                sqlx::query_as(
                    "SELECT message_id, handler, error_kind, error_message FROM dead_letters",
                )
                .fetch_optional(&pool)
                .await
                .ok()?
            }
        })
        .await;
    assert_eq!(dead.0, event["id"].as_str().expect("id"));
    assert_eq!(
        (dead.1.as_str(), dead.2.as_str()),
        ("capture_on_reserved", "permanent")
    );
    assert!(
        dead.3.contains("payment_intent_unexpected_state"),
        "{}",
        dead.3
    );
    assert_eq!(world.status(order).await, "authorized", "nothing changed");
    assert_eq!(world.fake().counts_for_order(order).captures, 0);
}

#[tokio::test]
async fn a_payment_is_shown_to_its_customer_and_admins_only() {
    let mut world = World::stripe().await;
    let (order, customer) = (Uuid::now_v7(), Uuid::now_v7());
    world
        .deliver(&order_created_by(order, customer, "pm_card_visa"))
        .await;
    world.deliver(&reserved(order)).await;
    let url = format!("{}/api/v1/payments/{order}", world.url);
    let get = |token: Option<String>| {
        let mut request = world.client.get(&url);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };

    let response = get(Some(world.token(customer, Role::Customer)))
        .await
        .expect("get");
    assert_eq!(response.status(), 200);
    let payment: Value = response.json().await.expect("json");
    assert_eq!(payment["status"], "captured");
    assert_eq!(payment["amount_cents"], 2500);
    assert_eq!(payment["provider"], "stripe");
    assert_eq!(
        payment["payment_id"],
        world.event(order, "payment.completed")["data"]["payment_id"]
    );
    let steps: Vec<(&str, &str)> = payment["ledger"]
        .as_array()
        .expect("ledger")
        .iter()
        .map(|e| {
            (
                e["step"].as_str().unwrap_or(""),
                e["result"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(steps, [("authorize", "ok"), ("capture", "ok")]);

    let admin = get(Some(world.token(Uuid::now_v7(), Role::Admin)))
        .await
        .expect("get");
    assert_eq!(admin.status(), 200);
    let stranger = get(Some(world.token(Uuid::now_v7(), Role::Customer)))
        .await
        .expect("get");
    assert_eq!(stranger.status(), 403);
    assert_eq!(get(None).await.expect("get").status(), 401);

    let token = world.token(customer, Role::Customer);
    let unknown = world
        .client
        .get(format!("{}/api/v1/payments/{}", world.url, Uuid::now_v7()))
        .bearer_auth(&token)
        .send()
        .await
        .expect("get");
    assert_eq!(unknown.status(), 404);
    let bad = world
        .client
        .get(format!("{}/api/v1/payments/not-a-uuid", world.url))
        .bearer_auth(&token)
        .send()
        .await
        .expect("get");
    assert_eq!(bad.status(), 400);
    assert_eq!(bad.headers()["content-type"], "application/problem+json");
}
