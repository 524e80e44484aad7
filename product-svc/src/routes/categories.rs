//! The category tree. Products name their category by slug.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use shared::auth::{AuthUser, Role};
use shared::http::{ApiError, Json, Problem};
use uuid::Uuid;

use super::Result;
use crate::AppState;
use crate::domain::{CategoryName, Problems, Slug};
use crate::store::{self, CategoryNode};

#[derive(Serialize, utoipa::ToSchema)]
pub struct CategoryTree {
    /// The top-level categories, each with its sub-categories.
    items: Vec<CategoryNode>,
}

/// Every category, as a tree sorted by name at each level.
#[utoipa::path(
    get, path = "/api/v1/categories", tag = "categories",
    responses((status = 200, body = CategoryTree))
)]
pub async fn tree(State(state): State<AppState>) -> Result<Json<CategoryTree>> {
    Ok(Json(CategoryTree {
        items: store::category_tree(&state.pool).await?,
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCategory {
    /// 1 to 100 characters.
    #[schema(required = true, example = "Kitchen")]
    name: Option<String>,
    /// Unique; a-z, 0-9 and inner hyphens, up to 64 characters.
    #[schema(required = true, example = "kitchen")]
    slug: Option<String>,
    /// The parent category's slug; none for a top-level category.
    #[schema(example = "home")]
    parent: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct CategoryView {
    id: Uuid,
    slug: String,
    name: String,
    /// The parent's slug.
    parent: Option<String>,
    created_at: DateTime<Utc>,
}

/// Adds a category (admins), under `parent` if given.
#[utoipa::path(
    post, path = "/api/v1/categories", tag = "categories",
    request_body = NewCategory,
    security(("bearer" = [])),
    responses(
        (status = 201, body = CategoryView),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Not an admin", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The slug is taken", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Invalid fields, listed in `errors`", body = Problem, content_type = "application/problem+json"),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    caller: AuthUser,
    Json(request): Json<NewCategory>,
) -> Result<Response> {
    caller.require_any(&[Role::Admin])?;
    let mut problems = Problems::default();
    let name = problems.require("name", request.name, |n| CategoryName::parse(&n));
    let slug = problems.require("slug", request.slug, |s| Slug::parse(&s));
    let parent = request
        .parent
        .and_then(|p| problems.check("parent", Slug::parse(&p)));
    let mut tx = state.pool.begin().await?;
    let parent_id = match &parent {
        Some(parent) => {
            let id = store::category_id(&mut *tx, parent).await?;
            if id.is_none() {
                problems.add(
                    "parent",
                    format!("there is no category {}", parent.as_str()),
                );
            }
            id
        }
        None => None,
    };
    problems.into_result()?;
    let (Some(name), Some(slug)) = (name, slug) else {
        return Err(anyhow::anyhow!("validated fields missing").into());
    };
    let id = Uuid::now_v7();
    let created_at: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO categories (id, slug, name, parent_id) VALUES ($1, $2, $3, $4) \
         RETURNING created_at",
    )
    .bind(id)
    .bind(slug.as_str())
    .bind(name.as_str())
    .bind(parent_id)
    .fetch_one(&mut *tx)
    .await
    .map_err(|e| {
        ApiError::from_db(
            e,
            &[(
                "categories_slug_unique",
                "a category with this slug already exists",
            )],
        )
    })?;
    tx.commit().await?;
    tracing::info!(category = %id, slug = slug.as_str(), "category created");
    let view = CategoryView {
        id,
        slug: slug.as_str().to_owned(),
        name: name.as_str().to_owned(),
        parent: parent.map(|p| p.as_str().to_owned()),
        created_at,
    };
    Ok((StatusCode::CREATED, Json(view)).into_response())
}
