//! Identity through the gateway: accounts, tokens, roles, rate limits (issue 3).

use base64::Engine as _;
use e2e::{PASSWORD, Stack, StackOptions};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use shared::auth::{Claims, Role, SigningKeys, generate_key};
use shared::config::RateLimit;
use testkit::eventually;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn kid(token: &str) -> Option<String> {
    jsonwebtoken::decode_header(token).ok()?.kid
}

async fn status_and_body(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

#[tokio::test]
async fn register_login_me_and_refresh_rotation() {
    let stack = Stack::start().await;
    let email = stack.email("ada");
    let registered = stack
        .register(&format!("  {}  ", email.to_uppercase()), "customer")
        .await;
    assert_eq!(registered["user"]["email"], email, "normalised");
    assert_eq!(registered["user"]["roles"], json!(["customer"]));
    assert_eq!(registered["token_type"], "Bearer");
    assert!(registered["expires_in"].as_u64().is_some_and(|s| s > 0));

    let (status, login) = status_and_body(stack.login(&email, PASSWORD).await).await;
    assert_eq!(status, StatusCode::OK, "{login}");
    let access = login["access_token"].as_str().expect("access token");
    let (status, me) = status_and_body(
        stack
            .api(Method::GET, "/users/me")
            .bearer_auth(access)
            .send()
            .await
            .expect("me"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{me}");
    assert_eq!(me["email"], email);
    assert_eq!(me["id"], registered["user"]["id"]);

    // Each refresh gives a new pair; the token it used stops working.
    let first = login["refresh_token"].as_str().expect("refresh token");
    let refresh = |token: String| {
        let request = stack
            .api(Method::POST, "/auth/refresh")
            .json(&json!({ "refresh_token": token }));
        async move { status_and_body(request.send().await.expect("refresh")).await }
    };
    let (status, second) = refresh(first.to_owned()).await;
    assert_eq!(status, StatusCode::OK, "{second}");
    let second_token = second["refresh_token"].as_str().expect("token").to_owned();
    assert_ne!(second_token, first);
    assert_ne!(second["access_token"], login["access_token"]);
    let (status, _) = refresh(first.to_owned()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "the used token fails");

    // That reuse revoked the whole family: even the newest token fails now.
    let (status, body) = refresh(second_token).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["status"], 401);

    // A new sign-in starts a new family that works.
    let (_, again) = status_and_body(stack.login(&email, PASSWORD).await).await;
    let (status, _) = refresh(again["refresh_token"].as_str().expect("token").to_owned()).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn unknown_email_and_wrong_password_get_identical_401_bodies() {
    let stack = Stack::start().await;
    let email = stack.email("grace");
    stack.register(&email, "customer").await;
    let attempt = |email: String, password: &'static str| {
        let request = stack
            .api(Method::POST, "/auth/login")
            .header("x-request-id", "same-request-id")
            .json(&json!({"email": email, "password": password}));
        async move {
            let response = request.send().await.expect("login");
            let status = response.status();
            let content_type = response.headers()["content-type"].clone();
            (status, content_type, response.bytes().await.expect("body"))
        }
    };
    let (status_a, type_a, unknown) = attempt(stack.email("nobody"), PASSWORD).await;
    let (status_b, type_b, wrong) = attempt(email, "wrong horse battery staple").await;
    assert_eq!(status_a, StatusCode::UNAUTHORIZED);
    assert_eq!(status_b, StatusCode::UNAUTHORIZED);
    assert_eq!(type_a, "application/problem+json");
    assert_eq!(type_a, type_b);
    assert_eq!(unknown, wrong, "byte-identical bodies");
}

/// Tokens that must be refused, made with the real key directory or a stranger's.
fn bad_tokens(stack: &Stack, user: uuid::Uuid) -> Vec<(&'static str, String)> {
    let keys = SigningKeys::open(&stack.keys_dir).expect("the service's keys");
    let auth = &stack.settings.auth;
    let good = keys
        .sign(&Claims::new(user, vec![Role::Admin], auth))
        .expect("sign");

    let mut tampered = good.split('.').map(str::to_owned).collect::<Vec<_>>();
    let mut payload: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&tampered[1])
            .expect("payload"),
    )
    .expect("json");
    payload["roles"] = json!(["admin", "seller"]);
    tampered[1] = b64(payload.to_string().as_bytes());

    let mut expired = Claims::new(user, vec![Role::Customer], auth);
    expired.iat -= 7200;
    expired.exp = expired.iat + 900;

    let mut wrong_audience = Claims::new(user, vec![Role::Customer], auth);
    wrong_audience.aud = "another-api".into();

    let none_claims = Claims::new(user, vec![Role::Admin], auth);
    let none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(&serde_json::to_vec(&none_claims).expect("json"))
    );

    let stranger_dir = std::env::temp_dir().join(format!("{}-stranger", stack.namespace()));
    let stranger = SigningKeys::open(&stranger_dir).expect("a stranger's keys");
    let unknown_kid = stranger
        .sign(&Claims::new(user, vec![Role::Admin], auth))
        .expect("sign");
    std::fs::remove_dir_all(&stranger_dir).expect("cleanup");

    vec![
        ("tampered signature", tampered.join(".")),
        ("expired", keys.sign(&expired).expect("sign")),
        ("alg none", none),
        ("wrong audience", keys.sign(&wrong_audience).expect("sign")),
        ("unknown kid", unknown_kid),
    ]
}

