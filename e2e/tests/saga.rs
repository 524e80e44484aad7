//! The order saga end to end through the gateway (issue 5): every service running, real
//! PostgreSQL, RabbitMQ and Redis, Stripe played by testkit's FakeStripe and reached
//! through async-stripe, mail received over SMTP by testkit's SmtpServer. Each test checks
//! what people see: the API's answers, the mails that arrived, what Stripe was asked to
//! do, and the stock as sellers and the catalog show it.

use std::collections::HashSet;

use e2e::{Stack, StackOptions, Svc};
use lapin::BasicProperties;
use lapin::options::ConfirmSelectOptions;
use lapin::types::ShortString;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use stripe_webhook::Webhook;
use testkit::smtp::{ReceivedMail, SmtpServer};
use testkit::stripe::{self, Counts, Failure, FakeStripe, Route};
use testkit::{Observer, eventually};
use uuid::Uuid;

const WEBHOOK_SECRET: &str = "whsec_e2e_saga_secret";
const VISA: &str = "pm_card_visa";
const DECLINED: &str = "pm_card_chargeDeclined";

/// How one test's world differs from the plain one.
#[derive(Default)]
struct Setup {
    /// Reservations last this long (the default, 15 minutes, never ends in a test).
    reservation_ttl_secs: Option<u64>,
    /// inventory-svc reaches the broker through a link the test cuts and restores.
    inventory_link: bool,
}

struct Person {
    token: String,
    id: Uuid,
    email: String,
}

/// The whole system, the fakes it talks to, a customer and two sellers, each of whom
/// has had their welcome mail (so notification-svc knows them).
struct World {
    stack: Stack,
    stripe: FakeStripe,
    smtp: SmtpServer,
    customer: Person,
    sellers: [Person; 2],
    /// Products created so far, for the barrier on notification-svc's replica.
    products: u64,
}

/// An order line: product and quantity.
type Line = (Uuid, i64);

