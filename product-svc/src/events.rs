//! What product-svc keeps from other services' events. Each handler gives the same end
//! state whatever order its events come in and however often: stock keeps the highest
//! version, images and purchases are keyed by what they are.

use async_trait::async_trait;
use shared::events::{Event, FileUploaded, OrderPaid, StockChanged};
use shared::messaging::{Envelope, Handler, HandlerError, Observer};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::cache::Cache;

/// `available` from `inventory.stock_changed`; a version older than (or equal to) the
/// one stored is ignored, so a late event never undoes a newer one.
pub struct Stock;

#[async_trait]
impl Handler for Stock {
    fn event_type(&self) -> &'static str {
        StockChanged::TYPE
    }

    fn name(&self) -> &'static str {
        "stock_replica"
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Envelope) -> Result<(), HandlerError> {
        let stock: StockChanged = event.data_as()?;
        let updated = sqlx::query(
            "INSERT INTO stock (product_id, on_hand, reserved, available, version) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (product_id) DO UPDATE SET \
                on_hand = EXCLUDED.on_hand, reserved = EXCLUDED.reserved, \
                available = EXCLUDED.available, version = EXCLUDED.version, updated_at = now() \
             WHERE stock.version < EXCLUDED.version",
        )
        .bind(stock.product_id)
        .bind(stock.on_hand)
        .bind(stock.reserved)
        .bind(stock.available)
        .bind(stock.version)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated == 0 {
            tracing::info!(
                product = %stock.product_id,
                version = stock.version,
                "stale stock event ignored"
            );
        }
        Ok(())
    }
}

/// Attaches an image from `file.uploaded`.
pub struct Images;

#[async_trait]
impl Handler for Images {
    fn event_type(&self) -> &'static str {
        FileUploaded::TYPE
    }

    fn name(&self) -> &'static str {
        "image_replica"
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Envelope) -> Result<(), HandlerError> {
        let file: FileUploaded = event.data_as()?;
        sqlx::query(
            "INSERT INTO product_images (id, product_id, url, thumbnail_url, uploaded_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING",
        )
        .bind(file.file_id)
        .bind(file.product_id)
        .bind(&file.url)
        .bind(&file.thumbnail_url)
        .bind(file.uploaded_at)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

/// Records who bought what from `order.paid`: only buyers may review.
pub struct Purchases;

#[async_trait]
impl Handler for Purchases {
    fn event_type(&self) -> &'static str {
        OrderPaid::TYPE
    }

    fn name(&self) -> &'static str {
        "purchases"
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Envelope) -> Result<(), HandlerError> {
        let order: OrderPaid = event.data_as()?;
        let products: Vec<Uuid> = order.lines.iter().map(|l| l.product_id).collect();
        sqlx::query(
            "INSERT INTO purchases (customer_id, product_id, order_id) \
             SELECT $1, product_id, $2 FROM unnest($3::uuid[]) AS product_id \
             ON CONFLICT DO NOTHING",
        )
        .bind(order.customer_id)
        .bind(order.order_id)
        .bind(&products)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

/// Invalidates the cache once a handler's change committed; before the commit a reader
/// could put the old value straight back.
pub struct InvalidateAfterCommit(pub Cache);

#[async_trait::async_trait]
impl Observer for InvalidateAfterCommit {
    async fn committed(&self, event: &Envelope) {
        let product = match event.event_type.as_str() {
            StockChanged::TYPE | FileUploaded::TYPE => event
                .data
                .get("product_id")
                .and_then(|id| id.as_str())
                .and_then(|id| Uuid::parse_str(id).ok()),
            _ => None,
        };
        if let Some(product) = product {
            self.0.invalidate(product).await;
        }
    }
}
