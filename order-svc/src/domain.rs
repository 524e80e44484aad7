//! Values that cannot be invalid once parsed, and the saga's decision itself (pure, so
//! that every arrival order of the events is tested without a database or broker).

use std::collections::HashSet;

use sha2::Digest as _;
use shared::http::{ApiError, FieldError};
use uuid::Uuid;

pub const MAX_LINES: usize = 50;
pub const MAX_QUANTITY: i64 = 1000;
pub const KEY_MAX_CHARS: usize = 255;
pub const PAYMENT_METHOD_MAX_CHARS: usize = 255;

/// The `Idempotency-Key` header: 1 to 255 visible ASCII characters (spaces inside
/// allowed, surrounding ones trimmed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    /// `raw` is `None` when the header is missing, `Some(Err)` when it is not ASCII.
    pub fn parse(raw: Option<Result<&str, ()>>) -> Result<Self, String> {
        let Some(raw) = raw else {
            return Err(
                "the Idempotency-Key header is required: a unique value per order, \
                 sent again unchanged when retrying the same order"
                    .into(),
            );
        };
        let key = raw
            .map_err(|()| "the Idempotency-Key header must be visible ASCII".to_owned())?
            .trim();
        if key.is_empty() {
            return Err("the Idempotency-Key header must not be blank".into());
        }
        if key.len() > KEY_MAX_CHARS {
            return Err(format!(
                "the Idempotency-Key header must be at most {KEY_MAX_CHARS} characters"
            ));
        }
        if !key.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
            return Err("the Idempotency-Key header must be visible ASCII".into());
        }
        Ok(Self(key.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Units of one product in one order: 1 to 1000.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quantity(i64);

impl Quantity {
    pub fn parse(raw: Option<i64>) -> Result<Self, String> {
        match raw {
            None => Err("is required".into()),
            Some(q) if (1..=MAX_QUANTITY).contains(&q) => Ok(Self(q)),
            Some(_) => Err(format!("must be between 1 and {MAX_QUANTITY}")),
        }
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

/// A payment method id as the payment provider knows it (e.g. `pm_card_visa`): trimmed,
/// 1 to 255 characters, no control characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaymentMethod(String);

impl PaymentMethod {
    pub fn parse(raw: Option<&str>) -> Result<Self, String> {
        let method = raw.map(str::trim).unwrap_or_default();
        if method.is_empty() {
            return Err("is required".into());
        }
        if method.chars().count() > PAYMENT_METHOD_MAX_CHARS {
            return Err(format!(
                "must be at most {PAYMENT_METHOD_MAX_CHARS} characters"
            ));
        }
        if method.chars().any(char::is_control) {
            return Err("must not contain control characters".into());
        }
        Ok(Self(method.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Collects the problems of several fields into one validation error.
#[derive(Default)]
pub struct Problems(Vec<FieldError>);

impl Problems {
    pub fn add(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }

    pub fn check<T>(&mut self, field: &str, result: Result<T, String>) -> Option<T> {
        result.map_err(|message| self.add(field, message)).ok()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn into_result(self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Validation(self.0))
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestedLine {
    pub product_id: Uuid,
    pub quantity: Quantity,
}

/// What a customer asked for, checked for shape (not yet against the catalog): 1 to 50
/// lines, each product at most once, a payment method.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderRequest {
    lines: Vec<RequestedLine>,
    payment_method: PaymentMethod,
}

impl OrderRequest {
    /// `items` as sent: each line's product id (text) and quantity. Errors name the line,
    /// e.g. `items[1].quantity`.
    pub fn parse(
        items: Option<Vec<(Option<String>, Option<i64>)>>,
        payment_method: Option<&str>,
    ) -> Result<Self, ApiError> {
        let mut problems = Problems::default();
        let mut lines = Vec::new();
        match items {
            None => problems.add("items", "is required"),
            Some(items) if items.is_empty() => problems.add("items", "must have at least 1 line"),
            Some(items) if items.len() > MAX_LINES => problems.add(
                "items",
                format!("must have at most {MAX_LINES} lines; place several orders"),
            ),
            Some(items) => {
                let mut first_line = std::collections::HashMap::new();
                for (i, (product_id, quantity)) in items.into_iter().enumerate() {
                    let field = format!("items[{i}].product_id");
                    let product_id = match product_id.as_deref().map(str::trim) {
                        None => problems.check::<Uuid>(&field, Err("is required".into())),
                        Some(raw) => problems.check(
                            &field,
                            Uuid::parse_str(raw).map_err(|_| "must be a UUID".to_owned()),
                        ),
                    };
                    let quantity =
                        problems.check(&format!("items[{i}].quantity"), Quantity::parse(quantity));
                    // One line per product: two lines for one product are most likely a
                    // client's mistake, and merging them would hide it.
                    if let Some(product_id) = product_id
                        && let Some(first) = first_line.get(&product_id).copied()
                    {
                        problems.add(
                            field,
                            format!(
                                "the product is already ordered in items[{first}]; \
                                 put its whole quantity on one line"
                            ),
                        );
                        continue;
                    }
                    if let Some(product_id) = product_id {
                        first_line.insert(product_id, i);
                    }
                    if let (Some(product_id), Some(quantity)) = (product_id, quantity) {
                        lines.push(RequestedLine {
                            product_id,
                            quantity,
                        });
                    }
                }
            }
        }
        let payment_method = problems.check("payment_method", PaymentMethod::parse(payment_method));
        problems.into_result()?;
        let payment_method =
            payment_method.ok_or_else(|| anyhow::anyhow!("validated payment method missing"))?;
        Ok(Self {
            lines,
            payment_method,
        })
    }

    pub fn lines(&self) -> &[RequestedLine] {
        &self.lines
    }

    pub fn payment_method(&self) -> &PaymentMethod {
        &self.payment_method
    }

    pub fn product_ids(&self) -> Vec<Uuid> {
        self.lines.iter().map(|l| l.product_id).collect()
    }

    /// SHA-256 of the request in a canonical form: the same order (lines in any order,
    /// any JSON spacing or key order, extra fields) gives the same fingerprint.
    pub fn fingerprint(&self) -> Vec<u8> {
        let mut lines: Vec<(Uuid, i64)> = self
            .lines
            .iter()
            .map(|l| (l.product_id, l.quantity.get()))
            .collect();
        lines.sort_unstable();
        let mut hasher = sha2::Sha256::new();
        hasher.update(b"order-request/v1\0");
        for (product_id, quantity) in lines {
            hasher.update(product_id.as_bytes());
            hasher.update(quantity.to_be_bytes());
        }
        hasher.update(self.payment_method.as_str().as_bytes());
        hasher.finalize().to_vec()
    }
}

/// Why an order was cancelled (DESIGN.md §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CancelReason {
    OutOfStock,
    PaymentDeclined,
    ReservationExpired,
    CustomerCancelled,
}

impl CancelReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OutOfStock => "out_of_stock",
            Self::PaymentDeclined => "payment_declined",
            Self::ReservationExpired => "reservation_expired",
            Self::CustomerCancelled => "customer_cancelled",
        }
    }
}

/// Where a pending order goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    Paid,
    Cancelled(CancelReason),
}

impl Outcome {
    pub fn status(self) -> &'static str {
        match self {
            Self::Paid => "paid",
            Self::Cancelled(_) => "cancelled",
        }
    }

    pub fn reason(self) -> Option<&'static str> {
        match self {
            Self::Paid => None,
            Self::Cancelled(reason) => Some(reason.as_str()),
        }
    }
}

/// The saga events order-svc consumes.
pub const INVENTORY_RESERVED: &str = "inventory.reserved";
pub const INVENTORY_REJECTED: &str = "inventory.rejected";
pub const INVENTORY_RELEASED: &str = "inventory.released";
pub const INVENTORY_COMMITTED: &str = "inventory.committed";
pub const PAYMENT_AUTHORIZED: &str = "payment.authorized";
pub const PAYMENT_FAILED: &str = "payment.failed";
pub const PAYMENT_COMPLETED: &str = "payment.completed";
pub const PAYMENT_VOIDED: &str = "payment.voided";
pub const PAYMENT_REFUNDED: &str = "payment.refunded";

/// What inventory.released says when the reservation ran out of time.
pub const RELEASED_EXPIRED: &str = "expired";

/// The facts of a saga seen so far: a set, so the arrival order and copies do not
/// matter to it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    pub payment_completed: bool,
    pub inventory_committed: bool,
    pub payment_failed: bool,
    pub inventory_rejected: bool,
    pub reservation_expired: bool,
    pub payment_voided: bool,
}

impl Facts {
    /// Adds one event (its type and, for those that carry one, its reason).
    pub fn record(&mut self, event_type: &str, detail: Option<&str>) {
        match event_type {
            PAYMENT_COMPLETED => self.payment_completed = true,
            INVENTORY_COMMITTED => self.inventory_committed = true,
            PAYMENT_FAILED => self.payment_failed = true,
            INVENTORY_REJECTED => self.inventory_rejected = true,
            INVENTORY_RELEASED if detail == Some(RELEASED_EXPIRED) => {
                self.reservation_expired = true;
            }
            PAYMENT_VOIDED => self.payment_voided = true,
            // reserved, authorized, refunded, other releases: history only.
            _ => {}
        }
    }

    pub fn from_events<'a>(events: impl IntoIterator<Item = (&'a str, Option<&'a str>)>) -> Self {
        let mut facts = Self::default();
        for (event_type, detail) in events {
            facts.record(event_type, detail);
        }
        facts
    }
}

