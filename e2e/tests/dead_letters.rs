//! Dead letters through the gateway (issue 6): a fault dead-letters messages in one
//! group, the operator fixes it and replays the group, and every message is handled once;
//! discards leave the open list and are in the audit log; only admins get in.
//!
//! The fault is real: notification-svc reads its templates from a directory that lacks
//! `order_receipt`, so every `order.paid` fails permanently until the file is put back.

use std::time::Duration;

use e2e::faults::{MissingReceiptTemplate, Orders, orders_of_a_new_customer, receipts};
use e2e::{Stack, StackOptions, Svc};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use shared::Settings;
use shared::messaging::{DeadLetterStore, NewEvent, Outbox};
use testkit::eventually;
use testkit::smtp::SmtpServer;
use uuid::Uuid;

const ADMIN_EMAIL: &str = "oncall@example.com";
const ADMIN_PASSWORD: &str = "a long admin passphrase nobody guesses";

struct World {
    stack: Stack,
    smtp: SmtpServer,
    templates: MissingReceiptTemplate,
    admin: String,
    admin_id: String,
}

async fn world(services: &[Svc], tweak: fn(&mut Settings)) -> World {
    let smtp = SmtpServer::start().await;
    let templates = MissingReceiptTemplate::new();
    let (url, dir) = (smtp.url(), templates.dir());
    let stack = Stack::start_with(StackOptions {
        services: services.to_vec(),
        configure: Box::new(move |s| {
            s.admin.email = Some(ADMIN_EMAIL.into());
            s.admin.password = Some(ADMIN_PASSWORD.into());
            s.gateway.rate_limit.enabled = false;
            s.smtp.url = Some(url.into());
            s.smtp.templates_dir = Some(dir);
            tweak(s);
        }),
        ..StackOptions::default()
    })
    .await;
    let login = stack.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    assert_eq!(login.status(), StatusCode::OK);
    let login: Value = login.json().await.expect("json");
    let admin = login["access_token"].as_str().expect("token").to_owned();
    let admin_id = login["user"]["id"].as_str().expect("id").to_owned();
    World {
        stack,
        smtp,
        templates,
        admin,
        admin_id,
    }
}

async fn read(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    if !status.is_success() && status != StatusCode::NOT_FOUND {
        let kind = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert_eq!(kind, "application/problem+json", "{status}");
    }
    (status, response.json().await.unwrap_or(Value::Null))
}

