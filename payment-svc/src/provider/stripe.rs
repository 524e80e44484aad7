//! Stripe through async-stripe: a PaymentIntent with manual capture, then capture, cancel
//! or refund. Each request carries our idempotency key and is sent once; retrying is the
//! consumer's job (with the same key), so one policy governs every retry.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::anyhow;
use async_trait::async_trait;
use stripe::{ApiErrorsType, IdempotencyKey, RequestStrategy, StripeError, StripeRequest as _};
use stripe_core::payment_intent::{
    CancelPaymentIntent, CapturePaymentIntent, CreatePaymentIntent,
    CreatePaymentIntentAutomaticPaymentMethods,
    CreatePaymentIntentAutomaticPaymentMethodsAllowRedirects,
};
use stripe_core::refund::CreateRefund;
use stripe_core::{PaymentIntentCaptureMethod, PaymentIntentStatus};
use stripe_types::Currency;

use super::{Authorization, AuthorizeRequest, PaymentProvider, ProviderError};

pub struct Stripe {
    client: stripe::Client,
}

impl Stripe {
    /// A client for `secret_key`, at `api_base` (e.g. a local fake; must end with `/`)
    /// or Stripe's own API.
    pub fn new(
        secret_key: &str,
        api_base: Option<&str>,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let mut builder = stripe::ClientBuilder::new(secret_key).timeout(timeout);
        if let Some(base) = api_base {
            // async-stripe appends `v1/...` to the base as is.
            let base = if base.ends_with('/') {
                base.to_owned()
            } else {
                format!("{base}/")
            };
            builder = builder.url(base);
        }
        let client = builder
            .build()
            .map_err(|error| anyhow!("configuring the Stripe client: {error}"))?;
        Ok(Self { client })
    }
}

fn strategy(key: &str) -> Result<RequestStrategy, ProviderError> {
    IdempotencyKey::new(key)
        .map(RequestStrategy::Idempotent)
        .map_err(|error| ProviderError::Rejected(anyhow!("idempotency key {key:?}: {error}")))
}

/// A Stripe error as our three outcomes: declined (a business answer), transient (try
/// again with the same key), or rejected (will never pass; a person must look).
enum Classified {
    Declined {
        code: String,
        message: String,
        intent_id: Option<String>,
    },
    Error(ProviderError),
}

fn classify(error: StripeError, during_authorize: bool) -> Classified {
    let (api, status) = match error {
        StripeError::Stripe(api, status) => (api, status),
        StripeError::Timeout => {
            return Classified::Error(ProviderError::Transient(anyhow!("Stripe timed out")));
        }
        StripeError::ClientError(message) => {
            return Classified::Error(ProviderError::Transient(anyhow!(
                "reaching Stripe: {message}"
            )));
        }
        // A 5xx without Stripe's error body, or a body we cannot read: the call's fate
        // is unknown, and only a retry with the same key can tell.
        StripeError::JSONDeserialize(message) => {
            return Classified::Error(ProviderError::Transient(anyhow!(
                "unreadable answer from Stripe: {message}"
            )));
        }
        StripeError::ConfigError(message) => {
            return Classified::Error(ProviderError::Rejected(anyhow!(
                "Stripe client configuration: {message}"
            )));
        }
    };
    let code = api.code.as_ref().map(|c| c.as_str().to_owned());
    let message = api.message.clone().unwrap_or_default();
    let intent_id = api
        .payment_intent
        .as_ref()
        .map(|intent| intent.id.to_string());
    let described = || {
        anyhow!(
            "Stripe answered {status} {} {}: {message}",
            api.type_.as_str(),
            code.as_deref().unwrap_or("-")
        )
    };
    // 401/403: a wrong or revoked key is fixed by people, then the retry passes.
    if matches!(status, 401 | 403 | 409 | 429) || status >= 500 {
        return Classified::Error(ProviderError::Transient(described()));
    }
    if during_authorize {
        if api.type_ == ApiErrorsType::CardError {
            // Stripe says card_declined with the finer reason in decline_code; the
            // generic one adds nothing.
            let code = api
                .decline_code
                .clone()
                .filter(|d| d != "generic_decline")
                .or(code)
                .unwrap_or_else(|| "card_declined".into());
            return Classified::Declined {
                code,
                message,
                intent_id,
            };
        }
        if api.type_ == ApiErrorsType::InvalidRequestError
            && api.param.as_deref() == Some("payment_method")
        {
            return Classified::Declined {
                code: "invalid_payment_method".into(),
                message,
                intent_id,
            };
        }
    }
    Classified::Error(ProviderError::Rejected(described()))
}