#[tokio::test]
async fn bad_tokens_are_refused_by_the_gateway_and_by_the_service() {
    let stack = Stack::start().await;
    let email = stack.email("mallory");
    let registered = stack.register(&email, "customer").await;
    let user = registered["user"]["id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .expect("user id");

    for (what, token) in bad_tokens(&stack, user) {
        // Login ignores tokens: only the gateway can have refused this one.
        let at_gateway = stack
            .api(Method::POST, "/auth/login")
            .bearer_auth(&token)
            .json(&json!({"email": email, "password": PASSWORD}))
            .send()
            .await
            .expect("login");
        assert_eq!(
            at_gateway.status(),
            StatusCode::UNAUTHORIZED,
            "gateway, {what}"
        );
        assert_eq!(at_gateway.headers()["www-authenticate"], "Bearer", "{what}");

        let direct = stack
            .client
            .get(format!("{}/api/v1/users/me", stack.user))
            .bearer_auth(&token)
            .send()
            .await
            .expect("me");
        assert_eq!(direct.status(), StatusCode::UNAUTHORIZED, "service, {what}");
        assert_eq!(direct.headers()["content-type"], "application/problem+json");
    }
    // The same login without a token works: the refusals were about the tokens.
    let ok = stack.login(&email, PASSWORD).await;
    assert_eq!(ok.status(), StatusCode::OK);
}

#[tokio::test]
async fn roles_are_enforced_and_nobody_registers_as_admin() {
    let admin_email = "root@example.com";
    let stack = Stack::start_with(StackOptions {
        configure: Box::new(move |s| {
            s.admin.email = Some(admin_email.into());
            s.admin.password = Some("a long admin passphrase nobody guesses".into());
        }),
        ..StackOptions::default()
    })
    .await;

    let response = stack
        .api(Method::POST, "/auth/register")
        .json(&json!({"email": stack.email("eve"), "password": PASSWORD, "name": "Eve", "role": "admin"}))
        .send()
        .await
        .expect("register");
    let (status, body) = status_and_body(response).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["errors"][0]["field"], "role");

    let customer = stack.register(&stack.email("carol"), "customer").await;
    let seller = stack.register(&stack.email("sam"), "seller").await;
    for who in [&customer, &seller] {
        let response = stack
            .api(Method::GET, "/admin/users")
            .bearer_auth(who["access_token"].as_str().expect("token"))
            .send()
            .await
            .expect("admin route");
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
    }

    let (status, admin) = status_and_body(
        stack
            .login(admin_email, "a long admin passphrase nobody guesses")
            .await,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{admin}");
    assert_eq!(admin["user"]["roles"], json!(["admin"]));
    let (status, users) = status_and_body(
        stack
            .api(Method::GET, "/admin/users?limit=10")
            .bearer_auth(admin["access_token"].as_str().expect("token"))
            .send()
            .await
            .expect("admin route"),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{users}");
    let emails: Vec<&str> = users["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|u| u["email"].as_str())
        .collect();
    assert!(
        emails.contains(&admin_email) && emails.len() == 3,
        "{emails:?}"
    );
}

#[tokio::test]
async fn past_the_limit_clients_get_429_across_two_gateways() {
    let stack = Stack::start_with(StackOptions {
        gateways: 2,
        configure: Box::new(|s| {
            s.gateway.rate_limit.anonymous = RateLimit {
                per_minute: 6,
                burst: 6,
            };
        }),
        ..StackOptions::default()
    })
    .await;
    let mut allowed = 0;
    let mut limited = None;
    for i in 0..12 {
        let gateway = &stack.gateways[i % 2];
        let response = stack
            .client
            .get(format!("{gateway}/api/v1/users/me"))
            .send()
            .await
            .expect("request");
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(response);
            break;
        }
        assert_eq!(response.headers()["ratelimit-limit"], "6");
        allowed += 1;
    }
    assert_eq!(allowed, 6, "the burst is shared by both gateways");
    let limited = limited.expect("a 429");
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=10).contains(&retry_after), "{retry_after}");
    assert_eq!(limited.headers()["ratelimit-remaining"], "0");
    let (_, body) = status_and_body(limited).await;
    assert_eq!(body["status"], 429);
}