impl World {
    async fn call(
        &self,
        token: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.stack.api(method, path).bearer_auth(token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        read(request.send().await.expect("request")).await
    }

    async fn get(&self, path: &str) -> Value {
        let (status, body) = self.call(&self.admin, Method::GET, path, None).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        body
    }

    async fn replay(&self, body: Value) -> Value {
        let (status, answer) = self
            .call(
                &self.admin,
                Method::POST,
                "/admin/dead-letters/replay",
                Some(body),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        answer
    }

    /// The open group of notification-svc's receipt handler, once it has `count` members.
    async fn receipt_group(&self, count: u64) -> Value {
        eventually("the receipts to be dead-lettered in one group", || async {
            let page = self.get("/admin/dead-letters?service=notification").await;
            let groups: Vec<Value> = page["items"]
                .as_array()
                .expect("items")
                .iter()
                .filter(|g| g["handler"] == "mail_receipts")
                .cloned()
                .collect();
            assert!(groups.len() <= 1, "one fault, one group: {page}");
            groups.into_iter().find(|g| g["count"] == count)
        })
        .await
    }

    /// Receipts to `customer`, by order id (from the subject).
    fn receipts(&self, customer: &str) -> Vec<String> {
        receipts(&self.smtp, customer)
    }

    /// Publishes events as their sources' outbox relays would: written to
    /// notification-svc's outbox in one transaction, its relay sends them to the events
    /// exchange with the usual message properties.
    async fn publish(&self, events: Vec<(&str, NewEvent)>) {
        let settings = &self.stack.settings;
        let pool = shared::db::pool(
            &settings.postgres,
            &shared::db::database_name(settings, "notification"),
        )
        .await
        .expect("the test reaches notification-svc's database");
        let mut tx = pool.begin().await.expect("begin");
        for (source, event) in events {
            let outbox = Outbox::new(&self.stack.env().topology(source));
            outbox.enqueue(&mut tx, event).await.expect("enqueue");
        }
        tx.commit().await.expect("commit");
        pool.close().await;
    }
}

/// The receipts to `email` in notification-svc's log, read until there are at least
/// `expected` (a mail is logged just after the SMTP server takes it, so the log may trail
/// the mail): their count and the page read, to be checked for exactly `expected`.
async fn logged_receipts(w: &World, email: &str, expected: usize) -> (usize, Value) {
    eventually("the receipts in notification-svc's log", || async {
        let sent = w
            .get(&format!("/admin/notifications?to={email}&limit=200"))
            .await;
        let logged = sent["items"]
            .as_array()
            .expect("items")
            .iter()
            .filter(|m| m["template"] == "order_receipt")
            .count();
        (logged >= expected).then_some((logged, sent))
    })
    .await
}

fn ids_of(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["id"].as_str().expect("id").to_owned())
        .collect()
}

/// The query-string form of a group key or id.
fn q(value: &str) -> String {
    value.replace(':', "%3A")
}

#[tokio::test]
async fn receipts_that_failed_for_a_missing_template_form_one_group_and_a_replay_after_the_fix_mails_each_once()
 {
    let w = world(
        &[
            Svc::Product,
            Svc::Inventory,
            Svc::Order,
            Svc::Payment,
            Svc::Notification,
        ],
        |_| {},
    )
    .await;
    let Orders {
        customer,
        customer_email,
        ids: orders,
    } = orders_of_a_new_customer(&w.stack, &w.smtp, 3, "order").await;
    for id in &orders {
        eventually("the order to be paid", || async {
            let (_, order) = w
                .call(&customer, Method::GET, &format!("/orders/{id}"), None)
                .await;
            (order["status"] == "paid").then_some(())
        })
        .await;
    }

    // One fault, one group, with the error that says what is wrong.
    let group = w.receipt_group(3).await;
    assert_eq!(group["service"], "notification");
    assert_eq!(group["error_kind"], "permanent");
    assert_eq!(group["event_types"], json!(["order.paid"]));
    let error = group["error_message"].as_str().expect("error");
    assert!(error.contains("order_receipt"), "{error}");
    assert!(w.receipts(&customer_email).is_empty());
    let key = group["key"].as_str().expect("key").to_owned();
    let members = w
        .get(&format!("/admin/dead-letters/messages?group={}", q(&key)))
        .await;
    let mut correlations: Vec<String> = members["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|m| {
            m["correlation_id"]
                .as_str()
                .expect("correlation")
                .to_owned()
        })
        .collect();
    correlations.sort();
    let mut expected = orders.clone();
    expected.sort();
    assert_eq!(correlations, expected, "the paid orders are the group");

    // Everything about one of them.
    let first = ids_of(&members)[0].clone();
    let detail = w.get(&format!("/admin/dead-letters/{first}")).await;
    assert_eq!(detail["id"], first.as_str());
    assert_eq!(detail["handler"], "mail_receipts");
    assert_eq!(detail["status"], "open");
    assert_eq!(detail["headers"]["x-commerce-error-kind"], "permanent");
    assert_eq!(detail["original_routing_key"], "order.paid");
    assert!(
        detail["attempts"].as_i64().is_some_and(|a| a >= 1),
        "{detail}"
    );
    assert!(detail["first_failed_at"].is_string(), "{detail}");
    let body = detail["body"].as_str().expect("body");
    assert!(body.contains("\n  \"data\": {"), "pretty-printed: {body}");
    assert!(
        body.contains(detail["correlation_id"].as_str().expect("order")),
        "{body}"
    );

