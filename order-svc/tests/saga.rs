//! order-svc against a real PostgreSQL and RabbitMQ: the catalog replica fed by product
//! events, idempotent placement, and the order's state machine fed by saga events
//! published to the broker as inventory-svc and payment-svc publish them. HTTP, auth and
//! the gateway are tested in e2e/tests/orders.rs.

use std::time::Duration;

use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use lapin::options::ConfirmSelectOptions;
use order_svc::domain::{IdempotencyKey, OrderRequest};
use order_svc::orders::{self, Canceller, OrderView, Placement};
use serde_json::{Value, json};
use shared::Settings;
use shared::events::{
    Event, InventoryCommitted, InventoryRejected, InventoryReleased, InventoryReserved,
    PaymentAuthorized, PaymentCompleted, PaymentFailed, PaymentRefunded, PaymentVoided,
    ProductCreated, ProductDeleted, ProductUpdated, Shortage, StockLine,
};
use shared::http::ApiError;
use shared::messaging::Outbox;
use shared::service::Service;
use sqlx::PgPool;
use testkit::{Observer, TestEnv, eventually};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// order-svc running in this test, a pool on its database, and a channel to publish
/// events as the other services would.
struct OrderSvc {
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    pool: PgPool,
    outbox: Outbox,
    channel: lapin::Channel,
    _amqp: lapin::Connection,
    exchange: String,
    /// Last: the namespace goes after the service stopped.
    env: TestEnv,
}

impl Drop for OrderSvc {
    fn drop(&mut self) {
        self.stop.cancel();
        self.task.abort();
    }
}

impl OrderSvc {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    async fn start_with(configure: impl FnOnce(&mut Settings)) -> Self {
        let env = TestEnv::new();
        let mut settings = env.settings();
        configure(&mut settings);
        let app = order_svc::Application::build(settings.clone())
            .await
            .expect("order-svc starts");
        let service = Service::from(app);
        let stop = service.shutdown_token();
        let task = tokio::spawn(service.run_until_stopped());
        let pool = shared::db::bootstrap(&settings, "order", Some(&order_svc::MIGRATIONS))
            .await
            .expect("the order database");
        let amqp = env.amqp().await;
        let channel = amqp.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        Self {
            stop,
            task,
            pool,
            outbox: Outbox::new(&env.topology("order")),
            channel,
            _amqp: amqp,
            exchange: env.topology("order").events_exchange(),
            env,
        }
    }

    /// Publishes each envelope, in this order, with its id as message id.
    async fn send(&self, envelopes: &[Value]) {
        for envelope in envelopes {
            let event_type = envelope["type"].as_str().expect("type");
            let id = envelope["id"].as_str().expect("id");
            testkit::publish(
                &self.channel,
                &self.exchange,
                event_type,
                &serde_json::to_vec(envelope).expect("json"),
                BasicProperties::default()
                    .with_message_id(id.into())
                    .with_type(event_type.into())
                    .with_content_type("application/json".into()),
            )
            .await;
        }
    }

    /// Waits until order-svc has handled (committed) every one of these envelopes.
    async fn handled(&self, envelopes: &[Value]) {
        let ids: Vec<Uuid> = envelopes.iter().map(id_of).collect();
        eventually("order-svc to handle the events", || async {
            let done: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM processed_messages WHERE message_id = ANY($1)",
            )
            .bind(&ids)
            .fetch_one(&self.pool)
            .await
            .ok()?;
            (done == ids.len() as i64).then_some(())
        })
        .await;
    }

    async fn send_and_wait(&self, envelopes: &[Value]) {
        self.send(envelopes).await;
        self.handled(envelopes).await;
    }

    /// One at a time, each handled before the next is sent: this arrival order exactly.
    async fn send_in_order(&self, envelopes: &[Value]) {
        for envelope in envelopes {
            self.send_and_wait(std::slice::from_ref(envelope)).await;
        }
    }

    /// A product in the replica, through `product.created`.
    async fn product(&self, price_cents: i64, currency: &str) -> Uuid {
        let product_id = Uuid::now_v7();
        let created = product_created(product_id, price_cents, currency, Utc::now());
        self.send_and_wait(&[created]).await;
        product_id
    }

    async fn place(
        &self,
        customer: Uuid,
        key: &str,
        lines: &[(Uuid, i64)],
        payment_method: &str,
    ) -> Result<Placement, ApiError> {
        let key = IdempotencyKey::parse(Some(Ok(key))).expect("a valid key");
        let items = lines
            .iter()
            .map(|(p, q)| (Some(p.to_string()), Some(*q)))
            .collect();
        let request = OrderRequest::parse(Some(items), Some(payment_method))?;
        orders::place(&self.pool, &self.outbox, customer, &key, &request).await
    }

    /// A new pending order of one unit of `product`.
    async fn order(&self, product: Uuid) -> OrderView {
        let placed = self
            .place(Uuid::now_v7(), "k", &[(product, 1)], "pm_card_visa")
            .await
            .expect("placed");
        assert_eq!(placed.order.status, "pending");
        placed.order
    }

    async fn get(&self, order_id: Uuid) -> OrderView {
        let mut conn = self.pool.acquire().await.expect("connection");
        orders::find(&mut conn, order_id)
            .await
            .expect("query")
            .expect("the order exists")
    }
}

