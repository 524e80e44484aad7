//! Forwarding one request to its service: verify a presented token first, count it
//! against the rate limits, then stream the body up and the response back, with the
//! hop-by-hop and internal headers removed.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt as _, Limited};
use shared::auth::AuthError;
use shared::http::Problem;
use shared::telemetry::TraceContext;

use crate::AppState;
use crate::rate_limit::Decision;

/// The services behind the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Upstream {
    User,
    Product,
    Order,
    Payment,
    Inventory,
    Notification,
    File,
}

impl Upstream {
    pub const ALL: [Self; 7] = [
        Self::User,
        Self::Product,
        Self::Order,
        Self::Payment,
        Self::Inventory,
        Self::Notification,
        Self::File,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::User => "user-svc",
            Self::Product => "product-svc",
            Self::Order => "order-svc",
            Self::Payment => "payment-svc",
            Self::Inventory => "inventory-svc",
            Self::Notification => "notification-svc",
            Self::File => "file-svc",
        }
    }
}

/// Whether `name` belongs to one connection, not to the message (RFC 9110 §7.6.1). A
/// match on the text compiles to a length switch and at most one comparison, where
/// comparing with a list of `HeaderName`s costs eight per header.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_COMMERCE_USER_ID: HeaderName = HeaderName::from_static("x-commerce-user-id");

/// Identity and routing headers only the gateway may set.
fn is_internal(name: &HeaderName) -> bool {
    let name = name.as_str();
    name.starts_with("x-commerce-")
        || name.starts_with("x-forwarded-")
        || name == "forwarded"
        || name == "x-real-ip"
        || name == "x-user-id"
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none of them; looking each one up costs a hash per name.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .chain(headers.keys().filter(|name| is_hop_by_hop(name)).cloned())
        .collect();
    for name in &listed {
        headers.remove(name);
    }
}

/// The client's address: the peer, or the nearest untrusted address in
/// `X-Forwarded-For` when the peer is a trusted proxy.
pub fn client_address(headers: &HeaderMap, peer: IpAddr, trusted: &[IpAddr]) -> IpAddr {
    if !trusted.contains(&peer) {
        return peer;
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    forwarded
        .iter()
        .rev()
        .find(|a| !trusted.contains(a))
        .copied()
        .unwrap_or(peer)
}

/// An address as text. IPv4 is written digit by digit: `Display` goes through the
/// formatting machinery, which cost a fiftieth of a proxied request.
fn address_text(address: IpAddr) -> String {
    let IpAddr::V4(v4) = address else {
        return address.to_string();
    };
    let mut text = String::with_capacity(15);
    let mut digits = itoa::Buffer::new();
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text.push('.');
        }
        text.push_str(digits.format(octet));
    }
    text
}

fn problem(status: StatusCode, detail: impl Into<String>) -> Response {
    Problem::new(status, Some(detail.into())).into_response()
}

fn rate_limit_headers(headers: &mut HeaderMap, decision: &Decision) {
    // `From<u64>` writes the digits with itoa and, being digits, skips validation.
    headers.insert(RATELIMIT_LIMIT, HeaderValue::from(decision.limit));
    headers.insert(RATELIMIT_REMAINING, HeaderValue::from(decision.remaining));
    headers.insert(
        RATELIMIT_RESET,
        HeaderValue::from(decision.reset.as_secs().max(1)),
    );
}

/// How a call to a service ended, as the `status` label of its duration.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Outcome {
    Status(u16),
    Error,
    Timeout,
}

/// The duration histogram of each (service, outcome), looked up once rather than
/// registered again with fresh labels on every call. A list: there are a few dozen
/// pairs at most, and a scan costs less than hashing the key.
#[derive(Default)]
pub struct UpstreamMetrics {
    durations: std::sync::Mutex<Vec<((Upstream, Outcome), metrics::Histogram)>>,
}

