//! Orders through the gateway (issue 5): a seller's product reaches order-svc's replica
//! through `product.created`; customers place orders idempotently, read only their own,
//! and cancel them while pending. Without inventory-svc and payment-svc in this stack
//! the saga does not move, so orders stay pending until cancelled; the state machine is
//! tested in order-svc/tests/saga.rs.

use e2e::{Stack, StackOptions, Svc};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use testkit::eventually;
use uuid::Uuid;

const ADMIN_EMAIL: &str = "root@example.com";
const ADMIN_PASSWORD: &str = "a long admin passphrase nobody guesses";

struct World {
    stack: Stack,
    seller: String,
    alice: String,
    alice_id: Uuid,
    bob: String,
    admin: String,
}

async fn world() -> World {
    let stack = Stack::start_with(StackOptions {
        services: vec![Svc::Product, Svc::Order],
        configure: Box::new(|s| {
            s.admin.email = Some(ADMIN_EMAIL.into());
            s.admin.password = Some(ADMIN_PASSWORD.into());
            // These tests poll the API; rate limits have tests of their own.
            s.gateway.rate_limit.enabled = false;
        }),
        ..StackOptions::default()
    })
    .await;
    let (seller, _) = stack.account("sam", "seller").await;
    let (alice, alice_id) = stack.account("alice", "customer").await;
    let (bob, _) = stack.account("bob", "customer").await;
    let login = stack.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    assert_eq!(login.status(), StatusCode::OK);
    let login: Value = login.json().await.expect("json");
    let admin = login["access_token"].as_str().expect("token").to_owned();
    World {
        stack,
        seller,
        alice,
        alice_id,
        bob,
        admin,
    }
}

/// Status, content type and JSON body of a response.
async fn read(response: reqwest::Response) -> (StatusCode, String, Value) {
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, content_type, body)
}

fn assert_problem(status: StatusCode, content_type: &str, body: &Value, expected: StatusCode) {
    assert_eq!(status, expected, "{body}");
    assert_eq!(content_type, "application/problem+json", "{body}");
    assert_eq!(body["status"], expected.as_u16(), "{body}");
    assert!(body["detail"].is_string(), "{body}");
}

impl World {
    /// A seller's product, priced `price_cents` EUR.
    async fn product(&self, price_cents: i64) -> String {
        let response = self
            .stack
            .api(Method::POST, "/products")
            .bearer_auth(&self.seller)
            .json(&json!({"name": "Teapot", "description": "Holds tea.",
                          "price_cents": price_cents, "currency": "EUR", "initial_stock": 10}))
            .send()
            .await
            .expect("create product");
        let (status, _, body) = read(response).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["id"].as_str().expect("id").to_owned()
    }

