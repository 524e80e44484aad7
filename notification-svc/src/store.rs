//! What the service keeps of other services' events to address and word its mail:
//! contacts (user.registered), product names and sellers (product.*), orders as placed
//! (order.created). All written inside the consumer's transaction.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::events::{OrderCreated, OrderLine, ProductDeleted, UserRegistered};
use sqlx::PgConnection;
use uuid::Uuid;

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Contact {
    pub user_id: Uuid,
    pub email: String,
    pub name: String,
}

/// Keeps the contact; a redelivered or replayed registration changes nothing.
pub async fn save_contact(tx: &mut PgConnection, user: &UserRegistered) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO contacts (user_id, email, name) VALUES ($1, $2, $3) \
         ON CONFLICT (user_id) DO NOTHING",
    )
    .bind(user.user_id)
    .bind(&user.email)
    .bind(&user.name)
    .execute(tx)
    .await?;
    Ok(())
}

pub async fn contacts(tx: &mut PgConnection, ids: &[Uuid]) -> sqlx::Result<HashMap<Uuid, Contact>> {
    let rows: Vec<Contact> =
        sqlx::query_as("SELECT user_id, email, name FROM contacts WHERE user_id = ANY($1)")
            .bind(ids)
            .fetch_all(tx)
            .await?;
    Ok(rows.into_iter().map(|c| (c.user_id, c)).collect())
}

/// Keeps a product's name and seller as of `changed_at`; an older event than the one
/// kept is ignored. Returns whether the row changed.
pub async fn save_product(
    tx: &mut PgConnection,
    product_id: Uuid,
    seller_id: Uuid,
    name: &str,
    changed_at: DateTime<Utc>,
) -> sqlx::Result<bool> {
    let changed = sqlx::query(
        "INSERT INTO products (product_id, seller_id, name, changed_at) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (product_id) DO UPDATE \
         SET seller_id = EXCLUDED.seller_id, name = EXCLUDED.name, \
             changed_at = EXCLUDED.changed_at, updated_at = now() \
         WHERE products.changed_at IS NULL OR products.changed_at < EXCLUDED.changed_at",
    )
    .bind(product_id)
    .bind(seller_id)
    .bind(name)
    .bind(changed_at)
    .execute(tx)
    .await?
    .rows_affected();
    Ok(changed == 1)
}

/// Marks the product deleted; its name stays for mails about past orders and reviews.
pub async fn delete_product(tx: &mut PgConnection, product: &ProductDeleted) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO products (product_id, seller_id, deleted_at) VALUES ($1, $2, $3) \
         ON CONFLICT (product_id) DO UPDATE \
         SET deleted_at = coalesce(products.deleted_at, EXCLUDED.deleted_at), updated_at = now()",
    )
    .bind(product.product_id)
    .bind(product.seller_id)
    .bind(product.deleted_at)
    .execute(tx)
    .await?;
    Ok(())
}

/// Names of the products known by name (a delete seen before the create has none yet).
pub async fn product_names(
    tx: &mut PgConnection,
    ids: &[Uuid],
) -> sqlx::Result<HashMap<Uuid, String>> {
    let rows: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT product_id, name FROM products WHERE product_id = ANY($1) AND name IS NOT NULL",
    )
    .bind(ids)
    .fetch_all(tx)
    .await?;
    Ok(rows.into_iter().collect())
}

/// The order as placed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OrderSnapshot {
    pub order_id: Uuid,
    pub customer_id: Uuid,
    pub lines: Vec<OrderLine>,
    pub total_cents: i64,
    pub currency: String,
}

pub async fn save_order(tx: &mut PgConnection, order: &OrderCreated) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO orders (order_id, customer_id, lines, total_cents, currency, placed_at) \
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(order.order_id)
    .bind(order.customer_id)
    .bind(sqlx::types::Json(&order.lines))
    .bind(order.total_cents)
    .bind(&order.currency)
    .bind(order.created_at)
    .execute(tx)
    .await?;
    Ok(())
}

pub async fn order(tx: &mut PgConnection, order_id: Uuid) -> sqlx::Result<Option<OrderSnapshot>> {
    type Row = (Uuid, Uuid, sqlx::types::Json<Vec<OrderLine>>, i64, String);
    let row: Option<Row> = sqlx::query_as(
        "SELECT order_id, customer_id, lines, total_cents, currency FROM orders \
         WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(tx)
    .await?;
    Ok(row.map(
        |(order_id, customer_id, lines, total_cents, currency)| OrderSnapshot {
            order_id,
            customer_id,
            lines: lines.0,
            total_cents,
            currency,
        },
    ))
}
