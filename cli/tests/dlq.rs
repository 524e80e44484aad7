//! `commerce dlq` against a running system (in-process services and gateway): the
//! built binary lists a real fault's dead letters, shows one, replays the group after the
//! fix, and reads the audit log; errors come out readable and with a failing exit code.

use std::path::{Path, PathBuf};
use std::process::Output;

use e2e::{Stack, StackOptions, Svc};
use serde_json::{Value, json};
use shared::messaging::{NewEvent, Outbox};
use testkit::eventually;
use testkit::smtp::SmtpServer;
use uuid::Uuid;

const ADMIN_EMAIL: &str = "oncall@example.com";
const ADMIN_PASSWORD: &str = "a long admin passphrase nobody guesses";

fn builtin_templates() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../notification-svc/templates")
}

async fn commerce(gateway: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_commerce"))
        .arg("dlq")
        .args(["--gateway", gateway])
        .args(args)
        .env_remove("COMMERCE_TOKEN")
        .env_remove("COMMERCE_EMAIL")
        .env_remove("COMMERCE_PASSWORD")
        .output()
        .await
        .expect("run commerce")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "commerce failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).expect("utf-8")
}

fn json_of(output: &Output) -> Value {
    serde_json::from_str(&stdout(output)).expect("--json prints JSON")
}

