//! What the listeners serve: a request to a path of another service goes straight to the
//! proxy, within the request context every request gets, instead of through axum's
//! routing and its per-route layers (a boxed service cloned and a boxed future per
//! layer and request). Every other request goes to the router: the gateway's own
//! routes, and, when CORS is configured, requests that carry an `Origin`, which the
//! router's CORS layer answers. Both get the security headers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Request};
use axum::http::{StatusCode, header};
use axum::response::Response;
use futures_util::future::BoxFuture;
use shared::http::{Problem, RequestContext};
use tower::Service as _;

use crate::AppState;
use crate::proxy::{self, Upstream};

/// Each proxied route pattern of DESIGN.md §6, as the router would match it.
pub struct ProxiedRoutes(matchit::Router<(&'static str, Upstream)>);

impl ProxiedRoutes {
    pub fn new(routes: &[(&'static str, Upstream)]) -> anyhow::Result<Self> {
        let mut matcher = matchit::Router::new();
        for &(pattern, upstream) in routes {
            matcher.insert(pattern, (pattern, upstream))?;
        }
        Ok(Self(matcher))
    }

    /// The pattern (the metrics' route label) and service of a path.
    fn at(&self, path: &str) -> Option<(&'static str, Upstream)> {
        self.0.at(path).ok().map(|m| *m.value)
    }
}

pub struct Front {
    state: AppState,
    context: RequestContext,
    routes: Arc<ProxiedRoutes>,
    router: Router,
    cors: bool,
}

impl Front {
    pub fn shared(
        state: AppState,
        context: RequestContext,
        routes: Arc<ProxiedRoutes>,
        router: Router,
        cors: bool,
    ) -> Arc<dyn shared::service::Front> {
        Arc::new(Self {
            state,
            context,
            routes,
            router,
            cors,
        })
    }
}

impl shared::service::Front for Front {
    fn call(&self, request: Request) -> BoxFuture<'static, Result<Response, Infallible>> {
        let browser = self.cors && request.headers().contains_key(header::ORIGIN);
        let proxied = if browser {
            None
        } else {
            self.routes.at(request.uri().path())
        };
        let Some((route, upstream)) = proxied else {
            let docs = request.uri().path().starts_with("/api/v1/docs");
            // The router is always ready; a clone is one reference count.
            let routed = self.router.clone().call(request);
            return Box::pin(async move {
                let mut response = routed.await?;
                crate::security_headers(&mut response, docs);
                Ok(response)
            });
        };
        let state = self.state.clone();
        let context = self.context.clone();
        Box::pin(async move {
            let peer = request
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .copied();
            let mut response = context
                .run(route, request, |request| async move {
                    match peer {
                        Some(ConnectInfo(peer)) => {
                            proxy::forward(state, upstream, peer, request).await
                        }
                        // Served without the peer's address: never from a listener.
                        None => axum::response::IntoResponse::into_response(Problem::new(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            Some("the client's address is unknown".into()),
                        )),
                    }
                })
                .await;
            crate::security_headers(&mut response, false);
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxied_paths_match_their_pattern_and_the_gateways_own_paths_do_not() {
        let routes = ProxiedRoutes::new(crate::ROUTES).expect("valid patterns");
        assert_eq!(
            routes.at("/api/v1/users/me"),
            Some(("/api/v1/users/{*rest}", Upstream::User))
        );
        assert_eq!(
            routes.at("/api/v1/products/7/images"),
            Some(("/api/v1/products/{id}/images", Upstream::File))
        );
        assert_eq!(
            routes.at("/api/v1/products/7"),
            Some(("/api/v1/products/{id}", Upstream::Product))
        );
        for own in [
            "/health",
            "/ready",
            "/metrics",
            "/console",
            "/api/v1/openapi.json",
            "/api/v1/docs/",
            shared::admin::BASE,
            "/api/v1/admin/dead-letters/17",
            "/api/v1/nothing",
        ] {
            assert_eq!(routes.at(own), None, "{own}");
        }
    }
}
