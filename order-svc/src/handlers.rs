//! One handler per event type consumed (DESIGN.md §5, docs/SAGA.md). Each runs in the
//! consumer's transaction, which also records the message in the inbox.

use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;
use shared::events::{
    Event, InventoryCommitted, InventoryRejected, InventoryReleased, InventoryReserved,
    PaymentAuthorized, PaymentCompleted, PaymentFailed, PaymentRefunded, PaymentVoided,
    ProductCreated, ProductDeleted, ProductUpdated,
};
use shared::messaging::{Envelope, Handler, HandlerError, Outbox};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::{orders, products};

/// Every handler of the service.
pub fn all(outbox: &Outbox) -> Vec<Arc<dyn Handler>> {
    vec![
        Arc::new(ReplicateCreated),
        Arc::new(ReplicateUpdated),
        Arc::new(ReplicateDeleted),
        step::<InventoryReserved>(outbox, "saga_inventory_reserved", |e| (e.order_id, None)),
        step::<InventoryRejected>(outbox, "saga_inventory_rejected", |e| {
            (e.order_id, Some(e.reason))
        }),
        step::<InventoryReleased>(outbox, "saga_inventory_released", |e| {
            (e.order_id, Some(e.reason))
        }),
        step::<InventoryCommitted>(outbox, "saga_inventory_committed", |e| (e.order_id, None)),
        step::<PaymentAuthorized>(outbox, "saga_payment_authorized", |e| (e.order_id, None)),
        step::<PaymentFailed>(outbox, "saga_payment_failed", |e| {
            (e.order_id, Some(e.reason))
        }),
        step::<PaymentCompleted>(outbox, "saga_payment_completed", |e| (e.order_id, None)),
        step::<PaymentVoided>(outbox, "saga_payment_voided", |e| (e.order_id, None)),
        step::<PaymentRefunded>(outbox, "saga_payment_refunded", |e| (e.order_id, None)),
    ]
}

fn data<T: Event>(event: &Envelope) -> Result<T, HandlerError> {
    Ok(event.data_as::<T>()?)
}

struct ReplicateCreated;

#[async_trait]
impl Handler for ReplicateCreated {
    fn event_type(&self) -> &'static str {
        ProductCreated::TYPE
    }

    fn name(&self) -> &'static str {
        "replicate_product_created"
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Envelope) -> Result<(), HandlerError> {
        let product: ProductCreated = data(event)?;
        let changed = products::upsert(tx, (&product).into()).await?;
        tracing::info!(product_id = %product.product_id, changed, "product.created");
        Ok(())
    }
}

struct ReplicateUpdated;

#[async_trait]
impl Handler for ReplicateUpdated {
    fn event_type(&self) -> &'static str {
        ProductUpdated::TYPE
    }

    fn name(&self) -> &'static str {
        "replicate_product_updated"
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Envelope) -> Result<(), HandlerError> {
        let product: ProductUpdated = data(event)?;
        let changed = products::upsert(tx, (&product).into()).await?;
        tracing::info!(product_id = %product.product_id, changed, "product.updated");
        Ok(())
    }
}

struct ReplicateDeleted;

#[async_trait]
impl Handler for ReplicateDeleted {
    fn event_type(&self) -> &'static str {
        ProductDeleted::TYPE
    }

    fn name(&self) -> &'static str {
        "replicate_product_deleted"
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Envelope) -> Result<(), HandlerError> {
        let product: ProductDeleted = data(event)?;
        products::delete(tx, &product).await?;
        tracing::info!(product_id = %product.product_id, "product.deleted");
        Ok(())
    }
}

/// A saga event: which order it is about, and the reason it carries, if any.
type Extract<T> = fn(T) -> (Uuid, Option<String>);

struct SagaStep<T> {
    outbox: Outbox,
    name: &'static str,
    extract: Extract<T>,
    _event: PhantomData<fn() -> T>,
}

fn step<T: Event + Send + 'static>(
    outbox: &Outbox,
    name: &'static str,
    extract: Extract<T>,
) -> Arc<dyn Handler> {
    Arc::new(SagaStep {
        outbox: outbox.clone(),
        name,
        extract,
        _event: PhantomData,
    })
}

#[async_trait]
impl<T: Event + Send + 'static> Handler for SagaStep<T> {
    fn event_type(&self) -> &'static str {
        T::TYPE
    }

    fn name(&self) -> &'static str {
        self.name
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Envelope) -> Result<(), HandlerError> {
        let (order_id, detail) = (self.extract)(data::<T>(event)?);
        let applied = orders::apply(tx, &self.outbox, event, order_id, detail.as_deref()).await?;
        tracing::info!(%order_id, event = T::TYPE, ?applied, "saga event");
        Ok(())
    }
}
