//! Reading the catalog from PostgreSQL, in the shapes the API answers with.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::http::FieldError;
use sqlx::{PgExecutor, PgPool, Postgres, QueryBuilder};
use uuid::Uuid;

use crate::cache::LoadError;
use crate::domain::{Cursor, Limit, SearchText, Slug};

/// An image of a product, as file-svc serves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProductImage {
    pub id: Uuid,
    #[schema(example = "/api/v1/files/01937a4e-0000-7000-8000-000000000000")]
    pub url: String,
    #[schema(example = "/api/v1/files/01937a4e-0000-7000-8000-000000000000/thumbnail")]
    pub thumbnail_url: String,
}

/// A product as everyone sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProductView {
    pub id: Uuid,
    pub seller_id: Uuid,
    #[schema(example = "Cast-iron teapot")]
    pub name: String,
    pub description: String,
    /// Minor units of `currency`.
    #[schema(example = 4599)]
    pub price_cents: i64,
    #[schema(example = "EUR")]
    pub currency: String,
    /// The category's slug.
    #[schema(example = "kitchen")]
    pub category: Option<String>,
    pub images: Vec<ProductImage>,
    /// Units that can be ordered now, as inventory-svc last reported; 0 until it has.
    pub available: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct ProductRow {
    id: Uuid,
    seller_id: Uuid,
    name: String,
    description: String,
    price_cents: i64,
    currency: String,
    category: Option<String>,
    available: i64,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    images: sqlx::types::Json<Vec<ProductImage>>,
    rank: Option<f32>,
}

impl ProductRow {
    fn view(self) -> ProductView {
        ProductView {
            id: self.id,
            seller_id: self.seller_id,
            name: self.name,
            description: self.description,
            price_cents: self.price_cents,
            currency: self.currency,
            category: self.category,
            images: self.images.0,
            available: self.available,
            created_at: self.created_at,
            updated_at: self.updated_at,
        }
    }
}

macro_rules! product_select {
    () => {
        "SELECT p.id, p.seller_id, p.name, p.description, p.price_cents, p.currency, \
         c.slug AS category, COALESCE(s.available, 0) AS available, p.created_at, \
         p.updated_at, \
         COALESCE((SELECT json_agg(json_build_object('id', i.id, 'url', i.url, \
                   'thumbnail_url', i.thumbnail_url) ORDER BY i.uploaded_at, i.id) \
                   FROM product_images i WHERE i.product_id = p.id), '[]'::json) AS images"
    };
}

macro_rules! product_from {
    () => {
        " FROM products p \
         LEFT JOIN categories c ON c.id = p.category_id \
         LEFT JOIN stock s ON s.product_id = p.id"
    };
}

/// A product that is not deleted.
pub async fn product(
    db: impl PgExecutor<'_>,
    id: Uuid,
) -> Result<Option<ProductView>, sqlx::Error> {
    let row: Option<ProductRow> = sqlx::query_as(concat!(
        product_select!(),
        ", NULL::real AS rank",
        product_from!(),
        " WHERE p.id = $1 AND p.deleted_at IS NULL"
    ))
    .bind(id)
    .fetch_optional(db)
    .await?;
    Ok(row.map(ProductRow::view))
}

/// What a listing asks for.
#[derive(Clone, Debug)]
pub struct ListQuery {
    pub q: Option<SearchText>,
    pub category: Option<Slug>,
    pub seller_id: Option<Uuid>,
    pub limit: Limit,
    pub cursor: Option<Cursor>,
}

