//! Small wording rules shared by the mails: amounts and cancellation reasons.

/// Cents as a decimal amount with two places, e.g. `1250` → `12.50`, `-5` → `-0.05`.
/// Every currency the shop sells in has two minor digits.
pub fn money(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let abs = cents.unsigned_abs();
    format!("{sign}{}.{:02}", abs / 100, abs % 100)
}

/// Why an order was cancelled, as the end of "your order was cancelled because …".
/// Unknown codes (a newer order-svc) are shown as they are rather than failing the mail.
pub fn cancellation_reason(code: &str) -> String {
    match code {
        "out_of_stock" => "some of its items are no longer in stock".into(),
        "payment_declined" => "your payment was declined".into(),
        "reservation_expired" => {
            "your payment could not be confirmed before we stopped holding the items".into()
        }
        "customer_cancelled" => "you cancelled it".into(),
        other => format!("of {}", other.replace('_', " ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_has_two_decimals() {
        assert_eq!(money(0), "0.00");
        assert_eq!(money(5), "0.05");
        assert_eq!(money(1250), "12.50");
        assert_eq!(money(123_456), "1234.56");
        assert_eq!(money(-5), "-0.05");
        assert_eq!(money(i64::MIN), "-92233720368547758.08");
    }

    #[test]
    fn reasons_read_as_sentences() {
        assert_eq!(
            cancellation_reason("customer_cancelled"),
            "you cancelled it"
        );
        assert_eq!(
            cancellation_reason("payment_declined"),
            "your payment was declined"
        );
        assert_eq!(cancellation_reason("fraud_suspected"), "of fraud suspected");
    }
}
