//! A provider without a network, used when no Stripe key is configured. It honours
//! Stripe's test payment methods, so the saga behaves as it would against Stripe's test
//! mode. It keeps no state: intent ids derive from the order, so every call is naturally
//! idempotent.

use async_trait::async_trait;

use super::{Authorization, AuthorizeRequest, PaymentProvider, ProviderError};

/// Stripe's test payment methods that decline, with Stripe's decline codes.
const DECLINING: &[(&str, &str, &str)] = &[
    (
        "pm_card_chargeDeclined",
        "card_declined",
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
    (
        "pm_card_chargeDeclinedIncorrectCvc",
        "incorrect_cvc",
        "Your card's security code is incorrect.",
    ),
];

/// Stripe's test payment methods that succeed.
const SUCCEEDING: &[&str] = &[
    "pm_card_visa",
    "pm_card_visa_debit",
    "pm_card_mastercard",
    "pm_card_amex",
];

#[derive(Clone, Copy, Debug, Default)]
pub struct Simulated;

#[async_trait]
impl PaymentProvider for Simulated {
    fn name(&self) -> &'static str {
        "simulated"
    }

    async fn authorize(&self, request: &AuthorizeRequest) -> Result<Authorization, ProviderError> {
        let intent_id = format!("pi_sim_{}", request.order_id.simple());
        let method = request.payment_method.as_str();
        if SUCCEEDING.contains(&method) {
            return Ok(Authorization::Authorized { intent_id });
        }
        if let Some((_, code, message)) = DECLINING.iter().find(|(pm, _, _)| *pm == method) {
            return Ok(Authorization::Declined {
                code: (*code).to_owned(),
                message: (*message).to_owned(),
                intent_id: Some(intent_id),
            });
        }
        Ok(Authorization::Declined {
            code: "invalid_payment_method".into(),
            message: format!("no such payment method: '{method}'"),
            intent_id: None,
        })
    }

    async fn capture(&self, _intent_id: &str, _key: &str) -> Result<(), ProviderError> {
        Ok(())
    }

    async fn void(&self, _intent_id: &str, _key: &str) -> Result<(), ProviderError> {
        Ok(())
    }

    async fn refund(
        &self,
        intent_id: &str,
        _amount_cents: i64,
        _key: &str,
    ) -> Result<String, ProviderError> {
        Ok(format!(
            "re_sim_{}",
            intent_id.trim_start_matches("pi_sim_")
        ))
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    fn request(payment_method: &str) -> AuthorizeRequest {
        let order_id = Uuid::now_v7();
        AuthorizeRequest {
            order_id,
            amount_cents: 1000,
            currency: "EUR".into(),
            payment_method: payment_method.into(),
            idempotency_key: format!("order-{order_id}-authorize"),
        }
    }

    async fn code(payment_method: &str) -> Option<String> {
        match Simulated.authorize(&request(payment_method)).await {
            Ok(Authorization::Declined { code, .. }) => Some(code),
            Ok(Authorization::Authorized { .. }) => None,
            Err(error) => panic!("the simulated provider never fails: {error}"),
        }
    }

    #[tokio::test]
    async fn honours_stripes_test_payment_methods() {
        assert_eq!(code("pm_card_visa").await, None);
        assert_eq!(
            code("pm_card_chargeDeclined").await.as_deref(),
            Some("card_declined")
        );
        assert_eq!(
            code("pm_card_chargeDeclinedInsufficientFunds")
                .await
                .as_deref(),
            Some("insufficient_funds")
        );
        assert_eq!(
            code("pm_bogus").await.as_deref(),
            Some("invalid_payment_method")
        );
    }
}