impl ListQuery {
    /// Everything that shapes the page, for its cache key.
    pub fn cache_key(&self) -> String {
        let cursor = self.cursor.map(|c| c.encode()).unwrap_or_default();
        format!(
            "q={}\ncategory={}\nseller={}\nlimit={}\ncursor={cursor}",
            self.q.as_ref().map_or("", SearchText::as_str),
            self.category.as_ref().map_or("", Slug::as_str),
            self.seller_id.map(|s| s.to_string()).unwrap_or_default(),
            self.limit.get(),
        )
    }
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProductPage {
    pub items: Vec<ProductView>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    pub next_cursor: Option<String>,
}

/// One page of products: newest first, or most relevant first when searching (ties
/// newest first). Keyset pagination on (relevance, id): ids never change, and a product
/// added meanwhile sorts before the cursor of a plain listing, so paging through visits
/// every product that was there once.
pub async fn list(pool: &PgPool, query: &ListQuery) -> Result<ProductPage, LoadError> {
    let category = match &query.category {
        None => None,
        Some(slug) => match category_id(pool, slug).await? {
            Some(id) => Some(id),
            None => {
                return Err(LoadError::Invalid(vec![FieldError {
                    field: "category".into(),
                    message: format!("there is no category {}", slug.as_str()),
                }]));
            }
        },
    };
    let mut sql = QueryBuilder::<Postgres>::new("");
    if let Some(category) = category {
        sql.push("WITH RECURSIVE scope AS (SELECT ")
            .push_bind(category)
            .push(
                "::uuid AS id UNION ALL \
                 SELECT c.id FROM categories c JOIN scope ON c.parent_id = scope.id) ",
            );
    }
    sql.push(product_select!());
    match &query.q {
        Some(_) => sql.push(", ts_rank(p.search, tsq) AS rank"),
        None => sql.push(", NULL::real AS rank"),
    };
    sql.push(product_from!());
    if let Some(q) = &query.q {
        // websearch syntax: quotes, `or`, `-word`; never an error for odd input.
        sql.push(" CROSS JOIN websearch_to_tsquery('english', ")
            .push_bind(q.as_str().to_owned())
            .push(") AS tsq");
    }
    sql.push(" WHERE p.deleted_at IS NULL");
    if query.q.is_some() {
        sql.push(" AND p.search @@ tsq");
    }
    if category.is_some() {
        sql.push(" AND p.category_id IN (SELECT id FROM scope)");
    }
    if let Some(seller) = query.seller_id {
        sql.push(" AND p.seller_id = ").push_bind(seller);
    }
    match (query.cursor, &query.q) {
        (
            Some(Cursor {
                rank: Some(rank),
                id,
            }),
            Some(_),
        ) => {
            sql.push(" AND (ts_rank(p.search, tsq), p.id) < (")
                .push_bind(rank)
                .push("::real, ")
                .push_bind(id)
                .push(")");
        }
        (Some(cursor), _) => {
            sql.push(" AND p.id < ").push_bind(cursor.id);
        }
        (None, _) => {}
    }
    sql.push(" ORDER BY ");
    if query.q.is_some() {
        sql.push("rank DESC, ");
    }
    let limit = query.limit.get();
    sql.push("p.id DESC LIMIT ").push_bind(limit + 1);
    let mut rows: Vec<ProductRow> = sql.build_query_as().fetch_all(pool).await?;
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = rows.len() > limit;
    rows.truncate(limit);
    let next_cursor = match rows.last() {
        Some(last) if more => Some(
            Cursor {
                rank: last.rank,
                id: last.id,
            }
            .encode(),
        ),
        _ => None,
    };
    Ok(ProductPage {
        items: rows.into_iter().map(ProductRow::view).collect(),
        next_cursor,
    })
}

pub async fn category_id(
    db: impl PgExecutor<'_>,
    slug: &Slug,
) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM categories WHERE slug = $1")
        .bind(slug.as_str())
        .fetch_optional(db)
        .await
}

/// A category and everything below it.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CategoryNode {
    pub id: Uuid,
    #[schema(example = "kitchen")]
    pub slug: String,
    #[schema(example = "Kitchen")]
    pub name: String,
    #[schema(no_recursion)]
    pub children: Vec<CategoryNode>,
}

/// Every category as a tree, each level sorted by name.
pub async fn category_tree(pool: &PgPool) -> Result<Vec<CategoryNode>, sqlx::Error> {
    let rows: Vec<(Uuid, String, String, Option<Uuid>)> =
        sqlx::query_as("SELECT id, slug, name, parent_id FROM categories ORDER BY name, slug")
            .fetch_all(pool)
            .await?;
    let mut children: HashMap<Option<Uuid>, Vec<(Uuid, String, String)>> = HashMap::new();
    for (id, slug, name, parent) in rows {
        children.entry(parent).or_default().push((id, slug, name));
    }
    fn build(
        parent: Option<Uuid>,
        children: &mut HashMap<Option<Uuid>, Vec<(Uuid, String, String)>>,
    ) -> Vec<CategoryNode> {
        children
            .remove(&parent)
            .unwrap_or_default()
            .into_iter()
            .map(|(id, slug, name)| CategoryNode {
                id,
                slug,
                name,
                children: build(Some(id), children),
            })
            .collect()
    }
    Ok(build(None, &mut children))
}
