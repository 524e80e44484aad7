//! Products: create, read (cached), change, delete, and the searchable listing.

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use shared::auth::{AuthUser, Role};
use shared::events::{Event as _, ProductCreated, ProductDeleted, ProductUpdated};
use shared::http::{ApiError, Json, Problem};
use uuid::Uuid;

use super::{Result, json_body, present, query};
use crate::AppState;
use crate::cache::LoadError;
use crate::domain::{
    Currency, Cursor, Description, InitialStock, Limit, PriceCents, Problems, ProductName,
    SearchText, Slug, path_id,
};
use crate::store::{self, ListQuery, ProductPage, ProductView};

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// Words to find in names and descriptions (web-search syntax: `"exact phrase"`,
    /// `or`, `-without`). Results are then ordered by relevance.
    q: Option<String>,
    /// A category's slug: its products and those of every category below it.
    category: Option<String>,
    #[param(value_type = Option<Uuid>)]
    seller_id: Option<String>,
    /// 1 to 100, default 20.
    #[param(value_type = Option<i64>)]
    limit: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// Products, newest first (most relevant first with `q`), a page at a time. Paging
/// through visits every product once, however many are added meanwhile.
#[utoipa::path(
    get, path = "/api/v1/products", tag = "products",
    params(ListParams),
    responses(
        (status = 200, body = ProductPage),
        (status = 422, description = "Invalid parameters, listed in `errors`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    params: std::result::Result<Query<ListParams>, QueryRejection>,
) -> Result<Response> {
    let params = query(params)?;
    let mut problems = Problems::default();
    let q = problems
        .check("q", SearchText::parse(params.q.as_deref()))
        .flatten();
    let category = params
        .category
        .as_deref()
        .and_then(|c| problems.check("category", Slug::parse(c)));
    let seller_id = params.seller_id.as_deref().and_then(|s| {
        problems.check(
            "seller_id",
            Uuid::parse_str(s).map_err(|_| "must be a UUID".to_owned()),
        )
    });
    let limit = problems.check("limit", Limit::parse(params.limit.as_deref()));
    let cursor = problems
        .check(
            "cursor",
            Cursor::parse(params.cursor.as_deref(), q.is_some()),
        )
        .flatten();
    problems.into_result()?;
    let Some(limit) = limit else {
        return Err(anyhow::anyhow!("validated limit missing").into());
    };
    let query = ListQuery {
        q,
        category,
        seller_id,
        limit,
        cursor,
    };
    let pool = state.pool.clone();
    let key = query.cache_key();
    let page = state
        .cache
        .list(&key, async move {
            let page = store::list(&pool, &query).await?;
            to_body(&page).map(Some)
        })
        .await?;
    let body = page.ok_or_else(|| anyhow::anyhow!("a listing always has a page"))?;
    Ok(json_body(body))
}

fn to_body<T: serde::Serialize>(value: &T) -> std::result::Result<Bytes, LoadError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|e| LoadError::Failed(std::sync::Arc::new(e.into())))
}

