//! A Stripe-compatible HTTP server for tests (the routes async-stripe calls).
//!
//! It speaks what payment-svc uses of Stripe's API: PaymentIntents (create and confirm,
//! retrieve, capture, cancel) and refunds, form-encoded in and JSON out, with Stripe's
//! error objects, bearer-key auth and `Idempotency-Key` semantics (the same key gives
//! the stored answer, never a second effect; the same key with other parameters is an
//! `idempotency_error`). It honours Stripe's test payment methods, can be told to fail
//! or delay the next calls of a route, and counts what it did per intent and per order.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Display;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// The key the fake accepts (any `sk_test_…` does).
pub const SECRET_KEY: &str = "sk_test_fake_stripe";

/// A route of the fake, for failure injection and request counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Route {
    CreateIntent,
    GetIntent,
    Capture,
    Cancel,
    Refund,
}

/// What an injected failure does to one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Answers 500 with Stripe's `api_error` before doing anything; nothing is stored
    /// under the idempotency key, so a retry does the work.
    Status500,
    /// Does the work and stores the answer, then waits this long before answering: a
    /// client that gives up sooner sees a timeout although the effect happened.
    Delay(Duration),
}

/// What the fake did to one intent (or to all intents of one order).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub intents: usize,
    pub captures: usize,
    pub cancels: usize,
    pub refunds: usize,
}

/// Successful test payment methods (Stripe's test mode).
const SUCCEEDING: &[&str] = &[
    "pm_card_visa",
    "pm_card_visa_debit",
    "pm_card_mastercard",
    "pm_card_amex",
];

/// Declining test payment methods: (method, decline_code, message), as Stripe answers.
const DECLINING: &[(&str, &str, &str)] = &[
    (
        "pm_card_chargeDeclined",
        "generic_decline",
        "Your card was declined.",
    ),
    (
        "pm_card_chargeDeclinedInsufficientFunds",
        "insufficient_funds",
        "Your card has insufficient funds.",
    ),
    (
        "pm_card_chargeDeclinedExpiredCard",
        "expired_card",
        "Your card has expired.",
    ),
];

#[derive(Default)]
struct Inner {
    intents: HashMap<String, Value>,
    counts: HashMap<String, Counts>,
    refunded: HashMap<String, i64>,
    /// Idempotency key → (fingerprint of the request, stored status, stored body).
    idempotency: HashMap<String, (String, u16, Value)>,
    failures: HashMap<Route, VecDeque<Failure>>,
    requests: HashMap<Route, usize>,
    next_id: u64,
}

impl Inner {
    fn id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}_fake{:014}", self.next_id)
    }
}

type Shared = Arc<Mutex<Inner>>;

/// The running fake. Dropping it stops the server.
pub struct FakeStripe {
    base_url: String,
    inner: Shared,
    server: JoinHandle<()>,
}

impl Drop for FakeStripe {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeStripe {
    /// Serves on 127.0.0.1, on a free port.
    pub async fn start() -> Self {
        let inner = Shared::default();
        let router = Router::new()
            .route("/v1/payment_intents", post(create_intent))
            .route("/v1/payment_intents/{id}", get(get_intent))
            .route("/v1/payment_intents/{id}/capture", post(capture))
            .route("/v1/payment_intents/{id}/cancel", post(cancel))
            .route("/v1/refunds", post(refund))
            .fallback(|| async {
                error(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    None,
                    "Unrecognized request URL (the fake does not serve it).",
                )
            })
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("the fake Stripe binds a port");
        let address = listener.local_addr().expect("its address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Self {
            base_url: format!("http://{address}/"),
            inner,
            server,
        }
    }

    /// The API base for async-stripe's `ClientBuilder::url` (ends with `/`).
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The next `n` calls of `route` fail this way.
    pub fn fail_next(&self, route: Route, n: usize, failure: Failure) {
        self.lock()
            .failures
            .entry(route)
            .or_default()
            .extend(std::iter::repeat_n(failure, n));
    }

    /// Calls received on `route`, failed and replayed ones included.
    pub fn requests(&self, route: Route) -> usize {
        self.lock()
            .requests
            .get(&route)
            .copied()
            .unwrap_or_default()
    }

    /// What was done to one intent.
    pub fn counts(&self, intent_id: &str) -> Counts {
        self.lock()
            .counts
            .get(intent_id)
            .copied()
            .unwrap_or_default()
    }

