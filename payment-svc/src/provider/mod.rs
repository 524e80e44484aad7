//! The payment provider: Stripe through async-stripe, or a simulated one that honours
//! Stripe's test payment methods. Every call carries an idempotency key derived from the
//! order and the step, so a retried call never charges twice.

mod simulated;
mod stripe;

use std::fmt;

use async_trait::async_trait;
use uuid::Uuid;

pub use self::simulated::Simulated;
pub use self::stripe::Stripe;

/// A step of a payment's life, as it appears in idempotency keys and the ledger.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Authorize,
    Capture,
    Void,
    Refund,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Authorize => "authorize",
            Self::Capture => "capture",
            Self::Void => "void",
            Self::Refund => "refund",
        }
    }

    /// `order-{order_id}-{step}`: the same for every attempt of this step of this order.
    pub fn idempotency_key(self, order_id: Uuid) -> String {
        format!("order-{order_id}-{}", self.as_str())
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to authorize: the whole order, held until captured or voided.
#[derive(Clone, Debug)]
pub struct AuthorizeRequest {
    pub order_id: Uuid,
    pub amount_cents: i64,
    /// ISO 4217, any case.
    pub currency: String,
    /// A Stripe payment method id, e.g. `pm_card_visa`.
    pub payment_method: String,
    pub idempotency_key: String,
}

/// A call the provider answered. What the provider refused for good, or could not be
/// reached for, is a [`ProviderError`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authorization {
    /// The money is held on the intent until captured or cancelled.
    Authorized { intent_id: String },
    /// A business outcome: the card was declined (`code`: card_declined,
    /// insufficient_funds, invalid_payment_method, …).
    Declined {
        code: String,
        message: String,
        intent_id: Option<String>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// Network, timeout, 5xx, rate limit: the same call with the same key may succeed.
    #[error("payment provider unavailable: {0:#}")]
    Transient(anyhow::Error),
    /// The provider refused the call and will refuse it again (bad state, bad
    /// parameters, idempotency key reused with other parameters).
    #[error("payment provider refused the call: {0:#}")]
    Rejected(anyhow::Error),
}

#[async_trait]
pub trait PaymentProvider: Send + Sync + 'static {
    /// `stripe` or `simulated`, for the ledger.
    fn name(&self) -> &'static str;

    /// Creates and confirms a PaymentIntent with manual capture.
    async fn authorize(&self, request: &AuthorizeRequest) -> Result<Authorization, ProviderError>;

    async fn capture(&self, intent_id: &str, idempotency_key: &str) -> Result<(), ProviderError>;

    /// Cancels an authorized, uncaptured intent: the hold is released.
    async fn void(&self, intent_id: &str, idempotency_key: &str) -> Result<(), ProviderError>;

    /// Refunds `amount_cents` of a captured intent; gives the refund's id.
    async fn refund(
        &self,
        intent_id: &str,
        amount_cents: i64,
        idempotency_key: &str,
    ) -> Result<String, ProviderError>;
}
