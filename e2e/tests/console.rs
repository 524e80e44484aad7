//! The ops console in a real browser (issue 6): an on-call admin signs in, opens the group
//! of receipts that failed for a missing template, replays it after the fix, and sees it
//! empty. The browser part is `e2e/browser/console.mjs` (playwright-core driving Debian's
//! Chromium); this test makes the fault, runs the script and checks the system behind it.
//!
//! Needs `node` and `e2e/browser/node_modules` (`scripts/ensure-browser.sh`, run by
//! `make test`) and Chromium at `/usr/bin/chromium` or `$CHROMIUM`.
//! `COMMERCE_CONSOLE_SCREENSHOT=<path>` (absolute, or relative to the workspace) saves a
//! screenshot of the groups there: `docs/console.png` is made that way.

use std::path::Path;
use std::process::Stdio;

use e2e::faults::{MissingReceiptTemplate, Orders, orders_of_a_new_customer, receipts};
use e2e::{PASSWORD, Stack, StackOptions, Svc, WAIT};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use testkit::eventually;
use testkit::smtp::SmtpServer;

const ADMIN_EMAIL: &str = "oncall@example.com";
const ADMIN_PASSWORD: &str = "a long admin passphrase nobody guesses";
const ORDERS: usize = 3;

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

async fn call(
    stack: &Stack,
    token: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Value {
    let mut request = stack.api(method.clone(), path).bearer_auth(token);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("request");
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "{method} {path}: {status} {body}");
    body
}

