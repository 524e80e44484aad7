//! Accounts and products of one run, made through the gateway, and the wait until every
//! service that the saga needs has them (they travel as events).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::check::Databases;
use crate::progress::Progress;
use crate::{Options, Target};

/// Stock of each product on sale: more than any run can sell, so that only the orders
/// meant to be out of stock are.
pub const STOCK: i64 = 1_000_000;
/// Added to each product's stock by an adjustment, so that the conservation check
/// covers adjustments too.
pub const TOP_UP: i64 = 1_000;
/// How long setup waits for the services to learn of the new accounts and products.
const SETUP_DEADLINE: Duration = Duration::from_secs(120);
const PASSWORD: &str = "bench load generator passphrase";

#[derive(Clone, Debug)]
pub struct Account {
    pub id: Uuid,
    pub token: String,
}

#[derive(Clone, Copy, Debug)]
pub struct Product {
    pub id: Uuid,
    pub seller: Uuid,
    /// Sold out: every order with it is meant to be rejected.
    pub sold_out: bool,
}

/// What the run made.
pub struct World {
    pub run_id: String,
    pub customers: Vec<Account>,
    pub sellers: Vec<Account>,
    pub on_sale: Vec<Product>,
    pub sold_out: Vec<Product>,
    pub client: reqwest::Client,
}

pub async fn prepare(
    target: &Target,
    options: &Options,
    dbs: &Databases,
    progress: &Progress,
) -> anyhow::Result<World> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(options.max_in_flight.min(4096))
        .timeout(Duration::from_secs(30))
        .build()?;
    let run_id = format!(
        "bench-{}-{}",
        chrono::Utc::now().format("%Y%m%d%H%M%S"),
        (0..4).map(|_| fastrand::lowercase()).collect::<String>()
    );
    let deadline = Instant::now() + SETUP_DEADLINE;

    progress.phase("registering sellers and customers");
    let sellers = register_all(
        &client,
        target,
        &run_id,
        "seller",
        options.sellers,
        deadline,
    )
    .await
    .context("registering sellers")?;
    let customers = register_all(
        &client,
        target,
        &run_id,
        "customer",
        options.customers,
        deadline,
    )
    .await
    .context("registering customers")?;

    progress.phase("creating products");
    let mut on_sale = Vec::new();
    let mut sold_out = Vec::new();
    for i in 0..options.products {
        let seller = &sellers[i % sellers.len()];
        let price = fastrand::i64(100..=5_000);
        on_sale.push(product(&client, target, seller, i, price, STOCK, deadline).await?);
    }
    for (i, seller) in sellers.iter().enumerate() {
        sold_out.push(product(&client, target, seller, i, 999, 0, deadline).await?);
    }

    progress.phase("waiting for the services to learn of them");
    for p in &on_sale {
        let seller = sellers
            .iter()
            .find(|s| s.id == p.seller)
            .context("product of an unknown seller")?;
        adjust(&client, target, seller, p.id, deadline).await?;
    }
    let users: Vec<Uuid> = sellers.iter().chain(&customers).map(|a| a.id).collect();
    let products: Vec<Uuid> = on_sale.iter().chain(&sold_out).map(|p| p.id).collect();
    dbs.wait_known(&users, &products, deadline).await?;

    Ok(World {
        run_id,
        customers,
        sellers,
        on_sale,
        sold_out,
        client,
    })
}

