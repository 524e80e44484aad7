//! Values that cannot be invalid once parsed, and the reservation decision itself (pure,
//! so the all-or-nothing rule is tested without a database).

use std::collections::BTreeMap;

use shared::events::{OrderLine, Shortage, StockLine};
use shared::http::{ApiError, FieldError};
use uuid::Uuid;

/// Largest change of stock one adjustment may make, either way: far above any real
/// delivery or write-off, and far from overflowing a BIGINT.
pub const MAX_DELTA: i64 = 1_000_000_000;

/// A change of on-hand stock asked for by a person: not zero, at most [`MAX_DELTA`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delta(i64);

impl Delta {
    pub fn parse(raw: Option<i64>) -> Result<Self, String> {
        match raw {
            None => Err("is required".into()),
            Some(0) => Err("must not be 0".into()),
            Some(d) if !(-MAX_DELTA..=MAX_DELTA).contains(&d) => {
                Err(format!("must be between -{MAX_DELTA} and {MAX_DELTA}"))
            }
            Some(d) => Ok(Self(d)),
        }
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

pub const REASON_MAX_CHARS: usize = 200;

/// Why stock was adjusted: trimmed, 1 to 200 characters, no control characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reason(String);

impl Reason {
    pub fn parse(raw: Option<&str>) -> Result<Self, String> {
        let reason = raw.map(str::trim).unwrap_or_default();
        if reason.is_empty() {
            return Err("is required".into());
        }
        if reason.chars().count() > REASON_MAX_CHARS {
            return Err(format!("must be at most {REASON_MAX_CHARS} characters"));
        }
        if reason.chars().any(char::is_control) {
            return Err("must not contain control characters".into());
        }
        Ok(Self(reason.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Collects the problems of several fields into one validation error.
#[derive(Default)]
pub struct Problems(Vec<FieldError>);

impl Problems {
    pub fn check<T>(&mut self, field: &str, result: Result<T, String>) -> Option<T> {
        result
            .map_err(|message| {
                self.0.push(FieldError {
                    field: field.to_owned(),
                    message,
                })
            })
            .ok()
    }

    pub fn into_result(self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Validation(self.0))
        }
    }
}

/// An order's demand: one line per product (repeated products summed), in product id
/// order, which is the order stock rows are locked in, so that two orders sharing
/// products never wait for each other in a cycle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lines(Vec<StockLine>);

impl Lines {
    pub fn from_order(lines: &[OrderLine]) -> Result<Self, String> {
        Self::new(lines.iter().map(|l| (l.product_id, l.quantity)))
    }

    pub fn new(lines: impl IntoIterator<Item = (Uuid, i64)>) -> Result<Self, String> {
        let mut by_product: BTreeMap<Uuid, i64> = BTreeMap::new();
        for (product_id, quantity) in lines {
            if quantity <= 0 {
                return Err(format!(
                    "the line for product {product_id} has quantity {quantity}; it must be at least 1"
                ));
            }
            let total = by_product.entry(product_id).or_default();
            *total = total
                .checked_add(quantity)
                .ok_or_else(|| format!("the quantity of product {product_id} is too large"))?;
        }
        if by_product.is_empty() {
            return Err("the order has no lines".into());
        }
        Ok(Self(
            by_product
                .into_iter()
                .map(|(product_id, quantity)| StockLine {
                    product_id,
                    quantity,
                })
                .collect(),
        ))
    }

    pub fn as_slice(&self) -> &[StockLine] {
        &self.0
    }

    pub fn product_ids(&self) -> Vec<Uuid> {
        self.0.iter().map(|l| l.product_id).collect()
    }

    pub fn into_vec(self) -> Vec<StockLine> {
        self.0
    }
}

/// What inventory knows of one product when an order asks for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Supply {
    /// No product.created handled for it (yet).
    Unknown,
    /// product.deleted: no new reservations.
    Deleted,
    Available(i64),
}

/// Why nothing was reserved, as `inventory.rejected` names it.
pub const OUT_OF_STOCK: &str = "out_of_stock";
pub const UNKNOWN_PRODUCT: &str = "unknown_product";
/// Payment completed for an order that was cancelled after its reservation: nothing is
/// sold to a cancelled order (payment-svc refunds on any `inventory.rejected`).
pub const ORDER_CANCELLED: &str = "order_cancelled";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Every line can be taken.
    Take,
    /// Some product has never been seen here: product.created may still be on its way.
    Wait(Vec<Uuid>),
    /// Nothing is taken; `reason` is `out_of_stock` or `unknown_product`.
    Reject {
        reason: &'static str,
        shortages: Vec<Shortage>,
    },
}

/// All lines or none. `supply` gives each product's state; `wait_for_unknown` says
/// whether a product never seen may still arrive (a young order) or counts as unknown.
pub fn decide(lines: &Lines, supply: impl Fn(Uuid) -> Supply, wait_for_unknown: bool) -> Decision {
    let mut unseen = Vec::new();
    let mut unknown = false;
    let mut shortages = Vec::new();
    for line in lines.as_slice() {
        let available = match supply(line.product_id) {
            Supply::Unknown => {
                unseen.push(line.product_id);
                unknown = true;
                0
            }
            Supply::Deleted => {
                unknown = true;
                0
            }
            Supply::Available(available) => available,
        };
        if available < line.quantity {
            shortages.push(Shortage {
                product_id: line.product_id,
                requested: line.quantity,
                available,
            });
        }
    }
    if wait_for_unknown && !unseen.is_empty() {
        return Decision::Wait(unseen);
    }
    if shortages.is_empty() {
        return Decision::Take;
    }
    Decision::Reject {
        reason: if unknown {
            UNKNOWN_PRODUCT
        } else {
            OUT_OF_STOCK
        },
        shortages,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    #[test]
    fn delta_is_required_non_zero_and_bounded() {
        assert_eq!(Delta::parse(Some(5)).map(Delta::get), Ok(5));
        assert_eq!(
            Delta::parse(Some(-MAX_DELTA)).map(Delta::get),
            Ok(-MAX_DELTA)
        );
        assert!(Delta::parse(None).is_err());
        assert!(Delta::parse(Some(0)).is_err());
        assert!(Delta::parse(Some(MAX_DELTA + 1)).is_err());
        assert!(Delta::parse(Some(i64::MIN)).is_err());
    }

    #[test]
    fn reason_is_trimmed_required_and_at_most_200_characters() {
        assert_eq!(
            Reason::parse(Some("  delivery 42 ")).map(|r| r.as_str().to_owned()),
            Ok("delivery 42".into())
        );
        assert!(Reason::parse(None).is_err());
        assert!(Reason::parse(Some("   ")).is_err());
        assert!(
            Reason::parse(Some(&"é".repeat(200))).is_ok(),
            "characters, not bytes"
        );
        assert!(Reason::parse(Some(&"x".repeat(201))).is_err());
        assert!(Reason::parse(Some("line\nbreak")).is_err());
    }

    #[test]
    fn lines_are_summed_per_product_and_sorted() {
        let lines = Lines::new([(id(3), 1), (id(1), 2), (id(3), 4)]).expect("valid");
        assert_eq!(
            lines.as_slice(),
            &[
                StockLine {
                    product_id: id(1),
                    quantity: 2
                },
                StockLine {
                    product_id: id(3),
                    quantity: 5
                },
            ]
        );
        assert!(Lines::new([]).is_err());
        assert!(Lines::new([(id(1), 0)]).is_err());
        assert!(Lines::new([(id(1), -2)]).is_err());
        assert!(Lines::new([(id(1), i64::MAX), (id(1), 1)]).is_err());
    }

    #[test]
    fn every_line_or_none() {
        let lines = Lines::new([(id(1), 2), (id(2), 3)]).expect("valid");
        let stock =
            |a: i64, b: i64| move |p: Uuid| Supply::Available(if p == id(1) { a } else { b });
        assert_eq!(decide(&lines, stock(2, 3), true), Decision::Take);
        assert_eq!(
            decide(&lines, stock(5, 2), true),
            Decision::Reject {
                reason: OUT_OF_STOCK,
                shortages: vec![Shortage {
                    product_id: id(2),
                    requested: 3,
                    available: 2
                }],
            }
        );
    }

    #[test]
    fn unseen_products_wait_while_the_order_is_young_deleted_ones_never_do() {
        let lines = Lines::new([(id(1), 1), (id(2), 1)]).expect("valid");
        let unseen = |p: Uuid| {
            if p == id(1) {
                Supply::Available(9)
            } else {
                Supply::Unknown
            }
        };
        assert_eq!(decide(&lines, unseen, true), Decision::Wait(vec![id(2)]));
        let rejected = decide(&lines, unseen, false);
        assert!(
            matches!(&rejected, Decision::Reject { reason, shortages }
                if *reason == UNKNOWN_PRODUCT && shortages.len() == 1 && shortages[0].available == 0),
            "{rejected:?}"
        );
        let deleted = |p: Uuid| {
            if p == id(1) {
                Supply::Deleted
            } else {
                Supply::Available(0)
            }
        };
        let rejected = decide(&lines, deleted, true);
        assert!(
            matches!(&rejected, Decision::Reject { reason, shortages }
                if *reason == UNKNOWN_PRODUCT && shortages.len() == 2),
            "{rejected:?}"
        );
    }
}
