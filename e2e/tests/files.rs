//! Product images through the gateway (issue 4, part 4): who may upload, what is
//! refused and why, what is stored and served, and the product replica file-svc keeps
//! from product events.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::Path;
use std::time::Duration;

use e2e::upload::{Part, encode, file_part, multipart, multipart_type, png};
use e2e::{PASSWORD, Stack, StackOptions, Svc};
use file_svc::image::{self, DynamicImage, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
use futures_util::future::BoxFuture;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use shared::messaging::outbox::{self, OutboxMessage};
use shared::messaging::{Broker, Relay};
use testkit::{TestEnv, eventually};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

// ---------------------------------------------------------------------------------------
// Images made in memory

/// An opaque photo-like JPEG.
fn jpeg(width: u32, height: u32) -> Vec<u8> {
    encode(
        DynamicImage::ImageRgb8(RgbImage::from_fn(width, height, |x, y| {
            Rgb([(x % 256) as u8, 120, (y % 256) as u8])
        })),
        ImageFormat::Jpeg,
    )
}

/// Noise does not compress: a PNG about `width × height × 3` bytes long.
fn noisy_png(width: u32, height: u32) -> Vec<u8> {
    let mut seed = 0x2545_f491_u32;
    encode(
        DynamicImage::ImageRgb8(RgbImage::from_fn(width, height, |_, _| {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            let [a, b, c, _] = seed.to_le_bytes();
            Rgb([a, b, c])
        })),
        ImageFormat::Png,
    )
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut chunk = u32::try_from(data.len())
        .expect("small")
        .to_be_bytes()
        .to_vec();
    let mut body = kind.to_vec();
    body.extend_from_slice(data);
    chunk.extend_from_slice(&body);
    chunk.extend_from_slice(&crc32(&body).to_be_bytes());
    chunk
}

/// A well-formed PNG of a few dozen bytes whose header declares `width × height` RGB
/// pixels: decoding it would need width × height × 3 bytes.
fn bomb_png(width: u32, height: u32) -> Vec<u8> {
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8 bits, RGB, deflate, no filter, no interlace
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(png_chunk(b"IHDR", &ihdr));
    // zlib of four zero bytes: a start, never reached.
    png.extend(png_chunk(
        b"IDAT",
        &[120, 156, 99, 96, 96, 96, 0, 0, 0, 4, 0, 1],
    ));
    png.extend(png_chunk(b"IEND", &[]));
    png
}

// ---------------------------------------------------------------------------------------
// Product events, published as product-svc would: through an outbox and its relay

struct ProductEvents {
    publish: Box<dyn Fn(OutboxMessage) -> BoxFuture<'static, ()> + Send + Sync>,
    events_exchange: String,
    stop: CancellationToken,
}

impl ProductEvents {
    async fn start(env: &TestEnv) -> Self {
        let settings = env.settings();
        let topology = env.topology("product");
        let pool = env.database("product").await;
        let stop = CancellationToken::new();
        let relay = Relay::new(
            pool.clone(),
            Broker::new(settings.amqp.url.clone(), "test.product-events"),
            &topology,
            Duration::from_millis(100),
            100,
        );
        tokio::spawn(relay.run(stop.clone()));
        let publish = move |message: OutboxMessage| -> BoxFuture<'static, ()> {
            let pool = pool.clone();
            Box::pin(async move {
                let mut tx = pool.begin().await.expect("begin");
                outbox::insert(&mut tx, &message).await.expect("outbox");
                tx.commit().await.expect("commit");
            })
        };
        Self {
            publish: Box::new(publish),
            events_exchange: topology.events_exchange(),
            stop,
        }
    }

    /// Publishes one event with message id `id` (the same id twice is a redelivery).
    async fn send(&self, id: Uuid, event_type: &str, product: Uuid, data: Value) {
        let envelope = json!({
            "id": id, "type": event_type, "version": 1, "occurred_at": chrono::Utc::now(),
            "source": "product-svc", "correlation_id": product, "causation_id": null,
            "data": data,
        });
        (self.publish)(OutboxMessage {
            message_id: id,
            exchange: self.events_exchange.clone(),
            routing_key: event_type.to_owned(),
            event_type: event_type.to_owned(),
            correlation_id: Some(product.to_string()),
            headers: serde_json::Map::new(),
            body: serde_json::to_vec(&envelope).expect("json"),
        })
        .await;
    }

    async fn created(&self, product: Uuid, seller: Uuid, at: chrono::DateTime<chrono::Utc>) {
        let data = json!({
            "product_id": product, "seller_id": seller, "name": "Lamp", "price_cents": 1999,
            "currency": "EUR", "category": null, "initial_stock": 5, "created_at": at,
        });
        self.send(Uuid::now_v7(), "product.created", product, data)
            .await;
    }

    async fn updated(&self, product: Uuid, seller: Uuid, at: chrono::DateTime<chrono::Utc>) {
        let data = json!({
            "product_id": product, "seller_id": seller, "name": "Lamp", "price_cents": 2499,
            "currency": "EUR", "category": null, "updated_at": at,
        });
        self.send(Uuid::now_v7(), "product.updated", product, data)
            .await;
    }

    async fn deleted(&self, id: Uuid, product: Uuid, seller: Uuid) {
        let data = json!({
            "product_id": product, "seller_id": seller, "deleted_at": chrono::Utc::now(),
        });
        self.send(id, "product.deleted", product, data).await;
    }
}

