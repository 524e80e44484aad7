//! Which service's queue receives which events, in one place for every service.
//!
//! A broker that lost its definitions (a new node) would drop every event published
//! before the subscribers declared their queues again. So each relay declares all the
//! queues and bindings below before it publishes, and publishes subscribed events
//! `mandatory`; each consumer checks at start that its handlers match its row.

use crate::events::{
    Event, FileUploaded, InventoryCommitted, InventoryRejected, InventoryReleased,
    InventoryReserved, OrderCancelled, OrderCreated, OrderPaid, PaymentAuthorized,
    PaymentCompleted, PaymentFailed, PaymentRefunded, PaymentVoided, ProductCreated,
    ProductDeleted, ProductUpdated, ReviewCreated, StockChanged, UserRegistered,
};

/// Service short name (queue `<ns>.<service>`) and the event types bound to its queue.
pub const SUBSCRIPTIONS: &[(&str, &[&str])] = &[
    (
        "product",
        &[StockChanged::TYPE, FileUploaded::TYPE, OrderPaid::TYPE],
    ),
    (
        "order",
        &[
            ProductCreated::TYPE,
            ProductUpdated::TYPE,
            ProductDeleted::TYPE,
            InventoryReserved::TYPE,
            InventoryRejected::TYPE,
            InventoryReleased::TYPE,
            InventoryCommitted::TYPE,
            PaymentAuthorized::TYPE,
            PaymentFailed::TYPE,
            PaymentCompleted::TYPE,
            PaymentVoided::TYPE,
            PaymentRefunded::TYPE,
        ],
    ),
    (
        "payment",
        &[
            OrderCreated::TYPE,
            InventoryReserved::TYPE,
            InventoryRejected::TYPE,
            InventoryReleased::TYPE,
            OrderCancelled::TYPE,
        ],
    ),
    (
        "inventory",
        &[
            ProductCreated::TYPE,
            ProductDeleted::TYPE,
            OrderCreated::TYPE,
            PaymentCompleted::TYPE,
            PaymentFailed::TYPE,
            OrderCancelled::TYPE,
        ],
    ),
    (
        "notification",
        &[
            UserRegistered::TYPE,
            ProductCreated::TYPE,
            ProductUpdated::TYPE,
            ProductDeleted::TYPE,
            OrderCreated::TYPE,
            OrderPaid::TYPE,
            OrderCancelled::TYPE,
            ReviewCreated::TYPE,
        ],
    ),
    (
        "file",
        &[
            ProductCreated::TYPE,
            ProductUpdated::TYPE,
            ProductDeleted::TYPE,
        ],
    ),
];

/// The event types `service` subscribes to, if it is one of the system's services.
pub fn of(service: &str) -> Option<&'static [&'static str]> {
    SUBSCRIPTIONS
        .iter()
        .find(|(name, _)| *name == service)
        .map(|(_, keys)| *keys)
}

/// Whether some service's queue is bound to `event_type`.
pub fn is_subscribed(event_type: &str) -> bool {
    SUBSCRIPTIONS
        .iter()
        .any(|(_, keys)| keys.contains(&event_type))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_appears_once_and_binds_each_key_once() {
        for (i, (service, keys)) in SUBSCRIPTIONS.iter().enumerate() {
            assert!(
                SUBSCRIPTIONS[i + 1..]
                    .iter()
                    .all(|(other, _)| other != service),
                "{service} has two rows"
            );
            for (j, key) in keys.iter().enumerate() {
                assert!(!keys[j + 1..].contains(key), "{service} binds {key} twice");
            }
        }
    }

    #[test]
    fn events_nobody_handles_are_not_subscribed() {
        assert!(is_subscribed("order.created"));
        assert!(!is_subscribed("user.deleted"));
        assert_eq!(of("user"), None);
        assert_eq!(of("file").map(<[_]>::len), Some(3));
    }
}
