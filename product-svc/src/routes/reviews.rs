//! Reviews: one per customer and product, only by customers who bought it.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::auth::{AuthUser, Role};
use shared::events::{Event as _, ReviewCreated};
use shared::http::{ApiError, Json, Problem};
use uuid::Uuid;

use super::{Error, Result, query};
use crate::AppState;
use crate::domain::{Cursor, Limit, Problems, Rating, ReviewBody, path_id};

#[derive(Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct ReviewView {
    id: Uuid,
    product_id: Uuid,
    customer_id: Uuid,
    /// 1 to 5 stars.
    rating: i16,
    body: String,
    created_at: DateTime<Utc>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ReviewPage {
    items: Vec<ReviewView>,
    /// Pass as `cursor` for the next page; `null` on the last one.
    next_cursor: Option<String>,
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// 1 to 100, default 20.
    #[param(value_type = Option<i64>)]
    limit: Option<String>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// The product's seller and name, if it is on sale.
async fn live_product(
    db: impl sqlx::PgExecutor<'_>,
    id: Uuid,
) -> std::result::Result<(Uuid, String), Error> {
    let found: Option<(Uuid, String)> =
        sqlx::query_as("SELECT seller_id, name FROM products WHERE id = $1 AND deleted_at IS NULL")
            .bind(id)
            .fetch_optional(db)
            .await?;
    found.ok_or_else(|| ApiError::NotFound("no such product".into()).into())
}

/// A product's reviews, newest first.
#[utoipa::path(
    get, path = "/api/v1/products/{id}/reviews", tag = "reviews",
    params(("id" = Uuid, Path), PageParams),
    responses(
        (status = 200, body = ReviewPage),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid parameters, listed in `errors`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    Path(id): Path<String>,
    params: std::result::Result<Query<PageParams>, QueryRejection>,
) -> Result<Json<ReviewPage>> {
    let id = path_id(&id, "product")?;
    let params = query(params)?;
    let mut problems = Problems::default();
    let limit = problems.check("limit", Limit::parse(params.limit.as_deref()));
    let cursor = problems
        .check("cursor", Cursor::parse(params.cursor.as_deref(), false))
        .flatten();
    problems.into_result()?;
    let limit = limit.map_or(Limit::DEFAULT, Limit::get);
    live_product(&state.pool, id).await?;
    let mut items: Vec<ReviewView> = sqlx::query_as(
        "SELECT id, product_id, customer_id, rating, body, created_at FROM reviews \
         WHERE product_id = $1 AND ($2::uuid IS NULL OR id < $2) ORDER BY id DESC LIMIT $3",
    )
    .bind(id)
    .bind(cursor.map(|c| c.id))
    .bind(limit + 1)
    .fetch_all(&state.pool)
    .await?;
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let more = items.len() > limit;
    items.truncate(limit);
    let next_cursor = match items.last() {
        Some(last) if more => Some(
            Cursor {
                rank: None,
                id: last.id,
            }
            .encode(),
        ),
        _ => None,
    };
    Ok(Json(ReviewPage { items, next_cursor }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewReview {
    /// 1 to 5 stars.
    #[schema(required = true, example = 5)]
    rating: Option<i64>,
    /// 1 to 5,000 characters.
    #[schema(required = true, example = "Keeps tea hot for an hour.")]
    body: Option<String>,
}

/// Reviews a product (customers who bought it, once each). Its seller is told by email.
#[utoipa::path(
    post, path = "/api/v1/products/{id}/reviews", tag = "reviews",
    params(("id" = Uuid, Path)),
    request_body = NewReview,
    security(("bearer" = [])),
    responses(
        (status = 201, body = ReviewView),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not a customer, or has not bought the product", body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Already reviewed by this customer", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields, listed in `errors`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    caller: AuthUser,
    Path(id): Path<String>,
    Json(request): Json<NewReview>,
) -> Result<(StatusCode, Json<ReviewView>)> {
    let id = path_id(&id, "product")?;
    if !caller.has_role(Role::Customer) {
        return Err(Error::Refused("only customers review products"));
    }
    let (seller_id, product_name) = live_product(&state.pool, id).await?;
    let mut problems = Problems::default();
    let rating = problems.require("rating", request.rating, Rating::parse);
    let body = problems.require("body", request.body, |b| ReviewBody::parse(&b));
    problems.into_result()?;
    let (Some(rating), Some(body)) = (rating, body) else {
        return Err(anyhow::anyhow!("validated fields missing").into());
    };
    let customer_id = caller.id();
    let bought: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM purchases WHERE customer_id = $1 AND product_id = $2)",
    )
    .bind(customer_id)
    .bind(id)
    .fetch_one(&state.pool)
    .await?;
    if !bought {
        return Err(Error::Refused(
            "only customers who bought this product can review it",
        ));
    }

    let review_id = Uuid::now_v7();
    let mut tx = state.pool.begin().await?;
    let review: ReviewView = sqlx::query_as(
        "INSERT INTO reviews (id, product_id, customer_id, rating, body) \
         VALUES ($1, $2, $3, $4, $5) \
         RETURNING id, product_id, customer_id, rating, body, created_at",
    )
    .bind(review_id)
    .bind(id)
    .bind(customer_id)
    .bind(rating.get())
    .bind(body.as_str())
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| {
        ApiError::from_db(
            e,
            &[(
                "reviews_one_per_customer",
                "you have already reviewed this product",
            )],
        )
    })?;
    let created = ReviewCreated {
        review_id,
        product_id: id,
        product_name,
        seller_id,
        customer_id,
        rating: review.rating,
        body: review.body.clone(),
        created_at: review.created_at,
    };
    state
        .outbox
        .enqueue(&mut tx, created.to_new(review_id))
        .await?;
    tx.commit().await?;
    tracing::info!(review = %review_id, product = %id, "review created");
    Ok((StatusCode::CREATED, Json(review)))
}
