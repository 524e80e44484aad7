//! Real faults for the dead-letter tests: notification-svc reading its templates from a
//! directory that lacks `order_receipt.txt`, so every `order.paid` fails permanently until
//! the file is put back.

use std::path::{Path, PathBuf};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use testkit::eventually;
use testkit::smtp::SmtpServer;

use crate::Stack;

fn builtin_templates() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../notification-svc/templates")
}

/// A copy of the built-in templates without `order_receipt.txt`; removed on drop.
pub struct MissingReceiptTemplate(PathBuf);

impl MissingReceiptTemplate {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("commerce-templates-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).expect("template dir");
        for entry in std::fs::read_dir(builtin_templates()).expect("built-in templates") {
            let path = entry.expect("entry").path();
            if path.file_name().is_some_and(|n| n != "order_receipt.txt") {
                std::fs::copy(&path, dir.join(path.file_name().expect("name"))).expect("copy");
            }
        }
        Self(dir)
    }

    /// For `smtp.templates_dir`.
    pub fn dir(&self) -> PathBuf {
        self.0.clone()
    }

    /// Puts the missing template in place: the fix is deployed.
    pub fn fix(&self) {
        std::fs::copy(
            builtin_templates().join("order_receipt.txt"),
            self.0.join("order_receipt.txt"),
        )
        .expect("copy the template");
    }
}

impl Default for MissingReceiptTemplate {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for MissingReceiptTemplate {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A new customer's orders of a new seller's product.
pub struct Orders {
    /// The customer's access token.
    pub customer: String,
    pub customer_email: String,
    /// Order ids, in the order they were placed.
    pub ids: Vec<String>,
}

/// Seller `sam` adds a product (10 in stock) and customer `carol` places `count`
/// single-unit card orders of it through the gateway, once notification-svc knows both
/// (their welcome mails reached `smtp`): a mail to an unknown contact fails for that
/// reason too, which would make it a dead letter of another cause.
pub async fn orders_of_a_new_customer(
    stack: &Stack,
    smtp: &SmtpServer,
    count: usize,
    key_prefix: &str,
) -> Orders {
    let (seller, _) = stack.account("sam", "seller").await;
    let (customer, _) = stack.account("carol", "customer").await;
    smtp.wait_for_to(&stack.email("sam"), 1).await;
    smtp.wait_for_to(&stack.email("carol"), 1).await;
    let response = stack
        .api(Method::POST, "/products")
        .bearer_auth(&seller)
        .json(
            &json!({"name": "Teapot", "description": "Holds tea.", "price_cents": 1250,
                      "currency": "EUR", "initial_stock": 10}),
        )
        .send()
        .await
        .expect("create the product");
    assert_eq!(response.status(), StatusCode::CREATED);
    let product: Value = response.json().await.expect("json");
    let ids = place_orders(stack, &customer, &product["id"], count, key_prefix).await;
    Orders {
        customer,
        customer_email: stack.email("carol"),
        ids,
    }
}

/// Receipts mailed to `customer_email`, by order id (from the subject).
pub fn receipts(smtp: &SmtpServer, customer_email: &str) -> Vec<String> {
    smtp.messages_to(customer_email)
        .into_iter()
        .filter_map(|m| {
            m.subject()
                .strip_prefix("Your receipt for order ")
                .map(str::to_owned)
        })
        .collect()
}

/// Places `count` single-unit card orders of `product_id` as `customer`, each under its own
/// `Idempotency-Key` (`<key_prefix>-<n>`), retrying while order-svc does not know the
/// product yet (422); returns their ids.
async fn place_orders(
    stack: &Stack,
    customer: &str,
    product_id: &Value,
    count: usize,
    key_prefix: &str,
) -> Vec<String> {
    let mut orders = Vec::new();
    for n in 0..count {
        let body = json!({"items": [{"product_id": product_id, "quantity": 1}],
                          "payment_method": "pm_card_visa"});
        let order = eventually("order-svc to know the product", || async {
            let response = stack
                .api(Method::POST, "/orders")
                .bearer_auth(customer)
                .header("Idempotency-Key", format!("{key_prefix}-{n}"))
                .json(&body)
                .send()
                .await
                .expect("place");
            match response.status() {
                StatusCode::ACCEPTED => Some(response.json::<Value>().await.expect("json")),
                StatusCode::UNPROCESSABLE_ENTITY => None,
                other => panic!("placing an order: {other}"),
            }
        })
        .await;
        orders.push(order["id"].as_str().expect("id").to_owned());
    }
    orders
}