impl UpstreamMetrics {
    fn record(&self, upstream: Upstream, outcome: Outcome, elapsed: Duration) {
        let key = (upstream, outcome);
        let mut durations = self.durations.lock().unwrap_or_else(|e| e.into_inner());
        let histogram = match durations.iter().position(|(k, _)| *k == key) {
            Some(i) => &durations[i].1,
            None => {
                let status = match outcome {
                    Outcome::Status(code) => code.to_string(),
                    Outcome::Error => "error".to_owned(),
                    Outcome::Timeout => "timeout".to_owned(),
                };
                let histogram = metrics::histogram!(
                    "gateway_upstream_duration_seconds",
                    "upstream" => upstream.name(),
                    "status" => status
                );
                durations.push((key, histogram));
                &durations[durations.len() - 1].1
            }
        };
        histogram.record(elapsed.as_secs_f64());
    }
}

fn too_many(decision: &Decision) -> Response {
    let seconds = decision.retry_after.as_secs_f64().ceil().max(1.0) as u64;
    let mut response = problem(
        StatusCode::TOO_MANY_REQUESTS,
        format!("too many requests; try again in {seconds} s"),
    );
    rate_limit_headers(response.headers_mut(), decision);
    if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// Login and register are limited harder, and login per email too.
fn is_auth_write(method: &Method, path: &str) -> bool {
    method == Method::POST && matches!(path, "/api/v1/auth/login" | "/api/v1/auth/register")
}

/// The largest login or register body the gateway reads to find the email.
const AUTH_BODY_LIMIT: usize = 16 * 1024;

fn email_of(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct WithEmail {
        email: String,
    }
    serde_json::from_slice::<WithEmail>(body)
        .ok()
        .map(|b| b.email.trim().to_lowercase())
}

pub async fn forward(
    state: AppState,
    upstream: Upstream,
    peer: SocketAddr,
    request: Request,
) -> Response {
    let (mut parts, body) = request.into_parts();

    // A token that is there must be good; a missing one is the service's business.
    let claims = match state.verifier.verify_header(&parts).await {
        Ok(claims) => Some(claims),
        Err(AuthError::Missing) => None,
        Err(error) => {
            tracing::info!(%error, "token refused at the gateway");
            return shared::http::ApiError::Unauthorized("a valid bearer token is required")
                .into_response();
        }
    };
    let client = client_address(&parts.headers, peer.ip(), &state.trusted_proxies);
    // Each goes into a rate-limit key and a header; formatted once.
    let client_text = address_text(client);
    let user_id = claims.as_ref().map(|c| shared::http::uuid_text(c.sub));
    // The body of login and register is small and read here for the per-email limit.
    let auth_write = is_auth_write(&parts.method, parts.uri.path());
    let login = auth_write && parts.uri.path().ends_with("/login");
    let (body, email) = if auth_write {
        // Boxed, like the other rare paths, so that every request's future stays small.
        match Box::pin(Limited::new(body, AUTH_BODY_LIMIT).collect()).await {
            Ok(collected) => {
                let bytes = collected.to_bytes();
                let email = email_of(&bytes);
                (Body::from(bytes), email)
            }
            Err(_) => {
                return problem(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "the request body is too large",
                );
            }
        }
    } else {
        (body, None)
    };

    let mut decision = None;
    if let Some(limiter) = &state.limiter {
        let policies = &state.settings.rate_limit;
        let mut checks = vec![match &user_id {
            Some(id) => ("user", id.as_str(), policies.user),
            None => ("ip", client_text.as_str(), policies.anonymous),
        }];
        if auth_write {
            checks.push(("auth-ip", client_text.as_str(), policies.auth));
            if let Some(email) = &email
                && login
            {
                checks.push(("login-email", email.as_str(), policies.auth));
            }
        }
        for (scope, id, policy) in checks {
            match limiter.check(scope, id, policy).await {
                Ok(d) => decision = Some(decision.map_or(d, |prev: Decision| prev.tighter(d))),
                Err(error) => {
                    // Redis down: serve rather than refuse everyone.
                    metrics::counter!("gateway_rate_limit_errors_total").increment(1);
                    tracing::warn!(%error, "rate limit check failed; letting the request through");
                }
            }
        }
        if let Some(d) = decision.filter(|d| !d.allowed) {
            metrics::counter!("gateway_rate_limited_total", "upstream" => upstream.name())
                .increment(1);
            return too_many(&d);
        }
    }

    let limit = if upstream == Upstream::File && parts.method == Method::POST {
        state.settings.upload_limit_bytes
    } else {
        state.body_limit
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|length| length > limit) {
        Box::pin(shared::http::drain(body, declared)).await;
        return problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {limit} bytes"),
        );
    }

    let Some(target) = state.targets.get(&upstream) else {
        return problem(
            StatusCode::BAD_GATEWAY,
            format!("no address for {}", upstream.name()),
        );
    };
    let Some(uri) = target.path(parts.uri.path_and_query()) else {
        return problem(StatusCode::BAD_REQUEST, "the request path is not valid");
    };
    let original_host = parts.headers.get(header::HOST).cloned();
    strip_hop_by_hop(&mut parts.headers);
    let internal: Vec<HeaderName> = parts
        .headers
        .keys()
        .filter(|name| is_internal(name))
        .cloned()
        .collect();
    for name in internal {
        parts.headers.remove(name);
    }
    let headers = &mut parts.headers;
    headers.insert(header::HOST, target.host().clone());
    if let Ok(value) = HeaderValue::from_str(&client_text) {
        headers.insert(X_FORWARDED_FOR, value);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    if let Some(host) = original_host {
        headers.insert(X_FORWARDED_HOST, host);
    }
    TraceContext::with_current(|trace| {
        if let Ok(value) = HeaderValue::from_str(&trace.traceparent()) {
            headers.insert(shared::http::TRACEPARENT, value);
        }
        if let Some(id) = trace
            .request_id
            .as_deref()
            .and_then(|id| HeaderValue::from_str(id).ok())
        {
            headers.insert(shared::http::REQUEST_ID, id);
        }
    });
    if let Some(value) = user_id
        .as_deref()
        .and_then(|id| HeaderValue::from_str(id).ok())
    {
        // For the services' logs only: they verify the token themselves.
        headers.insert(X_COMMERCE_USER_ID, value);
    }
    parts.uri = uri;
    parts.version = axum::http::Version::HTTP_11;
    let body = Body::new(Capped::new(body, limit));
    let outgoing = axum::http::Request::from_parts(parts, body);

    let started = Instant::now();
    let timeout = Duration::from_millis(state.settings.upstream_timeout_ms);
    let result = tokio::time::timeout(timeout, crate::upstream::send(target, outgoing)).await;
    let outcome = match &result {
        Ok(Ok(response)) => Outcome::Status(response.status().as_u16()),
        Ok(Err(_)) => Outcome::Error,
        Err(_) => Outcome::Timeout,
    };
    state
        .upstream_metrics
        .record(upstream, outcome, started.elapsed());

    let mut response = match result {
        Ok(Ok(response)) => buffer_small(response).await,
        Ok(Err(error)) => {
            if is_length_limit(&error) {
                return problem(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body is larger than {limit} bytes"),
                );
            }
            tracing::warn!(upstream = upstream.name(), error = %error, "upstream request failed");
            return problem(
                StatusCode::BAD_GATEWAY,
                format!("{} is not available", upstream.name()),
            );
        }
        Err(_) => {
            tracing::warn!(upstream = upstream.name(), ?timeout, "upstream timed out");
            return problem(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "{} did not answer within {} ms",
                    upstream.name(),
                    timeout.as_millis()
                ),
            );
        }
    };
    strip_hop_by_hop(response.headers_mut());
    // Room for what the gateway adds, made once rather than grown twice on the way.
    response
        .headers_mut()
        .reserve(crate::ADDED_RESPONSE_HEADERS);
    if let Some(decision) = &decision {
        rate_limit_headers(response.headers_mut(), decision);
    }
    response
}

