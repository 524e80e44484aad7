//! Product images (DESIGN.md §6, §7): upload, then serve the image and its thumbnail.

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{DefaultBodyLimit, FromRequest as _, Multipart, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use sha2::Digest as _;
use shared::auth::{AuthUser, Role};
use shared::events::{Event as _, FileUploaded};
use shared::http::{ApiError, FieldError, Json, Problem};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::AppState;
use crate::domain::{ContentHash, ImageKind, SNIFF_LEN};
use crate::imaging::{self, Processed};
use crate::products::Product;

/// Room for the multipart framing around the file (boundaries, part headers).
pub const MULTIPART_OVERHEAD: u64 = 64 * 1024;

const IMMUTABLE: &str = "public, max-age=31536000, immutable";
const NO_PRODUCT: &str = "no such product";
const NO_FILE: &str = "no such file";
const ACCEPTED_KINDS: &str = "JPEG, PNG, WebP or GIF";

/// This service's part of the API document; the gateway merges it with the others'.
#[derive(utoipa::OpenApi)]
#[openapi(
    paths(upload, original, thumbnail),
    components(schemas(UploadedImage, ImageUpload, Problem, FieldError)),
    tags((name = "files", description = "Product images"))
)]
pub struct ApiDoc;

pub fn router(state: AppState, upload_body_limit: usize) -> Router {
    Router::new()
        .route(
            "/openapi.json",
            get(|| async { Json(<ApiDoc as utoipa::OpenApi>::openapi()) }),
        )
        .route(
            "/api/v1/products/{id}/images",
            post(upload).layer(DefaultBodyLimit::max(upload_body_limit)),
        )
        .route("/api/v1/files/{id}", get(original))
        .route("/api/v1/files/{id}/thumbnail", get(thumbnail))
        .with_state(state)
}

/// The body of an upload.
#[derive(utoipa::ToSchema)]
#[allow(
    dead_code,
    reason = "describes the multipart form for the API document only"
)]
struct ImageUpload {
    /// The image: JPEG, PNG, WebP or GIF, decided by its content (not its name or
    /// declared type). The only field.
    #[schema(content_media_type = "application/octet-stream")]
    file: Vec<u8>,
}

/// A stored image.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UploadedImage {
    pub id: Uuid,
    pub product_id: Uuid,
    #[schema(example = "/api/v1/files/0193a0c4-5b7e-7d2a-9f10-6a1b2c3d4e5f")]
    pub url: String,
    #[schema(example = "/api/v1/files/0193a0c4-5b7e-7d2a-9f10-6a1b2c3d4e5f/thumbnail")]
    pub thumbnail_url: String,
    #[schema(example = "image/png")]
    pub content_type: String,
    /// Size of the image in bytes.
    pub bytes: i64,
    pub width: u32,
    pub height: u32,
}

fn url(id: Uuid) -> String {
    format!("/api/v1/files/{id}")
}

fn thumbnail_url(id: Uuid) -> String {
    format!("/api/v1/files/{id}/thumbnail")
}

/// An upload refused: an API error, or a problem with a status `ApiError` has no
/// variant for (413, 415, multipart errors).
#[derive(Debug)]
enum Refused {
    Api(ApiError),
    Status(StatusCode, String),
}

impl From<ApiError> for Refused {
    fn from(error: ApiError) -> Self {
        Self::Api(error)
    }
}

impl From<sqlx::Error> for Refused {
    fn from(error: sqlx::Error) -> Self {
        Self::Api(error.into())
    }
}

impl From<anyhow::Error> for Refused {
    fn from(error: anyhow::Error) -> Self {
        Self::Api(error.into())
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Self::Api(error) => error.into_response(),
            Self::Status(status, detail) => Problem::new(status, Some(detail)).into_response(),
        }
    }
}