    // The fix is deployed; the operator replays the group.
    w.templates.fix();
    let answer = w.replay(json!({"group": key})).await;
    assert_eq!(answer["replayed"], 3, "{answer}");
    let mut receipts = eventually("a receipt for every order", || async {
        let receipts = w.receipts(&customer_email);
        (receipts.len() >= orders.len()).then_some(receipts)
    })
    .await;
    receipts.sort();
    assert_eq!(receipts, expected, "one receipt per order");

    // The group is gone from the open list; its members say who replayed them.
    let open = w.get("/admin/dead-letters?service=notification").await;
    assert!(
        !open["items"]
            .as_array()
            .expect("items")
            .iter()
            .any(|g| g["key"] == key.as_str()),
        "{open}"
    );
    let detail = w.get(&format!("/admin/dead-letters/{first}")).await;
    assert_eq!(detail["status"], "replayed");
    assert_eq!(detail["replay_count"], 1);
    assert_eq!(detail["replayed_by"], w.admin_id.as_str());
    // What notification-svc logged as sent: one receipt per order, nothing twice.
    let (logged, sent) = logged_receipts(&w, &customer_email, orders.len()).await;
    assert_eq!(logged, orders.len(), "{sent}");
}

#[tokio::test]
async fn a_discarded_dead_letter_leaves_the_open_list_and_the_audit_log_names_who() {
    let w = world(&[Svc::Notification], |_| {}).await;
    // An order.paid whose data no handler can read: dead-lettered at once.
    let poison =
        NewEvent::new("order.paid", Uuid::now_v7(), json!({"order_id": "nope"})).expect("event");
    w.publish(vec![("order", poison)]).await;
    let letter = eventually("the poison message among the dead letters", || async {
        let page = w
            .get("/admin/dead-letters/messages?event_type=order.paid")
            .await;
        page["items"].as_array()?.first().cloned()
    })
    .await;
    let id = letter["id"].as_str().expect("id").to_owned();
    assert!(id.starts_with("notification:"), "{id}");
    assert_eq!(letter["status"], "open");

    // Services this stack did not start are reported; the others' dead letters show.
    let page = w.get("/admin/dead-letters/messages").await;
    assert_eq!(ids_of(&page), vec![id.clone()]);
    let down: Vec<&str> = page["unavailable"]
        .as_array()
        .expect("unavailable")
        .iter()
        .map(|u| u["service"].as_str().expect("service"))
        .collect();
    assert!(down.contains(&"order"), "{page}");
    assert!(
        !down.contains(&"notification") && !down.contains(&"user"),
        "{page}"
    );

    let (status, _) = w
        .call(
            &w.admin,
            Method::DELETE,
            &format!("/admin/dead-letters/{id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let open = w.get("/admin/dead-letters/messages").await;
    assert!(ids_of(&open).is_empty(), "{open}");
    let groups = w.get("/admin/dead-letters").await;
    assert_eq!(groups["items"], json!([]), "{groups}");
    let discarded = w.get("/admin/dead-letters/messages?status=discarded").await;
    assert_eq!(ids_of(&discarded), vec![id.clone()]);
    let detail = w.get(&format!("/admin/dead-letters/{id}")).await;
    assert_eq!(detail["status"], "discarded");
    assert_eq!(detail["discarded_by"], w.admin_id.as_str());

    let audit = w.get("/admin/dead-letters/audit").await;
    let entry = &audit["items"][0];
    assert_eq!(entry["action"], "discard", "{audit}");
    assert_eq!(entry["operator"], w.admin_id.as_str());
    assert_eq!(entry["affected"], json!([id]));
    assert_eq!(entry["result"], "done");
    assert!(entry["at"].is_string());

    // Discarding again changes nothing; a replay finds nothing open.
    let (status, _) = w
        .call(
            &w.admin,
            Method::DELETE,
            &format!("/admin/dead-letters/{id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let answer = w.replay(json!({"ids": [id]})).await;
    assert_eq!(answer["replayed"], 0, "{answer}");
    assert_eq!(answer["skipped"], json!([id]));
    let audit = w.get("/admin/dead-letters/audit?action=discard").await;
    assert_eq!(ids_of(&audit).len(), 1, "{audit}");

    // Unknown and malformed ids.
    let unknown = format!("notification:{}", Uuid::now_v7());
    let (status, body) = w
        .call(
            &w.admin,
            Method::GET,
            &format!("/admin/dead-letters/{unknown}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = w
        .call(
            &w.admin,
            Method::DELETE,
            "/admin/dead-letters/not-an-id",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = w
        .call(
            &w.admin,
            Method::GET,
            "/admin/dead-letters/messages?since=yesterday",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["errors"][0]["field"], "since", "{body}");
    let (status, body) = w
        .call(
            &w.admin,
            Method::POST,
            "/admin/dead-letters/replay",
            Some(json!({"ids": [id], "group": "notification:abc"})),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");

    // After the retention period the discarded dead letter is purged.
    let settings = &w.stack.settings;
    let pool = shared::db::pool(
        &settings.postgres,
        &shared::db::database_name(settings, "notification"),
    )
    .await
    .expect("database");
    let store = DeadLetterStore::new(pool.clone(), w.stack.env().topology("notification"));
    assert_eq!(
        store
            .purge_discarded(Duration::from_secs(3600))
            .await
            .expect("purge"),
        0,
        "kept within the retention period"
    );
    assert_eq!(
        store.purge_discarded(Duration::ZERO).await.expect("purge"),
        1
    );
    pool.close().await;
    let (status, _) = w
        .call(
            &w.admin,
            Method::GET,
            &format!("/admin/dead-letters/{id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

fn product_created(product: Uuid, seller: Uuid) -> NewEvent {
    NewEvent::new(
        "product.created",
        product,
        json!({"product_id": product, "seller_id": seller, "name": "Teapot",
               "price_cents": 1000, "currency": "EUR", "category": null,
               "initial_stock": 1000, "created_at": chrono_now()}),
    )
    .expect("event")
}

fn order_paid(order: Uuid, customer: Uuid, product: Uuid, seller: Uuid) -> NewEvent {
    NewEvent::new(
        "order.paid",
        order,
        json!({"order_id": order, "customer_id": customer, "total_cents": 1000,
               "currency": "EUR",
               "lines": [{"product_id": product, "seller_id": seller, "quantity": 1,
                          "unit_price_cents": 1000}]}),
    )
    .expect("event")
}

fn chrono_now() -> String {
    chrono::Utc::now().to_rfc3339()
}

#[tokio::test]
async fn a_group_of_a_hundred_dead_letters_replays_completely_each_once() {
    let w = world(&[Svc::Notification], |_| {}).await;
    let (_, seller) = w.stack.account("sam", "seller").await;
    let (_, customer) = w.stack.account("carol", "customer").await;
    let customer_email = w.stack.email("carol");
    // notification-svc knows both once their welcome mails are out.
    w.smtp.wait_for_to(&w.stack.email("sam"), 1).await;
    w.smtp.wait_for_to(&customer_email, 1).await;
    let product = Uuid::now_v7();
    w.publish(vec![("product", product_created(product, seller))])
        .await;

    // The first order's failure shows the product is known; then the other 99.
    let mut orders = vec![Uuid::now_v7()];
    w.publish(vec![(
        "order",
        order_paid(orders[0], customer, product, seller),
    )])
    .await;
    w.receipt_group(1).await;
    let more: Vec<Uuid> = (0..99).map(|_| Uuid::now_v7()).collect();
    w.publish(
        more.iter()
            .map(|o| ("order", order_paid(*o, customer, product, seller)))
            .collect(),
    )
    .await;
    orders.extend(more);
    let group = w.receipt_group(100).await;
    let key = group["key"].as_str().expect("key").to_owned();

    // The whole group, page by page.
    let mut listed = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/admin/dead-letters/messages?group={}&limit=30", q(&key));
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page = w.get(&path).await;
        listed.extend(ids_of(&page));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let mut unique = listed.clone();
    unique.sort();
    unique.dedup();
    assert_eq!((listed.len(), unique.len()), (100, 100));

    w.templates.fix();
    let answer = w.replay(json!({"group": key})).await;
    assert_eq!(answer["replayed"], 100, "{answer}");

    let mut receipts = eventually("a receipt for each of the 100 orders", || async {
        let receipts = w.receipts(&customer_email);
        (receipts.len() >= 100).then_some(receipts)
    })
    .await;
    receipts.sort();
    let mut expected: Vec<String> = orders.iter().map(Uuid::to_string).collect();
    expected.sort();
    assert_eq!(receipts, expected, "each order's receipt, once");

    // None left open, each replayed once, and the audit log has the replay.
    let open = w
        .get(&format!("/admin/dead-letters/messages?group={}", q(&key)))
        .await;
    assert!(ids_of(&open).is_empty(), "{open}");
    let replayed = w
        .get(&format!(
            "/admin/dead-letters/messages?group={}&status=replayed&limit=200",
            q(&key)
        ))
        .await;
    let items = replayed["items"].as_array().expect("items");
    assert_eq!(items.len(), 100);
    assert!(items.iter().all(|m| m["replay_count"] == 1), "{replayed}");
    let audit = w.get("/admin/dead-letters/audit?action=replay").await;
    let entry = &audit["items"][0];
    assert_eq!(entry["group"], key.as_str(), "{audit}");
    assert_eq!(entry["operator"], w.admin_id.as_str());
    assert_eq!(entry["requested"].as_array().map(Vec::len), Some(100));
    assert_eq!(entry["affected"].as_array().map(Vec::len), Some(100));
    assert_eq!(entry["result"], "done");
    let (logged, sent) = logged_receipts(&w, &customer_email, 100).await;
    assert_eq!(
        logged, 100,
        "notification-svc sent each receipt once: {sent}"
    );
}

#[tokio::test]
async fn only_admins_see_or_touch_dead_letters_at_the_gateway_and_at_each_service() {
    let w = world(&[Svc::Notification], |_| {}).await;
    let (customer, _) = w.stack.account("eve", "customer").await;
    let id = format!("notification:{}", Uuid::now_v7());
    let calls = [
        (Method::GET, "/admin/dead-letters".to_owned(), None),
        (Method::GET, "/admin/dead-letters/messages".to_owned(), None),
        (Method::GET, "/admin/dead-letters/audit".to_owned(), None),
        (Method::GET, format!("/admin/dead-letters/{id}"), None),
        (Method::DELETE, format!("/admin/dead-letters/{id}"), None),
        (
            Method::POST,
            "/admin/dead-letters/replay".to_owned(),
            Some(json!({"ids": [id]})),
        ),
    ];
    for (method, path, body) in calls {
        let (status, problem) = w.call(&customer, method.clone(), &path, body.clone()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {problem}");
        let mut request = w.stack.api(method.clone(), &path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let (status, _) = read(request.send().await.expect("request")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{method} {path}");
    }
    // The routes are in the gateway's API document.
    let doc: Value = w
        .stack
        .client
        .get(format!("{}/api/v1/openapi.json", w.stack.gateway()))
        .send()
        .await
        .expect("openapi")
        .json()
        .await
        .expect("json");
    for path in [
        "/api/v1/admin/dead-letters",
        "/api/v1/admin/dead-letters/{id}",
        "/api/v1/admin/dead-letters/replay",
        "/api/v1/admin/dead-letters/audit",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} documented");
    }
    // The service checks too, for calls that do not come through the gateway.
    let direct = format!(
        "{}/api/v1/admin/dead-letters",
        w.stack.url(Svc::Notification)
    );
    let response = w
        .stack
        .client
        .get(&direct)
        .bearer_auth(&customer)
        .send()
        .await
        .expect("direct");
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let response = w
        .stack
        .client
        .get(&direct)
        .bearer_auth(&w.admin)
        .send()
        .await
        .expect("direct");
    assert_eq!(response.status(), StatusCode::OK);
}