impl World {
    async fn start(setup: Setup) -> Self {
        let stripe = FakeStripe::start().await;
        let smtp = SmtpServer::start().await;
        let (api_base, smtp_url) = (stripe.base_url(), smtp.url());
        let ttl = setup.reservation_ttl_secs;
        let stack = Stack::start_with(StackOptions {
            services: Svc::ALL.to_vec(),
            configure: Box::new(move |s| {
                // These tests poll the API; rate limits have tests of their own.
                s.gateway.rate_limit.enabled = false;
                // Seven services per test, two tests at a time, on one PostgreSQL (100
                // connections) that other test runs share: a few connections each is
                // plenty for one order at a time.
                s.postgres.max_connections = 3;
                s.stripe.secret_key = Some(stripe::SECRET_KEY.to_owned().into());
                s.stripe.api_base = Some(api_base);
                s.stripe.webhook_secret = Some(WEBHOOK_SECRET.to_owned().into());
                s.smtp.url = Some(smtp_url.into());
                if let Some(ttl) = ttl {
                    s.reservations.ttl_secs = ttl;
                    s.reservations.sweep_interval_ms = 100;
                }
            }),
            broker_links: if setup.inventory_link {
                vec![Svc::Inventory]
            } else {
                Vec::new()
            },
            ..StackOptions::default()
        })
        .await;
        let customer = person(&stack, "carol", "customer").await;
        let sellers = [
            person(&stack, "sam", "seller").await,
            person(&stack, "sue", "seller").await,
        ];
        let world = Self {
            stack,
            stripe,
            smtp,
            customer,
            sellers,
            products: 0,
        };
        for who in [&world.customer, &world.sellers[0], &world.sellers[1]] {
            world.smtp.wait_for_to(&who.email, 1).await;
        }
        world
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (StatusCode, Value) {
        let mut request = self.stack.api(method, path);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// A product of `seller` with `stock` units, once inventory-svc holds its stock and
    /// notification-svc knows its name.
    async fn product(&mut self, seller: usize, name: &str, price_cents: i64, stock: i64) -> Uuid {
        let token = self.sellers[seller].token.clone();
        let (status, body) = self
            .call(
                Method::POST,
                "/products",
                Some(&token),
                Some(
                    &json!({"name": name, "description": format!("A fine {name}."),
                             "price_cents": price_cents, "currency": "EUR",
                             "initial_stock": stock}),
                ),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let id: Uuid = body["id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("id");
        self.wait_stock(seller, id, (stock, 0, stock)).await;
        self.products += 1;
        let products = self.products;
        eventually("notification-svc to know the products", || async {
            (self.handled("notification", "keep_product").await >= products).then_some(())
        })
        .await;
        id
    }

    async fn place(&self, key: &str, lines: &[Line], method: &str) -> reqwest::Response {
        let items: Vec<Value> = lines
            .iter()
            .map(|(product_id, quantity)| json!({"product_id": product_id, "quantity": quantity}))
            .collect();
        self.stack
            .api(Method::POST, "/orders")
            .bearer_auth(&self.customer.token)
            .header("Idempotency-Key", key)
            .json(&json!({"items": items, "payment_method": method}))
            .send()
            .await
            .expect("place order")
    }

    /// Places an order once order-svc's replica knows its products; gives its id.
    async fn order(&self, key: &str, lines: &[Line], method: &str) -> Uuid {
        let placed = eventually("order-svc to know the products", || async {
            let response = self.place(key, lines, method).await;
            let status = response.status();
            let body: Value = response.json().await.expect("json");
            match status {
                StatusCode::ACCEPTED => Some(body),
                StatusCode::UNPROCESSABLE_ENTITY => None,
                other => panic!("unexpected {other}: {body}"),
            }
        })
        .await;
        assert_eq!(placed["status"], "pending", "{placed}");
        placed["id"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("id")
    }

    async fn get_order(&self, token: &str, order: Uuid) -> (StatusCode, Value) {
        self.call(Method::GET, &format!("/orders/{order}"), Some(token), None)
            .await
    }

    /// The order once the saga has ended it.
    async fn ended(&self, order: Uuid) -> Value {
        eventually(&format!("order {order} to end"), || async {
            let (status, body) = self.get_order(&self.customer.token, order).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            (body["status"] != "pending").then_some(body)
        })
        .await
    }

    /// The customer's view of the order's payment, once payment-svc has one.
    async fn payment(&self, order: Uuid) -> Value {
        eventually(&format!("the payment of {order}"), || async {
            let path = format!("/payments/{order}");
            let (status, body) = self
                .call(Method::GET, &path, Some(&self.customer.token), None)
                .await;
            (status == StatusCode::OK).then_some(body)
        })
        .await
    }

    async fn wait_payment(&self, order: Uuid, status: &str) -> Value {
        eventually(
            &format!("the payment of {order} to be {status}"),
            || async {
                let payment = self.payment(order).await;
                (payment["status"] == status).then_some(payment)
            },
        )
        .await
    }

    /// (on_hand, reserved, available) as the product's seller reads it.
    async fn stock(&self, seller: usize, product: Uuid) -> (i64, i64, i64) {
        let (status, body) = self
            .call(
                Method::GET,
                &format!("/inventory/{product}"),
                Some(&self.sellers[seller].token),
                None,
            )
            .await;
        if status != StatusCode::OK {
            return (-1, -1, -1);
        }
        let n = |k: &str| body[k].as_i64().expect("a number");
        (n("on_hand"), n("reserved"), n("available"))
    }

    async fn wait_stock(&self, seller: usize, product: Uuid, expected: (i64, i64, i64)) {
        eventually(
            &format!("stock of {product} to be {expected:?} (on hand, reserved, available)"),
            || async { (self.stock(seller, product).await == expected).then_some(()) },
        )
        .await;
    }

    /// Waits until the catalog (product-svc) shows `available` units of `product`.
    async fn wait_catalog(&self, product: Uuid, available: i64) {
        eventually(
            &format!("the catalog to show {available} of {product}"),
            || async {
                let (status, body) = self
                    .call(Method::GET, &format!("/products/{product}"), None, None)
                    .await;
                (status == StatusCode::OK && body["available"] == available).then_some(())
            },
        )
        .await;
    }

    /// Mails of one template (named in their Message-ID) received for `to`.
    fn mails(&self, to: &str, template: &str) -> Vec<ReceivedMail> {
        let marker = format!(".{template}.");
        self.smtp
            .messages_to(to)
            .into_iter()
            .filter(|m| {
                m.header("Message-ID")
                    .is_some_and(|id| id.contains(&marker))
            })
            .collect()
    }

    async fn wait_mail(&self, to: &str, template: &str) -> ReceivedMail {
        let marker = format!(".{template}.");
        self.smtp
            .wait_until(&format!("{template} to {to}"), |all| {
                all.iter().any(|m| {
                    m.is_to(to)
                        && m.header("Message-ID")
                            .is_some_and(|id| id.contains(&marker))
                })
            })
            .await;
        self.mails(to, template).remove(0)
    }

    /// Messages one handler of one service has settled with `outcome` (`handled`:
    /// committed; `duplicate`: stopped by the inbox). The in-process services share one
    /// metrics recorder, so any service's `/metrics` shows them all.
    async fn settled(&self, service: &str, handler: &str, outcome: &str) -> u64 {
        let text = self
            .stack
            .client
            .get(format!("{}/metrics", self.stack.url(Svc::Order)))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        let labels = [
            format!("service=\"{service}\""),
            format!("handler=\"{handler}\""),
            format!("outcome=\"{outcome}\""),
        ];
        text.lines()
            .filter(|line| line.starts_with("messages_total{"))
            .filter(|line| labels.iter().all(|l| line.contains(l.as_str())))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    async fn handled(&self, service: &str, handler: &str) -> u64 {
        self.settled(service, handler, "handled").await
    }

    /// The cancellation mail of `order`, checked for its reason.
    async fn cancellation_mail(&self, order: Uuid, because: &str) {
        let mail = self
            .wait_mail(&self.customer.email, "order_cancelled")
            .await;
        assert_eq!(mail.subject(), format!("Your order {order} was cancelled"));
        let text = mail.text();
        assert!(text.contains(because), "{text}");
        assert!(
            self.mails(&self.customer.email, "order_receipt").is_empty(),
            "no receipt for a cancelled order"
        );
    }
}

async fn person(stack: &Stack, who: &str, role: &str) -> Person {
    let (token, id) = stack.account(who, role).await;
    Person {
        token,
        id,
        email: stack.email(who),
    }
}

fn counts(intents: usize, captures: usize, cancels: usize) -> Counts {
    Counts {
        intents,
        captures,
        cancels,
        refunds: 0,
    }
}

#[tokio::test]
async fn a_paid_order_takes_the_stock_captures_once_and_mails_the_customer_and_each_seller() {
    let mut w = World::start(Setup::default()).await;
    let teapot = w.product(0, "Teapot", 1250, 10).await;
    let cup = w.product(0, "Tea cup", 500, 5).await;
    let kettle = w.product(1, "Kettle", 2000, 3).await;

    let order = w
        .order("paid-1", &[(teapot, 2), (cup, 1), (kettle, 1)], VISA)
        .await;
    let ended = w.ended(order).await;
    assert_eq!(ended["status"], "paid", "{ended}");
    assert_eq!(ended["status_reason"], Value::Null);
    assert_eq!(ended["total_cents"], 5000);
    let history: Vec<&str> = ended["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|h| h["event"].as_str())
        .collect();
    for event in [
        "order.created",
        "inventory.reserved",
        "payment.authorized",
        "payment.completed",
        "inventory.committed",
        "order.paid",
    ] {
        assert!(history.contains(&event), "{event} in {history:?}");
    }

    // Stock: sold, nothing left reserved, as sellers and the catalog see it.
    w.wait_stock(0, teapot, (8, 0, 8)).await;
    w.wait_stock(0, cup, (4, 0, 4)).await;
    w.wait_stock(1, kettle, (2, 0, 2)).await;
    w.wait_catalog(teapot, 8).await;
    w.wait_catalog(cup, 4).await;
    w.wait_catalog(kettle, 2).await;

    // Stripe: one authorization for the total, captured once.
    assert_eq!(w.stripe.counts_for_order(order), counts(1, 1, 0));
    let intents = w.stripe.intents_for_order(order);
    assert_eq!(intents[0]["amount"], 5000);
    assert_eq!(intents[0]["status"], "succeeded");
    let payment = w.payment(order).await;
    assert_eq!(payment["status"], "captured", "{payment}");
    assert_eq!(payment["provider"], "stripe", "{payment}");

    // Mail: a receipt with every line, a notice per seller with only their lines.
    let receipt = w.wait_mail(&w.customer.email, "order_receipt").await;
    assert_eq!(receipt.subject(), format!("Your receipt for order {order}"));
    let text = receipt.text();
    for line in [
        "2 x Teapot at 12.50 EUR = 25.00 EUR",
        "1 x Tea cup at 5.00 EUR = 5.00 EUR",
        "1 x Kettle at 20.00 EUR = 20.00 EUR",
        "Total paid: 50.00 EUR",
    ] {
        assert!(text.contains(line), "{line:?} in {text}");
    }
    let sam = w
        .wait_mail(&w.sellers[0].email, "seller_order_notice")
        .await;
    assert_eq!(
        sam.subject(),
        format!("Order {order} is paid: please ship 2 products")
    );
    let text = sam.text();
    assert!(
        text.contains("2 x Teapot") && text.contains("1 x Tea cup"),
        "{text}"
    );
    assert!(!text.contains("Kettle"), "{text}");
    assert!(text.contains("Your part of the order: 30.00 EUR"), "{text}");
    let sue = w
        .wait_mail(&w.sellers[1].email, "seller_order_notice")
        .await;
    let text = sue.text();
    assert!(text.contains("1 x Kettle"), "{text}");
    assert!(
        !text.contains("Teapot") && !text.contains("Tea cup"),
        "{text}"
    );
    assert!(text.contains("Your part of the order: 20.00 EUR"), "{text}");

    // Exactly one each: order.paid was handled once, and all its mails went out in it.
    eventually("order.paid to be handled", || async {
        (w.handled("notification", "mail_receipts").await >= 1).then_some(())
    })
    .await;
    assert_eq!(w.mails(&w.customer.email, "order_receipt").len(), 1);
    for seller in &w.sellers {
        assert_eq!(w.mails(&seller.email, "seller_order_notice").len(), 1);
    }
    assert!(w.mails(&w.customer.email, "order_cancelled").is_empty());
}

#[tokio::test]
async fn a_declined_card_cancels_the_order_gives_the_stock_back_and_captures_nothing() {
    let mut w = World::start(Setup::default()).await;
    let teapot = w.product(0, "Teapot", 1250, 10).await;

    let order = w.order("declined-1", &[(teapot, 3)], DECLINED).await;
    let ended = w.ended(order).await;
    assert_eq!(ended["status"], "cancelled", "{ended}");
    assert_eq!(ended["status_reason"], "payment_declined", "{ended}");

    w.wait_stock(0, teapot, (10, 0, 10)).await;
    w.wait_catalog(teapot, 10).await;
    let payment = w.wait_payment(order, "failed").await;
    assert_eq!(payment["failure_code"], "card_declined", "{payment}");
    let done = w.stripe.counts_for_order(order);
    assert_eq!((done.captures, done.refunds), (0, 0), "{done:?}");
    w.cancellation_mail(order, "your payment was declined")
        .await;
}

#[tokio::test]
async fn a_line_out_of_stock_cancels_the_order_and_voids_the_authorization() {
    let mut w = World::start(Setup {
        inventory_link: true,
        ..Setup::default()
    })
    .await;
    let teapot = w.product(0, "Teapot", 1250, 10).await;
    let kettle = w.product(1, "Kettle", 2000, 3).await;

    // Inventory hears of the order only once the card is authorized, so there is always
    // a hold to void (were the rejection first, payment-svc would hold nothing at all).
    w.stack.broker_link(Svc::Inventory).cut();
    let order = w.order("short-1", &[(teapot, 1), (kettle, 5)], VISA).await;
    w.wait_payment(order, "authorized").await;
    w.stack.broker_link(Svc::Inventory).restore();

    let ended = w.ended(order).await;
    assert_eq!(ended["status"], "cancelled", "{ended}");
    assert_eq!(ended["status_reason"], "out_of_stock", "{ended}");
    w.wait_payment(order, "voided").await;
    assert_eq!(w.stripe.counts_for_order(order), counts(1, 0, 1));
    let intent = &w.stripe.intents_for_order(order)[0];
    assert_eq!(intent["status"], "canceled", "{intent}");
    // All or nothing: the line that was in stock was not taken either.
    assert_eq!(w.stock(0, teapot).await, (10, 0, 10));
    assert_eq!(w.stock(1, kettle).await, (3, 0, 3));
    w.cancellation_mail(order, "some of its items are no longer in stock")
        .await;
}

#[tokio::test]
async fn a_reservation_that_expires_before_the_capture_cancels_the_order_and_voids() {
    // Reservations last 1 s. Deterministic, with no race to win: inventory-svc is cut off
    // from the broker until the card is authorized, and Stripe answers every capture
    // with a 500, so `inventory.reserved` can never complete a capture (payment-svc
    // retries it, each try rolled back). The sweeper's `inventory.released` (`expired`)
    // then finds an authorized, uncaptured payment, which is voided.
    let mut w = World::start(Setup {
        reservation_ttl_secs: Some(1),
        inventory_link: true,
    })
    .await;
    let teapot = w.product(0, "Teapot", 1250, 10).await;
    w.stripe
        .fail_next(Route::Capture, 1_000, Failure::Status500);

    w.stack.broker_link(Svc::Inventory).cut();
    let order = w.order("late-1", &[(teapot, 4)], VISA).await;
    w.wait_payment(order, "authorized").await;
    w.stack.broker_link(Svc::Inventory).restore();

    let ended = w.ended(order).await;
    assert_eq!(ended["status"], "cancelled", "{ended}");
    assert_eq!(ended["status_reason"], "reservation_expired", "{ended}");
    let history: Vec<(&str, Option<&str>)> = ended["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|h| (h["event"].as_str().unwrap_or(""), h["detail"].as_str()))
        .collect();
    assert!(
        history.contains(&("inventory.released", Some("expired"))),
        "{history:?}"
    );
    w.wait_payment(order, "voided").await;
    assert_eq!(w.stripe.counts_for_order(order), counts(1, 0, 1));
    w.wait_stock(0, teapot, (10, 0, 10)).await;
    w.wait_catalog(teapot, 10).await;
    w.cancellation_mail(
        order,
        "your payment could not be confirmed before we stopped holding the items",
    )
    .await;
}

/// The saga events of one order, and who consumes each: (service, handler).
const SAGA: &[(&str, &[(&str, &str)])] = &[
    (
        "order.created",
        &[
            ("inventory", "reserve_stock"),
            ("payment", "authorize"),
            ("notification", "keep_order"),
        ],
    ),
    (
        "inventory.reserved",
        &[
            ("order", "saga_inventory_reserved"),
            ("payment", "capture_on_reserved"),
        ],
    ),
    (
        "payment.authorized",
        &[("order", "saga_payment_authorized")],
    ),
    (
        "payment.completed",
        &[
            ("order", "saga_payment_completed"),
            ("inventory", "commit_stock"),
        ],
    ),
    (
        "inventory.committed",
        &[("order", "saga_inventory_committed")],
    ),
    ("order.paid", &[("notification", "mail_receipts")]),
];

#[tokio::test]
async fn every_saga_event_delivered_twice_changes_nothing() {
    let mut w = World::start(Setup::default()).await;
    let teapot = w.product(0, "Teapot", 1250, 10).await;
    let kettle = w.product(1, "Kettle", 2000, 3).await;
    let mut observer = Observer::new(w.stack.env(), &["order.#", "inventory.#", "payment.#"]).await;

    let order = w.order("twice-1", &[(teapot, 2), (kettle, 1)], VISA).await;
    assert_eq!(w.ended(order).await["status"], "paid");

    // Every saga event of the order, as published.
    let types: HashSet<&str> = SAGA.iter().map(|(t, _)| *t).collect();
    let mut seen: Vec<Value> = Vec::new();
    while seen.len() < SAGA.len() {
        let delivery = observer.next().await;
        let event: Value = serde_json::from_slice(&delivery.data).expect("an envelope");
        let event_type = event["type"].as_str().unwrap_or_default();
        if event["data"]["order_id"] != order.to_string() || !types.contains(event_type) {
            continue;
        }
        // The relay publishes at least once: the same message again is fine, a second
        // event of one type is not.
        match seen.iter().find(|e| e["type"] == event["type"]) {
            Some(earlier) => assert_eq!(earlier["id"], event["id"], "two {event_type}"),
            None => seen.push(event),
        }
    }
    // The originals are handled everywhere before the copies go out, so that the counts
    // below are the copies'.
    for (_, consumers) in SAGA {
        for (service, handler) in *consumers {
            eventually(
                &format!("{service}/{handler} to handle the original"),
                || async { (w.handled(service, handler).await >= 1).then_some(()) },
            )
            .await;
        }
    }
    let stock_before = (w.stock(0, teapot).await, w.stock(1, kettle).await);

    // Each event again: once with its own message id, once as a new message.
    let connection = w.stack.env().amqp().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let exchange = w.stack.env().topology("test").events_exchange();
    for event in &seen {
        let mut renewed = event.clone();
        renewed["id"] = json!(Uuid::now_v7());
        for copy in [event, &renewed] {
            let event_type = copy["type"].as_str().expect("type");
            let properties = BasicProperties::default()
                .with_message_id(ShortString::from(copy["id"].as_str().expect("id")))
                .with_type(ShortString::from(event_type))
                .with_content_type(ShortString::from("application/json"))
                .with_correlation_id(ShortString::from(
                    copy["correlation_id"].as_str().expect("correlation id"),
                ));
            let body = serde_json::to_vec(copy).expect("json");
            testkit::publish(&channel, &exchange, event_type, &body, properties).await;
        }
    }
    // Every consumer settles both copies: the same id is stopped by its inbox, the new
    // one is handled (and must change nothing).
    for (_, consumers) in SAGA {
        for (service, handler) in *consumers {
            eventually(
                &format!("{service}/{handler} to settle the copies"),
                || async {
                    let handled = w.handled(service, handler).await;
                    let duplicate = w.settled(service, handler, "duplicate").await;
                    (handled >= 2 && duplicate >= 1).then_some(())
                },
            )
            .await;
        }
    }

    let after = w.ended(order).await;
    assert_eq!(after["status"], "paid", "{after}");
    assert_eq!(after["status_reason"], Value::Null, "{after}");
    assert_eq!(
        (w.stock(0, teapot).await, w.stock(1, kettle).await),
        stock_before
    );
    assert_eq!(stock_before, ((8, 0, 8), (2, 0, 2)));
    assert_eq!(w.stripe.counts_for_order(order), counts(1, 1, 0));
    assert_eq!(w.payment(order).await["status"], "captured");
    assert_eq!(w.mails(&w.customer.email, "order_receipt").len(), 1);
    for seller in &w.sellers {
        assert_eq!(w.mails(&seller.email, "seller_order_notice").len(), 1);
    }
    assert!(w.mails(&w.customer.email, "order_cancelled").is_empty());
}

#[tokio::test]
async fn one_idempotency_key_makes_one_order_and_a_failed_capture_is_retried_once() {
    let mut w = World::start(Setup::default()).await;
    let teapot = w.product(0, "Teapot", 1250, 10).await;
    w.stripe.fail_next(Route::Capture, 1, Failure::Status500);

    let lines = [(teapot, 1)];
    let order = w.order("same-key", &lines, VISA).await;
    let again = w.place("same-key", &lines, VISA).await;
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.expect("json");
    assert_eq!(again["id"], order.to_string());

    let ended = w.ended(order).await;
    assert_eq!(ended["status"], "paid", "{ended}");
    let (status, list) = w
        .call(Method::GET, "/orders", Some(&w.customer.token), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{list}");
    let ids: Vec<&Value> = list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|o| &o["id"])
        .collect();
    assert_eq!(ids, [&json!(order)], "one order for one key");

    // The first capture got a 500; the retry (same idempotency key) captured once.
    assert!(w.stripe.requests(Route::Capture) >= 2);
    assert_eq!(w.stripe.counts_for_order(order), counts(1, 1, 0));
    w.wait_stock(0, teapot, (9, 0, 9)).await;
    w.wait_mail(&w.customer.email, "order_receipt").await;
    eventually("order.paid to be handled", || async {
        (w.handled("notification", "mail_receipts").await >= 1).then_some(())
    })
    .await;
    assert_eq!(w.mails(&w.customer.email, "order_receipt").len(), 1);
}

#[tokio::test]
async fn a_customer_cannot_read_another_customers_order() {
    let mut w = World::start(Setup::default()).await;
    let teapot = w.product(0, "Teapot", 1250, 10).await;
    let order = w.order("mine", &[(teapot, 1)], VISA).await;
    let dave = person(&w.stack, "dave", "customer").await;

    let (status, body) = w.get_order(&dave.token, order).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["status"], 404, "{body}");
    // Answered exactly like an order that does not exist.
    let (status, missing) = w.get_order(&dave.token, Uuid::now_v7()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["detail"], missing["detail"]);
    let (status, list) = w
        .call(Method::GET, "/orders", Some(&dave.token), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["items"], json!([]), "{list}");
    // The order's owner still sees it, and it completes.
    let (status, _) = w.get_order(&w.customer.token, order).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(w.ended(order).await["status"], "paid");
    assert_eq!(
        w.customer.id.to_string(),
        w.ended(order).await["customer_id"]
    );
}

#[tokio::test]
async fn stripe_webhooks_pass_through_the_gateway_byte_for_byte() {
    let mut w = World::start(Setup::default()).await;
    let teapot = w.product(0, "Teapot", 1250, 10).await;
    let order = w.order("hooked", &[(teapot, 2)], VISA).await;
    assert_eq!(w.ended(order).await["status"], "paid");
    let intent = w.stripe.intents_for_order(order).remove(0);

    // Laid out as no JSON serializer would: any re-encoding breaks the signature.
    let event: Value = serde_json::from_str(&w.stripe.event("payment_intent.succeeded", &intent))
        .expect("an event");
    let payload = format!("{}\n", serde_json::to_string_pretty(&event).expect("json"))
        .replace("\": ", "\" :  ");
    assert!(serde_json::from_str::<Value>(&payload).is_ok());
    let post = |body: String, signature: String| {
        w.stack
            .api(Method::POST, "/payments/webhook")
            .header("content-type", "application/json")
            .header("stripe-signature", signature)
            .body(body)
            .send()
    };
    let signature = Webhook::generate_test_header(&payload, WEBHOOK_SECRET, None);
    let response = post(payload.clone(), signature.clone())
        .await
        .expect("post");
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body, json!({"received": true, "duplicate": false}));
    let payment = w.payment(order).await;
    let from_webhook: Vec<&Value> = payment["ledger"]
        .as_array()
        .expect("ledger")
        .iter()
        .filter(|e| e["source"] == "webhook")
        .collect();
    assert_eq!(from_webhook.len(), 1, "{payment}");
    assert_eq!(
        from_webhook[0]["step"], "payment_intent.succeeded",
        "{payment}"
    );

    // One byte changed after signing: refused, nothing recorded.
    let tampered = payload.replacen("2500", "2501", 1);
    assert_ne!(tampered, payload);
    let response = post(tampered, signature).await.expect("post");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
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
    let payment = w.payment(order).await;
    let recorded = payment["ledger"]
        .as_array()
        .expect("ledger")
        .iter()
        .filter(|e| e["source"] == "webhook")
        .count();
    assert_eq!(recorded, 1, "{payment}");
}