    /// What was done to the intents of one order (`metadata[order_id]`), summed.
    pub fn counts_for_order(&self, order_id: impl Display) -> Counts {
        let order_id = order_id.to_string();
        let inner = self.lock();
        inner
            .intents
            .values()
            .filter(|intent| intent["metadata"]["order_id"] == order_id.as_str())
            .filter_map(|intent| intent["id"].as_str())
            .map(|id| inner.counts.get(id).copied().unwrap_or_default())
            .fold(Counts::default(), |sum, c| Counts {
                intents: sum.intents + c.intents,
                captures: sum.captures + c.captures,
                cancels: sum.cancels + c.cancels,
                refunds: sum.refunds + c.refunds,
            })
    }

    /// One intent as Stripe would show it now.
    pub fn intent(&self, intent_id: &str) -> Option<Value> {
        self.lock().intents.get(intent_id).cloned()
    }

    /// The intents made for one order.
    pub fn intents_for_order(&self, order_id: impl Display) -> Vec<Value> {
        let order_id = order_id.to_string();
        self.lock()
            .intents
            .values()
            .filter(|intent| intent["metadata"]["order_id"] == order_id.as_str())
            .cloned()
            .collect()
    }

    /// A webhook event of `event_type` about `object`, as Stripe would post it (unsigned;
    /// sign it with the webhook secret).
    pub fn event(&self, event_type: &str, object: &Value) -> String {
        let id = self.lock().id("evt");
        json!({
            "id": id, "object": "event", "api_version": null, "created": now(),
            "livemode": false, "pending_webhooks": 1, "request": null,
            "type": event_type, "data": {"object": object},
        })
        .to_string()
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or_default())
        .unwrap_or_default()
}

fn error(status: StatusCode, kind: &str, code: Option<&str>, message: &str) -> Response {
    let mut body = json!({"type": kind, "message": message});
    if let Some(code) = code {
        body["code"] = code.into();
    }
    (status, axum::Json(json!({"error": body}))).into_response()
}

/// Form fields in order; `metadata[order_id]` stays one flat key.
fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    fn decode(text: &str) -> String {
        let bytes = text.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                    match u8::from_str_radix(hex, 16) {
                        Ok(byte) => {
                            out.push(byte);
                            i += 2;
                        }
                        Err(_) => out.push(b'%'),
                    }
                }
                byte => out.push(byte),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(key), decode(value))
        })
        .collect()
}

/// One call: auth, request count, injected failure, idempotency, then `work`.
async fn serve(
    inner: &Shared,
    route: Route,
    headers: &HeaderMap,
    fingerprint: String,
    work: impl FnOnce(&mut Inner) -> (StatusCode, Value),
) -> Response {
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|key| key.starts_with("sk_test_"));
    if !authorized {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            None,
            "Invalid API Key provided.",
        );
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let (response, delay) = {
        let mut state = inner.lock().unwrap_or_else(|p| p.into_inner());
        *state.requests.entry(route).or_default() += 1;
        let failure = state.failures.get_mut(&route).and_then(VecDeque::pop_front);
        if failure == Some(Failure::Status500) {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                None,
                "An unknown error occurred (injected by the fake).",
            );
        }
        let delay = match failure {
            Some(Failure::Delay(delay)) => Some(delay),
            _ => None,
        };
        let stored = key
            .as_ref()
            .and_then(|key| state.idempotency.get(key).cloned());
        let response = match stored {
            Some((stored_fingerprint, status, body)) if stored_fingerprint == fingerprint => {
                let mut response = (
                    StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
                    axum::Json(body),
                )
                    .into_response();
                response
                    .headers_mut()
                    .insert("idempotent-replayed", HeaderValue::from_static("true"));
                response
            }
            Some(_) => error(
                StatusCode::BAD_REQUEST,
                "idempotency_error",
                None,
                "Keys for idempotent requests can only be used with the same parameters \
                 they were first used with.",
            ),
            None => {
                let (status, body) = work(&mut state);
                if let Some(key) = key {
                    state
                        .idempotency
                        .insert(key, (fingerprint, status.as_u16(), body.clone()));
                }
                (status, axum::Json(body)).into_response()
            }
        };
        (response, delay)
    };
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    response
}

fn fingerprint(route: Route, id: &str, form: &[(String, String)]) -> String {
    let sorted: BTreeMap<_, _> = form.iter().cloned().collect();
    format!("{route:?} {id} {sorted:?}")
}

fn error_body(kind: &str, code: &str, message: &str) -> Value {
    json!({"error": {"type": kind, "code": code, "message": message}})
}

