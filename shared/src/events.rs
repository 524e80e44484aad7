//! The event catalogue (DESIGN.md §5): the data each event carries. Producers and
//! consumers share these types, so a change to an event is a change in one place.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use uuid::Uuid;

use crate::auth::Role;
use crate::messaging::NewEvent;

/// An event's data type, bound to its routing key and version.
pub trait Event: Serialize + DeserializeOwned {
    const TYPE: &'static str;
    const VERSION: u32 = 1;

    /// This event as one to write to the outbox, in the saga or unit `correlation_id`.
    fn to_new(&self, correlation_id: Uuid) -> NewEvent {
        NewEvent {
            event_type: Self::TYPE.to_owned(),
            version: Self::VERSION,
            correlation_id,
            causation_id: None,
            // Serialising our own plain data types cannot fail.
            data: serde_json::to_value(self).unwrap_or_default(),
        }
    }
}

/// A new account (user-svc).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UserRegistered {
    pub user_id: Uuid,
    pub email: String,
    pub name: String,
    pub roles: Vec<Role>,
    pub registered_at: DateTime<Utc>,
}

impl Event for UserRegistered {
    const TYPE: &'static str = "user.registered";
}

/// A new product (product-svc). Inventory creates its stock row from `initial_stock`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProductCreated {
    pub product_id: Uuid,
    pub seller_id: Uuid,
    pub name: String,
    pub price_cents: i64,
    pub currency: String,
    pub category: Option<String>,
    pub initial_stock: i64,
    pub created_at: DateTime<Utc>,
}

impl Event for ProductCreated {
    const TYPE: &'static str = "product.created";
}

/// A product's sale terms changed (product-svc).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProductUpdated {
    pub product_id: Uuid,
    pub seller_id: Uuid,
    pub name: String,
    pub price_cents: i64,
    pub currency: String,
    pub category: Option<String>,
    pub updated_at: DateTime<Utc>,
}

impl Event for ProductUpdated {
    const TYPE: &'static str = "product.updated";
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProductDeleted {
    pub product_id: Uuid,
    pub seller_id: Uuid,
    pub deleted_at: DateTime<Utc>,
}

impl Event for ProductDeleted {
    const TYPE: &'static str = "product.deleted";
}

/// A product's stock after any change (inventory-svc). `version` grows with every change
/// of that product, so a consumer can ignore a stale, late event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StockChanged {
    pub product_id: Uuid,
    pub on_hand: i64,
    pub reserved: i64,
    pub available: i64,
    pub version: i64,
}

impl Event for StockChanged {
    const TYPE: &'static str = "inventory.stock_changed";
}

/// An image stored for a product (file-svc).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileUploaded {
    pub file_id: Uuid,
    pub product_id: Uuid,
    pub uploaded_by: Uuid,
    /// Paths under the API base, e.g. `/api/v1/files/{id}`.
    pub url: String,
    pub thumbnail_url: String,
    pub content_type: String,
    pub bytes: i64,
    pub width: u32,
    pub height: u32,
    pub uploaded_at: DateTime<Utc>,
}

impl Event for FileUploaded {
    const TYPE: &'static str = "file.uploaded";
}

/// A review of a product by a customer who bought it (product-svc).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReviewCreated {
    pub review_id: Uuid,
    pub product_id: Uuid,
    pub product_name: String,
    pub seller_id: Uuid,
    pub customer_id: Uuid,
    pub rating: i16,
    pub body: String,
    pub created_at: DateTime<Utc>,
}

impl Event for ReviewCreated {
    const TYPE: &'static str = "review.created";
}

/// One line of an order, priced from order-svc's replica of the catalog.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub product_id: Uuid,
    pub seller_id: Uuid,
    pub quantity: i64,
    pub unit_price_cents: i64,
}

/// An order was placed and is pending (order-svc): the saga starts here.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrderCreated {
    pub order_id: Uuid,
    pub customer_id: Uuid,
    pub lines: Vec<OrderLine>,
    pub total_cents: i64,
    pub currency: String,
    /// A Stripe payment method id, e.g. `pm_card_visa`.
    pub payment_method: String,
    pub created_at: DateTime<Utc>,
}

