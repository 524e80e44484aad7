//! The OpenAPI document of the whole API, merged from each service's own
//! `/openapi.json` (so the gateway need not be rebuilt when a service adds a route), and
//! a Swagger UI page to read and try it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Map, Value, json};
use tokio::sync::Mutex;
use utoipa_swagger_ui::{Config, SwaggerUi};

use crate::AppState;
use crate::proxy::Upstream;

const DOC_PATH: &str = "/api/v1/openapi.json";
/// Services change their document only when redeployed.
const CACHE_FOR: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Docs {
    upstreams: HashMap<Upstream, String>,
    client: reqwest::Client,
    cached: Arc<Mutex<Option<(Instant, Value)>>>,
}

impl Docs {
    pub fn new(upstreams: HashMap<Upstream, String>, client: reqwest::Client) -> Self {
        Self {
            upstreams,
            client,
            cached: Arc::default(),
        }
    }

    /// The service's document; an empty one when it documents no routes (404), `None`
    /// when it does not answer.
    async fn fetch(&self, upstream: Upstream) -> Option<Value> {
        let url = format!("{}/openapi.json", self.upstreams.get(&upstream)?);
        let response = self.client.get(url).send().await.ok()?;
        match response.status() {
            s if s.is_success() => response.json().await.ok(),
            reqwest::StatusCode::NOT_FOUND => Some(json!({})),
            _ => None,
        }
    }

    async fn merged(&self) -> Value {
        let mut cached = self.cached.lock().await;
        if let Some((at, doc)) = cached.as_ref()
            && at.elapsed() < CACHE_FOR
        {
            return doc.clone();
        }
        let fragments =
            futures_util::future::join_all(Upstream::ALL.into_iter().map(|u| self.fetch(u))).await;
        let mut paths = Map::new();
        let mut schemas = Map::new();
        let mut missing = Vec::new();
        for (upstream, fragment) in Upstream::ALL.into_iter().zip(fragments) {
            let Some(fragment) = fragment else {
                missing.push(upstream.name());
                continue;
            };
            if let Some(Value::Object(p)) = fragment.get("paths") {
                paths.extend(p.clone());
            }
            if let Some(Value::Object(s)) = fragment.pointer("/components/schemas") {
                schemas.extend(s.clone());
            }
        }
        // The dead-letter routes are every service's and the gateway's join of them.
        let dead_letters = shared::admin::openapi_json();
        if let Some(Value::Object(p)) = dead_letters.get("paths") {
            paths.extend(p.clone());
        }
        if let Some(Value::Object(s)) = dead_letters.pointer("/components/schemas") {
            schemas.extend(s.clone());
        }
        let doc = json!({
            "openapi": "3.1.0",
            "info": {
                "title": "Commerce API",
                "version": env!("CARGO_PKG_VERSION"),
                "description": "Every route goes through the gateway. Errors are \
                    application/problem+json. Send `Authorization: Bearer <access_token>` \
                    from POST /api/v1/auth/login.",
            },
            "paths": paths,
            "components": {
                "schemas": schemas,
                "securitySchemes": {
                    "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
                },
            },
            "x-services-not-answering": missing,
        });
        // A document missing services is not kept: they may be starting.
        if missing.is_empty() {
            *cached = Some((Instant::now(), doc.clone()));
        }
        doc
    }
}

async fn openapi(State(state): State<AppState>) -> Response {
    Json(state.docs.merged().await).into_response()
}

pub fn router(state: AppState) -> Router {
    let ui: Router = SwaggerUi::new("/api/v1/docs")
        .config(Config::new([DOC_PATH]))
        .into();
    Router::new()
        .route(DOC_PATH, get(openapi))
        .with_state(state)
        .merge(ui)
}