impl Drop for ProductEvents {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

// ---------------------------------------------------------------------------------------
// The system, and what a client of it does

struct Files {
    stack: Stack,
    products: ProductEvents,
}

impl Files {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    async fn start_with(configure: impl FnOnce(&mut shared::Settings) + 'static) -> Self {
        let stack = Stack::start_with(StackOptions {
            services: vec![Svc::File],
            configure: Box::new(configure),
            ..StackOptions::default()
        })
        .await;
        let products = ProductEvents::start(stack.env()).await;
        Self { stack, products }
    }

    /// A product of `seller`, once file-svc knows of it.
    async fn product_of(&self, seller: (&str, Uuid)) -> Uuid {
        let product = Uuid::now_v7();
        self.products
            .created(product, seller.1, chrono::Utc::now())
            .await;
        self.wait_for_access(seller.0, product, StatusCode::UNSUPPORTED_MEDIA_TYPE)
            .await;
        product
    }

    /// Waits until a probe upload by `token` gets `expected`: 404 while file-svc does
    /// not know the product, 403 for someone else's, 415 (the probe is no image) once
    /// the caller may upload. The probe is refused either way, so it changes nothing.
    async fn wait_for_access(&self, token: &str, product: Uuid, expected: StatusCode) {
        eventually(&format!("an upload probe to get {expected}"), || async {
            let response = self
                .stack
                .api(Method::POST, &format!("/products/{product}/images"))
                .bearer_auth(token)
                .header("content-type", "text/plain")
                .body("probe")
                .send()
                .await
                .ok()?;
            (response.status() == expected).then_some(())
        })
        .await;
    }

    async fn upload(&self, token: &str, product: Uuid, body: Vec<u8>) -> (StatusCode, Value) {
        let response = self
            .stack
            .api(Method::POST, &format!("/products/{product}/images"))
            .bearer_auth(token)
            .header("content-type", multipart_type())
            .body(body)
            .send()
            .await
            .expect("upload");
        problem_or_json(response).await
    }

