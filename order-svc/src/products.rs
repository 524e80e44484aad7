//! The replica of the catalog: price, currency, seller and name of each product, from
//! product events, so that placing an order calls no other service.
//!
//! Events may arrive late or twice. Each row keeps the product's own time of the fact it
//! holds (`created_at` or `updated_at`, which product-svc makes strictly increasing per
//! product), and a fact only replaces an older one. A delete wins over everything, even
//! when it arrives first (it leaves a tombstone).

use chrono::{DateTime, Utc};
use shared::events::{ProductCreated, ProductDeleted, ProductUpdated};
use sqlx::PgConnection;
use uuid::Uuid;

/// A product's sale terms as order-svc knows them.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Product {
    pub product_id: Uuid,
    pub seller_id: Uuid,
    pub name: Option<String>,
    pub price_cents: Option<i64>,
    pub currency: Option<String>,
    pub deleted_at: Option<DateTime<Utc>>,
}

/// Sale terms at one moment of the product's life.
pub struct Terms<'a> {
    pub product_id: Uuid,
    pub seller_id: Uuid,
    pub name: &'a str,
    pub price_cents: i64,
    pub currency: &'a str,
    pub at: DateTime<Utc>,
}

impl<'a> From<&'a ProductCreated> for Terms<'a> {
    fn from(p: &'a ProductCreated) -> Self {
        Self {
            product_id: p.product_id,
            seller_id: p.seller_id,
            name: &p.name,
            price_cents: p.price_cents,
            currency: &p.currency,
            at: p.created_at,
        }
    }
}

impl<'a> From<&'a ProductUpdated> for Terms<'a> {
    fn from(p: &'a ProductUpdated) -> Self {
        Self {
            product_id: p.product_id,
            seller_id: p.seller_id,
            name: &p.name,
            price_cents: p.price_cents,
            currency: &p.currency,
            at: p.updated_at,
        }
    }
}

/// Keeps `terms` unless the replica holds newer ones or the product was deleted.
/// Returns whether anything changed.
pub async fn upsert(conn: &mut PgConnection, terms: Terms<'_>) -> sqlx::Result<bool> {
    let changed = sqlx::query(
        "INSERT INTO products (product_id, seller_id, name, price_cents, currency, version_at) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (product_id) DO UPDATE SET seller_id = EXCLUDED.seller_id, \
             name = EXCLUDED.name, price_cents = EXCLUDED.price_cents, \
             currency = EXCLUDED.currency, version_at = EXCLUDED.version_at, \
             replicated_at = now() \
         WHERE products.deleted_at IS NULL AND products.version_at < EXCLUDED.version_at",
    )
    .bind(terms.product_id)
    .bind(terms.seller_id)
    .bind(terms.name)
    .bind(terms.price_cents)
    .bind(terms.currency)
    .bind(terms.at)
    .execute(conn)
    .await?
    .rows_affected();
    Ok(changed == 1)
}

/// Marks the product deleted: no new orders for it. The first delete's time is kept.
pub async fn delete(conn: &mut PgConnection, product: &ProductDeleted) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO products (product_id, seller_id, version_at, deleted_at) \
         VALUES ($1, $2, $3, $3) \
         ON CONFLICT (product_id) DO UPDATE \
         SET deleted_at = COALESCE(products.deleted_at, EXCLUDED.deleted_at), \
             replicated_at = now()",
    )
    .bind(product.product_id)
    .bind(product.seller_id)
    .bind(product.deleted_at)
    .execute(conn)
    .await
    .map(drop)
}

pub async fn find_many(conn: &mut PgConnection, ids: &[Uuid]) -> sqlx::Result<Vec<Product>> {
    sqlx::query_as(
        "SELECT product_id, seller_id, name, price_cents, currency, deleted_at FROM products \
         WHERE product_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(conn)
    .await
}