async fn register_all(
    client: &reqwest::Client,
    target: &Target,
    run_id: &str,
    role: &'static str,
    count: usize,
    deadline: Instant,
) -> anyhow::Result<Vec<Account>> {
    // Password hashing is slow on purpose: a few at a time keeps every core busy.
    let permits = Arc::new(Semaphore::new(4));
    let mut tasks = JoinSet::new();
    for i in 0..count {
        let client = client.clone();
        let url = target.api("/auth/register");
        let email = format!("{run_id}.{role}{i}@bench.example.com");
        let permits = Arc::clone(&permits);
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await?;
            let body = json!({"email": email, "password": PASSWORD,
                              "name": format!("Bench {role} {i}"), "role": role});
            let answer = send(deadline, || client.post(&url).json(&body)).await?;
            let answer = expect(answer, StatusCode::CREATED, "register").await?;
            let id = answer["user"]["id"]
                .as_str()
                .and_then(|id| id.parse().ok())
                .context("register answered without user.id")?;
            let token = answer["access_token"]
                .as_str()
                .context("register answered without access_token")?
                .to_owned();
            anyhow::Ok((i, Account { id, token }))
        });
    }
    let mut accounts = Vec::with_capacity(count);
    while let Some(done) = tasks.join_next().await {
        accounts.push(done??);
    }
    accounts.sort_by_key(|(i, _)| *i);
    Ok(accounts.into_iter().map(|(_, a)| a).collect())
}

async fn product(
    client: &reqwest::Client,
    target: &Target,
    seller: &Account,
    i: usize,
    price_cents: i64,
    stock: i64,
    deadline: Instant,
) -> anyhow::Result<Product> {
    let name = if stock == 0 {
        format!("Sold-out item {i}")
    } else {
        format!("Bench item {i}")
    };
    let body = json!({"name": name, "description": "Made by commerce bench.",
                      "price_cents": price_cents, "currency": "EUR", "initial_stock": stock});
    let url = target.api("/products");
    let answer = send(deadline, || {
        client.post(&url).bearer_auth(&seller.token).json(&body)
    })
    .await?;
    let answer = expect(answer, StatusCode::CREATED, "create product").await?;
    let id = answer["id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .context("product created without id")?;
    Ok(Product {
        id,
        seller: seller.id,
        sold_out: stock == 0,
    })
}

/// Tops the stock up once inventory-svc knows the product (404 until product.created
/// reached it).
async fn adjust(
    client: &reqwest::Client,
    target: &Target,
    seller: &Account,
    product: Uuid,
    deadline: Instant,
) -> anyhow::Result<()> {
    let url = target.api(&format!("/inventory/{product}/adjust"));
    let body = json!({"delta": TOP_UP, "reason": "bench top-up"});
    let mut wait = Duration::from_millis(20);
    loop {
        let answer = send(deadline, || {
            client.post(&url).bearer_auth(&seller.token).json(&body)
        })
        .await?;
        if answer.status() != StatusCode::NOT_FOUND {
            expect(answer, StatusCode::OK, "adjust stock").await?;
            return Ok(());
        }
        if Instant::now() + wait > deadline {
            bail!("inventory-svc did not learn of product {product} in time");
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_millis(500));
    }
}

/// Sends a request, waiting out the gateway's rate limit (429 with `Retry-After`) as a
/// polite client does.
async fn send(
    deadline: Instant,
    request: impl Fn() -> reqwest::RequestBuilder,
) -> anyhow::Result<reqwest::Response> {
    loop {
        let response = request()
            .send()
            .await
            .context("the gateway does not answer")?;
        if response.status() != StatusCode::TOO_MANY_REQUESTS {
            return Ok(response);
        }
        let wait = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(Duration::from_secs(1), Duration::from_secs);
        if Instant::now() + wait > deadline {
            bail!(
                "the gateway's rate limit holds setup back past its deadline; run the \
                 system with COMMERCE__GATEWAY__RATE_LIMIT__ENABLED=false for benchmarks"
            );
        }
        tokio::time::sleep(wait).await;
    }
}

async fn expect(
    response: reqwest::Response,
    status: StatusCode,
    what: &str,
) -> anyhow::Result<Value> {
    let got = response.status();
    let body = response.text().await.unwrap_or_default();
    if got != status {
        bail!("{what}: expected {status}, got {got}: {body}");
    }
    serde_json::from_str(&body).with_context(|| format!("{what}: answer is not JSON: {body}"))
}
