//! A JWKS endpoint serving a test's own signing keys, as user-svc would, so a service
//! can be tested with real tokens without running user-svc.

use std::path::PathBuf;
use std::sync::Arc;

use shared::auth::SigningKeys;
use tokio::task::JoinHandle;

pub struct Jwks {
    /// Set it as `settings.auth.jwks_url`.
    pub url: String,
    /// Signs the test's tokens.
    pub keys: Arc<SigningKeys>,
    dir: PathBuf,
    task: JoinHandle<()>,
}

impl Jwks {
    pub async fn start(namespace: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("commerce-{namespace}-keys"));
        let keys = Arc::new(SigningKeys::open(&dir).expect("signing keys"));
        let served = keys.clone();
        let app = axum::Router::new().route(
            "/.well-known/jwks.json",
            axum::routing::get(move || {
                let keys = served.clone();
                async move { axum::Json(serde_json::to_value(keys.jwks()).expect("jwks")) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!(
            "http://{}/.well-known/jwks.json",
            listener.local_addr().expect("address")
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url,
            keys,
            dir,
            task,
        }
    }
}

impl Drop for Jwks {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