/// One product.
#[utoipa::path(
    get, path = "/api/v1/products/{id}", tag = "products",
    params(("id" = Uuid, Path)),
    responses(
        (status = 200, body = ProductView),
        (status = 404, description = "Unknown or deleted", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn show(State(state): State<AppState>, Path(id): Path<String>) -> Result<Response> {
    let id = path_id(&id, "product")?;
    let pool = state.pool.clone();
    let body = state
        .cache
        .product(id, async move {
            match store::product(&pool, id).await? {
                Some(product) => to_body(&product).map(Some),
                None => Ok(None),
            }
        })
        .await?;
    match body {
        Some(body) => Ok(json_body(body)),
        None => Err(not_found().into()),
    }
}

fn not_found() -> ApiError {
    ApiError::NotFound("no such product".into())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProduct {
    /// 1 to 200 characters.
    #[schema(required = true, example = "Cast-iron teapot")]
    name: Option<String>,
    /// Up to 10,000 characters; may be empty.
    #[schema(required = true, example = "Holds 1.2 litres. Enamelled inside.")]
    description: Option<String>,
    /// Minor units of `currency`, more than 0.
    #[schema(required = true, example = 4599)]
    price_cents: Option<i64>,
    /// ISO 4217, upper case.
    #[schema(required = true, example = "EUR")]
    currency: Option<String>,
    /// A category's slug.
    #[schema(example = "kitchen")]
    category: Option<String>,
    /// Units in stock to start with (inventory-svc keeps the stock), 0 or more.
    #[schema(required = true, example = 10)]
    initial_stock: Option<i64>,
}

/// Puts a product on sale (sellers and admins). Its stock starts at `initial_stock` once
/// inventory-svc has taken it in; until then `available` is 0.
#[utoipa::path(
    post, path = "/api/v1/products", tag = "products",
    request_body = NewProduct,
    security(("bearer" = [])),
    responses(
        (status = 201, body = ProductView),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a seller or admin", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields, listed in `errors`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    caller: AuthUser,
    Json(request): Json<NewProduct>,
) -> Result<Response> {
    caller.require_any(&[Role::Seller, Role::Admin])?;
    let mut problems = Problems::default();
    let name = problems.require("name", request.name, |n| ProductName::parse(&n));
    let description = problems.require("description", request.description, |d| {
        Description::parse(&d)
    });
    let price = problems.require("price_cents", request.price_cents, PriceCents::parse);
    let currency = problems.require("currency", request.currency, |c| Currency::parse(&c));
    let stock = problems.require("initial_stock", request.initial_stock, InitialStock::parse);
    let category = request
        .category
        .and_then(|c| problems.check("category", Slug::parse(&c)));

    let mut tx = state.pool.begin().await?;
    let category_id = match &category {
        Some(slug) => {
            let id = store::category_id(&mut *tx, slug).await?;
            if id.is_none() {
                problems.add(
                    "category",
                    format!("there is no category {}", slug.as_str()),
                );
            }
            id
        }
        None => None,
    };
    problems.into_result()?;
    let (Some(name), Some(description), Some(price), Some(currency), Some(stock)) =
        (name, description, price, currency, stock)
    else {
        return Err(anyhow::anyhow!("validated fields missing").into());
    };

    let id = Uuid::now_v7();
    let seller_id = caller.id();
    let (created_at, updated_at): (DateTime<Utc>, DateTime<Utc>) = sqlx::query_as(
        "INSERT INTO products \
         (id, seller_id, name, description, price_cents, currency, category_id, initial_stock) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING created_at, updated_at",
    )
    .bind(id)
    .bind(seller_id)
    .bind(name.as_str())
    .bind(description.as_str())
    .bind(price.get())
    .bind(currency.as_str())
    .bind(category_id)
    .bind(stock.get())
    .fetch_one(&mut *tx)
    .await?;
    let category = category.map(|c| c.as_str().to_owned());
    let created = ProductCreated {
        product_id: id,
        seller_id,
        name: name.as_str().to_owned(),
        price_cents: price.get(),
        currency: currency.as_str().to_owned(),
        category: category.clone(),
        initial_stock: stock.get(),
        created_at,
    };
    state.outbox.enqueue(&mut tx, created.to_new(id)).await?;
    tx.commit().await?;
    state.cache.invalidate(id).await;
    tracing::info!(product = %id, seller = %seller_id, "product created");

    let product = ProductView {
        id,
        seller_id,
        name: created.name,
        description: description.as_str().to_owned(),
        price_cents: created.price_cents,
        currency: created.currency,
        category,
        images: Vec::new(),
        available: 0,
        created_at,
        updated_at,
    };
    let location = format!("/api/v1/products/{id}");
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(product),
    )
        .into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProductChanges {
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    name: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    description: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>)]
    price_cents: Option<Option<i64>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    currency: Option<Option<String>>,
    /// A category's slug; `null` takes the product out of its category.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    category: Option<Option<String>>,
}

/// A field that may be left out but not set to null.
fn not_null<T, U>(
    problems: &mut Problems,
    field: &str,
    value: Option<Option<T>>,
    parse: impl FnOnce(T) -> std::result::Result<U, String>,
) -> Option<U> {
    match value {
        None => None,
        Some(None) => {
            problems.add(field, "must not be null".into());
            None
        }
        Some(Some(value)) => problems.check(field, parse(value)),
    }
}

#[derive(sqlx::FromRow)]
struct Current {
    seller_id: Uuid,
    name: String,
    description: String,
    price_cents: i64,
    currency: String,
    category_id: Option<Uuid>,
    category: Option<String>,
}

/// Locks a live product's row for a change.
async fn lock(tx: &mut sqlx::PgConnection, id: Uuid) -> Result<Current> {
    let current: Option<Current> = sqlx::query_as(
        "SELECT p.seller_id, p.name, p.description, p.price_cents, p.currency, p.category_id, \
                c.slug AS category \
         FROM products p LEFT JOIN categories c ON c.id = p.category_id \
         WHERE p.id = $1 AND p.deleted_at IS NULL FOR UPDATE OF p",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    current.ok_or_else(|| not_found().into())
}

/// Changes some of a product's fields (its seller or an admin).
#[utoipa::path(
    patch, path = "/api/v1/products/{id}", tag = "products",
    params(("id" = Uuid, Path)),
    request_body = ProductChanges,
    security(("bearer" = [])),
    responses(
        (status = 200, body = ProductView),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Neither its seller nor an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields, listed in `errors`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn update(
    State(state): State<AppState>,
    caller: AuthUser,
    Path(id): Path<String>,
    Json(changes): Json<ProductChanges>,
) -> Result<Response> {
    let id = path_id(&id, "product")?;
    let mut tx = state.pool.begin().await?;
    let current = lock(&mut tx, id).await?;
    caller.require_owner_or_admin(current.seller_id)?;

    let mut problems = Problems::default();
    let name = not_null(&mut problems, "name", changes.name, |n| {
        ProductName::parse(&n)
    });
    let description = not_null(&mut problems, "description", changes.description, |d| {
        Description::parse(&d)
    });
    let price = not_null(
        &mut problems,
        "price_cents",
        changes.price_cents,
        PriceCents::parse,
    );
    let currency = not_null(&mut problems, "currency", changes.currency, |c| {
        Currency::parse(&c)
    });
    // None: unchanged; Some(None): no category.
    let category: Option<Option<(Uuid, String)>> = match changes.category {
        None => None,
        Some(None) => Some(None),
        Some(Some(raw)) => match problems.check("category", Slug::parse(&raw)) {
            None => None,
            Some(slug) => match store::category_id(&mut *tx, &slug).await? {
                Some(found) => Some(Some((found, slug.as_str().to_owned()))),
                None => {
                    problems.add("category", format!("there is no category {raw}"));
                    None
                }
            },
        },
    };
    problems.into_result()?;

    let name = name.map_or(current.name.clone(), |n| n.as_str().to_owned());
    let description = description.map_or(current.description.clone(), |d| d.as_str().to_owned());
    let price_cents = price.map_or(current.price_cents, PriceCents::get);
    let currency = currency.map_or(current.currency.clone(), |c| c.as_str().to_owned());
    let (category_id, category) = match category {
        None => (current.category_id, current.category.clone()),
        Some(None) => (None, None),
        Some(Some((id, slug))) => (Some(id), Some(slug)),
    };
    let unchanged = name == current.name
        && description == current.description
        && price_cents == current.price_cents
        && currency == current.currency
        && category_id == current.category_id;
    if !unchanged {
        // Strictly increasing per product even when two changes race, so consumers can
        // keep the latest by `updated_at`.
        let updated_at: DateTime<Utc> = sqlx::query_scalar(
            "UPDATE products SET name = $2, description = $3, price_cents = $4, currency = $5, \
                 category_id = $6, \
                 updated_at = GREATEST(clock_timestamp(), updated_at + interval '1 microsecond') \
             WHERE id = $1 RETURNING updated_at",
        )
        .bind(id)
        .bind(&name)
        .bind(&description)
        .bind(price_cents)
        .bind(&currency)
        .bind(category_id)
        .fetch_one(&mut *tx)
        .await?;
        let updated = ProductUpdated {
            product_id: id,
            seller_id: current.seller_id,
            name,
            price_cents,
            currency,
            category,
            updated_at,
        };
        state.outbox.enqueue(&mut tx, updated.to_new(id)).await?;
        tx.commit().await?;
        state.cache.invalidate(id).await;
        tracing::info!(product = %id, by = %caller.id(), "product changed");
    } else {
        tx.rollback().await?;
    }
    let product = store::product(&state.pool, id)
        .await?
        .ok_or_else(not_found)?;
    Ok(Json(product).into_response())
}

/// Takes a product off sale (its seller or an admin). It is gone from the catalog;
/// its reviews and history stay.
#[utoipa::path(
    delete, path = "/api/v1/products/{id}", tag = "products",
    params(("id" = Uuid, Path)),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Neither its seller nor an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    caller: AuthUser,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let id = path_id(&id, "product")?;
    let mut tx = state.pool.begin().await?;
    let current = lock(&mut tx, id).await?;
    caller.require_owner_or_admin(current.seller_id)?;
    let deleted_at: DateTime<Utc> = sqlx::query_scalar(
        "UPDATE products SET deleted_at = clock_timestamp(), \
             updated_at = GREATEST(clock_timestamp(), updated_at + interval '1 microsecond') \
         WHERE id = $1 RETURNING deleted_at",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    let deleted = ProductDeleted {
        product_id: id,
        seller_id: current.seller_id,
        deleted_at,
    };
    state.outbox.enqueue(&mut tx, deleted.to_new(id)).await?;
    tx.commit().await?;
    state.cache.invalidate(id).await;
    tracing::info!(product = %id, by = %caller.id(), "product deleted");
    Ok(StatusCode::NO_CONTENT)
}