/// What a pending order becomes given the facts seen (docs/SAGA.md), or `None` while it
/// must wait. Asked after every event, so the first rule to hold decides.
pub fn decide(facts: &Facts) -> Option<Outcome> {
    use CancelReason::*;
    if facts.payment_failed {
        return Some(Outcome::Cancelled(PaymentDeclined));
    }
    if facts.inventory_rejected {
        // A rejection after an expiry is inventory failing to take the stock again.
        return Some(Outcome::Cancelled(if facts.reservation_expired {
            ReservationExpired
        } else {
            OutOfStock
        }));
    }
    // An expiry alone may still cross a capture; only the void says the order is lost.
    if facts.reservation_expired && facts.payment_voided {
        return Some(Outcome::Cancelled(ReservationExpired));
    }
    if facts.payment_completed && facts.inventory_committed {
        return Some(Outcome::Paid);
    }
    None
}

/// Plays `events` into a pending order one by one, as the handlers do: the outcome of
/// the first event that decides, later ones absorbed.
pub fn play<'a>(events: impl IntoIterator<Item = (&'a str, Option<&'a str>)>) -> Option<Outcome> {
    let mut facts = Facts::default();
    for (event_type, detail) in events {
        facts.record(event_type, detail);
        if let Some(outcome) = decide(&facts) {
            return Some(outcome);
        }
    }
    None
}

