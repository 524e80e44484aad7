//! What the listeners serve: a request to a path of another service goes straight to the
//! proxy, within the request context every request gets, instead of through axum's
//! routing and its per-route layers (a boxed service cloned and a boxed future per
//! layer and request). Every other request goes to the router: the gateway's own routes
//! and the 404 of unknown paths. Both get the CORS layer, when configured, and the
//! security headers, as every route did when the router served them all.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::future::BoxFuture;
use shared::http::{Problem, RequestContext};
use tower::Service;
use tower_http::cors::{Cors, CorsLayer};

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

/// A request's service and client, for the proxy behind the CORS layer.
#[derive(Clone, Copy)]
struct Destination(Upstream, SocketAddr);

/// The proxy as a service, for the CORS layer to wrap.
#[derive(Clone)]
struct Proxy(AppState);

impl Service<Request> for Proxy {
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let state = self.0.clone();
        Box::pin(async move {
            let Some(Destination(upstream, peer)) = request.extensions().get().copied() else {
                return Ok(unknown());
            };
            Ok(proxy::forward(state, upstream, peer, request).await)
        })
    }
}

async fn through_cors(
    cors: &Cors<Proxy>,
    upstream: Upstream,
    peer: SocketAddr,
    mut request: Request,
) -> Response {
    request.extensions_mut().insert(Destination(upstream, peer));
    let Ok(response) = cors.clone().call(request).await;
    response
}

/// The front always sets the destination: never served.
fn unknown() -> Response {
    Problem::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        Some("the request's service is unknown".to_owned()),
    )
    .into_response()
}

pub struct Front {
    state: AppState,
    context: RequestContext,
    routes: ProxiedRoutes,
    router: Router,
    cors: Option<Arc<Cors<Proxy>>>,
}

impl Front {
    pub fn shared(
        state: AppState,
        context: RequestContext,
        routes: ProxiedRoutes,
        router: Router,
        cors: Option<CorsLayer>,
    ) -> Arc<dyn shared::service::Front> {
        let cors = cors.map(|layer| Arc::new(tower::Layer::layer(&layer, Proxy(state.clone()))));
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
    fn call(
        &self,
        peer: SocketAddr,
        request: Request,
    ) -> BoxFuture<'static, Result<Response, Infallible>> {
        let Some((route, upstream)) = self.routes.at(request.uri().path()) else {
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
        let cors = self.cors.clone();
        Box::pin(async move {
            let mut response = context
                .run(route, request, |request| async move {
                    match cors {
                        // Boxed, so that without CORS the future is not the size of
                        // the layer's.
                        Some(cors) => Box::pin(through_cors(&cors, upstream, peer, request)).await,
                        // Boxed: built once in place, rather than moved through every
                        // layer of the request context at its 2.6 KB.
                        None => Box::pin(proxy::forward(state, upstream, peer, request)).await,
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