#[tokio::test]
async fn login_is_limited_harder_per_client_and_per_email() {
    let stack = Stack::start_with(StackOptions {
        configure: Box::new(|s| {
            s.gateway.rate_limit.auth = RateLimit {
                per_minute: 3,
                burst: 3,
            };
        }),
        ..StackOptions::default()
    })
    .await;
    let email = stack.email("target");
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            stack
                .login(&email, "guess guess guess guess")
                .await
                .status(),
        );
    }
    assert_eq!(
        statuses,
        [
            StatusCode::UNAUTHORIZED,
            StatusCode::UNAUTHORIZED,
            StatusCode::UNAUTHORIZED,
            StatusCode::TOO_MANY_REQUESTS
        ]
    );
}

#[tokio::test]
async fn malformed_json_gets_a_problem_that_names_the_problem() {
    let stack = Stack::start().await;
    let response = stack
        .api(Method::POST, "/auth/register")
        .header("content-type", "application/json")
        .body(r#"{"email": "a@example.com", "password": "#)
        .send()
        .await
        .expect("register");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let (_, body) = status_and_body(response).await;
    assert!(
        body["detail"].as_str().is_some_and(|d| d.contains("EOF")),
        "{body}"
    );

    let response = stack
        .api(Method::POST, "/auth/register")
        .json(&json!({"email": "a@example.com"}))
        .send()
        .await
        .expect("register");
    let (status, body) = status_and_body(response).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("password")),
        "{body}"
    );
}

#[tokio::test]
async fn weak_passwords_and_bad_emails_are_refused_field_by_field() {
    let stack = Stack::start().await;
    let response = stack
        .api(Method::POST, "/auth/register")
        .json(&json!({"email": "not-an-email", "password": "password1", "name": " "}))
        .send()
        .await
        .expect("register");
    let (status, body) = status_and_body(response).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e["field"].as_str())
        .collect();
    assert_eq!(fields, ["email", "name", "password"]);

    let email = stack.email("dup");
    stack.register(&email, "seller").await;
    let response = stack
        .api(Method::POST, "/auth/register")
        .json(&json!({"email": email.to_uppercase(), "password": PASSWORD, "name": "Dup"}))
        .send()
        .await
        .expect("register");
    assert_eq!(response.status(), StatusCode::CONFLICT);
}

#[tokio::test]
async fn after_key_rotation_old_tokens_still_verify_and_new_ones_use_the_new_key() {
    let stack = Stack::start().await;
    let email = stack.email("rotor");
    let before = stack.register(&email, "customer").await;
    let old_token = before["access_token"].as_str().expect("token").to_owned();
    let old_kid = kid(&old_token);

    let new_kid = generate_key(&stack.keys_dir).expect("rotate");
    let jwks = eventually("user-svc to publish the new key", || async {
        let jwks: Value = stack
            .client
            .get(format!("{}/.well-known/jwks.json", stack.user))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (jwks["keys"].as_array()?.len() == 2).then_some(jwks)
    })
    .await;
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|k| k["kid"].as_str())
        .collect();
    assert!(
        kids.contains(&new_kid.as_str()) && old_kid.as_deref().is_some_and(|k| kids.contains(&k))
    );

    let (_, body) = status_and_body(stack.login(&email, PASSWORD).await).await;
    let new_token = body["access_token"].as_str().expect("token").to_owned();
    assert_eq!(kid(&new_token), Some(new_kid), "the newest key signs");
    // The gateway has the old key cached; the new kid makes it fetch the JWKS again.
    for token in [&old_token, &new_token] {
        let response = stack
            .api(Method::GET, "/users/me")
            .bearer_auth(token)
            .send()
            .await
            .expect("me");
        assert_eq!(response.status(), StatusCode::OK);
    }
}

