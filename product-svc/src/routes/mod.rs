//! The catalog's HTTP API (DESIGN.md §6): products, categories, reviews.

mod categories;
mod products;
mod reviews;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Deserializer};
use shared::http::{ApiError, FieldError, Json, Problem};

use crate::AppState;
use crate::cache::LoadError;

/// This service's part of the API document; the gateway merges it with the others'.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(
        products::list,
        products::create,
        products::show,
        products::update,
        products::delete,
        categories::tree,
        categories::create,
        reviews::list,
        reviews::create,
    ),
    components(schemas(Problem, FieldError)),
    tags(
        (name = "products", description = "The catalog"),
        (name = "categories", description = "The category tree"),
        (name = "reviews", description = "Reviews by customers who bought the product"),
    )
)]
pub struct ApiDoc;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route(
            "/openapi.json",
            get(|| async { Json(<ApiDoc as utoipa::OpenApi>::openapi()) }),
        )
        .route(
            "/api/v1/products",
            get(products::list).post(products::create),
        )
        .route(
            "/api/v1/products/{id}",
            get(products::show)
                .patch(products::update)
                .delete(products::delete),
        )
        .route(
            "/api/v1/products/{id}/reviews",
            get(reviews::list).post(reviews::create),
        )
        .route(
            "/api/v1/categories",
            get(categories::tree).post(categories::create),
        )
        .with_state(state)
}

/// What a handler can answer besides success: an [`ApiError`], or a refusal whose reason
/// the client should read.
#[derive(Debug)]
pub enum Error {
    Api(ApiError),
    Refused(&'static str),
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        match self {
            Self::Api(error) => error.into_response(),
            Self::Refused(reason) => {
                Problem::new(StatusCode::FORBIDDEN, Some(reason.into())).into_response()
            }
        }
    }
}

impl From<ApiError> for Error {
    fn from(error: ApiError) -> Self {
        Self::Api(error)
    }
}

impl From<sqlx::Error> for Error {
    fn from(error: sqlx::Error) -> Self {
        Self::Api(error.into())
    }
}

impl From<LoadError> for Error {
    fn from(error: LoadError) -> Self {
        Self::Api(error.into())
    }
}

impl From<anyhow::Error> for Error {
    fn from(error: anyhow::Error) -> Self {
        Self::Api(error.into())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// A JSON body already serialised (from the cache or for it).
fn json_body(body: Bytes) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Query strings that do not parse get a problem+json 400, like bad JSON bodies.
fn query<T>(query: std::result::Result<axum::extract::Query<T>, QueryRejection>) -> Result<T> {
    query
        .map(|q| q.0)
        .map_err(|rejection| ApiError::BadRequest(rejection.body_text()).into())
}

/// For PATCH fields: absent is `None`, `null` is `Some(None)`.
fn present<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}
