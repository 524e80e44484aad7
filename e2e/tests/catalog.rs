//! The catalog through the gateway (issue 4): products, categories, search and paging,
//! availability and images from events, reviews, and the Redis cache in front of it.
//!
//! Cache assertions read product-svc's `/metrics`. nextest runs each test in its own
//! process, so the counters there are this test's alone.

use std::collections::HashSet;

use e2e::upload::{file_part, multipart, multipart_type, png};
use e2e::{Stack, StackOptions, Svc};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use testkit::{Observer, TcpProxy, eventually};
use uuid::Uuid;

const ADMIN_EMAIL: &str = "root@example.com";
const ADMIN_PASSWORD: &str = "a long admin passphrase nobody guesses";

async fn status_and_body(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

/// A stack with product-svc and a first admin. The gateway's rate limits are off: the
/// tests poll for what events change, and limits are tested in identity.rs.
async fn catalog(services: &[Svc]) -> Stack {
    Stack::start_with(StackOptions {
        services: services.to_vec(),
        configure: Box::new(|s| {
            s.admin.email = Some(ADMIN_EMAIL.into());
            s.admin.password = Some(ADMIN_PASSWORD.into());
            s.gateway.rate_limit.enabled = false;
        }),
        ..StackOptions::default()
    })
    .await
}

async fn admin_token(stack: &Stack) -> String {
    let (status, body) = status_and_body(stack.login(ADMIN_EMAIL, ADMIN_PASSWORD).await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["access_token"].as_str().expect("token").to_owned()
}

async fn send(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    status_and_body(request.send().await.expect("request")).await
}

/// A product with these fields (and defaults for the rest), created by `token`.
async fn create_product(stack: &Stack, token: &str, fields: Value) -> Value {
    let mut body = json!({
        "name": "Cast-iron teapot",
        "description": "Holds 1.2 litres.",
        "price_cents": 4599,
        "currency": "EUR",
        "initial_stock": 10,
    });
    for (key, value) in fields.as_object().expect("an object") {
        body[key] = value.clone();
    }
    let (status, product) = send(
        stack
            .api(Method::POST, "/products")
            .bearer_auth(token)
            .json(&body),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{product}");
    product
}

async fn get_product(stack: &Stack, id: &str) -> (StatusCode, Value) {
    send(stack.api(Method::GET, &format!("/products/{id}"))).await
}

async fn list(stack: &Stack, query: &str) -> Value {
    let (status, page) = send(stack.api(Method::GET, &format!("/products?{query}"))).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    page
}

fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|p| p["id"].as_str().expect("id").to_owned())
        .collect()
}

/// The sum of product-svc's series `name` having all of `labels`.
async fn metric(stack: &Stack, name: &str, labels: &[(&str, &str)]) -> u64 {
    let text = stack
        .client
        .get(format!("{}/metrics", stack.url(Svc::Product)))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{'))
                && labels
                    .iter()
                    .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

async fn cache_hits(stack: &Stack, cache: &str) -> u64 {
    metric(stack, "cache_hits_total", &[("cache", cache)]).await
}

/// Messages product-svc's handler `handler` has handled (committed).
async fn handled(stack: &Stack, handler: &str) -> u64 {
    metric(
        stack,
        "messages_total",
        &[
            ("service", "product"),
            ("handler", handler),
            ("outcome", "handled"),
        ],
    )
    .await
}

async fn wait_handled(stack: &Stack, handler: &str, count: u64) {
    eventually(
        &format!("{count} messages handled by {handler}"),
        || async { (handled(stack, handler).await >= count).then_some(()) },
    )
    .await;
}

fn with<P>(value: P, change: impl FnOnce(P) -> P) -> P {
    change(value)
}

/// Publishes `data` as event `event_type`, as its producer would: an envelope with a new
/// id, persistent, `message_id` = id. Returns the id.
async fn inject(stack: &Stack, event_type: &str, data: Value) -> Uuid {
    let id = Uuid::now_v7();
    let source = match event_type.split('.').next() {
        Some("inventory") => "inventory-svc",
        Some("file") => "file-svc",
        _ => "order-svc",
    };
    let envelope = json!({
        "id": id, "type": event_type, "version": 1, "occurred_at": chrono::Utc::now(),
        "source": source, "correlation_id": Uuid::now_v7(), "causation_id": null,
        "data": data,
    });
    let connection = stack.env().amqp().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(Default::default())
        .await
        .expect("confirms");
    testkit::publish(
        &channel,
        &format!("{}.events", stack.namespace()),
        event_type,
        &serde_json::to_vec(&envelope).expect("json"),
        with(Default::default(), |p| {
            p.with_message_id(id.to_string().into())
                .with_type(event_type.into())
                .with_content_type("application/json".into())
        }),
    )
    .await;
    connection.close(200, "sent".into()).await.expect("close");
    id
}

async fn stock_changed(stack: &Stack, product: &str, available: i64, version: i64) -> Uuid {
    inject(
        stack,
        "inventory.stock_changed",
        json!({"product_id": product, "on_hand": available + 1, "reserved": 1,
               "available": available, "version": version}),
    )
    .await
}

async fn available(stack: &Stack, id: &str) -> i64 {
    let (status, product) = get_product(stack, id).await;
    assert_eq!(status, StatusCode::OK, "{product}");
    product["available"].as_i64().expect("available")
}

async fn wait_available(stack: &Stack, id: &str, units: i64) {
    eventually(
        &format!("product {id} to show {units} available"),
        || async { (available(stack, id).await == units).then_some(()) },
    )
    .await;
}

/// Needs inventory-svc: it takes the product in from `product.created` and reports the
/// stock, which product-svc shows.
#[tokio::test]
async fn a_new_product_is_listed_with_the_stock_inventory_reports() {
    let stack = catalog(&[Svc::Product, Svc::Inventory]).await;
    let (seller, seller_id) = stack.account("sam", "seller").await;
    let product = create_product(&stack, &seller, json!({"initial_stock": 10})).await;
    let id = product["id"].as_str().expect("id");
    eventually("the listing to show 10 available", || async {
        let page = list(&stack, &format!("seller_id={seller_id}")).await;
        (page["items"][0]["id"] == id && page["items"][0]["available"] == 10).then_some(())
    })
    .await;
    assert_eq!(available(&stack, id).await, 10);
}

#[tokio::test]
async fn availability_follows_stock_events_and_ignores_stale_ones() {
    let stack = catalog(&[Svc::Product]).await;
    let (seller, _) = stack.account("sam", "seller").await;
    let product = create_product(&stack, &seller, json!({"initial_stock": 10})).await;
    let id = product["id"].as_str().expect("id");
    assert_eq!(
        product["available"], 0,
        "nothing available until inventory says so"
    );
    assert_eq!(available(&stack, id).await, 0);

    stock_changed(&stack, id, 7, 2).await;
    wait_available(&stack, id, 7).await;

    // Older than what is stored: handled, and changes nothing.
    stock_changed(&stack, id, 10, 1).await;
    wait_handled(&stack, "stock_replica", 2).await;
    assert_eq!(available(&stack, id).await, 7, "a stale event is ignored");
    // The same fact again under another message id (a replay): nothing changes either.
    stock_changed(&stack, id, 7, 2).await;
    wait_handled(&stack, "stock_replica", 3).await;
    assert_eq!(available(&stack, id).await, 7);
    let page = list(&stack, "").await;
    assert_eq!(page["items"][0]["available"], 7, "{page}");

    stock_changed(&stack, id, 3, 5).await;
    wait_available(&stack, id, 3).await;
    let page = list(&stack, "").await;
    assert_eq!(page["items"][0]["available"], 3, "{page}");
}

#[tokio::test]
async fn sellers_and_admins_create_and_only_the_owner_or_an_admin_changes() {
    let stack = catalog(&[Svc::Product]).await;
    let mut events = Observer::new(stack.env(), &["product.#"]).await;
    let (owner, owner_id) = stack.account("sam", "seller").await;
    let (rival, _) = stack.account("rita", "seller").await;
    let (customer, _) = stack.account("carol", "customer").await;
    let admin = admin_token(&stack).await;

    let new = json!({"name": "Kettle", "description": "", "price_cents": 2500,
                     "currency": "EUR", "initial_stock": 3});
    let (status, body) = send(
        stack
            .api(Method::POST, "/products")
            .bearer_auth(&customer)
            .json(&new),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, _) = send(stack.api(Method::POST, "/products").json(&new)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let product = create_product(&stack, &owner, json!({"price_cents": 2500})).await;
    let id = product["id"].as_str().expect("id").to_owned();
    assert_eq!(product["seller_id"], owner_id.to_string());
    assert_eq!(product["images"], json!([]));
    let created = events.next().await;
    let created: Value = serde_json::from_slice(&created.data).expect("json");
    assert_eq!(created["type"], "product.created");
    assert_eq!(created["data"]["product_id"], id.as_str());
    assert_eq!(created["data"]["initial_stock"], 10);
    assert_eq!(created["data"]["price_cents"], 2500);
    assert_eq!(created["data"]["seller_id"], owner_id.to_string());

    let path = format!("/products/{id}");
    let (status, _) = send(
        stack
            .api(Method::PATCH, &path)
            .bearer_auth(&rival)
            .json(&json!({"price_cents": 1})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = send(stack.api(Method::DELETE, &path).bearer_auth(&rival)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = send(
        stack
            .api(Method::PATCH, &path)
            .bearer_auth(&customer)
            .json(&json!({"price_cents": 1})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (_, unchanged) = get_product(&stack, &id).await;
    assert_eq!(unchanged["price_cents"], 2500, "refusals change nothing");

    let (status, changed) = send(
        stack
            .api(Method::PATCH, &path)
            .bearer_auth(&owner)
            .json(&json!({"price_cents": 2999, "currency": "USD"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    assert_eq!(changed["price_cents"], 2999);
    assert_eq!(changed["currency"], "USD");
    assert_eq!(changed["name"], "Cast-iron teapot", "fields not sent stay");
    let first_update: Value = serde_json::from_slice(&events.next().await.data).expect("json");
    assert_eq!(first_update["type"], "product.updated");
    assert_eq!(first_update["data"]["price_cents"], 2999);

    let (status, changed) = send(
        stack
            .api(Method::PATCH, &path)
            .bearer_auth(&admin)
            .json(&json!({"name": "Enamelled teapot"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    assert_eq!(changed["name"], "Enamelled teapot");
    let second_update: Value = serde_json::from_slice(&events.next().await.data).expect("json");
    assert_eq!(second_update["data"]["name"], "Enamelled teapot");
    let at = |event: &Value| {
        chrono::DateTime::parse_from_rfc3339(event["data"]["updated_at"].as_str().expect("time"))
            .expect("RFC 3339")
    };
    assert!(
        at(&second_update) > at(&first_update),
        "updated_at grows with each change: {first_update} {second_update}"
    );

    let (status, _) = send(stack.api(Method::DELETE, &path).bearer_auth(&admin)).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let deleted: Value = serde_json::from_slice(&events.next().await.data).expect("json");
    assert_eq!(deleted["type"], "product.deleted");
    assert_eq!(deleted["data"]["product_id"], id.as_str());
    let (status, body) = get_product(&stack, &id).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["status"], 404);
    assert_eq!(list(&stack, "").await["items"], json!([]));
    let (status, _) = send(stack.api(Method::DELETE, &path).bearer_auth(&owner)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // The owner deletes their own product too.
    let other = create_product(&stack, &owner, json!({})).await;
    let other_path = format!("/products/{}", other["id"].as_str().expect("id"));
    let (status, _) = send(stack.api(Method::DELETE, &other_path).bearer_auth(&owner)).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

fn fields(problem: &Value) -> Vec<String> {
    let mut fields: Vec<String> = problem["errors"]
        .as_array()
        .map(|errors| {
            errors
                .iter()
                .filter_map(|e| e["field"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    fields.sort();
    fields
}

#[tokio::test]
async fn bad_input_gets_field_errors_and_changes_nothing() {
    let stack = catalog(&[Svc::Product]).await;
    let (seller, _) = stack.account("sam", "seller").await;

    let (status, problem) = send(
        stack
            .api(Method::POST, "/products")
            .bearer_auth(&seller)
            .json(&json!({"name": "  ", "price_cents": 0, "currency": "usd",
                          "initial_stock": -1, "category": "no-such-category"})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{problem}");
    assert_eq!(
        fields(&problem),
        [
            "category",
            "currency",
            "description",
            "initial_stock",
            "name",
            "price_cents"
        ]
    );
    let (status, problem) = send(
        stack
            .api(Method::POST, "/products")
            .bearer_auth(&seller)
            .json(
                &json!({"name": "x".repeat(201), "description": "", "price_cents": 100,
                          "currency": "XYZ", "initial_stock": 1}),
            ),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(fields(&problem), ["currency", "name"]);
    let (status, problem) = send(
        stack
            .api(Method::POST, "/products")
            .bearer_auth(&seller)
            .json(&json!({"name": "x", "description": "", "price_cents": 100,
                          "currency": "EUR", "initial_stock": 1, "available": 99})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "unknown field");
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("available")),
        "{problem}"
    );
    assert_eq!(
        list(&stack, "").await["items"],
        json!([]),
        "nothing was created"
    );

    let product = create_product(&stack, &seller, json!({})).await;
    let path = format!("/products/{}", product["id"].as_str().expect("id"));
    for (change, field) in [
        (json!({"currency": "usd"}), "currency"),
        (json!({"name": null}), "name"),
        (json!({"price_cents": -5}), "price_cents"),
        (json!({"category": "nowhere"}), "category"),
    ] {
        let (status, problem) = send(
            stack
                .api(Method::PATCH, &path)
                .bearer_auth(&seller)
                .json(&change),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{change}");
        assert_eq!(fields(&problem), [field], "{problem}");
    }
    let (_, after) = send(stack.api(Method::GET, &path)).await;
    assert_eq!(after, product, "refused changes change nothing");

    let (status, problem) = send(stack.api(Method::GET, "/products/not-a-uuid")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{problem}");
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=ten", "limit"),
        ("cursor=garbage", "cursor"),
        ("seller_id=someone", "seller_id"),
        ("category=Not%20A%20Slug", "category"),
        ("category=unknown", "category"),
    ] {
        let (status, problem) = send(stack.api(Method::GET, &format!("/products?{query}"))).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{query}: {problem}"
        );
        assert_eq!(fields(&problem), [field], "{query}");
    }
}

#[tokio::test]
async fn product_reads_come_from_redis_and_every_change_shows_at_once() {
    let stack = catalog(&[Svc::Product]).await;
    let (seller, _) = stack.account("sam", "seller").await;
    let product = create_product(&stack, &seller, json!({})).await;
    let id = product["id"].as_str().expect("id");

    let (_, first) = get_product(&stack, id).await;
    let hits = cache_hits(&stack, "product").await;
    let (_, second) = get_product(&stack, id).await;
    assert_eq!(first, second);
    assert_eq!(
        cache_hits(&stack, "product").await,
        hits + 1,
        "the second read came from Redis"
    );

    // The writer's next read sees its own change: invalidation precedes the response.
    let (status, _) = send(
        stack
            .api(Method::PATCH, &format!("/products/{id}"))
            .bearer_auth(&seller)
            .json(&json!({"price_cents": 1234})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, read) = get_product(&stack, id).await;
    assert_eq!(read["price_cents"], 1234, "{read}");

    // Stock and images change in events; the entry goes once they are committed (the
    // entries live for minutes, longer than the wait here).
    get_product(&stack, id).await;
    stock_changed(&stack, id, 42, 1).await;
    wait_available(&stack, id, 42).await;
    let file = Uuid::now_v7();
    inject(
        &stack,
        "file.uploaded",
        json!({"file_id": file, "product_id": id, "uploaded_by": Uuid::now_v7(),
               "url": format!("/api/v1/files/{file}"),
               "thumbnail_url": format!("/api/v1/files/{file}/thumbnail"),
               "content_type": "image/png", "bytes": 1234, "width": 64, "height": 64,
               "uploaded_at": chrono::Utc::now()}),
    )
    .await;
    let image = json!([{"id": file, "url": format!("/api/v1/files/{file}"),
                        "thumbnail_url": format!("/api/v1/files/{file}/thumbnail")}]);
    eventually("the image to show", || async {
        let (_, product) = get_product(&stack, id).await;
        (product["images"] == image).then_some(())
    })
    .await;

    // List pages are cached too, and a new product shows in the very next read.
    let page = list(&stack, "limit=10").await;
    let list_hits = cache_hits(&stack, "list").await;
    assert_eq!(list(&stack, "limit=10").await, page);
    assert_eq!(cache_hits(&stack, "list").await, list_hits + 1);
    assert_eq!(page["items"][0]["available"], 42, "{page}");
    let newer = create_product(&stack, &seller, json!({"name": "Mug"})).await;
    let page = list(&stack, "limit=10").await;
    assert_eq!(ids(&page), [newer["id"].as_str().expect("id"), id]);
}

/// The same path with every service that takes part and no injected events: an owner's
/// stock adjustment in inventory-svc and an image upload to file-svc reach the cached
/// product, and the next read after each is handled shows it.
#[tokio::test]
async fn adjustments_and_uploads_from_the_other_services_show_on_the_cached_product() {
    let stack = catalog(&[Svc::Product, Svc::Inventory, Svc::File]).await;
    let (seller, _) = stack.account("sam", "seller").await;
    let product = create_product(&stack, &seller, json!({"initial_stock": 10})).await;
    let id = product["id"].as_str().expect("id");
    wait_available(&stack, id, 10).await;

    get_product(&stack, id).await;
    let hits = cache_hits(&stack, "product").await;
    assert_eq!(available(&stack, id).await, 10);
    assert_eq!(
        cache_hits(&stack, "product").await,
        hits + 1,
        "served from Redis"
    );

    let stock_events = handled(&stack, "stock_replica").await;
    let (status, stock) = send(
        stack
            .api(Method::POST, &format!("/inventory/{id}/adjust"))
            .bearer_auth(&seller)
            .json(&json!({"delta": -3, "reason": "two broke in the warehouse, one lost"})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{stock}");
    assert_eq!(stock["available"], 7, "{stock}");
    wait_handled(&stack, "stock_replica", stock_events + 1).await;
    assert_eq!(
        available(&stack, id).await,
        7,
        "the first read after the event"
    );

    // file-svc learns the product's owner from product.created; until then it says 404.
    let image_events = handled(&stack, "image_replica").await;
    let upload = eventually("file-svc to accept the owner's upload", || async {
        let response = stack
            .api(Method::POST, &format!("/products/{id}/images"))
            .bearer_auth(&seller)
            .header("content-type", multipart_type())
            .body(multipart(&[file_part(
                "teapot.png",
                "image/png",
                &png(640, 480),
            )]))
            .send()
            .await
            .ok()?;
        (response.status() == StatusCode::CREATED).then_some(response)
    })
    .await;
    let uploaded: Value = upload.json().await.expect("upload body");
    wait_handled(&stack, "image_replica", image_events + 1).await;
    let (_, read) = get_product(&stack, id).await;
    let images = read["images"].as_array().expect("images");
    assert_eq!(images.len(), 1, "{read}");
    assert_eq!(images[0]["id"], uploaded["id"]);
    let thumbnail_url = images[0]["thumbnail_url"].as_str().expect("thumbnail url");
    let thumbnail = stack
        .client
        .get(format!("{}{thumbnail_url}", stack.gateway()))
        .send()
        .await
        .expect("thumbnail");
    assert_eq!(thumbnail.status(), StatusCode::OK);
    assert_eq!(thumbnail.headers()["content-type"], "image/png");
    let bytes = thumbnail.bytes().await.expect("thumbnail bytes");
    let decoded = file_svc::image::load_from_memory(&bytes).expect("a thumbnail that decodes");
    assert!(decoded.width() <= stack.settings.files.thumbnail_size);
    assert!(decoded.width() < 640, "smaller than the original");
}

#[tokio::test]
async fn reads_keep_working_while_redis_is_unreachable() {
    let redis = TcpProxy::start("127.0.0.1:6379".parse().expect("address")).await;
    let address = redis.address();
    let stack = Stack::start_with(StackOptions {
        services: vec![Svc::Product],
        configure: Box::new(move |s| {
            s.redis.url = format!("redis://{address}").into();
            // The gateway's rate limits use Redis too; this test is about product-svc.
            s.gateway.rate_limit.enabled = false;
        }),
        ..StackOptions::default()
    })
    .await;
    let (seller, _) = stack.account("sam", "seller").await;
    let product = create_product(&stack, &seller, json!({"price_cents": 1000})).await;
    let id = product["id"].as_str().expect("id");
    get_product(&stack, id).await;
    let hits = cache_hits(&stack, "product").await;
    get_product(&stack, id).await;
    assert_eq!(cache_hits(&stack, "product").await, hits + 1, "cached");

    redis.cut();
    let errors = metric(&stack, "cache_errors_total", &[]).await;
    for _ in 0..3 {
        let (status, read) = get_product(&stack, id).await;
        assert_eq!(status, StatusCode::OK, "{read}");
        assert_eq!(read["price_cents"], 1000);
    }
    assert!(metric(&stack, "cache_errors_total", &[]).await > errors);
    assert_eq!(ids(&list(&stack, "").await), [id]);

    // A change while Redis is away: served from PostgreSQL at once, and the entry that
    // Redis still holds is removed when it is back, before the cache is used again.
    let (status, changed) = send(
        stack
            .api(Method::PATCH, &format!("/products/{id}"))
            .bearer_auth(&seller)
            .json(&json!({"price_cents": 2000})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{changed}");
    let (_, read) = get_product(&stack, id).await;
    assert_eq!(read["price_cents"], 2000);

    redis.restore();
    let hits = cache_hits(&stack, "product").await;
    eventually("reads to come from Redis again", || async {
        let (status, read) = get_product(&stack, id).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(read["price_cents"], 2000, "never the entry from before");
        (cache_hits(&stack, "product").await > hits).then_some(())
    })
    .await;
}

#[tokio::test]
async fn categories_form_a_tree_and_a_category_lists_its_sub_categories() {
    let stack = catalog(&[Svc::Product]).await;
    let admin = admin_token(&stack).await;
    let (seller, seller_id) = stack.account("sam", "seller").await;
    let (other_seller, other_id) = stack.account("olga", "seller").await;

    let category = |body: Value| {
        let request = stack
            .api(Method::POST, "/categories")
            .bearer_auth(&admin)
            .json(&body);
        async move { send(request).await }
    };
    for (name, slug, parent) in [
        ("Home", "home", None),
        ("Kitchen", "kitchen", Some("home")),
        ("Cookware", "cookware", Some("kitchen")),
        ("Garden", "garden", Some("home")),
        ("Books", "books", None),
    ] {
        let (status, body) = category(json!({"name": name, "slug": slug, "parent": parent})).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert_eq!(body["parent"], json!(parent));
    }
    let (status, _) = category(json!({"name": "Again", "slug": "home"})).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, problem) =
        category(json!({"name": "", "slug": "Bad Slug", "parent": "nowhere"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(fields(&problem), ["name", "parent", "slug"]);
    let (status, _) = send(
        stack
            .api(Method::POST, "/categories")
            .bearer_auth(&seller)
            .json(&json!({"name": "Mine", "slug": "mine"})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let (status, tree) = send(stack.api(Method::GET, "/categories")).await;
    assert_eq!(status, StatusCode::OK);
    let slugs = |nodes: &Value| -> Vec<String> {
        nodes
            .as_array()
            .expect("nodes")
            .iter()
            .map(|n| n["slug"].as_str().expect("slug").to_owned())
            .collect()
    };
    assert_eq!(slugs(&tree["items"]), ["books", "home"], "{tree}");
    let home = &tree["items"][1];
    assert_eq!(slugs(&home["children"]), ["garden", "kitchen"]);
    assert_eq!(slugs(&home["children"][1]["children"]), ["cookware"]);

    let pan = create_product(
        &stack,
        &seller,
        json!({"name": "Frying pan", "category": "cookware",
               "description": "Carbon steel, seasoned; good for omelettes."}),
    )
    .await;
    let kettle = create_product(
        &stack,
        &seller,
        json!({"name": "Kettle", "category": "kitchen"}),
    )
    .await;
    let rake = create_product(
        &stack,
        &other_seller,
        json!({"name": "Rake", "category": "garden"}),
    )
    .await;
    let novel = create_product(
        &stack,
        &seller,
        json!({"name": "A novel", "category": "books", "description": "About omelettes."}),
    )
    .await;
    assert_eq!(pan["category"], "cookware");
    let id = |p: &Value| p["id"].as_str().expect("id").to_owned();
    let set = |ids: Vec<String>| ids.into_iter().collect::<HashSet<_>>();

    assert_eq!(
        set(ids(&list(&stack, "category=home").await)),
        set(vec![id(&pan), id(&kettle), id(&rake)])
    );
    assert_eq!(
        set(ids(&list(&stack, "category=kitchen").await)),
        set(vec![id(&pan), id(&kettle)])
    );
    assert_eq!(ids(&list(&stack, "category=cookware").await), [id(&pan)]);

    // Search: a word of the description, stemmed; combined with filters.
    assert_eq!(
        ids(&list(&stack, "q=seasoned").await),
        [id(&pan)],
        "a word of the description"
    );
    assert_eq!(
        ids(&list(&stack, "q=omelette").await),
        [id(&novel), id(&pan)],
        "stemmed; newest first among equals"
    );
    assert_eq!(
        ids(&list(&stack, "q=omelette&category=kitchen").await),
        [id(&pan)]
    );
    assert_eq!(
        ids(&list(&stack, &format!("seller_id={other_id}")).await),
        [id(&rake)]
    );
    assert_eq!(
        set(ids(&list(&stack, &format!("seller_id={seller_id}")).await)),
        set(vec![id(&pan), id(&kettle), id(&novel)])
    );
    assert_eq!(list(&stack, "q=submarine").await["items"], json!([]));

    // The category can be changed and removed.
    let (status, moved) = send(
        stack
            .api(Method::PATCH, &format!("/products/{}", id(&kettle)))
            .bearer_auth(&seller)
            .json(&json!({"category": null})),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{moved}");
    assert_eq!(moved["category"], Value::Null);
    assert_eq!(
        set(ids(&list(&stack, "category=kitchen").await)),
        set(vec![id(&pan)])
    );
}

#[tokio::test]
async fn search_results_page_by_relevance_without_repeats() {
    let stack = catalog(&[Svc::Product]).await;
    let (seller, _) = stack.account("sam", "seller").await;
    let mut in_name = Vec::new();
    let mut in_description = Vec::new();
    for i in 0..4 {
        let p = create_product(
            &stack,
            &seller,
            json!({"name": format!("Teapot {i}"), "description": "Porcelain."}),
        )
        .await;
        in_name.push(p["id"].as_str().expect("id").to_owned());
        let p = create_product(
            &stack,
            &seller,
            json!({"name": format!("Cup {i}"), "description": "Matches the teapot."}),
        )
        .await;
        in_description.push(p["id"].as_str().expect("id").to_owned());
    }
    create_product(
        &stack,
        &seller,
        json!({"name": "Spoon", "description": "Silver."}),
    )
    .await;

    let mut seen = Vec::new();
    let mut query = "q=teapot&limit=3".to_owned();
    loop {
        let page = list(&stack, &query).await;
        seen.extend(ids(&page));
        match page["next_cursor"].as_str() {
            Some(cursor) => query = format!("q=teapot&limit=3&cursor={cursor}"),
            None => break,
        }
    }
    in_name.reverse();
    in_description.reverse();
    let expected: Vec<String> = in_name.into_iter().chain(in_description).collect();
    assert_eq!(
        seen, expected,
        "names first, then descriptions; newest first within each"
    );

    // A cursor of a search is not one of the plain listing.
    let page = list(&stack, "q=teapot&limit=3").await;
    let cursor = page["next_cursor"].as_str().expect("a cursor");
    let (status, _) = send(stack.api(Method::GET, &format!("/products?cursor={cursor}"))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn paging_visits_every_product_once_while_products_are_added() {
    const BEFORE: usize = 30;
    const DURING: usize = 30;
    let stack = catalog(&[Svc::Product]).await;
    let (seller, _) = stack.account("sam", "seller").await;
    let mut original = HashSet::new();
    for i in 0..BEFORE {
        let p = create_product(&stack, &seller, json!({"name": format!("Item {i}")})).await;
        original.insert(p["id"].as_str().expect("id").to_owned());
    }

    let client = stack.client.clone();
    let url = format!("{}/api/v1/products", stack.gateway());
    let token = seller.clone();
    let writer = tokio::spawn(async move {
        let mut added = 0;
        for i in 0..DURING {
            let response = client
                .post(&url)
                .bearer_auth(&token)
                .json(&json!({"name": format!("New {i}"), "description": "",
                              "price_cents": 100, "currency": "EUR", "initial_stock": 1}))
                .send()
                .await
                .expect("create");
            assert_eq!(response.status(), StatusCode::CREATED);
            added += 1;
        }
        added
    });

    let mut seen = Vec::new();
    let mut query = "limit=4".to_owned();
    let mut pages = 0;
    loop {
        let page = list(&stack, &query).await;
        pages += 1;
        seen.extend(ids(&page));
        match page["next_cursor"].as_str() {
            Some(cursor) => query = format!("limit=4&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(writer.await.expect("writer"), DURING);

    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "no product twice: {seen:?}");
    let missed: Vec<_> = original.iter().filter(|id| !unique.contains(id)).collect();
    assert!(missed.is_empty(), "missed {missed:?}");
    assert!(pages >= BEFORE / 4, "{pages} pages");
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "newest first");
}

#[tokio::test]
async fn only_buyers_review_and_only_once() {
    let stack = catalog(&[Svc::Product]).await;
    let mut reviews = Observer::new(stack.env(), &["review.created"]).await;
    let (seller, seller_id) = stack.account("sam", "seller").await;
    let (customer, customer_id) = stack.account("carol", "customer").await;
    let product = create_product(&stack, &seller, json!({"name": "Teapot"})).await;
    let id = product["id"].as_str().expect("id");
    let path = format!("/products/{id}/reviews");
    let review = json!({"rating": 5, "body": "Keeps tea hot for an hour."});

    let (status, problem) = send(
        stack
            .api(Method::POST, &path)
            .bearer_auth(&customer)
            .json(&review),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("bought")),
        "{problem}"
    );
    let (status, _) = send(
        stack
            .api(Method::POST, &path)
            .bearer_auth(&seller)
            .json(&review),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "sellers do not review");

    let line = json!({"product_id": id, "seller_id": seller_id, "quantity": 1,
                      "unit_price_cents": 4599});
    inject(
        &stack,
        "order.paid",
        json!({"order_id": Uuid::now_v7(), "customer_id": customer_id, "lines": [line],
               "total_cents": 4599, "currency": "EUR"}),
    )
    .await;
    wait_handled(&stack, "purchases", 1).await;

    let (status, problem) = send(
        stack
            .api(Method::POST, &path)
            .bearer_auth(&customer)
            .json(&json!({"rating": 6, "body": "Too good."})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(fields(&problem), ["rating"]);

    let (status, created) = send(
        stack
            .api(Method::POST, &path)
            .bearer_auth(&customer)
            .json(&review),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(created["rating"], 5);
    assert_eq!(created["customer_id"], customer_id.to_string());
    let event: Value = serde_json::from_slice(&reviews.next().await.data).expect("json");
    assert_eq!(event["type"], "review.created");
    assert_eq!(event["data"]["review_id"], created["id"]);
    assert_eq!(event["data"]["product_id"], id);
    assert_eq!(event["data"]["product_name"], "Teapot");
    assert_eq!(event["data"]["seller_id"], seller_id.to_string());
    assert_eq!(event["data"]["customer_id"], customer_id.to_string());
    assert_eq!(event["data"]["rating"], 5);

    let (status, problem) = send(
        stack
            .api(Method::POST, &path)
            .bearer_auth(&customer)
            .json(&json!({"rating": 1, "body": "Changed my mind."})),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{problem}");

    let (status, page) = send(stack.api(Method::GET, &path)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(page["items"].as_array().map(Vec::len), Some(1), "{page}");
    assert_eq!(page["items"][0]["body"], "Keeps tea hot for an hour.");
    assert_eq!(page["next_cursor"], Value::Null);
    let (status, _) = send(stack.api(
        Method::GET,
        &format!("/products/{}/reviews", Uuid::now_v7()),
    ))
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn the_catalog_documents_its_routes() {
    let stack = catalog(&[Svc::Product]).await;
    let (status, doc) = send(
        stack
            .client
            .get(format!("{}/api/v1/openapi.json", stack.gateway())),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    for path in [
        "/api/v1/products",
        "/api/v1/products/{id}",
        "/api/v1/products/{id}/reviews",
        "/api/v1/categories",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} documented");
    }
    assert!(doc["components"]["schemas"]["ProductView"].is_object());
}
