//! Inventory through the gateway and the broker (issue 4): stock from product events,
//! who may read and adjust it, and reservations for the order saga, driven by events
//! injected as product-svc, order-svc and payment-svc publish them.
//!
//! The injected events go through the same kernel the services use: written to an
//! outbox of the test's own and published by a relay, with their ids as message ids.

use std::time::Duration;

use chrono::Utc;
use e2e::{Stack, StackOptions, Svc};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use shared::Settings;
use shared::messaging::Relay;
use shared::messaging::outbox::{OutboxMessage, insert};
use shared::service::{Infra, Needs};
use testkit::{Observer, eventually};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const ADMIN_EMAIL: &str = "root@example.com";
const ADMIN_PASSWORD: &str = "a long admin passphrase nobody guesses";

/// Publishes events as the other services would: through an outbox and a relay.
struct Producer {
    infra: Infra,
    stop: CancellationToken,
}

impl Producer {
    async fn start(settings: &Settings) -> Self {
        let needs = Needs {
            database: Some(None),
            redis: false,
        };
        let infra = Infra::connect("producer", settings, needs)
            .await
            .expect("the producer's database");
        let relay = Relay::new(
            infra.pool().expect("pool").clone(),
            infra.broker.clone().expect("broker"),
            &infra.topology,
            Duration::from_millis(50),
            100,
        );
        let stop = CancellationToken::new();
        tokio::spawn(relay.run(stop.clone()));
        Self { infra, stop }
    }

