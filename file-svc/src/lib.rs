//! file-svc: product image upload, validation, thumbnails, storage and serving.
//!
//! - `POST /api/v1/products/{id}/images`: the product's seller or an admin uploads an
//!   image (multipart, field `file`). The type comes from the bytes, the size is capped
//!   while streaming, the pixel count is checked from the header before decoding, a
//!   thumbnail is made, both are stored under their SHA-256, and `file.uploaded` is
//!   published through the outbox.
//! - `GET /api/v1/files/{id}` and `…/thumbnail`: the bytes, streamed from disk, with a
//!   strong ETag and a year of caching (content-addressed bytes never change).
//! - Sellers come from `product.created` / `.updated` / `.deleted` (a local replica).

// Public for the `images` benchmark.
pub mod domain;
pub mod imaging;
mod products;
mod routes;
mod storage;

use std::sync::Arc;

use axum::extract::FromRef;
use shared::Settings;
use shared::auth::Verifier;
use shared::messaging::Outbox;
use shared::service::{Infra, Needs, Service, Work};
use sqlx::PgPool;
use tokio::sync::Semaphore;

pub use routes::{ApiDoc, UploadedImage};

/// The `image` crate this service decodes with. The end-to-end tests make their images
/// with it until the e2e crate has `image` as a dev-dependency of its own.
pub use image;

/// Names the service's database (`<ns>_file`) and queues (`<ns>.file`).
pub const SERVICE: &str = "file";

static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Clone)]
pub struct AppState {
    pool: PgPool,
    outbox: Outbox,
    verifier: Verifier,
    storage: Arc<storage::Storage>,
    limits: imaging::ImageLimits,
    max_bytes: u64,
    /// Decoded images are large (up to `max_pixels` × 8 bytes): only this many at once.
    decoding: Arc<Semaphore>,
}

impl FromRef<AppState> for Verifier {
    fn from_ref(state: &AppState) -> Self {
        state.verifier.clone()
    }
}

pub struct Application(Service);

impl Application {
    /// Connects, migrates, opens the storage directory, starts the product replica's
    /// consumer and binds its port.
    pub async fn build(mut settings: Settings) -> anyhow::Result<Self> {
        let files = settings.files.clone();
        anyhow::ensure!(
            files.max_bytes > 0 && files.max_pixels > 0 && files.thumbnail_size > 0,
            "COMMERCE__FILES__MAX_BYTES, …__MAX_PIXELS and …__THUMBNAIL_SIZE must be positive"
        );
        let upload_body_limit =
            usize::try_from(files.max_bytes.saturating_add(routes::MULTIPART_OVERHEAD))
                .unwrap_or(usize::MAX);
        // The shared layer applies one body limit to every route; the upload route needs
        // the file limit plus its multipart framing. Uploads enforce `max_bytes` on the
        // file itself, and this service takes no other request bodies.
        settings.http.body_limit_bytes = settings.http.body_limit_bytes.max(upload_body_limit);

        let needs = Needs {
            database: Some(Some(&MIGRATIONS)),
            redis: false,
        };
        let infra = Infra::connect(SERVICE, &settings, needs).await?;
        let storage = storage::Storage::open(&files.dir)?;
        let parallelism = std::thread::available_parallelism().map_or(2, |n| n.get());
        let state = AppState {
            pool: infra.pool()?.clone(),
            outbox: infra.outbox.clone(),
            verifier: Verifier::remote(&settings),
            storage: Arc::new(storage),
            limits: imaging::ImageLimits {
                max_pixels: files.max_pixels,
                thumbnail_size: files.thumbnail_size,
            },
            max_bytes: files.max_bytes,
            decoding: Arc::new(Semaphore::new(parallelism)),
        };
        let work = Work {
            handlers: vec![
                Arc::new(products::OnProductCreated),
                Arc::new(products::OnProductUpdated),
                Arc::new(products::OnProductDeleted),
            ],
            ..Work::default()
        };
        let service = Service::start(
            infra,
            settings.file.port,
            routes::router(state, upload_body_limit),
            work,
        )
        .await?;
        Ok(Self(service))
    }

    pub fn port(&self) -> u16 {
        self.0.port()
    }

    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.0.run_until_stopped().await
    }
}

impl From<Application> for Service {
    fn from(app: Application) -> Self {
        app.0
    }
}