#[tokio::test]
async fn a_registration_publishes_user_registered_through_the_outbox() {
    let stack = Stack::start().await;
    let mut seen = testkit::Observer::new(stack.env(), &["user.registered"]).await;
    let email = stack.email("newcomer");
    let registered = stack.register(&email, "seller").await;
    let message = seen.next().await;
    let event: Value = serde_json::from_slice(&message.data).expect("json");
    assert_eq!(event["type"], "user.registered");
    assert_eq!(event["source"], "user-svc");
    assert_eq!(event["data"]["email"], email);
    assert_eq!(event["data"]["user_id"], registered["user"]["id"]);
    assert_eq!(event["data"]["roles"], json!(["seller"]));
}

#[tokio::test]
async fn the_gateway_reports_each_service_and_sets_security_headers() {
    let stack = Stack::start().await;
    let response = stack
        .client
        .get(format!("{}/ready", stack.gateway()))
        .send()
        .await
        .expect("ready");
    let (_, body) = status_and_body(response).await;
    assert_eq!(body["checks"]["user-svc"]["status"], "ok", "{body}");
    assert_eq!(body["checks"]["redis"]["status"], "ok", "{body}");
    // Only user-svc runs in this stack: the others are reported, and the gateway is not ready.
    assert_eq!(body["checks"]["order-svc"]["status"], "error", "{body}");
    assert_eq!(body["status"], "not_ready");

    let response = stack
        .api(Method::GET, "/users/me")
        .header("x-commerce-user-id", "00000000-0000-0000-0000-000000000000")
        .send()
        .await
        .expect("me");
    assert_eq!(
        response.status(),
        StatusCode::UNAUTHORIZED,
        "spoofed identity is ignored"
    );
    let headers = response.headers();
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["x-frame-options"], "DENY");
    assert!(headers.contains_key("x-request-id"));
    assert!(headers.contains_key("content-security-policy"));

    let response = stack
        .api(Method::GET, "/orders")
        .send()
        .await
        .expect("orders");
    assert_eq!(
        response.status(),
        StatusCode::BAD_GATEWAY,
        "order-svc is not running"
    );
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
}

#[tokio::test]
async fn the_gateway_serves_the_api_document_and_its_docs_page() {
    let stack = Stack::start().await;
    let (status, doc) = status_and_body(
        stack
            .api(Method::GET, "/openapi.json")
            .send()
            .await
            .expect("openapi"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")),
        "{doc}"
    );
    for path in [
        "/api/v1/auth/register",
        "/api/v1/auth/login",
        "/api/v1/auth/refresh",
        "/api/v1/users/me",
        "/api/v1/admin/users",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} missing from {doc}");
    }
    assert!(doc["paths"]["/api/v1/auth/login"]["post"]["responses"]["401"].is_object());
    assert!(doc["components"]["schemas"]["Problem"].is_object());
    assert!(doc["components"]["schemas"]["AuthResponse"].is_object());
    // Only user-svc runs here; the document says which services it could not ask.
    let missing = doc["x-services-not-answering"].as_array().expect("list");
    assert!(missing.iter().any(|s| s == "order-svc"), "{missing:?}");

    let page = stack
        .client
        .get(format!("{}/api/v1/docs/", stack.gateway()))
        .send()
        .await
        .expect("docs page");
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.expect("html");
    assert!(html.to_lowercase().contains("swagger"), "{html}");
    let initializer = stack
        .client
        .get(format!(
            "{}/api/v1/docs/swagger-initializer.js",
            stack.gateway()
        ))
        .send()
        .await
        .expect("initializer");
    let script = initializer.text().await.expect("js");
    assert!(script.contains("/api/v1/openapi.json"), "{script}");
}