/// Largest response body read whole before answering; larger or unsized ones stream.
const BUFFER_UP_TO: u64 = 256 * 1024;

/// Like nginx's proxy buffering: a small answer goes to the client in one write, head and
/// body together, instead of the head first and the body after.
async fn buffer_small(response: axum::http::Response<crate::upstream::UpstreamBody>) -> Response {
    let length = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if length.is_none_or(|l| l > BUFFER_UP_TO) {
        return response.map(Body::new);
    }
    let (parts, body) = response.into_parts();
    match body.collect().await {
        Ok(collected) => Response::from_parts(parts, Body::from(collected.to_bytes())),
        Err(error) => {
            tracing::warn!(%error, "upstream response body failed");
            problem(
                StatusCode::BAD_GATEWAY,
                "the service's answer was cut short",
            )
        }
    }
}

/// A body cut off at `limit` bytes, like `Limited`, except that past the limit it reads
/// the rest of the client's body (up to [`shared::http::DRAIN_LIMIT`]) before failing,
/// so the client, still writing, reads the 413 instead of a reset connection.
struct Capped {
    inner: Body,
    limit: usize,
    read: usize,
}

impl Capped {
    fn new(inner: Body, limit: usize) -> Self {
        Self {
            inner,
            limit,
            read: 0,
        }
    }
}