fn fail(error: StripeError) -> ProviderError {
    match classify(error, false) {
        Classified::Declined { code, message, .. } => {
            ProviderError::Rejected(anyhow!("Stripe declined ({code}): {message}"))
        }
        Classified::Error(error) => error,
    }
}

#[async_trait]
impl PaymentProvider for Stripe {
    fn name(&self) -> &'static str {
        "stripe"
    }

    async fn authorize(&self, request: &AuthorizeRequest) -> Result<Authorization, ProviderError> {
        let currency: Currency = request
            .currency
            .to_ascii_lowercase()
            .parse()
            .unwrap_or_else(|never| match never {});
        let metadata = HashMap::from([("order_id".to_owned(), request.order_id.to_string())]);
        let create = CreatePaymentIntent::new(request.amount_cents, currency)
            .capture_method(PaymentIntentCaptureMethod::Manual)
            .confirm(true)
            .payment_method(request.payment_method.clone())
            // Confirmed server-side with nobody to follow a redirect.
            .automatic_payment_methods(CreatePaymentIntentAutomaticPaymentMethods {
                allow_redirects: Some(
                    CreatePaymentIntentAutomaticPaymentMethodsAllowRedirects::Never,
                ),
                enabled: true,
            })
            .metadata(metadata);
        let answer = create
            .customize()
            .request_strategy(strategy(&request.idempotency_key)?)
            .send(&self.client)
            .await;
        match answer {
            Ok(intent) => match intent.status {
                PaymentIntentStatus::RequiresCapture => Ok(Authorization::Authorized {
                    intent_id: intent.id.to_string(),
                }),
                // 3-D Secure and the like: nobody is there to complete it.
                status => Ok(Authorization::Declined {
                    code: "authentication_required".into(),
                    message: format!("the payment intent is {}", status.as_str()),
                    intent_id: Some(intent.id.to_string()),
                }),
            },
            Err(error) => match classify(error, true) {
                Classified::Declined {
                    code,
                    message,
                    intent_id,
                } => Ok(Authorization::Declined {
                    code,
                    message,
                    intent_id,
                }),
                Classified::Error(error) => Err(error),
            },
        }
    }

    async fn capture(&self, intent_id: &str, key: &str) -> Result<(), ProviderError> {
        CapturePaymentIntent::new(intent_id)
            .customize()
            .request_strategy(strategy(key)?)
            .send(&self.client)
            .await
            .map(drop)
            .map_err(fail)
    }

    async fn void(&self, intent_id: &str, key: &str) -> Result<(), ProviderError> {
        CancelPaymentIntent::new(intent_id)
            .customize()
            .request_strategy(strategy(key)?)
            .send(&self.client)
            .await
            .map(drop)
            .map_err(fail)
    }

    async fn refund(
        &self,
        intent_id: &str,
        amount_cents: i64,
        key: &str,
    ) -> Result<String, ProviderError> {
        CreateRefund::new()
            .payment_intent(intent_id)
            .amount(amount_cents)
            .customize()
            .request_strategy(strategy(key)?)
            .send(&self.client)
            .await
            .map(|refund| refund.id.to_string())
            .map_err(fail)
    }
}
