//! One handler per event type consumed (DESIGN.md §5). Each runs in the consumer's
//! transaction, which also records the message in the inbox.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use shared::events::{
    Event, OrderCancelled, OrderCreated, PaymentCompleted, PaymentFailed, ProductCreated,
    ProductDeleted,
};
use shared::messaging::{Envelope, Handler, HandlerError, Outbox};
use sqlx::PgConnection;

use crate::reservations::{self, ReleaseReason};
use crate::stock;

/// Every handler of the service.
pub fn all(outbox: &Outbox, reservation_ttl: Duration) -> Vec<Arc<dyn Handler>> {
    let outbox = outbox.clone();
    vec![
        Arc::new(CreateStock(outbox.clone())),
        Arc::new(RetireStock),
        Arc::new(ReserveStock {
            outbox: outbox.clone(),
            ttl: reservation_ttl,
        }),
        Arc::new(CommitStock(outbox.clone())),
        Arc::new(ReleaseOnPaymentFailure(outbox.clone())),
        Arc::new(ReleaseOnCancel(outbox)),
    ]
}

fn data<T: Event>(event: &Envelope) -> Result<T, HandlerError> {
    Ok(event.data_as::<T>()?)
}

struct CreateStock(Outbox);

#[async_trait]
impl Handler for CreateStock {
    fn event_type(&self) -> &'static str {
        ProductCreated::TYPE
    }

    fn name(&self) -> &'static str {
        "create_stock"
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Envelope) -> Result<(), HandlerError> {
        let product: ProductCreated = data(event)?;
        if product.initial_stock < 0 {
            return Err(HandlerError::permanent(anyhow::anyhow!(
                "product {} has negative initial stock {}",
                product.product_id,
                product.initial_stock
            )));
        }
        let created = stock::create(tx, &self.0, event, &product).await?;
        tracing::info!(product_id = %product.product_id, created, "product stock");
        Ok(())
    }
}

struct RetireStock;

#[async_trait]
impl Handler for RetireStock {
    fn event_type(&self) -> &'static str {
        ProductDeleted::TYPE
    }

    fn name(&self) -> &'static str {
        "retire_stock"
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Envelope) -> Result<(), HandlerError> {
        let product: ProductDeleted = data(event)?;
        stock::delete(tx, &product).await?;
        tracing::info!(product_id = %product.product_id, "product deleted; no new reservations");
        Ok(())
    }
}

struct ReserveStock {
    outbox: Outbox,
    ttl: Duration,
}

#[async_trait]
impl Handler for ReserveStock {
    fn event_type(&self) -> &'static str {
        OrderCreated::TYPE
    }

    fn name(&self) -> &'static str {
        "reserve_stock"
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Envelope) -> Result<(), HandlerError> {
        let order: OrderCreated = data(event)?;
        let outcome = reservations::reserve(tx, &self.outbox, self.ttl, event, &order).await?;
        tracing::info!(order_id = %order.order_id, ?outcome, "order.created");
        Ok(())
    }
}

struct CommitStock(Outbox);

#[async_trait]
impl Handler for CommitStock {
    fn event_type(&self) -> &'static str {
        PaymentCompleted::TYPE
    }

    fn name(&self) -> &'static str {
        "commit_stock"
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Envelope) -> Result<(), HandlerError> {
        let payment: PaymentCompleted = data(event)?;
        let outcome = reservations::commit(tx, &self.0, event, payment.order_id).await?;
        tracing::info!(order_id = %payment.order_id, ?outcome, "payment.completed");
        Ok(())
    }
}

struct ReleaseOnPaymentFailure(Outbox);

#[async_trait]
impl Handler for ReleaseOnPaymentFailure {
    fn event_type(&self) -> &'static str {
        PaymentFailed::TYPE
    }

    fn name(&self) -> &'static str {
        "release_on_payment_failure"
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Envelope) -> Result<(), HandlerError> {
        let failed: PaymentFailed = data(event)?;
        let outcome = reservations::release(
            tx,
            &self.0,
            event,
            failed.order_id,
            ReleaseReason::PaymentFailed,
        )
        .await?;
        tracing::info!(order_id = %failed.order_id, ?outcome, "payment.failed");
        Ok(())
    }
}

struct ReleaseOnCancel(Outbox);

#[async_trait]
impl Handler for ReleaseOnCancel {
    fn event_type(&self) -> &'static str {
        OrderCancelled::TYPE
    }

    fn name(&self) -> &'static str {
        "release_on_cancel"
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Envelope) -> Result<(), HandlerError> {
        let cancelled: OrderCancelled = data(event)?;
        let outcome = reservations::release(
            tx,
            &self.0,
            event,
            cancelled.order_id,
            ReleaseReason::Cancelled,
        )
        .await?;
        tracing::info!(order_id = %cancelled.order_id, ?outcome, "order.cancelled");
        Ok(())
    }
}