#[derive(Debug)]
struct BodyTooLarge;

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request body too large")
    }
}

impl std::error::Error for BodyTooLarge {}

impl hyper::body::Body for Capped {
    type Data = axum::body::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::task::Poll;
        loop {
            let over = self.read > self.limit;
            let frame = match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) if over => return Poll::Ready(Some(Err(BodyTooLarge.into()))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error.into()))),
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            self.read += frame.data_ref().map_or(0, |d| d.len());
            if self.read <= self.limit {
                return Poll::Ready(Some(Ok(frame)));
            }
            if self.read > shared::http::DRAIN_LIMIT {
                return Poll::Ready(Some(Err(BodyTooLarge.into())));
            }
        }
    }
}

fn is_length_limit(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() || e.is::<BodyTooLarge>() {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_address_comes_from_forwarded_headers_only_behind_a_trusted_proxy() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("203.0.113.9, 10.0.0.2"),
        );
        let peer: IpAddr = "10.0.0.1".parse().expect("ip");
        let lb: Vec<IpAddr> = vec![
            "10.0.0.1".parse().expect("ip"),
            "10.0.0.2".parse().expect("ip"),
        ];
        assert_eq!(
            client_address(&headers, peer, &[]),
            peer,
            "spoofable without trust"
        );
        assert_eq!(
            client_address(&headers, peer, &lb),
            "203.0.113.9".parse::<IpAddr>().expect("ip")
        );
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for address in [
            "0.0.0.0",
            "127.0.0.1",
            "203.0.113.9",
            "255.255.255.255",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = address.parse().expect("ip");
            assert_eq!(address_text(ip), ip.to_string());
        }
    }

    #[test]
    fn hop_by_hop_names_are_recognised_by_their_text() {
        for name in [
            header::CONNECTION,
            HeaderName::from_static("keep-alive"),
            header::TE,
            header::TRANSFER_ENCODING,
            header::UPGRADE,
        ] {
            assert!(is_hop_by_hop(&name), "{name}");
        }
        for name in [header::CONTENT_TYPE, header::HOST, X_FORWARDED_FOR] {
            assert!(!is_hop_by_hop(&name), "{name}");
        }
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_go() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key(header::ACCEPT));
    }

    #[test]
    fn internal_identity_headers_are_recognised() {
        for name in [
            "x-commerce-user-id",
            "x-forwarded-for",
            "x-user-id",
            "forwarded",
        ] {
            assert!(is_internal(&HeaderName::from_static(name)), "{name}");
        }
        assert!(!is_internal(&header::AUTHORIZATION));
    }
}