fn id_of(envelope: &Value) -> Uuid {
    envelope["id"].as_str().expect("id").parse().expect("uuid")
}

fn envelope<T: Event>(source: &str, correlation_id: Uuid, data: &T) -> Value {
    json!({
        "id": Uuid::now_v7(), "type": T::TYPE, "version": 1, "occurred_at": Utc::now(),
        "source": source, "correlation_id": correlation_id, "causation_id": null,
        "data": data,
    })
}

/// The same event again under a new id, as a publisher that retried would send it.
fn again(envelope: &Value) -> Value {
    let mut copy = envelope.clone();
    copy["id"] = json!(Uuid::now_v7());
    copy
}

const SELLER: Uuid = Uuid::from_u128(0x5e11e5);

fn product_created(id: Uuid, price_cents: i64, currency: &str, at: DateTime<Utc>) -> Value {
    let data = ProductCreated {
        product_id: id,
        seller_id: SELLER,
        name: "Teapot".into(),
        price_cents,
        currency: currency.into(),
        category: None,
        initial_stock: 10,
        created_at: at,
    };
    envelope("product-svc", id, &data)
}

fn product_updated(id: Uuid, price_cents: i64, at: DateTime<Utc>) -> Value {
    let data = ProductUpdated {
        product_id: id,
        seller_id: SELLER,
        name: format!("Teapot at {price_cents}"),
        price_cents,
        currency: "EUR".into(),
        category: None,
        updated_at: at,
    };
    envelope("product-svc", id, &data)
}

fn product_deleted(id: Uuid, at: DateTime<Utc>) -> Value {
    let data = ProductDeleted {
        product_id: id,
        seller_id: SELLER,
        deleted_at: at,
    };
    envelope("product-svc", id, &data)
}

/// The saga events order-svc consumes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    Reserved,
    Rejected,
    ReleasedExpired,
    ReleasedPaymentFailed,
    Committed,
    Authorized,
    Failed,
    Completed,
    Voided,
    Refunded,
}