/// The distinct currencies of some products, in first-seen order.
pub fn currencies<'a>(all: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
    let mut seen = HashSet::new();
    all.into_iter().filter(|c| seen.insert(*c)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(product: u128, quantity: i64) -> (Option<String>, Option<i64>) {
        (Some(Uuid::from_u128(product).to_string()), Some(quantity))
    }

    fn fields(error: ApiError) -> Vec<(String, String)> {
        match error {
            ApiError::Validation(errors) => {
                errors.into_iter().map(|e| (e.field, e.message)).collect()
            }
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn idempotency_key_is_required_trimmed_ascii_and_bounded() {
        assert_eq!(
            IdempotencyKey::parse(Some(Ok("  k-1 "))).map(|k| k.as_str().to_owned()),
            Ok("k-1".into())
        );
        assert!(IdempotencyKey::parse(None).is_err());
        assert!(IdempotencyKey::parse(Some(Ok("   "))).is_err());
        assert!(IdempotencyKey::parse(Some(Err(()))).is_err());
        assert!(IdempotencyKey::parse(Some(Ok(&"k".repeat(255)))).is_ok());
        assert!(IdempotencyKey::parse(Some(Ok(&"k".repeat(256)))).is_err());
    }

    #[test]
    fn quantity_and_payment_method_bounds() {
        assert!(Quantity::parse(Some(1)).is_ok());
        assert!(Quantity::parse(Some(1000)).is_ok());
        assert!(Quantity::parse(Some(0)).is_err());
        assert!(Quantity::parse(Some(1001)).is_err());
        assert!(Quantity::parse(None).is_err());
        assert_eq!(
            PaymentMethod::parse(Some(" pm_card_visa ")).map(|m| m.as_str().to_owned()),
            Ok("pm_card_visa".into())
        );
        assert!(PaymentMethod::parse(Some("  ")).is_err());
        assert!(PaymentMethod::parse(None).is_err());
        assert!(PaymentMethod::parse(Some("pm\n")).is_ok(), "trimmed");
        assert!(PaymentMethod::parse(Some("p\u{7}m")).is_err());
    }

    #[test]
    fn every_bad_line_is_named() {
        let errors = fields(
            OrderRequest::parse(
                Some(vec![
                    item(1, 2),
                    (Some("nope".into()), Some(0)),
                    item(1, 1),
                    (None, None),
                ]),
                None,
            )
            .expect_err("invalid"),
        );
        let names: Vec<&str> = errors.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            names,
            [
                "items[1].product_id",
                "items[1].quantity",
                "items[2].product_id",
                "items[3].product_id",
                "items[3].quantity",
                "payment_method"
            ],
            "{errors:?}"
        );
        assert!(errors[2].1.contains("items[0]"), "{errors:?}");
    }

    #[test]
    fn line_count_is_bounded() {
        let none = fields(OrderRequest::parse(Some(vec![]), Some("pm")).expect_err("empty"));
        assert_eq!(none[0].0, "items");
        let many: Vec<_> = (0..51).map(|i| item(i, 1)).collect();
        let many = fields(OrderRequest::parse(Some(many), Some("pm")).expect_err("51 lines"));
        assert_eq!(many[0].0, "items");
        let fifty: Vec<_> = (0..50).map(|i| item(i, 1)).collect();
        assert!(OrderRequest::parse(Some(fifty), Some("pm")).is_ok());
    }

    #[test]
    fn fingerprint_ignores_line_order_but_not_content() {
        let parse = |items, pm: &str| OrderRequest::parse(Some(items), Some(pm)).expect("valid");
        let a = parse(vec![item(1, 2), item(2, 3)], "pm_card_visa").fingerprint();
        let b = parse(vec![item(2, 3), item(1, 2)], " pm_card_visa").fingerprint();
        assert_eq!(a, b);
        let more = parse(vec![item(1, 2), item(2, 4)], "pm_card_visa").fingerprint();
        let other_pm = parse(vec![item(1, 2), item(2, 3)], "pm_card_chargeDeclined").fingerprint();
        assert_ne!(a, more);
        assert_ne!(a, other_pm);
    }

    /// Every ordering of `events`.
    fn permutations<T: Clone>(events: &[T]) -> Vec<Vec<T>> {
        if events.len() <= 1 {
            return vec![events.to_vec()];
        }
        let mut all = Vec::new();
        for i in 0..events.len() {
            let mut rest = events.to_vec();
            let first = rest.remove(i);
            for mut tail in permutations(&rest) {
                tail.insert(0, first.clone());
                all.push(tail);
            }
        }
        all
    }

    fn same_end_in_every_order(events: &[(&str, Option<&str>)], expected: Option<Outcome>) {
        let all = permutations(events);
        for order in &all {
            assert_eq!(play(order.iter().copied()), expected, "order {order:?}");
            // A copy of every event, anywhere, changes nothing.
            let twice = order.iter().chain(order.iter()).copied();
            assert_eq!(play(twice), expected, "order {order:?} twice");
        }
    }

    #[test]
    fn a_saga_ends_the_same_whatever_the_order_of_its_events() {
        use CancelReason::*;
        same_end_in_every_order(
            &[
                (INVENTORY_RESERVED, None),
                (PAYMENT_AUTHORIZED, None),
                (PAYMENT_COMPLETED, None),
                (INVENTORY_COMMITTED, None),
            ],
            Some(Outcome::Paid),
        );
        same_end_in_every_order(
            &[
                (INVENTORY_RESERVED, None),
                (PAYMENT_FAILED, Some("card_declined")),
                (INVENTORY_RELEASED, Some("payment_failed")),
            ],
            Some(Outcome::Cancelled(PaymentDeclined)),
        );
        same_end_in_every_order(
            &[
                (INVENTORY_REJECTED, Some("out_of_stock")),
                (PAYMENT_AUTHORIZED, None),
                (PAYMENT_VOIDED, None),
            ],
            Some(Outcome::Cancelled(OutOfStock)),
        );
        same_end_in_every_order(
            &[
                (INVENTORY_RESERVED, None),
                (PAYMENT_AUTHORIZED, None),
                (INVENTORY_RELEASED, Some(RELEASED_EXPIRED)),
                (PAYMENT_VOIDED, None),
            ],
            Some(Outcome::Cancelled(ReservationExpired)),
        );
        // Captured across the expiry and inventory took the stock again: paid.
        same_end_in_every_order(
            &[
                (INVENTORY_RESERVED, None),
                (PAYMENT_AUTHORIZED, None),
                (INVENTORY_RELEASED, Some(RELEASED_EXPIRED)),
                (PAYMENT_COMPLETED, None),
                (INVENTORY_COMMITTED, None),
            ],
            Some(Outcome::Paid),
        );
        // Still waiting: nothing decides yet.
        same_end_in_every_order(
            &[
                (INVENTORY_RESERVED, None),
                (PAYMENT_AUTHORIZED, None),
                (PAYMENT_COMPLETED, None),
            ],
            None,
        );
    }

    #[test]
    fn a_rejection_after_an_expiry_is_an_expiry() {
        use CancelReason::*;
        let expired_first = [
            (INVENTORY_RELEASED, Some(RELEASED_EXPIRED)),
            (PAYMENT_COMPLETED, None),
            (INVENTORY_REJECTED, Some("out_of_stock")),
        ];
        assert_eq!(
            play(expired_first),
            Some(Outcome::Cancelled(ReservationExpired))
        );
        let rejected_first = [
            (INVENTORY_REJECTED, Some("out_of_stock")),
            (INVENTORY_RELEASED, Some(RELEASED_EXPIRED)),
        ];
        assert_eq!(play(rejected_first), Some(Outcome::Cancelled(OutOfStock)));
    }

    #[test]
    fn releases_other_than_expiry_and_refunds_alone_decide_nothing() {
        assert_eq!(
            play([
                (INVENTORY_RELEASED, Some("cancelled")),
                (PAYMENT_VOIDED, None),
                (PAYMENT_REFUNDED, None),
            ]),
            None
        );
    }

    #[test]
    fn currencies_are_distinct_in_first_seen_order() {
        assert_eq!(currencies(["EUR", "USD", "EUR"]), ["EUR", "USD"]);
    }
}