fn invalid(field: &str, message: impl Into<String>) -> Refused {
    Refused::Api(ApiError::Validation(vec![FieldError {
        field: field.to_owned(),
        message: message.into(),
    }]))
}

fn unsupported_type() -> Refused {
    Refused::Status(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        format!(
            "the file is not a {ACCEPTED_KINDS} image (decided by its content, not by its name \
             or declared type)"
        ),
    )
}

fn too_large(max: u64) -> Refused {
    Refused::Status(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the file is larger than {max} bytes"),
    )
}

/// A multipart body that cannot be read is the client's doing (or the body limit's):
/// never a 500.
fn unreadable(error: &axum::extract::multipart::MultipartError) -> Refused {
    let over_limit = error.status() == StatusCode::PAYLOAD_TOO_LARGE
        || std::iter::successors(Some(error as &(dyn std::error::Error + 'static)), |e| {
            e.source()
        })
        .any(|e| e.is::<http_body_util::LengthLimitError>());
    if over_limit {
        return Refused::Status(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the request body is too large".into(),
        );
    }
    Refused::Status(
        StatusCode::BAD_REQUEST,
        format!(
            "the multipart body could not be read: {}",
            error.body_text()
        ),
    )
}

/// The file part of an upload, read whole and checked.
struct Upload {
    bytes: Vec<u8>,
    kind: ImageKind,
    hash: ContentHash,
}

/// Reads the form: exactly one field, `file`. The file is read chunk by chunk and
/// refused as soon as it passes `max_bytes` or its first bytes are not an accepted image.
async fn read_form(multipart: &mut Multipart, max_bytes: u64) -> Result<Upload, Refused> {
    let mut upload = None;
    while let Some(mut field) = multipart.next_field().await.map_err(|e| unreadable(&e))? {
        match field.name() {
            Some("file") if upload.is_some() => {
                return Err(invalid("file", "send one file per request"));
            }
            Some("file") => upload = Some(read_file(&mut field, max_bytes).await?),
            other => {
                // Not read any further: its size is unknown and it is refused anyway.
                let name = other.filter(|n| !n.is_empty()).unwrap_or("(unnamed)");
                let mut errors = Vec::new();
                if upload.is_none() {
                    errors.push(file_required());
                }
                errors.push(FieldError {
                    field: name.to_owned(),
                    message: "unexpected field; the form takes only `file`".into(),
                });
                return Err(ApiError::Validation(errors).into());
            }
        }
    }
    upload.ok_or_else(|| ApiError::Validation(vec![file_required()]).into())
}

fn file_required() -> FieldError {
    FieldError {
        field: "file".into(),
        message: "is required: a multipart field named `file` holding the image".into(),
    }
}

async fn read_file(
    field: &mut axum::extract::multipart::Field<'_>,
    max_bytes: u64,
) -> Result<Upload, Refused> {
    let mut bytes = Vec::new();
    let mut hasher = sha2::Sha256::new();
    let mut kind = None;
    while let Some(chunk) = field.chunk().await.map_err(|e| unreadable(&e))? {
        if (bytes.len() + chunk.len()) as u64 > max_bytes {
            return Err(too_large(max_bytes));
        }
        hasher.update(&chunk);
        bytes.extend_from_slice(&chunk);
        if kind.is_none() && bytes.len() >= SNIFF_LEN {
            kind = Some(ImageKind::sniff(&bytes).ok_or_else(unsupported_type)?);
        }
    }
    if bytes.is_empty() {
        return Err(invalid("file", "is empty"));
    }
    let kind = match kind {
        Some(kind) => kind,
        None => ImageKind::sniff(&bytes).ok_or_else(unsupported_type)?,
    };
    Ok(Upload {
        bytes,
        kind,
        hash: ContentHash::from_digest(&hasher.finalize()),
    })
}

#[derive(sqlx::FromRow)]
struct FileRow {
    id: Uuid,
    product_id: Uuid,
    content_type: String,
    bytes: i64,
    width: i32,
    height: i32,
}

impl FileRow {
    fn view(self) -> UploadedImage {
        UploadedImage {
            id: self.id,
            product_id: self.product_id,
            url: url(self.id),
            thumbnail_url: thumbnail_url(self.id),
            content_type: self.content_type,
            bytes: self.bytes,
            width: u32::try_from(self.width).unwrap_or_default(),
            height: u32::try_from(self.height).unwrap_or_default(),
        }
    }
}

async fn same_content(
    state: &AppState,
    product: Uuid,
    hash: &ContentHash,
) -> Result<Option<UploadedImage>, sqlx::Error> {
    let row: Option<FileRow> = sqlx::query_as(
        "SELECT id, product_id, content_type, bytes, width, height FROM files \
         WHERE product_id = $1 AND sha256 = $2",
    )
    .bind(product)
    .bind(hash.as_str())
    .fetch_optional(&state.pool)
    .await?;
    Ok(row.map(FileRow::view))
}

/// Decodes and thumbnails off the async runtime, a bounded number at a time: a decoded
/// image may take up to `max_pixels` × 8 bytes.
async fn process(state: &AppState, upload: Upload) -> Result<(Upload, Processed), Refused> {
    let _permit = state
        .decoding
        .acquire()
        .await
        .map_err(|e| anyhow::anyhow!("decoding closed: {e}"))?;
    let limits = state.limits;
    let span = tracing::Span::current();
    let (upload, processed) = tokio::task::spawn_blocking(move || {
        let processed = span.in_scope(|| imaging::process(&upload.bytes, upload.kind, limits));
        (upload, processed)
    })
    .instrument(tracing::Span::current())
    .await
    .map_err(|e| anyhow::anyhow!("image task failed: {e}"))?;
    match processed {
        Ok(processed) => Ok((upload, processed)),
        Err(refusal) => {
            tracing::info!(%refusal, kind = upload.kind.name(), "image refused");
            Err(invalid("file", refusal.to_string()))
        }
    }
}

/// Uploads an image of a product.
///
/// The type is decided by the file's content. The image's size is read from its header
/// and an image over the pixel limit is refused before it is decoded. Uploading the same
/// bytes again for the same product answers 200 with the image already stored.
#[utoipa::path(
    post, path = "/api/v1/products/{id}/images", tag = "files",
    params(("id" = Uuid, Path, description = "The product")),
    request_body(content = inline(ImageUpload), content_type = "multipart/form-data"),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Stored; `file.uploaded` is published", body = UploadedImage,
            headers(("location" = String, description = "The image's URL"))),
        (status = 200, description = "These bytes were already uploaded for this product", body = UploadedImage),
        (status = 400, description = "The multipart body is malformed", body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "Neither the product's seller nor an admin", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such product (or it was deleted)", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "The file is over the size limit", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not multipart, or the file is not a JPEG, PNG, WebP or GIF image", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "No `file` field, another field, an empty or undecodable image, or one over the pixel limit; listed in `errors`", body = Problem, content_type = "application/problem+json"),
    )
)]
#[tracing::instrument(skip_all, fields(product_id = tracing::field::Empty))]
async fn upload(
    State(state): State<AppState>,
    caller: AuthUser,
    id: Result<Path<Uuid>, PathRejection>,
    request: Request,
) -> Result<Response, Refused> {
    // A path that is no id names no product.
    let Ok(Path(product_id)) = id else {
        return Err(ApiError::NotFound(NO_PRODUCT.into()).into());
    };
    tracing::Span::current().record("product_id", tracing::field::display(product_id));
    caller.require_any(&[Role::Seller, Role::Admin])?;
    let product = Product::find(&mut *state.pool.acquire().await?, product_id, false)
        .await?
        .ok_or_else(|| ApiError::NotFound(NO_PRODUCT.into()))?;
    caller.require_owner_or_admin(product.seller_id)?;

    let multipart_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("multipart/form-data")
        });
    if !multipart_type {
        return Err(Refused::Status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the image as multipart/form-data with one field named `file`".into(),
        ));
    }
    let mut multipart = Multipart::from_request(request, &())
        .await
        .map_err(|rejection| {
            Refused::Status(
                StatusCode::BAD_REQUEST,
                format!(
                    "the multipart body cannot be read: {}",
                    rejection.body_text()
                ),
            )
        })?;
    let upload = read_form(&mut multipart, state.max_bytes).await?;
    drop(multipart);

    if let Some(existing) = same_content(&state, product_id, &upload.hash).await? {
        return Ok((StatusCode::OK, Json(existing)).into_response());
    }
    let (upload, processed) = process(&state, upload).await?;
    let kind = upload.kind;
    let hash = upload.hash.clone();
    let bytes = upload.bytes.len();
    let thumbnail_hash = ContentHash::of(&processed.thumbnail);

    // Files first: a row must never point at bytes that are not there. A failure after
    // this leaves only unreferenced content-addressed files behind.
    let storage = state.storage.clone();
    let thumb_hash = thumbnail_hash.clone();
    let thumb = tokio::task::spawn_blocking(move || {
        storage.put(&upload.hash, &upload.bytes)?;
        storage.put(&thumb_hash, &processed.thumbnail)?;
        Ok::<_, std::io::Error>(processed)
    })
    .await
    .map_err(|e| anyhow::anyhow!("storage task failed: {e}"))?
    .map_err(|e| anyhow::anyhow!("storing an image: {e}"))?;

    let id = Uuid::now_v7();
    let view = UploadedImage {
        id,
        product_id,
        url: url(id),
        thumbnail_url: thumbnail_url(id),
        content_type: kind.content_type().into(),
        bytes: i64::try_from(bytes).unwrap_or(i64::MAX),
        width: thumb.width,
        height: thumb.height,
    };
    let mut tx = state.pool.begin().await?;
    // Checked again under a lock: the product may have been deleted meanwhile.
    let product = Product::find(&mut tx, product_id, true)
        .await?
        .ok_or_else(|| ApiError::NotFound(NO_PRODUCT.into()))?;
    caller.require_owner_or_admin(product.seller_id)?;
    let inserted = sqlx::query(
        "INSERT INTO files (id, product_id, uploaded_by, sha256, content_type, bytes, width, \
         height, thumbnail_sha256, thumbnail_content_type, thumbnail_bytes) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
         ON CONFLICT (product_id, sha256) DO NOTHING",
    )
    .bind(id)
    .bind(product_id)
    .bind(caller.id())
    .bind(hash.as_str())
    .bind(&view.content_type)
    .bind(view.bytes)
    .bind(i32::try_from(view.width).unwrap_or(i32::MAX))
    .bind(i32::try_from(view.height).unwrap_or(i32::MAX))
    .bind(thumbnail_hash.as_str())
    .bind(thumb.thumbnail_kind.content_type())
    .bind(i64::try_from(thumb.thumbnail.len()).unwrap_or(i64::MAX))
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        // The same bytes, uploaded concurrently: that upload's image is this one.
        tx.rollback().await?;
        let existing = same_content(&state, product_id, &hash)
            .await?
            .ok_or_else(|| anyhow::anyhow!("a conflicting upload vanished"))?;
        return Ok((StatusCode::OK, Json(existing)).into_response());
    }
    let event = FileUploaded {
        file_id: id,
        product_id,
        uploaded_by: caller.id(),
        url: view.url.clone(),
        thumbnail_url: view.thumbnail_url.clone(),
        content_type: view.content_type.clone(),
        bytes: view.bytes,
        width: view.width,
        height: view.height,
        uploaded_at: chrono::Utc::now(),
    };
    state
        .outbox
        .enqueue(&mut tx, event.to_new(product_id))
        .await?;
    tx.commit().await?;
    tracing::info!(file_id = %id, bytes = view.bytes, content_type = %view.content_type, "image stored");
    let location = HeaderValue::from_str(&view.url).map_err(anyhow::Error::from)?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(view),
    )
        .into_response())
}