impl Step {
    fn event_type(self) -> &'static str {
        match self {
            Self::Reserved => InventoryReserved::TYPE,
            Self::Rejected => InventoryRejected::TYPE,
            Self::ReleasedExpired | Self::ReleasedPaymentFailed => InventoryReleased::TYPE,
            Self::Committed => InventoryCommitted::TYPE,
            Self::Authorized => PaymentAuthorized::TYPE,
            Self::Failed => PaymentFailed::TYPE,
            Self::Completed => PaymentCompleted::TYPE,
            Self::Voided => PaymentVoided::TYPE,
            Self::Refunded => PaymentRefunded::TYPE,
        }
    }

    fn event(self, order_id: Uuid) -> Value {
        let payment_id = Uuid::from_u128(order_id.as_u128() ^ 1);
        match self {
            Self::Reserved => envelope(
                "inventory-svc",
                order_id,
                &InventoryReserved {
                    order_id,
                    lines: vec![StockLine {
                        product_id: Uuid::now_v7(),
                        quantity: 1,
                    }],
                    expires_at: Utc::now() + Duration::from_secs(900),
                },
            ),
            Self::Rejected => envelope(
                "inventory-svc",
                order_id,
                &InventoryRejected {
                    order_id,
                    reason: "out_of_stock".into(),
                    shortages: vec![Shortage {
                        product_id: Uuid::now_v7(),
                        requested: 1,
                        available: 0,
                    }],
                },
            ),
            Self::ReleasedExpired => envelope(
                "inventory-svc",
                order_id,
                &InventoryReleased {
                    order_id,
                    reason: "expired".into(),
                },
            ),
            Self::ReleasedPaymentFailed => envelope(
                "inventory-svc",
                order_id,
                &InventoryReleased {
                    order_id,
                    reason: "payment_failed".into(),
                },
            ),
            Self::Committed => {
                envelope("inventory-svc", order_id, &InventoryCommitted { order_id })
            }
            Self::Authorized => envelope(
                "payment-svc",
                order_id,
                &PaymentAuthorized {
                    order_id,
                    payment_id,
                    amount_cents: 1250,
                    currency: "EUR".into(),
                },
            ),
            Self::Failed => envelope(
                "payment-svc",
                order_id,
                &PaymentFailed {
                    order_id,
                    reason: "card_declined".into(),
                },
            ),
            Self::Completed => envelope(
                "payment-svc",
                order_id,
                &PaymentCompleted {
                    order_id,
                    payment_id,
                    amount_cents: 1250,
                    currency: "EUR".into(),
                },
            ),
            Self::Voided => envelope(
                "payment-svc",
                order_id,
                &PaymentVoided {
                    order_id,
                    payment_id,
                },
            ),
            Self::Refunded => envelope(
                "payment-svc",
                order_id,
                &PaymentRefunded {
                    order_id,
                    payment_id,
                    amount_cents: 1250,
                },
            ),
        }
    }
}

fn permutations(steps: &[Step]) -> Vec<Vec<Step>> {
    if steps.len() <= 1 {
        return vec![steps.to_vec()];
    }
    let mut all = Vec::new();
    for i in 0..steps.len() {
        let mut rest = steps.to_vec();
        let first = rest.remove(i);
        for mut tail in permutations(&rest) {
            tail.insert(0, first);
            all.push(tail);
        }
    }
    all
}

/// The event types in an order's history, without the order's own.
fn saga_history(order: &OrderView) -> Vec<&str> {
    order
        .history
        .iter()
        .map(|h| h.event.as_str())
        .filter(|e| !e.starts_with("order."))
        .collect()
}

fn own_history(order: &OrderView) -> Vec<&str> {
    order
        .history
        .iter()
        .map(|h| h.event.as_str())
        .filter(|e| e.starts_with("order."))
        .collect()
}

#[tokio::test]
async fn every_arrival_order_of_a_saga_gives_the_same_end_state() {
    use Step::*;
    let svc = OrderSvc::start().await;
    let product = svc.product(1250, "EUR").await;
    let scenarios: &[(&str, &[Step], &str, Option<&str>)] = &[
        (
            "paid",
            &[Reserved, Authorized, Completed, Committed],
            "paid",
            None,
        ),
        (
            "declined",
            &[Reserved, Failed, ReleasedPaymentFailed],
            "cancelled",
            Some("payment_declined"),
        ),
        (
            "out of stock",
            &[Rejected, Authorized, Voided],
            "cancelled",
            Some("out_of_stock"),
        ),
        (
            "expired",
            &[Reserved, Authorized, ReleasedExpired, Voided],
            "cancelled",
            Some("reservation_expired"),
        ),
        (
            "captured across the expiry, stock taken again",
            &[Reserved, Authorized, ReleasedExpired, Completed, Committed],
            "paid",
            None,
        ),
        (
            "captured, not yet committed: waits",
            &[Reserved, Authorized, Completed],
            "pending",
            None,
        ),
    ];
    // One order per scenario and arrival order.
    let mut cases = Vec::new();
    for (name, steps, status, reason) in scenarios {
        for order in permutations(steps) {
            let order_id = svc.order(product).await.id;
            let events: Vec<Value> = order.iter().map(|s| s.event(order_id)).collect();
            cases.push((*name, order, order_id, events, *status, *reason));
        }
    }
    assert_eq!(cases.len(), 24 + 6 + 6 + 24 + 120 + 6);
    // Round k delivers the k-th event of every order and waits for all of them to be
    // handled, so each order sees exactly its permutation while orders run side by side.
    for k in 0..5 {
        let round: Vec<Value> = cases
            .iter()
            .filter_map(|(_, _, _, events, _, _)| events.get(k).cloned())
            .collect();
        svc.send_and_wait(&round).await;
    }
    for (name, order, order_id, _, status, reason) in &cases {
        let seen = svc.get(*order_id).await;
        let what = format!("{name}: {order:?}");
        assert_eq!(seen.status, *status, "{what}");
        assert_eq!(seen.status_reason.as_deref(), *reason, "{what}");
        let expected: Vec<&str> = order.iter().map(|s| s.event_type()).collect();
        assert_eq!(
            saga_history(&seen),
            expected,
            "{what}: every event, in arrival order"
        );
        let own: &[&str] = match *status {
            "paid" => &["order.created", "order.paid"],
            "cancelled" => &["order.created", "order.cancelled"],
            _ => &["order.created"],
        };
        assert_eq!(own_history(&seen), own, "{what}");
    }
    let metrics = shared::metrics::render();
    for outcome in ["paid", "cancelled"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("saga_duration_seconds_count")
                    && l.contains(&format!("outcome=\"{outcome}\""))),
            "saga_duration_seconds for {outcome} in:\n{metrics}"
        );
    }
}

