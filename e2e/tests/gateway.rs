//! The gateway as a proxy, against a stand-in service that echoes what it received.

use std::time::Duration;

use e2e::{EchoUpstream, Stack, StackOptions};
use reqwest::{Method, StatusCode};
use serde_json::Value;

async fn with_order_upstream(
    echo: &EchoUpstream,
    configure: impl FnOnce(&mut shared::Settings) + 'static,
) -> Stack {
    let url = echo.url.clone();
    Stack::start_with(StackOptions {
        configure: Box::new(move |s| {
            s.order.url = Some(url.clone());
            s.file.url = Some(url);
            configure(s);
        }),
        ..StackOptions::default()
    })
    .await
}

#[tokio::test]
async fn the_gateway_forwards_what_it_should_and_drops_what_clients_must_not_set() {
    let echo = EchoUpstream::start(Duration::ZERO).await;
    let stack = with_order_upstream(&echo, |_| {}).await;
    let customer = stack.register(&stack.email("echo"), "customer").await;
    let token = customer["access_token"].as_str().expect("token");
    let user_id = customer["user"]["id"].as_str().expect("id");

    let response = stack
        .api(Method::GET, "/orders?limit=5&cursor=abc")
        .bearer_auth(token)
        .header("x-commerce-user-id", "00000000-0000-0000-0000-000000000000")
        .header("x-forwarded-for", "203.0.113.66")
        .header("x-request-id", "req-echo-1")
        .header("x-custom", "kept")
        .header(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    let answer = response.headers();
    assert_eq!(
        answer["x-request-id"], "req-echo-1",
        "the client's id comes back"
    );
    assert_eq!(answer["x-content-type-options"], "nosniff");
    assert_eq!(
        answer["content-security-policy"],
        "default-src 'none'; frame-ancestors 'none'"
    );
    let returned = answer["traceparent"].to_str().expect("ascii").to_owned();
    let echo: Value = response.json().await.expect("json");
    let headers = &echo["headers"];
    assert_eq!(echo["uri"], "/api/v1/orders?limit=5&cursor=abc");
    assert_eq!(
        headers["x-commerce-user-id"], user_id,
        "set by the gateway, not the client"
    );
    assert_eq!(
        headers["x-forwarded-for"], "127.0.0.1",
        "the real peer, not the claimed one"
    );
    assert_eq!(headers["x-request-id"], "req-echo-1");
    assert_eq!(headers["x-custom"], "kept");
    assert_eq!(
        headers["authorization"],
        format!("Bearer {token}"),
        "services verify too"
    );
    let traceparent = headers["traceparent"].as_str().expect("traceparent");
    assert!(
        traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{traceparent}"
    );
    assert!(
        !traceparent.contains("00f067aa0ba902b7"),
        "a span of the gateway's own"
    );
    assert!(
        returned.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{returned}"
    );
}

#[tokio::test]
async fn a_service_answering_too_slowly_gets_the_client_a_504() {
    let echo = EchoUpstream::start(Duration::from_secs(30)).await;
    let stack = with_order_upstream(&echo, |s| s.gateway.upstream_timeout_ms = 300).await;
    let response = stack
        .api(Method::GET, "/orders")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = response.json().await.expect("json");
    assert!(
        body["detail"]
            .as_str()
            .is_some_and(|d| d.contains("order-svc")),
        "{body}"
    );
}

#[tokio::test]
async fn uploads_stream_through_under_their_own_limit_and_other_bodies_under_theirs() {
    let echo = EchoUpstream::start(Duration::ZERO).await;
    let stack = with_order_upstream(&echo, |s| {
        s.gateway.upload_limit_bytes = 4 * 1024 * 1024;
        s.http.body_limit_bytes = 64 * 1024;
    })
    .await;
    let seller = stack.register(&stack.email("uploader"), "seller").await;
    let token = seller["access_token"].as_str().expect("token");
    let upload = |bytes: usize, chunked: bool| {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = (0..bytes.div_ceil(65536))
            .map(|i| Ok(vec![b'x'; 65536.min(bytes - i * 65536)]))
            .collect();
        let request = stack
            .api(
                Method::POST,
                "/products/0192f1c2-aaaa-7bbb-8ccc-123456789abc/images",
            )
            .bearer_auth(token);
        let request = if chunked {
            request.body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
        } else {
            request.body(vec![b'x'; bytes])
        };
        async move { request.send().await.expect("upload") }
    };
    let response = upload(3 * 1024 * 1024, true).await;
    assert_eq!(response.status(), StatusCode::OK);
    let echo: Value = response.json().await.expect("json");
    assert_eq!(
        echo["body_bytes"],
        3 * 1024 * 1024,
        "streamed through whole"
    );

    assert_eq!(
        upload(5 * 1024 * 1024, false).await.status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(
        upload(5 * 1024 * 1024, true).await.status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );

    let response = stack
        .api(Method::POST, "/orders")
        .bearer_auth(token)
        .body(vec![b'{'; 100 * 1024])
        .send()
        .await
        .expect("order");
    assert_eq!(
        response.status(),
        StatusCode::PAYLOAD_TOO_LARGE,
        "not an upload route"
    );
}

#[tokio::test]
async fn cors_answers_configured_origins_only() {
    let echo = EchoUpstream::start(Duration::ZERO).await;
    let stack = with_order_upstream(&echo, |s| {
        s.gateway.cors_origins = vec!["https://shop.example".into()]
    })
    .await;
    let preflight = |origin: &'static str| {
        stack
            .api(Method::OPTIONS, "/orders")
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
    };
    let allowed = preflight("https://shop.example").await.expect("preflight");
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://shop.example"
    );
    let methods = allowed.headers()["access-control-allow-methods"]
        .to_str()
        .expect("ascii");
    assert!(methods.contains("POST"), "{methods}");
    let other = preflight("https://evil.example").await.expect("preflight");
    assert!(!other.headers().contains_key("access-control-allow-origin"));

    // A browser's request itself is proxied with the CORS headers on its answer.
    let response = stack
        .api(Method::GET, "/orders?from=browser")
        .header("origin", "https://shop.example")
        .send()
        .await
        .expect("cross-origin request");
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers();
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://shop.example"
    );
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert!(headers.contains_key("x-request-id"));
    let echo: Value = response.json().await.expect("json");
    assert_eq!(echo["uri"], "/api/v1/orders?from=browser");

    // An answer without CORS headers must not be cached for browsers either.
    let response = stack
        .api(Method::GET, "/orders")
        .send()
        .await
        .expect("request without an origin");
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        !response
            .headers()
            .contains_key("access-control-allow-origin")
    );
    let vary = response.headers()["vary"].to_str().expect("ascii");
    assert!(vary.contains("origin"), "{vary}");
}