    async fn upload_file(&self, token: &str, product: Uuid, name: &str, bytes: &[u8]) -> Value {
        let content_type = if name.ends_with(".png") {
            "image/png"
        } else {
            "image/jpeg"
        };
        let (status, body) = self
            .upload(
                token,
                product,
                multipart(&[file_part(name, content_type, bytes)]),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body
    }

    fn storage(&self) -> BTreeMap<String, u64> {
        listing(&self.stack.settings.files.dir)
    }

    /// `messages_total` of file-svc for one handler and outcome, from its `/metrics`.
    async fn messages(&self, handler: &str, outcome: &str) -> u64 {
        let text = self
            .stack
            .client
            .get(format!("{}/metrics", self.stack.url(Svc::File)))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        text.lines()
            .filter(|line| {
                line.starts_with("messages_total{")
                    && line.contains("service=\"file\"")
                    && line.contains(&format!("handler=\"{handler}\""))
                    && line.contains(&format!("outcome=\"{outcome}\""))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

/// Every path below `dir` with its size (directories as `…/`).
fn listing(dir: &Path) -> BTreeMap<String, u64> {
    fn walk(root: &Path, dir: &Path, into: &mut BTreeMap<String, u64>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let name = path
                .strip_prefix(root)
                .expect("below root")
                .display()
                .to_string();
            let metadata = entry.metadata().expect("metadata");
            if metadata.is_dir() {
                into.insert(format!("{name}/"), 0);
                walk(root, &path, into);
            } else {
                into.insert(name, metadata.len());
            }
        }
    }
    let mut found = BTreeMap::new();
    walk(dir, dir, &mut found);
    found
}

async fn problem_or_json(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let problem = response
        .headers()
        .get("content-type")
        .is_some_and(|v| v == "application/problem+json");
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        assert!(problem, "{status}: errors are problem+json: {body}");
        assert_eq!(body["status"], status.as_u16(), "{body}");
    }
    (status, body)
}

async fn get(stack: &Stack, url: &str, if_none_match: Option<&str>) -> reqwest::Response {
    let mut request = stack.client.get(format!("{}{url}", stack.gateway()));
    if let Some(tag) = if_none_match {
        request = request.header("if-none-match", tag);
    }
    request.send().await.expect("get")
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("{name} header"))
        .to_str()
        .expect("ascii")
}

// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn the_owner_uploads_images_that_anyone_then_fetches_with_cache_headers() {
    let files = Files::start().await;
    let stack = &files.stack;
    let (token, seller) = stack.account("seller", "seller").await;
    let product = files.product_of((&token, seller)).await;
    let mut published = testkit::Observer::new(stack.env(), &["file.uploaded"]).await;
    let thumbnail_size = stack.settings.files.thumbnail_size;

    for (name, bytes, content_type, thumbnail_type) in [
        ("front.png", png(640, 400), "image/png", ImageFormat::Png),
        ("side.jpg", jpeg(300, 900), "image/jpeg", ImageFormat::Jpeg),
    ] {
        let uploaded = files.upload_file(&token, product, name, &bytes).await;
        let id = uploaded["id"].as_str().expect("id");
        assert_eq!(uploaded["url"], format!("/api/v1/files/{id}"));
        assert_eq!(
            uploaded["thumbnail_url"],
            format!("/api/v1/files/{id}/thumbnail")
        );
        assert_eq!(uploaded["content_type"], content_type);
        assert_eq!(uploaded["bytes"], bytes.len());

        // The image: the same bytes, typed, tagged with their hash, cached for good.
        let url = uploaded["url"].as_str().expect("url");
        let response = get(stack, url, None).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(header(&response, "content-type"), content_type);
        assert_eq!(
            header(&response, "cache-control"),
            "public, max-age=31536000, immutable"
        );
        assert_eq!(header(&response, "x-content-type-options"), "nosniff");
        assert_eq!(header(&response, "content-length"), bytes.len().to_string());
        let etag = header(&response, "etag").to_owned();
        assert!(
            etag.len() == 66 && etag.starts_with('"') && etag.ends_with('"'),
            "a strong tag: {etag}"
        );
        assert_eq!(response.bytes().await.expect("bytes").as_ref(), bytes);
        // Named after the content: the tag is the stored file's name.
        let hash = etag.trim_matches('"');
        let stored = stack.settings.files.dir.join(&hash[..2]).join(hash);
        assert_eq!(
            std::fs::read(&stored).expect("stored under its hash"),
            bytes
        );

        let response = get(stack, url, Some(&etag)).await;
        assert_eq!(response.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(header(&response, "etag"), etag);
        assert!(response.bytes().await.expect("body").is_empty());
        let response = get(stack, url, Some("\"something-else\"")).await;
        assert_eq!(response.status(), StatusCode::OK);

        // The thumbnail: a real image within the thumbnail size, with its own tag.
        let thumbnail_url = uploaded["thumbnail_url"].as_str().expect("thumbnail url");
        let response = get(stack, thumbnail_url, None).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            header(&response, "content-type"),
            thumbnail_type.to_mime_type()
        );
        let thumbnail_etag = header(&response, "etag").to_owned();
        assert_ne!(thumbnail_etag, etag);
        let thumbnail = response.bytes().await.expect("bytes");
        assert_eq!(image::guess_format(&thumbnail).ok(), Some(thumbnail_type));
        let decoded = image::load_from_memory(&thumbnail).expect("a thumbnail that decodes");
        assert_eq!(
            decoded.width().max(decoded.height()),
            thumbnail_size,
            "the longest side is the thumbnail size"
        );
        let response = get(stack, thumbnail_url, Some(&thumbnail_etag)).await;
        assert_eq!(response.status(), StatusCode::NOT_MODIFIED);

        // And the event, with the same ids, through the outbox.
        let message = published.next().await;
        let event: Value = serde_json::from_slice(&message.data).expect("json");
        assert_eq!(event["type"], "file.uploaded");
        assert_eq!(event["source"], "file-svc");
        assert_eq!(
            message.properties.message_id().as_ref().map(|m| m.as_str()),
            event["id"].as_str()
        );
        let data = &event["data"];
        assert_eq!(data["file_id"], id);
        assert_eq!(data["product_id"], product.to_string());
        assert_eq!(data["uploaded_by"], seller.to_string());
        assert_eq!(data["url"], uploaded["url"]);
        assert_eq!(data["thumbnail_url"], uploaded["thumbnail_url"]);
        assert_eq!(data["content_type"], content_type);
        assert_eq!(data["bytes"], bytes.len());
    }

    // The same bytes again for the same product: the image already stored, nothing new
    // on disk, no second event.
    let first = png(640, 400);
    let stored = files.storage();
    let (status, again) = files
        .upload(
            &token,
            product,
            multipart(&[file_part("copy.png", "image/png", &first)]),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(files.storage(), stored);
    // For another product the same bytes are a new image, stored once on disk.
    let other = files.product_of((&token, seller)).await;
    let copy = files.upload_file(&token, other, "copy.png", &first).await;
    assert_ne!(copy["id"], again["id"]);
    assert_eq!(files.storage(), stored, "content-addressed: nothing new");
    let message = published.next().await;
    let event: Value = serde_json::from_slice(&message.data).expect("json");
    assert_eq!(
        event["data"]["file_id"], copy["id"],
        "the repeated upload published nothing"
    );

    // WebP and GIF are images too; anything else is refused by content (below).
    for format in [ImageFormat::WebP, ImageFormat::Gif] {
        let bytes = encode(
            DynamicImage::ImageRgba8(RgbaImage::from_pixel(40, 30, Rgba([9, 99, 199, 255]))),
            format,
        );
        let (status, body) = files
            .upload(
                &token,
                product,
                multipart(&[file_part("picture", "application/octet-stream", &bytes)]),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{format:?}: {body}");
        assert_eq!(body["content_type"], format.to_mime_type());
    }
}

#[tokio::test]
async fn only_the_products_seller_or_an_admin_may_upload() {
    let admin_email = format!("admin.{}@example.com", Uuid::now_v7().simple());
    let email = admin_email.clone();
    let files = Files::start_with(move |settings| {
        settings.admin.email = Some(email);
        settings.admin.password = Some(PASSWORD.to_owned().into());
    })
    .await;
    let stack = &files.stack;
    let (owner_token, owner) = stack.account("owner", "seller").await;
    let (rival_token, _) = stack.account("rival", "seller").await;
    let (customer_token, _) = stack.account("customer", "customer").await;
    let product = files.product_of((&owner_token, owner)).await;
    let bytes = png(64, 64);
    let body = || multipart(&[file_part("a.png", "image/png", &bytes)]);
    let empty = files.storage();

    for (who, token) in [
        ("another seller", &rival_token),
        ("a customer", &customer_token),
    ] {
        let (status, problem) = files.upload(token, product, body()).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{who}: {problem}");
    }
    let (status, _) = files.upload(&owner_token, Uuid::now_v7(), body()).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "an unknown product");
    let response = stack
        .api(Method::POST, "/products/not-a-product/images")
        .bearer_auth(&owner_token)
        .header("content-type", multipart_type())
        .body(body())
        .send()
        .await
        .expect("upload");
    let (status, _) = problem_or_json(response).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "not even an id");
    let (status, _) = files.upload(&owner_token, product, body()).await;
    assert_eq!(status, StatusCode::CREATED, "its seller");
    let after_owner = files.storage();
    assert_ne!(after_owner, empty);

    // No token at all: 401, whether through the gateway or straight to file-svc.
    let response = stack
        .api(Method::POST, &format!("/products/{product}/images"))
        .header("content-type", multipart_type())
        .body(body())
        .send()
        .await
        .expect("upload");
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = stack
        .client
        .post(format!(
            "{}/api/v1/products/{product}/images",
            stack.url(Svc::File)
        ))
        .header("content-type", multipart_type())
        .body(body())
        .send()
        .await
        .expect("upload");
    assert_eq!(
        response.status(),
        StatusCode::UNAUTHORIZED,
        "file-svc checks on its own"
    );

    let login = stack.login(&admin_email, PASSWORD).await;
    assert_eq!(login.status(), StatusCode::OK);
    let login: Value = login.json().await.expect("json");
    let admin_token = login["access_token"].as_str().expect("token");
    let admin_bytes = jpeg(80, 60);
    let uploaded = files
        .upload_file(admin_token, product, "by-admin.jpg", &admin_bytes)
        .await;
    assert_eq!(uploaded["content_type"], "image/jpeg");
    let stored_files =
        |listing: BTreeMap<String, u64>| listing.keys().filter(|path| !path.ends_with('/')).count();
    assert_eq!(
        stored_files(files.storage()),
        stored_files(after_owner) + 2,
        "the image and its thumbnail"
    );
}

#[tokio::test]
async fn refused_uploads_get_a_problem_and_leave_storage_as_it_was() {
    let files = Files::start().await;
    let stack = &files.stack;
    let (token, seller) = stack.account("seller", "seller").await;
    let product = files.product_of((&token, seller)).await;
    let mut published = testkit::Observer::new(stack.env(), &["file.uploaded"]).await;
    let image = png(32, 32);
    files
        .upload_file(&token, product, "first.png", &image)
        .await;
    published.next().await;

    let bomb = bomb_png(50_000, 50_000);
    assert!(bomb.len() < 100, "a tiny file");
    assert_eq!(
        image::ImageReader::new(Cursor::new(&bomb))
            .with_guessed_format()
            .expect("guess")
            .into_dimensions()
            .expect("a well-formed PNG header"),
        (50_000, 50_000)
    );
    let mut truncated = png(200, 200);
    truncated.truncate(truncated.len() / 2);
    let text = b"just some text, pretending to be a picture\n".repeat(20);

    let cases: Vec<(&str, StatusCode, Option<&str>, Vec<u8>)> = vec![
        (
            "text named x.png, declared image/png",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            None,
            multipart(&[file_part("x.png", "image/png", &text)]),
        ),
        (
            "an SVG (scripts run in it; not accepted)",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            None,
            multipart(&[file_part(
                "logo.png",
                "image/png",
                br#"<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>"#,
            )]),
        ),
        (
            "a PNG header declaring 50000x50000 pixels",
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("file"),
            multipart(&[file_part("bomb.png", "image/png", &bomb)]),
        ),
        (
            "a PNG cut in half",
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("file"),
            multipart(&[file_part("half.png", "image/png", &truncated)]),
        ),
        (
            "an empty file",
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("file"),
            multipart(&[file_part("empty.png", "image/png", b"")]),
        ),
        (
            "no file field",
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("file"),
            multipart(&[Part {
                name: "caption",
                file_name: None,
                content_type: None,
                bytes: b"a lamp",
            }]),
        ),
        (
            "an empty form",
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("file"),
            multipart(&[]),
        ),
        (
            "a second field after the file",
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("caption"),
            multipart(&[
                file_part("a.png", "image/png", &png(20, 20)),
                Part {
                    name: "caption",
                    file_name: None,
                    content_type: None,
                    bytes: b"a lamp",
                },
            ]),
        ),
        (
            "two files",
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("file"),
            multipart(&[
                file_part("a.png", "image/png", &png(20, 20)),
                file_part("b.png", "image/png", &png(21, 21)),
            ]),
        ),
        (
            "a multipart body cut off mid-file",
            StatusCode::BAD_REQUEST,
            None,
            {
                let whole = multipart(&[file_part("a.png", "image/png", &png(200, 200))]);
                whole[..whole.len() / 2].to_vec()
            },
        ),
    ];
    let before = files.storage();
    let (status, problem) = files
        .upload(
            &token,
            product,
            multipart(&[file_part("bomb.png", "image/png", &bomb)]),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    let message = problem["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("50000×50000 pixels"),
        "refused for its declared size, before decoding: {problem}"
    );
    assert_eq!(files.storage(), before);

    for (what, expected, field, body) in cases {
        let before = files.storage();
        let (status, problem) = files.upload(&token, product, body).await;
        assert_eq!(status, expected, "{what}: {problem}");
        if let Some(field) = field {
            let named = problem["errors"]
                .as_array()
                .is_some_and(|errors| errors.iter().any(|e| e["field"] == field));
            assert!(named, "{what}: the error names {field}: {problem}");
        }
        assert!(problem["detail"].is_string(), "{what}: {problem}");
        assert_eq!(files.storage(), before, "{what}: storage unchanged");
    }

    // Bodies that are not multipart at all.
    for (content_type, body) in [
        ("application/json", br#"{"file": "x.png"}"#.to_vec()),
        ("image/png", image.clone()),
        (
            "multipart/form-data",
            multipart(&[file_part("a.png", "image/png", &image)]),
        ),
    ] {
        let before = files.storage();
        let response = stack
            .api(Method::POST, &format!("/products/{product}/images"))
            .bearer_auth(&token)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("upload");
        let (status, problem) = problem_or_json(response).await;
        assert!(
            status.is_client_error(),
            "{content_type}: {status} {problem}"
        );
        assert_eq!(files.storage(), before, "{content_type}: storage unchanged");
    }

    // None of that published anything: the next event is the next accepted image's.
    let next = files
        .upload_file(&token, product, "next.jpg", &jpeg(50, 50))
        .await;
    let message = published.next().await;
    let event: Value = serde_json::from_slice(&message.data).expect("json");
    assert_eq!(event["data"]["file_id"], next["id"]);
}

#[tokio::test]
async fn a_file_over_the_size_limit_is_refused_while_it_streams_in() {
    let limit = 64 * 1024;
    let files = Files::start_with(move |settings| settings.files.max_bytes = limit).await;
    let stack = &files.stack;
    let (token, seller) = stack.account("seller", "seller").await;
    let product = files.product_of((&token, seller)).await;
    let big = noisy_png(200, 200);
    assert!(big.len() as u64 > limit);
    let before = files.storage();

    let (status, problem) = files
        .upload(
            &token,
            product,
            multipart(&[file_part("big.png", "image/png", &big)]),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{problem}");
    assert_eq!(files.storage(), before);

    // Without a length up front (chunked), straight to file-svc.
    let body = multipart(&[file_part("big.png", "image/png", &big)]);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        body.chunks(8 * 1024).map(|c| Ok(c.to_vec())).collect();
    let response = stack
        .client
        .post(format!(
            "{}/api/v1/products/{product}/images",
            stack.url(Svc::File)
        ))
        .bearer_auth(&token)
        .header("content-type", multipart_type())
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .expect("upload");
    let (status, problem) = problem_or_json(response).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{problem}");
    assert_eq!(files.storage(), before);

    // Just under the limit is fine.
    let fits = noisy_png(100, 100);
    assert!((fits.len() as u64) < limit);
    files.upload_file(&token, product, "fits.png", &fits).await;
}

#[tokio::test]
async fn the_seller_replica_follows_product_events_in_any_order() {
    let files = Files::start().await;
    let stack = &files.stack;
    let (alice_token, alice) = stack.account("alice", "seller").await;
    let (bob_token, bob) = stack.account("bob", "seller").await;
    let product = files.product_of((&alice_token, alice)).await;
    let now = chrono::Utc::now();

    // The product passes to bob; a stale update naming alice, arriving later, loses.
    files
        .products
        .updated(product, bob, now + chrono::Duration::seconds(10))
        .await;
    files
        .wait_for_access(&bob_token, product, StatusCode::UNSUPPORTED_MEDIA_TYPE)
        .await;
    files
        .wait_for_access(&alice_token, product, StatusCode::FORBIDDEN)
        .await;
    let handled = files.messages("product_replica_updated", "handled").await;
    files
        .products
        .updated(product, alice, now + chrono::Duration::seconds(5))
        .await;
    eventually("the stale update to be handled", || async {
        (files.messages("product_replica_updated", "handled").await > handled).then_some(())
    })
    .await;
    files
        .wait_for_access(&bob_token, product, StatusCode::UNSUPPORTED_MEDIA_TYPE)
        .await;
    files
        .wait_for_access(&alice_token, product, StatusCode::FORBIDDEN)
        .await;

    // An update that overtook its product's creation: the later fact wins all the same.
    let early = Uuid::now_v7();
    files
        .products
        .updated(early, bob, now + chrono::Duration::seconds(1))
        .await;
    files
        .wait_for_access(&bob_token, early, StatusCode::UNSUPPORTED_MEDIA_TYPE)
        .await;
    let handled = files.messages("product_replica_created", "handled").await;
    files.products.created(early, alice, now).await;
    eventually("the late creation to be handled", || async {
        (files.messages("product_replica_created", "handled").await > handled).then_some(())
    })
    .await;
    files
        .wait_for_access(&bob_token, early, StatusCode::UNSUPPORTED_MEDIA_TYPE)
        .await;

    // Deleted is final: uploads get 404, and neither a redelivery nor a creation that
    // comes late (a replayed dead letter, say) brings it back.
    let bytes = png(30, 30);
    let uploaded = files
        .upload_file(&bob_token, product, "kept.png", &bytes)
        .await;
    let deletion = Uuid::now_v7();
    files.products.deleted(deletion, product, bob).await;
    files
        .wait_for_access(&bob_token, product, StatusCode::NOT_FOUND)
        .await;
    let duplicates = files.messages("product_replica_deleted", "duplicate").await;
    files.products.deleted(deletion, product, bob).await;
    let handled = files.messages("product_replica_created", "handled").await;
    files.products.created(product, bob, now).await;
    eventually(
        "the redelivery and the late creation to be handled",
        || async {
            let duplicate =
                files.messages("product_replica_deleted", "duplicate").await > duplicates;
            let created = files.messages("product_replica_created", "handled").await > handled;
            (duplicate && created).then_some(())
        },
    )
    .await;
    let (status, _) = files
        .upload(
            &bob_token,
            product,
            multipart(&[file_part("new.png", "image/png", &png(31, 31))]),
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "still deleted");
    // Images already published keep being served: pages and emails link to them.
    let response = get(stack, uploaded["url"].as_str().expect("url"), None).await;
    assert_eq!(response.status(), StatusCode::OK);

    // A deletion that arrives before the creation leaves the product deleted too.
    let ghost = Uuid::now_v7();
    let handled = files.messages("product_replica_deleted", "handled").await;
    files.products.deleted(Uuid::now_v7(), ghost, alice).await;
    eventually("the early deletion to be handled", || async {
        (files.messages("product_replica_deleted", "handled").await > handled).then_some(())
    })
    .await;
    let handled = files.messages("product_replica_created", "handled").await;
    files.products.created(ghost, alice, now).await;
    eventually("the creation to be handled", || async {
        (files.messages("product_replica_created", "handled").await > handled).then_some(())
    })
    .await;
    files
        .wait_for_access(&alice_token, ghost, StatusCode::NOT_FOUND)
        .await;
}

#[tokio::test]
async fn unknown_files_are_404_problems_and_the_routes_are_documented() {
    let files = Files::start().await;
    let stack = &files.stack;
    for url in [
        format!("/api/v1/files/{}", Uuid::now_v7()),
        format!("/api/v1/files/{}/thumbnail", Uuid::now_v7()),
        "/api/v1/files/not-an-id".to_owned(),
        "/api/v1/files/..%2F..%2Fetc%2Fpasswd".to_owned(),
        "/api/v1/files/%FF%FE/thumbnail".to_owned(),
    ] {
        let (status, problem) = problem_or_json(get(stack, &url, None).await).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{url}: {problem}");
    }

    let response = stack
        .client
        .get(format!("{}/openapi.json", stack.url(Svc::File)))
        .send()
        .await
        .expect("openapi");
    assert_eq!(response.status(), StatusCode::OK);
    let doc: Value = response.json().await.expect("json");
    let upload = &doc["paths"]["/api/v1/products/{id}/images"]["post"];
    assert!(
        upload["requestBody"]["content"]["multipart/form-data"].is_object(),
        "{upload}"
    );
    for status in ["201", "403", "404", "413", "415", "422"] {
        assert!(
            upload["responses"][status].is_object(),
            "{status}: {upload}"
        );
    }
    assert!(doc["paths"]["/api/v1/files/{id}"]["get"].is_object());
    assert!(doc["paths"]["/api/v1/files/{id}/thumbnail"]["get"].is_object());
    // And the gateway's merged document has them.
    let response = stack
        .api(Method::GET, "/openapi.json")
        .send()
        .await
        .expect("merged openapi");
    let merged: Value = response.json().await.expect("json");
    assert!(
        merged["paths"]["/api/v1/products/{id}/images"]["post"].is_object(),
        "{}",
        merged["paths"]
    );
}