impl Event for OrderCreated {
    const TYPE: &'static str = "order.created";
}

/// A quantity of one product, as reserved or released.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockLine {
    pub product_id: Uuid,
    pub quantity: i64,
}

/// Every line of an order is reserved (inventory-svc), until `expires_at`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InventoryReserved {
    pub order_id: Uuid,
    pub lines: Vec<StockLine>,
    pub expires_at: DateTime<Utc>,
}

impl Event for InventoryReserved {
    const TYPE: &'static str = "inventory.reserved";
}

/// A line that could not be reserved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shortage {
    pub product_id: Uuid,
    pub requested: i64,
    pub available: i64,
}

/// Nothing of the order was reserved (inventory-svc): a line was short or unknown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InventoryRejected {
    pub order_id: Uuid,
    /// `out_of_stock` or `unknown_product`.
    pub reason: String,
    pub shortages: Vec<Shortage>,
}

impl Event for InventoryRejected {
    const TYPE: &'static str = "inventory.rejected";
}

/// An order's reservation was given back (inventory-svc).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InventoryReleased {
    pub order_id: Uuid,
    /// `payment_failed`, `expired` or `cancelled`.
    pub reason: String,
}

impl Event for InventoryReleased {
    const TYPE: &'static str = "inventory.released";
}

/// An order's reservation became a sale: stock on hand went down (inventory-svc).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InventoryCommitted {
    pub order_id: Uuid,
}

impl Event for InventoryCommitted {
    const TYPE: &'static str = "inventory.committed";
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PaymentAuthorized {
    pub order_id: Uuid,
    pub payment_id: Uuid,
    pub amount_cents: i64,
    pub currency: String,
}

impl Event for PaymentAuthorized {
    const TYPE: &'static str = "payment.authorized";
}

/// The payment was declined or could not be made (payment-svc).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PaymentFailed {
    pub order_id: Uuid,
    /// The provider's decline code, e.g. `card_declined`.
    pub reason: String,
}

impl Event for PaymentFailed {
    const TYPE: &'static str = "payment.failed";
}

/// The payment was captured (payment-svc).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PaymentCompleted {
    pub order_id: Uuid,
    pub payment_id: Uuid,
    pub amount_cents: i64,
    pub currency: String,
}

impl Event for PaymentCompleted {
    const TYPE: &'static str = "payment.completed";
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PaymentVoided {
    pub order_id: Uuid,
    pub payment_id: Uuid,
}

impl Event for PaymentVoided {
    const TYPE: &'static str = "payment.voided";
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PaymentRefunded {
    pub order_id: Uuid,
    pub payment_id: Uuid,
    pub amount_cents: i64,
}

impl Event for PaymentRefunded {
    const TYPE: &'static str = "payment.refunded";
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrderPaid {
    pub order_id: Uuid,
    pub customer_id: Uuid,
    pub lines: Vec<OrderLine>,
    pub total_cents: i64,
    pub currency: String,
}

impl Event for OrderPaid {
    const TYPE: &'static str = "order.paid";
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrderCancelled {
    pub order_id: Uuid,
    pub customer_id: Uuid,
    /// `out_of_stock`, `payment_declined`, `reservation_expired` or `customer_cancelled`.
    pub reason: String,
}

impl Event for OrderCancelled {
    const TYPE: &'static str = "order.cancelled";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn to_new_carries_type_version_and_data() {
        let event = UserRegistered {
            user_id: Uuid::now_v7(),
            email: "ada@example.com".into(),
            name: "Ada".into(),
            roles: vec![Role::Customer],
            registered_at: Utc::now(),
        };
        let new = event.to_new(event.user_id);
        assert_eq!(new.event_type, "user.registered");
        assert_eq!(new.version, 1);
        assert_eq!(new.correlation_id, event.user_id);
        let back: UserRegistered = serde_json::from_value(new.data).expect("round trip");
        assert_eq!(back, event);
    }
}