    /// Publishes these envelopes, in this order, all or none (one transaction).
    async fn send(&self, envelopes: &[Value]) {
        let mut tx = self.infra.pool().expect("pool").begin().await.expect("tx");
        for envelope in envelopes {
            let event_type = envelope["type"].as_str().expect("type").to_owned();
            let message = OutboxMessage {
                message_id: envelope["id"].as_str().expect("id").parse().expect("uuid"),
                exchange: self.infra.topology.events_exchange(),
                routing_key: event_type.clone(),
                event_type,
                correlation_id: envelope["correlation_id"].as_str().map(str::to_owned),
                headers: serde_json::Map::new(),
                body: serde_json::to_vec(envelope).expect("json"),
            };
            insert(&mut tx, &message).await.expect("outbox row");
        }
        tx.commit().await.expect("commit");
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// An event as `source` publishes it, in the saga `correlation_id`.
fn envelope(event_type: &str, source: &str, correlation_id: Uuid, data: Value) -> Value {
    json!({
        "id": Uuid::now_v7(), "type": event_type, "version": 1, "occurred_at": Utc::now(),
        "source": source, "correlation_id": correlation_id, "causation_id": null,
        "data": data,
    })
}

fn order_created(order_id: Uuid, lines: &[(Uuid, i64)]) -> Value {
    let lines: Vec<Value> = lines
        .iter()
        .map(|(product_id, quantity)| {
            json!({"product_id": product_id, "seller_id": Uuid::now_v7(),
                   "quantity": quantity, "unit_price_cents": 1250})
        })
        .collect();
    let total: i64 = lines.len() as i64 * 1250;
    envelope(
        "order.created",
        "order-svc",
        order_id,
        json!({"order_id": order_id, "customer_id": Uuid::now_v7(), "lines": lines,
               "total_cents": total, "currency": "EUR", "payment_method": "pm_card_visa",
               "created_at": Utc::now()}),
    )
}

fn payment_completed(order_id: Uuid) -> Value {
    envelope(
        "payment.completed",
        "payment-svc",
        order_id,
        json!({"order_id": order_id, "payment_id": Uuid::now_v7(), "amount_cents": 1250,
               "currency": "EUR"}),
    )
}

fn payment_failed(order_id: Uuid) -> Value {
    envelope(
        "payment.failed",
        "payment-svc",
        order_id,
        json!({"order_id": order_id, "reason": "card_declined"}),
    )
}

fn order_cancelled(order_id: Uuid) -> Value {
    envelope(
        "order.cancelled",
        "order-svc",
        order_id,
        json!({"order_id": order_id, "customer_id": Uuid::now_v7(),
               "reason": "customer_cancelled"}),
    )
}

/// The system under test (user-svc, inventory-svc, a gateway), a seller, an admin, the
/// test's producer, and its eyes on every `inventory.*` event.
struct World {
    stack: Stack,
    producer: Producer,
    seller: String,
    seller_id: Uuid,
    admin: String,
    observer: Observer,
    /// Every inventory event seen so far, in arrival order.
    seen: Vec<Value>,
    /// A product of the test's own, adjusted to push a marker event through the outbox.
    marker: Option<Uuid>,
}

impl World {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    async fn start_with(configure: impl FnOnce(&mut Settings) + 'static) -> Self {
        let stack = Stack::start_with(StackOptions {
            services: vec![Svc::Inventory],
            configure: Box::new(move |s| {
                s.admin.email = Some(ADMIN_EMAIL.into());
                s.admin.password = Some(ADMIN_PASSWORD.into());
                // These tests poll the API; rate limits have tests of their own.
                s.gateway.rate_limit.enabled = false;
                configure(s);
            }),
            ..StackOptions::default()
        })
        .await;
        let observer = Observer::new(stack.env(), &["inventory.#"]).await;
        let producer = Producer::start(&stack.settings).await;
        let (seller, seller_id) = stack.account("sam", "seller").await;
        let login = stack.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
        assert_eq!(login.status(), StatusCode::OK);
        let login: Value = login.json().await.expect("json");
        let admin = login["access_token"].as_str().expect("token").to_owned();
        Self {
            stack,
            producer,
            seller,
            seller_id,
            admin,
            observer,
            seen: Vec::new(),
            marker: None,
        }
    }

    /// A product of the seller with `stock` on hand, once inventory has its row.
    async fn product(&self, stock: i64) -> Uuid {
        let product_id = Uuid::now_v7();
        self.producer
            .send(&[self.product_created(product_id, stock)])
            .await;
        eventually("the stock row of a new product", || async {
            let (status, _) = self.stock_as(&self.seller, product_id).await;
            (status == StatusCode::OK).then_some(())
        })
        .await;
        product_id
    }

    fn product_created(&self, product_id: Uuid, stock: i64) -> Value {
        envelope(
            "product.created",
            "product-svc",
            product_id,
            json!({"product_id": product_id, "seller_id": self.seller_id, "name": "Teapot",
                   "price_cents": 1250, "currency": "EUR", "category": null,
                   "initial_stock": stock, "created_at": Utc::now()}),
        )
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.stack.api(method, path).bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        let body = response.json().await.unwrap_or(Value::Null);
        (status, body)
    }

    async fn stock_as(&self, token: &str, product_id: Uuid) -> (StatusCode, Value) {
        self.call(
            Method::GET,
            &format!("/inventory/{product_id}"),
            token,
            None,
        )
        .await
    }

    /// (on_hand, reserved, available), read by the seller through the gateway.
    async fn stock(&self, product_id: Uuid) -> (i64, i64, i64) {
        let (status, body) = self.stock_as(&self.seller, product_id).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["product_id"], product_id.to_string());
        let n = |k: &str| body[k].as_i64().expect("a number");
        (n("on_hand"), n("reserved"), n("available"))
    }

    async fn adjust(&self, token: &str, product_id: Uuid, body: Value) -> (StatusCode, Value) {
        let path = format!("/inventory/{product_id}/adjust");
        self.call(Method::POST, &path, token, Some(body)).await
    }

    /// The whole ledger of a product, oldest first.
    async fn ledger(&self, product_id: Uuid) -> Vec<Value> {
        let path = format!("/inventory/{product_id}/ledger?limit=200");
        let (status, body) = self.call(Method::GET, &path, &self.seller, None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let mut items = body["items"].as_array().expect("items").clone();
        items.reverse();
        items
    }

    /// Inventory's record of an order, once it has handled `events` events of it.
    async fn reservation(&self, order_id: Uuid, events: usize) -> Value {
        let path = format!("/inventory/reservations/{order_id}");
        eventually(
            &format!("inventory to handle {events} events of {order_id}"),
            || async {
                let (status, body) = self.call(Method::GET, &path, &self.admin, None).await;
                let handled = body["history"].as_array().map_or(0, Vec::len);
                (status == StatusCode::OK && handled >= events).then_some(body)
            },
        )
        .await
    }

    /// Waits for an inventory event of `event_type` about `id` (an order or product).
    async fn event(&mut self, event_type: &str, id: Uuid) -> Value {
        let matches = |e: &Value| {
            e["type"] == event_type
                && (e["data"]["order_id"] == id.to_string()
                    || e["data"]["product_id"] == id.to_string())
        };
        if let Some(found) = self.seen.iter().find(|e| matches(e)) {
            return found.clone();
        }
        loop {
            let event = self.next_event().await;
            if matches(&event) {
                return event;
            }
        }
    }

    async fn next_event(&mut self) -> Value {
        let delivery = self.observer.next().await;
        let event: Value = serde_json::from_slice(&delivery.data).expect("an envelope");
        self.seen.push(event.clone());
        event
    }

    /// Every inventory event committed so far has been seen: a marker event written
    /// after them comes out of the same outbox behind them.
    async fn flush(&mut self) {
        let marker = match self.marker {
            Some(marker) => marker,
            None => {
                let marker = self.product(1).await;
                self.marker = Some(marker);
                marker
            }
        };
        let (status, body) = self
            .adjust(
                &self.seller,
                marker,
                json!({"delta": 1, "reason": "marker"}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let version = self
            .ledger(marker)
            .await
            .last()
            .map(|e| e["version"].clone())
            .expect("an entry");
        loop {
            let event = self.next_event().await;
            if event["type"] == "inventory.stock_changed"
                && event["data"]["product_id"] == marker.to_string()
                && event["data"]["version"] == version
            {
                return;
            }
        }
    }

    /// The events seen so far about an order.
    fn seen_for(&self, order_id: Uuid) -> Vec<&Value> {
        self.seen
            .iter()
            .filter(|e| e["data"]["order_id"] == order_id.to_string())
            .collect()
    }
}

fn kinds(ledger: &[Value]) -> Vec<&str> {
    ledger.iter().filter_map(|e| e["kind"].as_str()).collect()
}

#[tokio::test]
async fn product_created_makes_stock_that_only_its_seller_or_an_admin_reads_and_adjusts() {
    let mut world = World::start().await;
    let product = world.product(10).await;
    assert_eq!(world.stock(product).await, (10, 0, 10));
    let created = world.event("inventory.stock_changed", product).await;
    assert_eq!(
        created["data"],
        json!({"product_id": product, "on_hand": 10, "reserved": 0, "available": 10, "version": 1})
    );

    let (other_seller, _) = world.stack.account("olga", "seller").await;
    let (customer, _) = world.stack.account("carl", "customer").await;
    for token in [&other_seller, &customer] {
        let (status, body) = world.stock_as(token, product).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        let (status, _) = world
            .adjust(token, product, json!({"delta": 1, "reason": "mine now"}))
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN);
    }
    let (status, body) = world.stock_as(&world.admin, product).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["on_hand"], 10);
    let response = world
        .stack
        .api(Method::GET, &format!("/inventory/{product}"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let (status, body) = world.stock_as(&world.seller, Uuid::now_v7()).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["status"], 404);
    let (status, body) = world.stock_as(&world.seller, Uuid::nil()).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = world
        .call(Method::GET, "/inventory/not-a-uuid", &world.seller, None)
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    let (status, body) = world
        .adjust(
            &world.seller,
            product,
            json!({"delta": 5, "reason": "delivery from the supplier"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body,
        json!({"product_id": product, "on_hand": 15, "reserved": 0, "available": 15})
    );

    // Bad input: every field named, nothing changed.
    let (status, body) = world
        .adjust(&world.seller, product, json!({"delta": 0, "reason": "  "}))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let mut fields: Vec<&str> = body["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e["field"].as_str())
        .collect();
    fields.sort_unstable();
    assert_eq!(fields, ["delta", "reason"], "{body}");
    let (status, body) = world
        .adjust(
            &world.seller,
            product,
            json!({"delta": 1, "reason": "x".repeat(201)}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["errors"][0]["field"], "reason");
    let (status, body) = world
        .adjust(
            &world.seller,
            product,
            json!({"delta": "five", "reason": "r"}),
        )
        .await;
    assert!(status.is_client_error(), "{status} {body}");
    assert_eq!(body["status"], status.as_u16());
    assert_eq!(world.stock(product).await, (15, 0, 15));

    // 12 reserved: on hand may not drop below that.
    let order = Uuid::now_v7();
    world
        .producer
        .send(&[order_created(order, &[(product, 12)])])
        .await;
    world.event("inventory.reserved", order).await;
    assert_eq!(world.stock(product).await, (15, 12, 3));
    let (status, body) = world
        .adjust(
            &world.seller,
            product,
            json!({"delta": -5, "reason": "broken"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let detail = body["detail"].as_str().expect("detail");
    assert!(detail.contains("12 units reserved"), "{detail}");
    assert_eq!(world.stock(product).await, (15, 12, 3));
    let (status, body) = world
        .adjust(
            &world.admin,
            product,
            json!({"delta": -3, "reason": "broken"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "the admin may adjust: {body}");
    assert_eq!(body["available"], 0);

    // The ledger: who, what, why, when, by how much.
    let ledger = world.ledger(product).await;
    assert_eq!(
        kinds(&ledger),
        ["initial", "adjustment", "reservation", "adjustment"]
    );
    let versions: Vec<i64> = ledger
        .iter()
        .filter_map(|e| e["version"].as_i64())
        .collect();
    assert_eq!(versions, [1, 2, 3, 4]);
    assert_eq!(ledger[1]["on_hand_delta"], 5);
    assert_eq!(ledger[1]["reason"], "delivery from the supplier");
    assert_eq!(ledger[1]["actor"]["kind"], "user");
    assert_eq!(ledger[1]["actor"]["id"], world.seller_id.to_string());
    assert_eq!(ledger[2]["reserved_delta"], 12);
    assert_eq!(ledger[2]["order_id"], order.to_string());
    assert_eq!(ledger[2]["actor"]["event_type"], "order.created");
    assert_eq!(ledger[3]["on_hand"], 12);
    assert!(ledger.iter().all(|e| e["at"].as_str().is_some()));
    let (status, _) = world
        .call(
            Method::GET,
            &format!("/inventory/{product}/ledger"),
            &other_seller,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let document: Value = reqwest::get(format!("{}/openapi.json", world.stack.url(Svc::Inventory)))
        .await
        .expect("openapi")
        .json()
        .await
        .expect("json");
    for path in [
        "/api/v1/inventory/{product_id}",
        "/api/v1/inventory/{product_id}/adjust",
        "/api/v1/inventory/{product_id}/ledger",
    ] {
        assert!(document["paths"][path].is_object(), "{path} documented");
    }
}

#[tokio::test]
async fn fifty_concurrent_single_unit_orders_against_ten_in_stock_reserve_exactly_ten() {
    let mut world = World::start().await;
    let product = world.product(10).await;
    let orders: Vec<Uuid> = (0..50).map(|_| Uuid::now_v7()).collect();
    let events: Vec<Value> = orders
        .iter()
        .map(|order| order_created(*order, &[(product, 1)]))
        .collect();
    world.producer.send(&events).await;

    let (mut reserved, mut rejected) = (0, 0);
    for order in &orders {
        loop {
            let outcomes = world.seen_for(*order);
            if let Some(outcome) = outcomes.first() {
                assert_eq!(outcomes.len(), 1, "one outcome per order: {outcomes:?}");
                match outcome["type"].as_str() {
                    Some("inventory.reserved") => reserved += 1,
                    Some("inventory.rejected") => {
                        assert_eq!(outcome["data"]["reason"], "out_of_stock");
                        assert_eq!(
                            outcome["data"]["shortages"],
                            json!([{"product_id": product, "requested": 1, "available": 0}])
                        );
                        rejected += 1;
                    }
                    other => panic!("unexpected {other:?}"),
                }
                break;
            }
            world.next_event().await;
        }
    }
    assert_eq!((reserved, rejected), (10, 40));
    assert_eq!(world.stock(product).await, (10, 10, 0));

    world.flush().await;
    let outcomes = world
        .seen
        .iter()
        .filter(|e| e["type"] == "inventory.reserved" || e["type"] == "inventory.rejected")
        .count();
    assert_eq!(outcomes, 50, "no order got a second answer");

    // The ledger: ten reservations of one, and at no point less than nothing available.
    let ledger = world.ledger(product).await;
    assert_eq!(ledger.len(), 11);
    let reservations: Vec<&Value> = ledger
        .iter()
        .filter(|e| e["kind"] == "reservation")
        .collect();
    assert_eq!(reservations.len(), 10);
    assert!(reservations.iter().all(|e| e["reserved_delta"] == 1));
    let mut reserved_orders: Vec<&str> = reservations
        .iter()
        .filter_map(|e| e["order_id"].as_str())
        .collect();
    reserved_orders.sort_unstable();
    reserved_orders.dedup();
    assert_eq!(reserved_orders.len(), 10, "ten different orders");
    for (i, entry) in ledger.iter().enumerate() {
        assert_eq!(entry["version"], i as i64 + 1);
        assert_eq!(entry["reserved"], i as i64);
        assert!(
            entry["available"].as_i64().expect("available") >= 0,
            "{entry}"
        );
    }
    let published: Vec<i64> = world
        .seen
        .iter()
        .filter(|e| {
            e["type"] == "inventory.stock_changed" && e["data"]["product_id"] == product.to_string()
        })
        .filter_map(|e| e["data"]["available"].as_i64())
        .collect();
    assert_eq!(published.len(), 11);
    assert!(published.iter().all(|a| *a >= 0), "{published:?}");
}

#[tokio::test]
async fn an_order_with_one_short_line_reserves_nothing() {
    let mut world = World::start().await;
    let plenty = world.product(5).await;
    let scarce = world.product(1).await;
    let order = Uuid::now_v7();
    world
        .producer
        .send(&[order_created(order, &[(plenty, 2), (scarce, 3)])])
        .await;
    let rejected = world.event("inventory.rejected", order).await;
    assert_eq!(rejected["data"]["reason"], "out_of_stock");
    assert_eq!(
        rejected["data"]["shortages"],
        json!([{"product_id": scarce, "requested": 3, "available": 1}])
    );
    assert_eq!(rejected["correlation_id"], order.to_string());
    assert_eq!(world.stock(plenty).await, (5, 0, 5));
    assert_eq!(world.stock(scarce).await, (1, 0, 1));
    assert_eq!(kinds(&world.ledger(plenty).await), ["initial"]);
    let record = world.reservation(order, 1).await;
    assert_eq!(record["status"], "rejected");
    assert_eq!(record["expires_at"], Value::Null);
    assert_eq!(
        record["lines"],
        json!([{"product_id": plenty, "quantity": 2}, {"product_id": scarce, "quantity": 3}])
    );

    // A deleted product is no longer sold; its stock and history stay.
    let deleted = world.product(4).await;
    let product_deleted = envelope(
        "product.deleted",
        "product-svc",
        deleted,
        json!({"product_id": deleted, "seller_id": world.seller_id, "deleted_at": Utc::now()}),
    );
    world.producer.send(&[product_deleted]).await;
    // Probe with orders too big to reserve until one says the product is gone.
    let mut probes = 0;
    loop {
        let probe = Uuid::now_v7();
        world
            .producer
            .send(&[order_created(probe, &[(deleted, 100)])])
            .await;
        let rejected = world.event("inventory.rejected", probe).await;
        if rejected["data"]["reason"] == "unknown_product" {
            break;
        }
        probes += 1;
        assert!(probes < 500, "product.deleted never took effect");
    }
    let late = Uuid::now_v7();
    world
        .producer
        .send(&[order_created(late, &[(deleted, 1), (plenty, 1)])])
        .await;
    let rejected = world.event("inventory.rejected", late).await;
    assert_eq!(rejected["data"]["reason"], "unknown_product");
    assert_eq!(
        rejected["data"]["shortages"],
        json!([{"product_id": deleted, "requested": 1, "available": 0}])
    );
    assert_eq!(world.stock(deleted).await, (4, 0, 4));
    assert_eq!(world.stock(plenty).await, (5, 0, 5));
}

#[tokio::test]
async fn payment_completed_commits_while_payment_failed_and_cancel_release() {
    let mut world = World::start().await;
    let product = world.product(10).await;

    let paid = Uuid::now_v7();
    let order = order_created(paid, &[(product, 2)]);
    world.producer.send(std::slice::from_ref(&order)).await;
    let reserved = world.event("inventory.reserved", paid).await;
    assert_eq!(reserved["correlation_id"], paid.to_string());
    assert_eq!(reserved["causation_id"], order["id"]);
    assert_eq!(
        reserved["data"]["lines"],
        json!([{"product_id": product, "quantity": 2}])
    );
    let expires_at: chrono::DateTime<Utc> = reserved["data"]["expires_at"]
        .as_str()
        .expect("expires_at")
        .parse()
        .expect("RFC 3339");
    let ttl = expires_at - Utc::now();
    assert!(
        ttl > chrono::TimeDelta::minutes(14) && ttl <= chrono::TimeDelta::minutes(15),
        "the default TTL is 15 minutes: {ttl}"
    );
    assert_eq!(world.stock(product).await, (10, 2, 8));
    world.producer.send(&[payment_completed(paid)]).await;
    world.event("inventory.committed", paid).await;
    assert_eq!(world.stock(product).await, (8, 0, 8));

    let declined = Uuid::now_v7();
    world
        .producer
        .send(&[order_created(declined, &[(product, 3)])])
        .await;
    world.event("inventory.reserved", declined).await;
    assert_eq!(world.stock(product).await, (8, 3, 5));
    world.producer.send(&[payment_failed(declined)]).await;
    let released = world.event("inventory.released", declined).await;
    assert_eq!(released["data"]["reason"], "payment_failed");
    assert_eq!(world.stock(product).await, (8, 0, 8));

    let cancelled = Uuid::now_v7();
    world
        .producer
        .send(&[order_created(cancelled, &[(product, 1)])])
        .await;
    world.event("inventory.reserved", cancelled).await;
    world.producer.send(&[order_cancelled(cancelled)]).await;
    let released = world.event("inventory.released", cancelled).await;
    assert_eq!(released["data"]["reason"], "cancelled");
    assert_eq!(world.stock(product).await, (8, 0, 8));

    // Releasing twice does nothing; a committed reservation is never released.
    world
        .producer
        .send(&[
            order_cancelled(cancelled),
            payment_failed(declined),
            payment_failed(paid),
            payment_completed(paid),
        ])
        .await;
    world.reservation(cancelled, 3).await;
    world.reservation(declined, 3).await;
    let record = world.reservation(paid, 4).await;
    assert_eq!(record["status"], "committed");
    world.flush().await;
    for order in [paid, declined, cancelled] {
        let types: Vec<&str> = world
            .seen_for(order)
            .iter()
            .filter_map(|e| e["type"].as_str())
            .collect();
        let expected: &[&str] = if order == paid {
            &["inventory.reserved", "inventory.committed"]
        } else {
            &["inventory.reserved", "inventory.released"]
        };
        assert_eq!(types, expected, "{order}");
    }
    assert_eq!(world.stock(product).await, (8, 0, 8));

    // Paid after the customer cancelled: nothing is sold to a cancelled order, and the
    // rejection makes payment-svc refund.
    world.producer.send(&[payment_completed(cancelled)]).await;
    let rejected = world.event("inventory.rejected", cancelled).await;
    assert_eq!(rejected["data"]["reason"], "order_cancelled");
    assert_eq!(world.stock(product).await, (8, 0, 8));

    let ledger = world.ledger(product).await;
    assert_eq!(
        kinds(&ledger),
        [
            "initial",
            "reservation",
            "commit",
            "reservation",
            "release",
            "reservation",
            "release"
        ]
    );
    assert_eq!(ledger[2]["on_hand_delta"], -2);
    assert_eq!(ledger[2]["reserved_delta"], -2);
    assert_eq!(ledger[4]["reason"], "payment_failed");
    assert_eq!(ledger[6]["reason"], "cancelled");
}

#[tokio::test]
async fn expired_reservations_are_released_and_a_late_payment_takes_the_stock_again_if_it_can() {
    let mut world = World::start_with(|s| {
        s.reservations.ttl_secs = 1;
        s.reservations.sweep_interval_ms = 100;
    })
    .await;
    let product = world.product(1).await;
    let order = Uuid::now_v7();
    world
        .producer
        .send(&[order_created(order, &[(product, 1)])])
        .await;
    world.event("inventory.reserved", order).await;
    let released = world.event("inventory.released", order).await;
    assert_eq!(released["data"]["reason"], "expired");
    assert_eq!(released["correlation_id"], order.to_string());
    assert_eq!(world.stock(product).await, (1, 0, 1));
    let ledger = world.ledger(product).await;
    assert_eq!(ledger.last().expect("entry")["actor"]["kind"], "sweeper");

    // Paid after expiry, with the stock still there: taken again and sold.
    world.producer.send(&[payment_completed(order)]).await;
    world.event("inventory.committed", order).await;
    assert_eq!(world.stock(product).await, (0, 0, 0));
    assert_eq!(
        kinds(&world.ledger(product).await),
        ["initial", "reservation", "release", "sale"]
    );

    // Paid after expiry, with the stock gone meanwhile: rejected (payment-svc refunds).
    let scarce = world.product(1).await;
    let unlucky = Uuid::now_v7();
    world
        .producer
        .send(&[order_created(unlucky, &[(scarce, 1)])])
        .await;
    world.event("inventory.reserved", unlucky).await;
    world.event("inventory.released", unlucky).await;
    let (status, body) = world
        .adjust(
            &world.seller,
            scarce,
            json!({"delta": -1, "reason": "dropped it"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    world.producer.send(&[payment_completed(unlucky)]).await;
    let rejected = world.event("inventory.rejected", unlucky).await;
    assert_eq!(rejected["data"]["reason"], "out_of_stock");
    assert_eq!(
        rejected["data"]["shortages"],
        json!([{"product_id": scarce, "requested": 1, "available": 0}])
    );
    assert_eq!(world.stock(scarce).await, (0, 0, 0));

    // The same payment again under another id: decided already, nothing more happens.
    world.producer.send(&[payment_completed(unlucky)]).await;
    let record = world.reservation(unlucky, 4).await;
    assert_eq!(record["status"], "rejected");
    world.flush().await;
    assert_eq!(
        world
            .seen_for(unlucky)
            .iter()
            .filter(|e| e["type"] == "inventory.rejected")
            .count(),
        1
    );
}

#[tokio::test]
async fn duplicates_and_events_out_of_order_reach_the_same_end_state() {
    let mut world = World::start().await;
    let product = world.product(5).await;

    // The same order twice under different message ids (a replayed dead letter).
    let twice = Uuid::now_v7();
    let first = order_created(twice, &[(product, 2)]);
    let mut again = first.clone();
    again["id"] = json!(Uuid::now_v7());
    world.producer.send(&[first, again]).await;
    let record = world.reservation(twice, 2).await;
    assert_eq!(record["status"], "held");
    let outcomes: Vec<&str> = record["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|h| h["outcome"].as_str())
        .collect();
    assert_eq!(outcomes, ["reserved", "ignored: order already held"]);
    assert_eq!(world.stock(product).await, (5, 2, 3));

    // A cancel, and a payment failure, before their order.created: nothing reserved.
    let cancelled = Uuid::now_v7();
    let declined = Uuid::now_v7();
    world
        .producer
        .send(&[order_cancelled(cancelled), payment_failed(declined)])
        .await;
    assert_eq!(world.reservation(cancelled, 1).await["status"], "tombstone");
    assert_eq!(world.reservation(declined, 1).await["status"], "tombstone");
    world
        .producer
        .send(&[
            order_created(cancelled, &[(product, 1)]),
            order_created(declined, &[(product, 1)]),
        ])
        .await;
    for order in [cancelled, declined] {
        let record = world.reservation(order, 2).await;
        assert_eq!(record["status"], "tombstone");
        assert_eq!(record["lines"], json!([]));
        assert_eq!(
            record["history"][1]["outcome"],
            "ignored: cancelled before it arrived"
        );
    }
    assert_eq!(world.stock(product).await, (5, 2, 3));

    // An order before its product's product.created is reserved once the product comes.
    let new_product = Uuid::now_v7();
    let early = Uuid::now_v7();
    world
        .producer
        .send(&[
            order_created(early, &[(new_product, 1)]),
            world.product_created(new_product, 3),
        ])
        .await;
    world.event("inventory.reserved", early).await;
    assert_eq!(world.stock(new_product).await, (3, 1, 2));

    world.flush().await;
    assert_eq!(world.seen_for(cancelled), Vec::<&Value>::new());
    assert_eq!(world.seen_for(declined), Vec::<&Value>::new());
    let types: Vec<&str> = world
        .seen_for(twice)
        .iter()
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert_eq!(types, ["inventory.reserved"]);
    assert_eq!(
        kinds(&world.ledger(product).await),
        ["initial", "reservation"]
    );
}

#[tokio::test]
async fn stock_changed_carries_a_version_that_grows_with_every_change() {
    let mut world = World::start().await;
    let product = world.product(5).await;
    let (status, _) = world
        .adjust(
            &world.seller,
            product,
            json!({"delta": 3, "reason": "delivery"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let sold = Uuid::now_v7();
    let released = Uuid::now_v7();
    world
        .producer
        .send(&[
            order_created(sold, &[(product, 2)]),
            order_created(released, &[(product, 1)]),
        ])
        .await;
    world.event("inventory.reserved", sold).await;
    world.event("inventory.reserved", released).await;
    world
        .producer
        .send(&[payment_completed(sold), order_cancelled(released)])
        .await;
    world.event("inventory.committed", sold).await;
    world.event("inventory.released", released).await;
    world.flush().await;

    let changes: Vec<&Value> = world
        .seen
        .iter()
        .filter(|e| {
            e["type"] == "inventory.stock_changed" && e["data"]["product_id"] == product.to_string()
        })
        .map(|e| &e["data"])
        .collect();
    let versions: Vec<i64> = changes
        .iter()
        .filter_map(|c| c["version"].as_i64())
        .collect();
    assert_eq!(versions, [1, 2, 3, 4, 5, 6], "{changes:?}");
    let last = changes.last().expect("a change");
    assert_eq!(
        **last,
        json!({"product_id": product, "on_hand": 6, "reserved": 0, "available": 6, "version": 6})
    );
    for change in &changes {
        assert_eq!(
            change["available"].as_i64(),
            Some(change["on_hand"].as_i64().expect("n") - change["reserved"].as_i64().expect("n"))
        );
    }
    let ledger = world.ledger(product).await;
    let versions: Vec<i64> = ledger
        .iter()
        .filter_map(|e| e["version"].as_i64())
        .collect();
    assert_eq!(versions, [1, 2, 3, 4, 5, 6]);
}
