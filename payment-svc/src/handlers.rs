//! One handler per event type consumed (docs/SAGA.md). Each turns its event into a fact
//! about the order's payment and lets the engine decide, in the consumer's transaction.

use std::sync::Arc;

use async_trait::async_trait;
use shared::events::{
    Event, InventoryRejected, InventoryReleased, InventoryReserved, OrderCancelled, OrderCreated,
};
use shared::messaging::{Envelope, Handler, HandlerError};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::payments::{Fact, Payments};

/// Every handler of the service.
pub fn all(payments: &Payments) -> Vec<Arc<dyn Handler>> {
    let on = |event_type, name, fact: fn(&Envelope) -> Result<(Uuid, Fact), HandlerError>| {
        Arc::new(OnFact {
            event_type,
            name,
            fact,
            payments: payments.clone(),
        }) as Arc<dyn Handler>
    };
    vec![
        on(OrderCreated::TYPE, "authorize", |event| {
            let order: OrderCreated = event.data_as()?;
            Ok((order.order_id, Fact::Ordered(order)))
        }),
        on(InventoryReserved::TYPE, "capture_on_reserved", |event| {
            let reserved: InventoryReserved = event.data_as()?;
            Ok((reserved.order_id, Fact::Reserved))
        }),
        on(InventoryRejected::TYPE, "void_on_rejected", |event| {
            let rejected: InventoryRejected = event.data_as()?;
            Ok((rejected.order_id, Fact::Rejected))
        }),
        on(InventoryReleased::TYPE, "void_on_released", |event| {
            let released: InventoryReleased = event.data_as()?;
            Ok((released.order_id, Fact::Released(released.reason)))
        }),
        on(OrderCancelled::TYPE, "void_on_cancelled", |event| {
            let cancelled: OrderCancelled = event.data_as()?;
            Ok((cancelled.order_id, Fact::Cancelled))
        }),
    ]
}

struct OnFact {
    event_type: &'static str,
    name: &'static str,
    fact: fn(&Envelope) -> Result<(Uuid, Fact), HandlerError>,
    payments: Payments,
}

#[async_trait]
impl Handler for OnFact {
    fn event_type(&self) -> &'static str {
        self.event_type
    }

    fn name(&self) -> &'static str {
        self.name
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Envelope) -> Result<(), HandlerError> {
        let (order_id, fact) = (self.fact)(event)?;
        let payment = self.payments.apply(tx, event, order_id, fact).await?;
        tracing::info!(%order_id, status = payment.status.as_str(), event = self.event_type, "payment");
        Ok(())
    }
}