async fn create_intent(State(inner): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let form = parse_form(&body);
    let print = fingerprint(Route::CreateIntent, "", &form);
    serve(&inner, Route::CreateIntent, &headers, print, |state| {
        let field = |name: &str| {
            form.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let Some(amount) = field("amount").and_then(|a| a.parse::<i64>().ok()) else {
            return (
                StatusCode::BAD_REQUEST,
                error_body(
                    "invalid_request_error",
                    "parameter_missing",
                    "Missing required param: amount.",
                ),
            );
        };
        if amount < 1 {
            return (
                StatusCode::BAD_REQUEST,
                error_body(
                    "invalid_request_error",
                    "amount_too_small",
                    "Amount must be at least 1.",
                ),
            );
        }
        let Some(currency) = field("currency").filter(|c| c.len() == 3) else {
            return (
                StatusCode::BAD_REQUEST,
                error_body(
                    "invalid_request_error",
                    "parameter_missing",
                    "Missing required param: currency.",
                ),
            );
        };
        let metadata: serde_json::Map<String, Value> = form
            .iter()
            .filter_map(|(k, v)| {
                let name = k.strip_prefix("metadata[")?.strip_suffix(']')?;
                Some((name.to_owned(), Value::from(v.as_str())))
            })
            .collect();
        let capture_method = field("capture_method").unwrap_or("automatic_async");
        let confirm = field("confirm") == Some("true");
        let method = field("payment_method");
        let declined = method.and_then(|m| DECLINING.iter().find(|(pm, _, _)| *pm == m));
        if let Some(m) = method
            && declined.is_none()
            && !SUCCEEDING.contains(&m)
        {
            let mut body = error_body(
                "invalid_request_error",
                "resource_missing",
                &format!("No such PaymentMethod: '{m}'"),
            );
            body["error"]["param"] = "payment_method".into();
            return (StatusCode::BAD_REQUEST, body);
        }
        let id = state.id("pi");
        let status = match (confirm, method, declined) {
            (_, None, _) => "requires_payment_method",
            (false, Some(_), _) => "requires_confirmation",
            (true, Some(_), Some(_)) => "requires_payment_method",
            (true, Some(_), None) if capture_method == "manual" => "requires_capture",
            (true, Some(_), None) => "succeeded",
        };
        let mut intent = json!({
            "id": id, "object": "payment_intent", "amount": amount,
            "amount_capturable": if status == "requires_capture" { amount } else { 0 },
            "amount_received": if status == "succeeded" { amount } else { 0 },
            "capture_method": capture_method, "confirmation_method": "automatic",
            "client_secret": format!("{id}_secret_fake"), "created": now(),
            "currency": currency.to_ascii_lowercase(), "livemode": false,
            "metadata": metadata, "payment_method": method,
            "payment_method_types": ["card"], "status": status,
            "canceled_at": null, "cancellation_reason": null, "last_payment_error": null,
            "latest_charge": null,
        });
        state.counts.entry(id.clone()).or_default().intents += 1;
        if let Some((_, decline_code, message)) = declined.filter(|_| confirm) {
            let failure = json!({
                "type": "card_error", "code": "card_declined", "decline_code": decline_code,
                "message": message,
            });
            intent["last_payment_error"] = failure.clone();
            state.intents.insert(id, intent.clone());
            let mut body = json!({"error": failure});
            body["error"]["payment_intent"] = intent;
            return (StatusCode::PAYMENT_REQUIRED, body);
        }
        state.intents.insert(id, intent.clone());
        (StatusCode::OK, intent)
    })
    .await
}

fn missing_intent(id: &str) -> (StatusCode, Value) {
    let mut body = error_body(
        "invalid_request_error",
        "resource_missing",
        &format!("No such payment_intent: '{id}'"),
    );
    body["error"]["param"] = "intent".into();
    (StatusCode::NOT_FOUND, body)
}

fn unexpected_state(intent: &Value, doing: &str) -> (StatusCode, Value) {
    let mut body = error_body(
        "invalid_request_error",
        "payment_intent_unexpected_state",
        &format!(
            "This PaymentIntent could not be {doing} because it has a status of {}.",
            intent["status"].as_str().unwrap_or("unknown")
        ),
    );
    body["error"]["payment_intent"] = intent.clone();
    (StatusCode::BAD_REQUEST, body)
}

async fn get_intent(
    State(inner): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    // Stripe ignores idempotency keys on GET.
    let mut headers = headers;
    headers.remove("idempotency-key");
    serve(
        &inner,
        Route::GetIntent,
        &headers,
        String::new(),
        |state| match state.intents.get(&id) {
            Some(intent) => (StatusCode::OK, intent.clone()),
            None => missing_intent(&id),
        },
    )
    .await
}

async fn capture(
    State(inner): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = parse_form(&body);
    let print = fingerprint(Route::Capture, &id, &form);
    serve(&inner, Route::Capture, &headers, print, |state| {
        let Some(intent) = state.intents.get_mut(&id) else {
            return missing_intent(&id);
        };
        if intent["status"] != "requires_capture" {
            return unexpected_state(intent, "captured");
        }
        let amount = intent["amount_capturable"].clone();
        intent["status"] = "succeeded".into();
        intent["amount_received"] = amount;
        intent["amount_capturable"] = 0.into();
        intent["latest_charge"] = format!("ch_{}", id.trim_start_matches("pi_")).into();
        let intent = intent.clone();
        state.counts.entry(id).or_default().captures += 1;
        (StatusCode::OK, intent)
    })
    .await
}

async fn cancel(
    State(inner): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = parse_form(&body);
    let print = fingerprint(Route::Cancel, &id, &form);
    serve(&inner, Route::Cancel, &headers, print, |state| {
        let Some(intent) = state.intents.get_mut(&id) else {
            return missing_intent(&id);
        };
        let cancelable = [
            "requires_payment_method",
            "requires_capture",
            "requires_confirmation",
            "requires_action",
            "processing",
        ];
        if !cancelable.iter().any(|s| intent["status"] == *s) {
            return unexpected_state(intent, "canceled");
        }
        let reason = form
            .iter()
            .find(|(k, _)| k == "cancellation_reason")
            .map(|(_, v)| Value::from(v.as_str()))
            .unwrap_or(Value::Null);
        intent["status"] = "canceled".into();
        intent["amount_capturable"] = 0.into();
        intent["canceled_at"] = now().into();
        intent["cancellation_reason"] = reason;
        let intent = intent.clone();
        state.counts.entry(id).or_default().cancels += 1;
        (StatusCode::OK, intent)
    })
    .await
}

async fn refund(State(inner): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let form = parse_form(&body);
    let print = fingerprint(Route::Refund, "", &form);
    serve(&inner, Route::Refund, &headers, print, |state| {
        let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        let Some(id) = field("payment_intent") else {
            return (
                StatusCode::BAD_REQUEST,
                error_body(
                    "invalid_request_error",
                    "parameter_missing",
                    "One of the following params should be provided for this request: \
                     payment_intent or charge.",
                ),
            );
        };
        let Some(intent) = state.intents.get(&id).cloned() else {
            return missing_intent(&id);
        };
        if intent["status"] != "succeeded" {
            return (
                StatusCode::BAD_REQUEST,
                error_body(
                    "invalid_request_error",
                    "charge_not_refundable",
                    "This PaymentIntent has no successful charge to refund.",
                ),
            );
        }
        let received = intent["amount_received"].as_i64().unwrap_or_default();
        let refunded = state.refunded.get(&id).copied().unwrap_or_default();
        let amount = field("amount")
            .and_then(|a| a.parse::<i64>().ok())
            .unwrap_or(received - refunded);
        if amount < 1 || amount > received - refunded {
            return (
                StatusCode::BAD_REQUEST,
                error_body(
                    "invalid_request_error",
                    "amount_too_large",
                    &format!(
                        "Refund amount ({amount}) is greater than unrefunded amount on \
                         charge ({}).",
                        received - refunded
                    ),
                ),
            );
        }
        let refund_id = state.id("re");
        *state.refunded.entry(id.clone()).or_default() += amount;
        state.counts.entry(id.clone()).or_default().refunds += 1;
        let body = json!({
            "id": refund_id, "object": "refund", "amount": amount, "created": now(),
            "currency": intent["currency"], "metadata": {}, "payment_intent": id,
            "status": "succeeded", "reason": null,
        });
        (StatusCode::OK, body)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::parse_form;

    #[test]
    fn form_keys_and_values_are_percent_decoded() {
        let form = parse_form(b"amount=1250&metadata%5Border_id%5D=a%2Bb+c&confirm=true&x");
        assert_eq!(
            form,
            vec![
                ("amount".to_owned(), "1250".to_owned()),
                ("metadata[order_id]".to_owned(), "a+b c".to_owned()),
                ("confirm".to_owned(), "true".to_owned()),
                ("x".to_owned(), String::new()),
            ]
        );
    }
}