#[tokio::test]
async fn copies_and_repeats_of_events_change_nothing() {
    // One message at a time, so that the last one handled means all before it were.
    let svc = OrderSvc::start_with(|s| s.messaging.concurrency = 1).await;
    let mut observer = Observer::new(&svc.env, &["order.#"]).await;
    let product = svc.product(1250, "EUR").await;
    let order = svc.order(product).await;
    let events: Vec<Value> = [
        Step::Reserved,
        Step::Authorized,
        Step::Completed,
        Step::Committed,
    ]
    .iter()
    .map(|s| s.event(order.id))
    .collect();
    svc.send_and_wait(&events).await;
    assert_eq!(svc.get(order.id).await.status, "paid");

    // The same messages again (the inbox drops them), the same facts under new ids (kept
    // in the history, deciding nothing), then a last one to know all were handled.
    let repeats = [again(&events[2]), again(&events[3])];
    let last = Step::Refunded.event(order.id);
    svc.send(&events).await;
    svc.send(&repeats).await;
    svc.send_and_wait(std::slice::from_ref(&last)).await;

    let seen = svc.get(order.id).await;
    assert_eq!(seen.status, "paid");
    assert_eq!(
        saga_history(&seen),
        [
            "inventory.reserved",
            "payment.authorized",
            "payment.completed",
            "inventory.committed",
            "payment.completed",
            "inventory.committed",
            "payment.refunded",
        ]
    );
    assert_eq!(own_history(&seen), ["order.created", "order.paid"]);

    // On the broker: order.created, then one order.paid with the order's lines.
    let created = observer.next().await;
    assert_eq!(
        created.properties.kind().as_ref().map(|k| k.as_str()),
        Some("order.created")
    );
    let paid = observer.next().await;
    let body: Value = serde_json::from_slice(&paid.data).expect("json");
    assert_eq!(body["type"], "order.paid");
    assert_eq!(body["correlation_id"], order.id.to_string());
    assert_eq!(body["data"]["total_cents"], 1250);
    assert_eq!(body["data"]["lines"][0]["product_id"], product.to_string());
    assert_eq!(body["data"]["lines"][0]["seller_id"], SELLER.to_string());
}

