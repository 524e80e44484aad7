//! Payments through HTTP: Stripe's webhook (verified by signature, recorded in the
//! ledger for reconciliation) and one order's payment for its customer or an admin.

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::{get, post};
use secrecy::ExposeSecret as _;
use serde::Serialize;
use shared::auth::AuthUser;
use shared::http::{ApiError, FieldError, Json, Problem};
use stripe_webhook::{EventObject, Webhook, WebhookError};
use uuid::Uuid;

use crate::AppState;
use crate::ledger::{self, Entry, LedgerView};
use crate::payments::{self, Status};

/// This service's part of the API document; the gateway merges it with the others'.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(webhook, payment),
    components(schemas(Problem, FieldError, WebhookAnswer, PaymentView, Status, LedgerView)),
    tags((name = "payments", description = "Payments of orders, and Stripe's webhook"))
)]
pub struct ApiDoc;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/openapi.json",
            get(|| async { Json(<ApiDoc as utoipa::OpenApi>::openapi()) }),
        )
        .route("/api/v1/payments/webhook", post(webhook))
        .route("/api/v1/payments/{order_id}", get(payment))
        .with_state(state)
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookAnswer {
    pub received: bool,
    /// The event was recorded before (Stripe delivers at least once).
    pub duplicate: bool,
}

/// Stripe's webhook: a `payment_intent.*` event is recorded in the ledger; others are
/// acknowledged and ignored. The signature (`Stripe-Signature`, HMAC with the webhook
/// secret, at most 5 minutes old) is checked before anything else.
#[utoipa::path(
    post, path = "/api/v1/payments/webhook", tag = "payments",
    request_body(content = String, content_type = "application/json", description = "A Stripe event, as Stripe signed it"),
    params(("Stripe-Signature" = String, Header, description = "Stripe's signature of the body")),
    responses(
        (status = 200, body = WebhookAnswer),
        (status = 400, description = "Missing or bad signature, or not a Stripe event", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No webhook secret is configured", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<WebhookAnswer>, ApiError> {
    let Some(secret) = &state.webhook_secret else {
        return Err(ApiError::Unavailable(
            "Stripe webhooks are not configured on this service".into(),
        ));
    };
    let signature = headers
        .get("stripe-signature")
        .and_then(|value| value.to_str().ok())
        .ok_or_else(|| ApiError::BadRequest("the Stripe-Signature header is missing".into()))?;
    let payload = std::str::from_utf8(&body)
        .map_err(|_| ApiError::BadRequest("the body is not UTF-8 text".into()))?;
    let event =
        Webhook::construct_event(payload, signature, secret.expose_secret()).map_err(|error| {
            tracing::info!(%error, "webhook refused");
            ApiError::BadRequest(match error {
                WebhookError::BadParse(_) => "the body is not a Stripe event".into(),
                WebhookError::BadTimestamp(_) => {
                    "the signature is older than the 5 minutes tolerated".into()
                }
                _ => "the Stripe-Signature does not match the body".into(),
            })
        })?;
    let event_type = event.type_.as_str().to_owned();
    let intent = match event.data.object {
        EventObject::PaymentIntentAmountCapturableUpdated(intent)
        | EventObject::PaymentIntentCanceled(intent)
        | EventObject::PaymentIntentCreated(intent)
        | EventObject::PaymentIntentPartiallyFunded(intent)
        | EventObject::PaymentIntentPaymentFailed(intent)
        | EventObject::PaymentIntentProcessing(intent)
        | EventObject::PaymentIntentRequiresAction(intent)
        | EventObject::PaymentIntentSucceeded(intent) => intent,
        _ => {
            tracing::debug!(event_type, "webhook event ignored");
            return Ok(Json(WebhookAnswer {
                received: true,
                duplicate: false,
            }));
        }
    };
    let intent_id = intent.id.to_string();
    let mut conn = state.pool.acquire().await?;
    // The order from the intent's metadata, else from our own records of the intent.
    let order_id = match intent
        .metadata
        .get("order_id")
        .and_then(|id| id.parse().ok())
    {
        Some(id) => Some(id),
        None => {
            sqlx::query_scalar("SELECT order_id FROM payments WHERE intent_id = $1")
                .bind(&intent_id)
                .fetch_optional(&mut *conn)
                .await?
        }
    };
    let entry = Entry {
        order_id,
        source: "webhook",
        step: event_type.clone(),
        idempotency_key: None,
        provider: "stripe",
        intent_id: Some(intent_id.clone()),
        result: intent.status.as_str().to_owned(),
        detail: None,
        amount_cents: Some(intent.amount),
        currency: Some(intent.currency.to_string()),
        provider_event_id: Some(event.id.to_string()),
    };
    let recorded = ledger::insert(&mut conn, &entry).await?;
    tracing::info!(
        event_type,
        intent_id,
        ?order_id,
        duplicate = !recorded,
        "webhook recorded"
    );
    Ok(Json(WebhookAnswer {
        received: true,
        duplicate: !recorded,
    }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PaymentView {
    pub order_id: Uuid,
    pub payment_id: Uuid,
    pub status: Status,
    pub amount_cents: Option<i64>,
    pub currency: Option<String>,
    pub provider: Option<String>,
    pub intent_id: Option<String>,
    /// The decline code when the payment failed.
    pub failure_code: Option<String>,
    /// Every provider call and webhook event about this payment, oldest first.
    pub ledger: Vec<LedgerView>,
}

/// One order's payment and its ledger: the order's customer, or an admin.
#[utoipa::path(
    get, path = "/api/v1/payments/{order_id}", tag = "payments",
    params(("order_id" = Uuid, Path, description = "The order")),
    security(("bearer" = [])),
    responses(
        (status = 200, body = PaymentView),
        (status = 400, description = "The id is not a UUID", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not the order's customer, nor an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No payment for this order (yet)", body = Problem, content_type = "application/problem+json"),
    )
)]
async fn payment(
    State(state): State<AppState>,
    caller: AuthUser,
    path: Result<Path<Uuid>, PathRejection>,
) -> Result<Json<PaymentView>, ApiError> {
    let Path(order_id) =
        path.map_err(|_| ApiError::BadRequest("the order id in the path must be a UUID".into()))?;
    let mut conn = state.pool.acquire().await?;
    let found = payments::find(&mut conn, order_id)
        .await
        .map_err(|e| ApiError::Unexpected(e.error))?;
    let not_found = || ApiError::NotFound("no payment for this order".into());
    // A row made by an early inventory event has no customer yet: nobody's to show.
    let payment = found.ok_or_else(not_found)?;
    let customer = payment.customer_id.ok_or_else(not_found)?;
    caller.require_owner_or_admin(customer)?;
    let ledger = ledger::of_order(&mut conn, order_id).await?;
    Ok(Json(PaymentView {
        order_id,
        payment_id: payment.payment_id,
        status: payment.status,
        amount_cents: payment.amount_cents,
        currency: payment.currency,
        provider: payment.provider,
        intent_id: payment.intent_id,
        failure_code: payment.failure_code,
        ledger,
    }))
}
