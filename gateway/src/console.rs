//! The ops console (issue 6): one static page for on-call engineers, on top of the
//! dead-letter admin API (`admin.rs`). Plain HTML, JS and CSS embedded in the binary, so
//! there is no build step and nothing to deploy beside the gateway.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;

/// The gateway's default policy (`default-src 'none'`) forbids any script, and the docs
/// page needs inline styles. The console needs neither: its own script, style and API
/// calls, all from this origin. No inline code is allowed, so data that slipped into the
/// page unescaped still could not run.
const CONSOLE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; form-action 'none'; base-uri 'none'; \
     frame-ancestors 'none'";

const INDEX: &str = include_str!("../console/index.html");
const SCRIPT: &str = include_str!("../console/console.js");
const STYLE: &str = include_str!("../console/console.css");
const ICON: &str = include_str!("../console/favicon.svg");

pub fn router() -> Router {
    Router::new()
        .route("/console", get(|| async { asset("text/html", INDEX) }))
        // The page's own URL is /console; the trailing-slash form is a common typing.
        .route(
            "/console/",
            get(|| async { Redirect::permanent("/console") }),
        )
        .route(
            "/console/console.js",
            get(|| async { asset("text/javascript", SCRIPT) }),
        )
        .route(
            "/console/console.css",
            get(|| async { asset("text/css", STYLE) }),
        )
        .route(
            "/console/favicon.svg",
            get(|| async { asset("image/svg+xml", ICON) }),
        )
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    let content_type = HeaderValue::from_str(&format!("{kind}; charset=utf-8"))
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    (
        [
            (header::CONTENT_TYPE, content_type),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONSOLE_CSP),
            ),
            // Small files that change with the gateway: always revalidate.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt as _;

    async fn get(path: &str) -> Response {
        router()
            .oneshot(Request::get(path).body(Body::empty()).expect("request"))
            .await
            .expect("response")
    }

    #[tokio::test]
    async fn the_page_and_its_assets_are_served_under_a_policy_that_allows_only_own_files() {
        for (path, kind) in [
            ("/console", "text/html"),
            ("/console/console.js", "text/javascript"),
            ("/console/console.css", "text/css"),
            ("/console/favicon.svg", "image/svg+xml"),
        ] {
            let response = get(path).await;
            assert_eq!(response.status(), StatusCode::OK, "{path}");
            let header = |name| response.headers()[name].to_str().expect("ascii").to_owned();
            assert!(header(header::CONTENT_TYPE).starts_with(kind), "{path}");
            let csp = header(header::CONTENT_SECURITY_POLICY);
            assert!(csp.contains("script-src 'self';"), "{csp}");
            assert!(!csp.contains("unsafe"), "{csp}");
        }
        assert_eq!(
            get("/console/").await.status(),
            StatusCode::PERMANENT_REDIRECT
        );
    }

    #[test]
    fn the_page_has_no_inline_script_or_style_and_renders_data_as_text() {
        assert!(!INDEX.contains("<style"), "styles live in console.css");
        assert!(!INDEX.contains(" style="), "no inline style attributes");
        let handlers = INDEX.split(" on").skip(1).any(|rest| {
            rest.split_once('=')
                .is_some_and(|(name, _)| name.chars().all(|c| c.is_ascii_lowercase()))
        });
        assert!(!handlers, "no inline event handlers");
        let scripts: Vec<&str> = INDEX
            .match_indices("<script")
            .map(|(i, _)| &INDEX[i..])
            .collect();
        assert!(!scripts.is_empty());
        assert!(
            scripts.iter().all(|s| s.starts_with("<script src=")),
            "no inline script"
        );
        assert!(!SCRIPT.contains("innerHTML"), "data is set as textContent");
    }
}