    async fn place(&self, token: &str, key: Option<&str>, body: &Value) -> reqwest::Response {
        let mut request = self
            .stack
            .api(Method::POST, "/orders")
            .bearer_auth(token)
            .json(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        request.send().await.expect("place order")
    }

    /// Places an order once order-svc's replica knows the product (product.created is
    /// on its way when the product is created).
    async fn place_when_known(&self, key: &str, body: &Value) -> Value {
        eventually("order-svc to know the product", || async {
            let (status, _, body) = read(self.place(&self.alice, Some(key), body).await).await;
            match status {
                StatusCode::ACCEPTED => Some(body),
                StatusCode::UNPROCESSABLE_ENTITY => None,
                other => panic!("unexpected {other}: {body}"),
            }
        })
        .await
    }

    async fn get(&self, token: &str, path: &str) -> (StatusCode, String, Value) {
        let response = self
            .stack
            .api(Method::GET, path)
            .bearer_auth(token)
            .send()
            .await
            .expect("get");
        read(response).await
    }

    async fn cancel(&self, token: &str, id: &str) -> (StatusCode, String, Value) {
        let response = self
            .stack
            .api(Method::POST, &format!("/orders/{id}/cancel"))
            .bearer_auth(token)
            .send()
            .await
            .expect("cancel");
        read(response).await
    }
}

fn order_of(product: &str, quantity: i64) -> Value {
    json!({"items": [{"product_id": product, "quantity": quantity}],
           "payment_method": "pm_card_visa"})
}

#[tokio::test]
async fn a_customer_places_an_order_once_per_key_and_reads_it() {
    let w = world().await;
    let product = w.product(1250).await;
    let body = order_of(&product, 2);
    let placed = w.place_when_known("order-1", &body).await;
    assert_eq!(placed["status"], "pending");
    assert_eq!(placed["total_cents"], 2500);
    assert_eq!(placed["currency"], "EUR");
    assert_eq!(placed["items"][0]["product_id"], product.as_str());
    assert_eq!(placed["items"][0]["quantity"], 2);
    assert_eq!(placed["items"][0]["unit_price_cents"], 1250);
    let id = placed["id"].as_str().expect("id").to_owned();

    // The same key and request again (another JSON layout): the same order.
    let same = json!({"payment_method": "pm_card_visa",
                      "items": [{"quantity": 2, "product_id": product}]});
    let response = w.place(&w.alice, Some("order-1"), &same).await;
    assert_eq!(response.headers()["idempotent-replayed"], "true");
    assert_eq!(
        response.headers()["location"],
        format!("/api/v1/orders/{id}").as_str()
    );
    let (status, _, again) = read(response).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{again}");
    assert_eq!(again["id"], id.as_str());

    // The same key with another request: refused, nothing made.
    let (status, content_type, body) = read(
        w.place(&w.alice, Some("order-1"), &order_of(&product, 3))
            .await,
    )
    .await;
    assert_problem(
        status,
        &content_type,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
    );
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("Idempotency-Key")),
        "{body}"
    );
    let (status, _, list) = w.get(&w.alice, "/orders").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list["next_cursor"], Value::Null);

    // Two requests with one new key at the same moment: one order.
    let race = order_of(&product, 1);
    let (a, b) = tokio::join!(
        w.place(&w.alice, Some("race"), &race),
        w.place(&w.alice, Some("race"), &race)
    );
    let ((status_a, _, a), (status_b, _, b)) = (read(a).await, read(b).await);
    assert_eq!(
        (status_a, status_b),
        (StatusCode::ACCEPTED, StatusCode::ACCEPTED)
    );
    assert_eq!(a["id"], b["id"]);
    let (_, _, list) = w.get(&w.alice, "/orders").await;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(2), "{list}");
    assert_eq!(list["items"][0]["id"], a["id"], "newest first");

    let (status, _, order) = w.get(&w.alice, &format!("/orders/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{order}");
    assert_eq!(order["customer_id"], w.alice_id.to_string());
    assert_eq!(order["status"], "pending");
    assert_eq!(order["status_reason"], Value::Null);
    assert_eq!(order["total_cents"], 2500);
    assert_eq!(order["history"][0]["event"], "order.created");
    assert!(order["created_at"].is_string() && order["updated_at"].is_string());
}

#[tokio::test]
async fn bad_orders_are_refused_with_problems_that_name_the_fault() {
    let w = world().await;
    let product = w.product(500).await;
    w.place_when_known("known", &order_of(&product, 1)).await;

    let unknown = json!({"items": [{"product_id": product, "quantity": 1},
                                   {"product_id": Uuid::now_v7(), "quantity": 1}],
                         "payment_method": "pm_card_visa"});
    let (status, content_type, body) = read(w.place(&w.alice, Some("u"), &unknown).await).await;
    assert_problem(
        status,
        &content_type,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
    );
    assert_eq!(body["errors"][0]["field"], "items[1].product_id", "{body}");

    let invalid = json!({"items": [{"product_id": product, "quantity": 0}], "payment_method": " "});
    let (status, content_type, body) = read(w.place(&w.alice, Some("v"), &invalid).await).await;
    assert_problem(
        status,
        &content_type,
        &body,
        StatusCode::UNPROCESSABLE_ENTITY,
    );
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e["field"].as_str())
        .collect();
    assert_eq!(fields, ["items[0].quantity", "payment_method"], "{body}");

    let (status, content_type, body) =
        read(w.place(&w.alice, None, &order_of(&product, 1)).await).await;
    assert_problem(status, &content_type, &body, StatusCode::BAD_REQUEST);
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("Idempotency-Key")),
        "{body}"
    );
    let long = "k".repeat(256);
    let (status, content_type, body) =
        read(w.place(&w.alice, Some(&long), &order_of(&product, 1)).await).await;
    assert_problem(status, &content_type, &body, StatusCode::BAD_REQUEST);

    let response = w
        .stack
        .api(Method::POST, "/orders")
        .bearer_auth(&w.alice)
        .header("Idempotency-Key", "bad-json")
        .header("content-type", "application/json")
        .body(r#"{"items": [{"product_id": "#)
        .send()
        .await
        .expect("send");
    let (status, content_type, body) = read(response).await;
    assert_problem(status, &content_type, &body, StatusCode::BAD_REQUEST);

    // Only customers order.
    let (status, content_type, body) = read(
        w.place(&w.seller, Some("seller"), &order_of(&product, 1))
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(content_type, "application/problem+json");

    // None of these made an order.
    let (_, _, list) = w.get(&w.alice, "/orders").await;
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1), "{list}");
}