#[tokio::test]
async fn a_customer_cancel_ends_a_pending_order_and_later_events_only_join_its_history() {
    let svc = OrderSvc::start().await;
    let mut observer = Observer::new(&svc.env, &["order.cancelled"]).await;
    let product = svc.product(500, "EUR").await;
    let order = svc.order(product).await;
    svc.send_in_order(&[
        Step::Reserved.event(order.id),
        Step::Authorized.event(order.id),
    ])
    .await;

    let stranger = Canceller {
        user_id: Uuid::now_v7(),
        admin: false,
    };
    let refused = orders::cancel(&svc.pool, &svc.outbox, order.id, &stranger).await;
    assert!(matches!(refused, Err(ApiError::NotFound(_))), "{refused:?}");
    assert_eq!(svc.get(order.id).await.status, "pending");

    let owner = Canceller {
        user_id: order.customer_id,
        admin: false,
    };
    let cancelled = orders::cancel(&svc.pool, &svc.outbox, order.id, &owner)
        .await
        .expect("cancelled");
    assert_eq!(cancelled.status, "cancelled");
    assert_eq!(
        cancelled.status_reason.as_deref(),
        Some("customer_cancelled")
    );
    let again = orders::cancel(&svc.pool, &svc.outbox, order.id, &owner).await;
    assert!(
        matches!(&again, Err(ApiError::Conflict(m)) if m.contains("customer_cancelled")),
        "{again:?}"
    );

    let published = observer.next().await;
    let body: Value = serde_json::from_slice(&published.data).expect("json");
    assert_eq!(body["data"]["order_id"], order.id.to_string());
    assert_eq!(body["data"]["customer_id"], order.customer_id.to_string());
    assert_eq!(body["data"]["reason"], "customer_cancelled");

    // A capture that crossed the cancel: recorded, absorbed.
    svc.send_in_order(&[
        Step::Completed.event(order.id),
        Step::Committed.event(order.id),
    ])
    .await;
    let seen = svc.get(order.id).await;
    assert_eq!(seen.status, "cancelled");
    assert_eq!(seen.status_reason.as_deref(), Some("customer_cancelled"));
    assert_eq!(
        saga_history(&seen),
        [
            "inventory.reserved",
            "payment.authorized",
            "payment.completed",
            "inventory.committed"
        ]
    );
    assert_eq!(own_history(&seen), ["order.created", "order.cancelled"]);
}

#[tokio::test]
async fn an_event_for_an_unknown_order_is_retried_then_dead_lettered() {
    let svc = OrderSvc::start().await;
    let stray = Step::Completed.event(Uuid::now_v7());
    svc.send(std::slice::from_ref(&stray)).await;
    let id = id_of(&stray).to_string();
    let (kind, attempts, message): (String, i32, String) =
        eventually("the event in order-svc's dead letters", || async {
            sqlx::query_as(
                "SELECT error_kind, attempts, error_message FROM dead_letters \
                 WHERE message_id = $1",
            )
            .bind(&id)
            .fetch_optional(&svc.pool)
            .await
            .ok()
            .flatten()
        })
        .await;
    assert_eq!(kind, "transient");
    // Test settings retry three times before parking.
    assert_eq!(attempts, 4, "{message}");
    assert!(message.contains("is not known"), "{message}");
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&svc.pool)
        .await
        .expect("count");
    assert_eq!(orders, 0);
}

