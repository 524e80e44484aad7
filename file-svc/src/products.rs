//! Who sells each product, kept from product-svc's events, so an upload is authorised
//! without calling product-svc.
//!
//! Events may come in any order and the same fact more than once, so every handler is
//! an upsert that converges: the seller is the one named by the latest event (ties
//! broken by seller id, so the outcome never depends on arrival order), and a deletion
//! is final whatever comes after it (product ids are never reused).

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use shared::events::{Event, ProductCreated, ProductDeleted, ProductUpdated};
use shared::messaging::{Envelope, Handler, HandlerError};
use sqlx::PgConnection;
use uuid::Uuid;

/// A product as uploads see it.
#[derive(Debug, sqlx::FromRow)]
pub struct Product {
    pub seller_id: Uuid,
    pub deleted: bool,
}

impl Product {
    /// The live product, locked against a concurrent deletion until the caller's
    /// transaction ends when `lock` is set.
    pub async fn find(
        conn: &mut PgConnection,
        id: Uuid,
        lock: bool,
    ) -> Result<Option<Self>, sqlx::Error> {
        let sql = if lock {
            "SELECT seller_id, deleted_at IS NOT NULL AS deleted FROM products WHERE id = $1 FOR SHARE"
        } else {
            "SELECT seller_id, deleted_at IS NOT NULL AS deleted FROM products WHERE id = $1"
        };
        let found: Option<Self> = sqlx::query_as(sql).bind(id).fetch_optional(conn).await?;
        Ok(found.filter(|p| !p.deleted))
    }
}

/// Records `seller` for `product` as of `at`, unless a later event already said otherwise.
async fn upsert_seller(
    tx: &mut PgConnection,
    product: Uuid,
    seller: Uuid,
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO products (id, seller_id, seller_as_of) VALUES ($1, $2, $3) \
         ON CONFLICT (id) DO UPDATE \
         SET seller_id = EXCLUDED.seller_id, seller_as_of = EXCLUDED.seller_as_of \
         WHERE (products.seller_as_of, products.seller_id) \
             < (EXCLUDED.seller_as_of, EXCLUDED.seller_id)",
    )
    .bind(product)
    .bind(seller)
    .bind(at)
    .execute(tx)
    .await?;
    Ok(())
}

pub struct OnProductCreated;

#[async_trait]
impl Handler for OnProductCreated {
    fn event_type(&self) -> &'static str {
        ProductCreated::TYPE
    }

    fn name(&self) -> &'static str {
        "product_replica_created"
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Envelope) -> Result<(), HandlerError> {
        let created: ProductCreated = event.data_as()?;
        upsert_seller(
            tx,
            created.product_id,
            created.seller_id,
            created.created_at,
        )
        .await?;
        Ok(())
    }
}

pub struct OnProductUpdated;

#[async_trait]
impl Handler for OnProductUpdated {
    fn event_type(&self) -> &'static str {
        ProductUpdated::TYPE
    }

    fn name(&self) -> &'static str {
        "product_replica_updated"
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Envelope) -> Result<(), HandlerError> {
        let updated: ProductUpdated = event.data_as()?;
        upsert_seller(
            tx,
            updated.product_id,
            updated.seller_id,
            updated.updated_at,
        )
        .await?;
        Ok(())
    }
}

pub struct OnProductDeleted;

#[async_trait]
impl Handler for OnProductDeleted {
    fn event_type(&self) -> &'static str {
        ProductDeleted::TYPE
    }

    fn name(&self) -> &'static str {
        "product_replica_deleted"
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Envelope) -> Result<(), HandlerError> {
        let deleted: ProductDeleted = event.data_as()?;
        // A tombstone: a late `product.created` must not bring the product back.
        sqlx::query(
            "INSERT INTO products (id, seller_id, seller_as_of, deleted_at) \
             VALUES ($1, $2, $3, $3) \
             ON CONFLICT (id) DO UPDATE \
             SET deleted_at = LEAST(products.deleted_at, EXCLUDED.deleted_at)",
        )
        .bind(deleted.product_id)
        .bind(deleted.seller_id)
        .bind(deleted.deleted_at)
        .execute(tx)
        .await?;
        Ok(())
    }
}