/// Publishes events through notification-svc's outbox, as their producers would.
async fn publish(stack: &Stack, events: Vec<(&str, NewEvent)>) {
    let settings = &stack.settings;
    let pool = shared::db::pool(
        &settings.postgres,
        &shared::db::database_name(settings, "notification"),
    )
    .await
    .expect("database");
    let mut tx = pool.begin().await.expect("begin");
    for (source, event) in events {
        Outbox::new(&stack.env().topology(source))
            .enqueue(&mut tx, event)
            .await
            .expect("enqueue");
    }
    tx.commit().await.expect("commit");
    pool.close().await;
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

#[tokio::test]
async fn the_cli_lists_shows_and_replays_dead_letters_of_a_running_system() {
    // notification-svc without its receipt template: every order.paid fails.
    let templates = std::env::temp_dir().join(format!("commerce-cli-templates-{}", Uuid::now_v7()));
    std::fs::create_dir_all(&templates).expect("dir");
    for entry in std::fs::read_dir(builtin_templates()).expect("templates") {
        let path = entry.expect("entry").path();
        if path.file_name().is_some_and(|n| n != "order_receipt.txt") {
            std::fs::copy(&path, templates.join(path.file_name().expect("name"))).expect("copy");
        }
    }
    let smtp = SmtpServer::start().await;
    let (url, dir) = (smtp.url(), templates.clone());
    let stack = Stack::start_with(StackOptions {
        services: vec![Svc::Notification],
        configure: Box::new(move |s| {
            s.admin.email = Some(ADMIN_EMAIL.into());
            s.admin.password = Some(ADMIN_PASSWORD.into());
            s.gateway.rate_limit.enabled = false;
            s.smtp.url = Some(url.into());
            s.smtp.templates_dir = Some(dir);
        }),
        ..StackOptions::default()
    })
    .await;
    let gateway = stack.gateway().to_owned();
    let login: Value = stack
        .login(ADMIN_EMAIL, ADMIN_PASSWORD)
        .await
        .json()
        .await
        .expect("login");
    let token = login["access_token"].as_str().expect("token").to_owned();
    let admin_id = login["user"]["id"].as_str().expect("id").to_owned();
    let (customer_token, customer) = stack.account("carol", "customer").await;
    let (_, seller) = stack.account("sam", "seller").await;
    smtp.wait_for_to(&stack.email("carol"), 1).await;
    smtp.wait_for_to(&stack.email("sam"), 1).await;
    let product = Uuid::now_v7();
    publish(
        &stack,
        vec![(
            "product",
            NewEvent::new(
                "product.created",
                product,
                json!({"product_id": product, "seller_id": seller, "name": "Teapot",
                       "price_cents": 1000, "currency": "EUR", "category": null,
                       "initial_stock": 5, "created_at": "2026-01-01T00:00:00Z"}),
            )
            .expect("event"),
        )],
    )
    .await;
    let orders = [Uuid::now_v7(), Uuid::now_v7()];
    publish(
        &stack,
        orders
            .iter()
            .map(|o| ("order", order_paid(*o, customer, product, seller)))
            .collect(),
    )
    .await;

    // list --json: one group of two, once both have failed.
    let group = eventually("the group of two in `dlq list`", || async {
        let page = json_of(&commerce(&gateway, &["--token", &token, "--json", "list"]).await);
        page["items"]
            .as_array()?
            .iter()
            .find(|g| g["handler"] == "mail_receipts" && g["count"] == 2)
            .cloned()
    })
    .await;
    let key = group["key"].as_str().expect("key").to_owned();

    // The table a person reads.
    let table = stdout(&commerce(&gateway, &["--token", &token, "list"]).await);
    for expected in [
        key.as_str(),
        "mail_receipts",
        "permanent",
        "order.paid",
        "1 group\n",
    ] {
        assert!(table.contains(expected), "{expected:?} in\n{table}");
    }
    let members = stdout(&commerce(&gateway, &["--token", &token, "list", "--group", &key]).await);
    for order in &orders {
        assert!(
            members.contains(&order.to_string()),
            "{order} in\n{members}"
        );
    }
    let page = json_of(
        &commerce(
            &gateway,
            &[
                "--token",
                &token,
                "--json",
                "list",
                "--messages",
                "--event-type",
                "order.paid",
            ],
        )
        .await,
    );
    let id = page["items"][0]["id"].as_str().expect("id").to_owned();
    let shown = stdout(&commerce(&gateway, &["--token", &token, "show", &id]).await);
    for expected in [
        "x-commerce-error-kind",
        "order_receipt",
        "Headers:",
        "Body:",
        "\"order_id\"",
    ] {
        assert!(shown.contains(expected), "{expected:?} in\n{shown}");
    }

    // A customer is refused, readably, with a failing exit code.
    let refused = commerce(&gateway, &["--token", &customer_token, "list"]).await;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("403 Forbidden"), "{stderr}");
    let missing = commerce(
        &gateway,
        &[
            "--token",
            &token,
            "discard",
            &format!("notification:{}", Uuid::now_v7()),
        ],
    )
    .await;
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("404 Not Found: no dead letter"), "{stderr}");

    // The fix is deployed; the operator logs in and replays the group.
    std::fs::copy(
        builtin_templates().join("order_receipt.txt"),
        templates.join("order_receipt.txt"),
    )
    .expect("fix");
    let replayed = stdout(
        &commerce(
            &gateway,
            &[
                "--email",
                ADMIN_EMAIL,
                "--password",
                ADMIN_PASSWORD,
                "replay",
                "--group",
                &key,
            ],
        )
        .await,
    );
    assert!(replayed.contains("replayed 2"), "{replayed}");
    let receipts = eventually("both receipts", || async {
        let receipts: Vec<String> = smtp
            .messages_to(&stack.email("carol"))
            .into_iter()
            .map(|m| m.subject())
            .filter(|s| s.starts_with("Your receipt for order"))
            .collect();
        (receipts.len() >= 2).then_some(receipts)
    })
    .await;
    assert_eq!(receipts.len(), 2, "{receipts:?}");
    for order in &orders {
        assert!(
            receipts.iter().any(|r| r.ends_with(&order.to_string())),
            "{receipts:?}"
        );
    }
    let after = stdout(&commerce(&gateway, &["--token", &token, "list"]).await);
    assert!(after.contains("no dead letters"), "{after}");

    // The audit log says who did it.
    let audit = json_of(&commerce(&gateway, &["--token", &token, "--json", "audit"]).await);
    assert_eq!(audit["items"][0]["action"], "replay", "{audit}");
    assert_eq!(audit["items"][0]["operator"], admin_id.as_str());
    let table = stdout(&commerce(&gateway, &["--token", &token, "audit"]).await);
    assert!(
        table.contains(&admin_id) && table.contains("done"),
        "{table}"
    );
    let _ = std::fs::remove_dir_all(&templates);
}