#[tokio::test]
async fn the_replica_keeps_the_newest_terms_and_a_delete_wins() {
    let svc = OrderSvc::start().await;
    let customer = Uuid::now_v7();
    let product = Uuid::now_v7();
    let t0 = Utc::now();
    let second = |n: i64| t0 + chrono::TimeDelta::seconds(n);
    // The newest update arrives first, the creation and an older update after it.
    svc.send_and_wait(&[product_updated(product, 300, second(2))])
        .await;
    svc.send_and_wait(&[product_created(product, 100, "EUR", t0)])
        .await;
    svc.send_and_wait(&[product_updated(product, 200, second(1))])
        .await;
    let first = svc
        .place(customer, "first", &[(product, 2)], "pm_card_visa")
        .await
        .expect("placed");
    assert_eq!(first.order.total_cents, 600);
    assert_eq!(first.order.items[0].unit_price_cents, 300);
    assert_eq!(first.order.items[0].name, "Teapot at 300");

    // Deleted, then a later update: still deleted.
    svc.send_and_wait(&[product_deleted(product, second(3))])
        .await;
    svc.send_and_wait(&[product_updated(product, 400, second(4))])
        .await;
    let refused = svc
        .place(customer, "second", &[(product, 1)], "pm_card_visa")
        .await;
    match refused {
        Err(ApiError::Validation(errors)) => {
            assert_eq!(errors[0].field, "items[0].product_id");
            assert!(errors[0].message.contains("no longer sold"), "{errors:?}");
        }
        other => panic!("expected a validation error, got {other:?}"),
    }
    // A retry of the first request still gets its order: the key is answered first.
    let retried = svc
        .place(customer, "first", &[(product, 2)], "pm_card_visa")
        .await
        .expect("replayed");
    assert!(retried.replayed);
    assert_eq!(retried.order.id, first.order.id);

    // Deleted before it was ever created here: the creation never revives it.
    let ghost = Uuid::now_v7();
    svc.send_and_wait(&[product_deleted(ghost, t0)]).await;
    svc.send_and_wait(&[product_created(ghost, 100, "EUR", t0)])
        .await;
    let refused = svc
        .place(customer, "third", &[(ghost, 1)], "pm_card_visa")
        .await;
    assert!(
        matches!(&refused, Err(ApiError::Validation(e)) if e[0].message.contains("no longer sold")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn orders_are_priced_from_the_replica_in_one_currency() {
    let svc = OrderSvc::start().await;
    let mut observer = Observer::new(&svc.env, &["order.created"]).await;
    let customer = Uuid::now_v7();
    let teapot = svc.product(1250, "EUR").await;
    let cups = svc.product(300, "EUR").await;
    let dollars = svc.product(999, "USD").await;
    let unknown = Uuid::now_v7();

    let refused = svc
        .place(
            customer,
            "a",
            &[(teapot, 1), (unknown, 1), (dollars, 1)],
            "pm",
        )
        .await;
    match refused {
        Err(ApiError::Validation(errors)) => {
            let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
            assert_eq!(fields, ["items[1].product_id", "items"], "{errors:?}");
            assert!(errors[1].message.contains("one currency"), "{errors:?}");
        }
        other => panic!("expected a validation error, got {other:?}"),
    }
    // Nothing was written: the key is still free for a good request.
    let placed = svc
        .place(customer, "a", &[(teapot, 2), (cups, 3)], "pm_card_visa")
        .await
        .expect("placed");
    assert!(!placed.replayed);
    let order = placed.order;
    assert_eq!(order.total_cents, 2 * 1250 + 3 * 300);
    assert_eq!(order.currency, "EUR");
    assert_eq!(order.items.len(), 2);
    assert_eq!(order.items[1].line_total_cents, 900);
    assert_eq!(order.items[1].seller_id, SELLER);

    let published = observer.next().await;
    let body: Value = serde_json::from_slice(&published.data).expect("json");
    assert_eq!(body["correlation_id"], order.id.to_string());
    let data = &body["data"];
    assert_eq!(data["order_id"], order.id.to_string());
    assert_eq!(data["customer_id"], customer.to_string());
    assert_eq!(data["total_cents"], 3400);
    assert_eq!(data["currency"], "EUR");
    assert_eq!(data["payment_method"], "pm_card_visa");
    assert_eq!(data["lines"][0]["unit_price_cents"], 1250);
    assert_eq!(data["lines"][1]["quantity"], 3);
}

#[tokio::test]
async fn simultaneous_requests_with_one_key_make_one_order() {
    let svc = std::sync::Arc::new(OrderSvc::start().await);
    let product = svc.product(700, "EUR").await;
    let customer = Uuid::now_v7();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let svc = svc.clone();
        tasks.spawn(async move {
            svc.place(customer, "same-key", &[(product, 1)], "pm_card_visa")
                .await
                .expect("placed or replayed")
        });
    }
    let placements = tasks.join_all().await;
    let first = placements[0].order.id;
    assert!(placements.iter().all(|p| p.order.id == first));
    assert_eq!(placements.iter().filter(|p| !p.replayed).count(), 1);
    let count = |sql: &'static str| {
        let pool = svc.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .expect("count")
        }
    };
    assert_eq!(count("SELECT count(*) FROM orders").await, 1);
    assert_eq!(
        count("SELECT count(*) FROM order_history WHERE event_type = 'order.created'").await,
        1
    );

    let other_body = svc
        .place(customer, "same-key", &[(product, 2)], "pm_card_visa")
        .await;
    assert!(
        matches!(&other_body, Err(ApiError::Unprocessable(m)) if m.contains("Idempotency-Key")),
        "{other_body:?}"
    );
    // Keys belong to a customer: another one's same key is another order.
    let other_customer = svc
        .place(Uuid::now_v7(), "same-key", &[(product, 1)], "pm_card_visa")
        .await
        .expect("placed");
    assert_ne!(other_customer.order.id, first);
    assert!(!other_customer.replayed);
}