#[tokio::test]
async fn orders_are_private_and_cancellable_while_pending() {
    let w = world().await;
    let product = w.product(900).await;
    let placed = w.place_when_known("mine", &order_of(&product, 1)).await;
    let id = placed["id"].as_str().expect("id").to_owned();

    // Another customer learns nothing about it.
    let (status, content_type, body) = w.get(&w.bob, &format!("/orders/{id}")).await;
    assert_problem(status, &content_type, &body, StatusCode::NOT_FOUND);
    let (status, _, body) = w.cancel(&w.bob, &id).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (_, _, list) = w.get(&w.bob, "/orders").await;
    assert_eq!(list["items"], json!([]), "{list}");
    let (status, _, body) = w.get(&w.bob, &format!("/orders/{}", Uuid::now_v7())).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    // An admin sees every order.
    let (status, _, all) = w.get(&w.admin, "/orders").await;
    assert_eq!(status, StatusCode::OK, "{all}");
    assert!(
        all["items"]
            .as_array()
            .expect("items")
            .iter()
            .any(|o| o["id"] == id.as_str()),
        "{all}"
    );

    let (status, _, cancelled) = w.cancel(&w.alice, &id).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(cancelled["status_reason"], "customer_cancelled");
    let (_, _, order) = w.get(&w.alice, &format!("/orders/{id}")).await;
    assert_eq!(order["status"], "cancelled");
    assert_eq!(order["status_reason"], "customer_cancelled");
    let events: Vec<&str> = order["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|h| h["event"].as_str())
        .collect();
    assert_eq!(events, ["order.created", "order.cancelled"], "{order}");

    let (status, content_type, body) = w.cancel(&w.alice, &id).await;
    assert_problem(status, &content_type, &body, StatusCode::CONFLICT);

    // An admin may cancel a customer's order too.
    let other = w.place_when_known("second", &order_of(&product, 2)).await;
    let other = other["id"].as_str().expect("id");
    let (status, _, body) = w.cancel(&w.admin, other).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["status_reason"], "customer_cancelled");
}

#[tokio::test]
async fn a_customers_orders_come_newest_first_a_page_at_a_time() {
    let w = world().await;
    let product = w.product(100).await;
    let mut placed = Vec::new();
    for n in 1..=5 {
        let order = w
            .place_when_known(&format!("order-{n}"), &order_of(&product, n))
            .await;
        placed.push(order["id"].as_str().expect("id").to_owned());
    }
    placed.reverse();

    let mut seen = Vec::new();
    let mut path = "/orders?limit=2".to_owned();
    loop {
        let (status, _, page) = w.get(&w.alice, &path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let items = page["items"].as_array().expect("items");
        assert!(items.len() <= 2, "{page}");
        seen.extend(
            items
                .iter()
                .map(|o| o["id"].as_str().expect("id").to_owned()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/orders?limit=2&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, placed);

    let (status, content_type, body) = w.get(&w.alice, "/orders?limit=0").await;
    assert_problem(status, &content_type, &body, StatusCode::BAD_REQUEST);
    let (status, content_type, body) = w.get(&w.alice, "/orders?cursor=nope").await;
    assert_problem(status, &content_type, &body, StatusCode::BAD_REQUEST);
    // Another customer's order is no cursor of Bob's.
    let (status, _, body) = w
        .get(&w.bob, &format!("/orders?cursor={}", placed[0]))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test]
async fn order_svc_documents_its_routes() {
    let w = world().await;
    let response = w
        .stack
        .client
        .get(format!("{}/openapi.json", w.stack.url(Svc::Order)))
        .send()
        .await
        .expect("openapi");
    assert_eq!(response.status(), StatusCode::OK);
    let doc: Value = response.json().await.expect("json");
    for path in [
        "/api/v1/orders",
        "/api/v1/orders/{id}",
        "/api/v1/orders/{id}/cancel",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} in {doc}");
    }
    assert!(doc["paths"]["/api/v1/orders"]["post"].is_object());
    assert!(doc["components"]["schemas"]["OrderView"].is_object());
}