/// Which stored bytes of a file to serve.
#[derive(Clone, Copy)]
enum Variant {
    Original,
    Thumbnail,
}

/// The image.
#[utoipa::path(
    get, path = "/api/v1/files/{id}", tag = "files",
    params(
        ("id" = Uuid, Path, description = "The file"),
        ("if-none-match" = Option<String>, Header, description = "An ETag seen before: 304 if it still matches"),
    ),
    responses(
        (status = 200, description = "The bytes, with a strong `ETag` (their SHA-256) and cached for a year: they never change",
            content(("image/jpeg"), ("image/png"), ("image/webp"), ("image/gif")),
            headers(
                ("etag" = String, description = "SHA-256 of the bytes, quoted"),
                ("cache-control" = String, description = "public, max-age=31536000, immutable"),
            )),
        (status = 304, description = "The ETag given in `If-None-Match` still matches"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    )
)]
async fn original(
    State(state): State<AppState>,
    id: Result<Path<Uuid>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    serve(&state, id, &headers, Variant::Original).await
}

/// The image's thumbnail: its longest side is at most the configured thumbnail size
/// (256 by default). JPEG, or PNG when the image has transparent pixels.
#[utoipa::path(
    get, path = "/api/v1/files/{id}/thumbnail", tag = "files",
    params(
        ("id" = Uuid, Path, description = "The file"),
        ("if-none-match" = Option<String>, Header, description = "An ETag seen before: 304 if it still matches"),
    ),
    responses(
        (status = 200, description = "The thumbnail's bytes, with a strong `ETag` and cached for a year",
            content(("image/jpeg"), ("image/png"))),
        (status = 304, description = "The ETag given in `If-None-Match` still matches"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    )
)]
async fn thumbnail(
    State(state): State<AppState>,
    id: Result<Path<Uuid>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    serve(&state, id, &headers, Variant::Thumbnail).await
}