/// Runs the browser script; its JSON report, whether it succeeded or not.
async fn run_browser(env: &[(&str, String)]) -> Value {
    let dir = manifest_dir().join("browser");
    assert!(
        dir.join("node_modules/playwright-core").is_dir(),
        "e2e/browser/node_modules is missing: run scripts/ensure-browser.sh (make test does)"
    );
    let mut command = tokio::process::Command::new("node");
    command
        .arg("console.mjs")
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    let child = command
        .spawn()
        .expect("node runs (scripts/ensure-browser.sh installs it)");
    // The script gives up on each step by its own deadline; this only guards against a hang.
    let output = tokio::time::timeout(WAIT * 20, child.wait_with_output())
        .await
        .expect("the browser script ends")
        .expect("the browser script's output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report = stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str::<Value>(line).ok())
        .unwrap_or_else(|| {
            panic!("no report from the browser script\nstdout: {stdout}\nstderr: {stderr}")
        });
    assert!(
        output.status.success() && report["ok"] == true,
        "the browser script failed: {report:#}\nstderr: {stderr}"
    );
    report
}

#[tokio::test]
async fn an_admin_replays_a_group_of_failed_receipts_in_the_console_and_sees_it_empty() {
    let smtp = SmtpServer::start().await;
    let templates = MissingReceiptTemplate::new();
    let (url, dir) = (smtp.url(), templates.dir());
    let stack = Stack::start_with(StackOptions {
        services: vec![
            Svc::Product,
            Svc::Inventory,
            Svc::Order,
            Svc::Payment,
            Svc::Notification,
            // Not needed for receipts; started so that every service answers the console.
            Svc::File,
        ],
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
    let login = stack.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
    assert_eq!(login.status(), StatusCode::OK);
    let login: Value = login.json().await.expect("json");
    let admin = login["access_token"].as_str().expect("token").to_owned();
    let admin_id = login["user"]["id"].as_str().expect("id").to_owned();

    // Orders are paid; their receipts fail for the missing template.
    let Orders {
        customer_email,
        ids: mut orders,
        ..
    } = orders_of_a_new_customer(&stack, &smtp, ORDERS, "console").await;
    let group = eventually("the receipts to be dead-lettered in one group", || async {
        let page = call(
            &stack,
            &admin,
            Method::GET,
            "/admin/dead-letters?service=notification",
            None,
        )
        .await;
        page["items"]
            .as_array()?
            .iter()
            .find(|g| g["handler"] == "mail_receipts" && g["count"] == ORDERS)
            .cloned()
    })
    .await;
    let key = group["key"].as_str().expect("key").to_owned();
    assert!(receipts(&smtp, &customer_email).is_empty());

    // The fix is deployed; the on-call admin turns to the console.
    templates.fix();
    let mut env = vec![
        ("COMMERCE_GATEWAY", stack.gateway().to_owned()),
        ("COMMERCE_ADMIN_EMAIL", ADMIN_EMAIL.to_owned()),
        ("COMMERCE_ADMIN_PASSWORD", ADMIN_PASSWORD.to_owned()),
        ("COMMERCE_GROUP", key.clone()),
        ("COMMERCE_GROUP_COUNT", ORDERS.to_string()),
        ("COMMERCE_CUSTOMER_EMAIL", customer_email.clone()),
        ("COMMERCE_CUSTOMER_PASSWORD", PASSWORD.to_owned()),
    ];
    if let Ok(path) = std::env::var("COMMERCE_CONSOLE_SCREENSHOT") {
        // Test runners start a test in its package's directory: relative to the workspace.
        let path = manifest_dir().join("..").join(path);
        env.push(("COMMERCE_CONSOLE_SCREENSHOT", path.display().to_string()));
    }
    let report = run_browser(&env).await;

    // What the page showed.
    assert!(
        report["customer_message"]
            .as_str()
            .is_some_and(|m| m.contains("administrators only")),
        "{report:#}"
    );
    assert_eq!(report["signed_in_as"], ADMIN_EMAIL, "{report:#}");
    assert_eq!(
        report["local_storage_items"], 0,
        "the token stays out of localStorage"
    );
    assert_eq!(report["group_row"]["count"], ORDERS, "{report:#}");
    assert_eq!(report["group_row"]["event_types"], "order.paid");
    assert!(
        report["group_row"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("order_receipt")),
        "{report:#}"
    );
    let headers = report["message"]["headers"].as_array().expect("headers");
    assert!(
        headers.iter().any(|h| h == "x-commerce-error-kind"),
        "{report:#}"
    );
    assert_eq!(report["message"]["body_is_pretty"], true, "{report:#}");
    assert!(
        report["replay_notice"]
            .as_str()
            .is_some_and(|n| n.contains(&format!("{ORDERS} messages"))),
        "{report:#}"
    );
    assert_eq!(report["group_empty"], true);
    assert_eq!(report["audit"]["action"], "replay", "{report:#}");
    assert_eq!(report["audit"]["group"], key.as_str(), "{report:#}");
    assert_eq!(report["audit"]["operator"], admin_id.as_str(), "{report:#}");
    assert_eq!(
        report["audit"]["who"],
        format!("{ADMIN_EMAIL} (you)"),
        "{report:#}"
    );
    assert_eq!(report["session_items_after_sign_out"], 0, "{report:#}");

    // What the system did: the group is gone, each order got one receipt, the audit log
    // names the admin.
    let open = call(
        &stack,
        &admin,
        Method::GET,
        "/admin/dead-letters?service=notification",
        None,
    )
    .await;
    assert!(
        !open["items"]
            .as_array()
            .expect("items")
            .iter()
            .any(|g| g["key"] == key.as_str()),
        "{open}"
    );
    let mut got = eventually("a receipt for every order", || async {
        let got = receipts(&smtp, &customer_email);
        (got.len() >= ORDERS).then_some(got)
    })
    .await;
    got.sort();
    orders.sort();
    assert_eq!(got, orders, "exactly one receipt per order");
    // notification-svc's own log of what it sent: once each (it logs just after the send).
    let logged = eventually("every receipt in the notification log", || async {
        let sent = call(
            &stack,
            &admin,
            Method::GET,
            &format!("/admin/notifications?to={customer_email}&limit=200"),
            None,
        )
        .await;
        let logged = sent["items"]
            .as_array()?
            .iter()
            .filter(|m| m["template"] == "order_receipt")
            .count();
        (logged >= ORDERS).then_some(logged)
    })
    .await;
    assert_eq!(logged, ORDERS);
    let audit = call(
        &stack,
        &admin,
        Method::GET,
        "/admin/dead-letters/audit?action=replay",
        None,
    )
    .await;
    let entry = &audit["items"][0];
    assert_eq!(entry["group"], key.as_str(), "{audit}");
    assert_eq!(entry["operator"], admin_id.as_str(), "{audit}");
    assert_eq!(entry["affected"].as_array().map(Vec::len), Some(ORDERS));
    assert_eq!(entry["result"], "done");
}