/// Streams stored bytes from disk, or answers 304 when the client has them.
async fn serve(
    state: &AppState,
    id: Result<Path<Uuid>, PathRejection>,
    headers: &HeaderMap,
    variant: Variant,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::NotFound(NO_FILE.into());
    let Ok(Path(id)) = id else {
        return Err(not_found());
    };
    let sql = match variant {
        Variant::Original => "SELECT sha256, content_type FROM files WHERE id = $1",
        Variant::Thumbnail => {
            "SELECT thumbnail_sha256, thumbnail_content_type FROM files WHERE id = $1"
        }
    };
    let (hash, content_type): (String, String) = sqlx::query_as(sql)
        .bind(id)
        .fetch_optional(&state.pool)
        .await?
        .ok_or_else(not_found)?;
    let hash = ContentHash::parse(&hash)
        .ok_or_else(|| anyhow::anyhow!("file {id} has a malformed hash in the database"))?;

    let response = Response::builder()
        .header(header::ETAG, hash.etag())
        .header(header::CACHE_CONTROL, IMMUTABLE)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| hash.matches_if_none_match(v));
    if fresh {
        return Ok(response
            .status(StatusCode::NOT_MODIFIED)
            .body(Body::empty())
            .map_err(anyhow::Error::from)?);
    }
    let path = state.storage.path(&hash);
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| anyhow::anyhow!("opening {} of file {id}: {e}", path.display()))?;
    let length = file
        .metadata()
        .await
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?
        .len();
    Ok(response
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, length)
        .body(Body::from_stream(
            tokio_util::io::ReaderStream::with_capacity(file, 64 * 1024),
        ))
        .map_err(anyhow::Error::from)?)
}
