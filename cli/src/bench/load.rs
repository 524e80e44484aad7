//! Placing orders, open or closed loop, and following each to its end.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::StatusCode;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use uuid::Uuid;

use crate::check::{Databases, Scope};
use crate::progress::{Counters, Progress};
use crate::setup::{Account, Product, World};
use crate::{Load, Options, Stop, Target};

/// What an order is meant to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// In stock, good card: expected `paid`.
    Normal,
    /// `pm_card_chargeDeclined`: expected `cancelled` / `payment_declined`.
    Declined,
    /// A line of a sold-out product: expected `cancelled` / `out_of_stock`.
    OutOfStock,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Declined => "declined",
            Self::OutOfStock => "out_of_stock",
        }
    }

    pub fn expected(self) -> (&'static str, Option<&'static str>) {
        match self {
            Self::Normal => ("paid", None),
            Self::Declined => ("cancelled", Some("payment_declined")),
            Self::OutOfStock => ("cancelled", Some("out_of_stock")),
        }
    }
}

/// An order the gateway accepted.
#[derive(Clone, Debug)]
pub struct Placed {
    pub id: Uuid,
    pub kind: Kind,
    pub lines: usize,
    pub sellers: usize,
    /// When the 202 arrived.
    pub placed_at: DateTime<Utc>,
    /// From the moment it was due (open loop) or sent (closed loop) to the 202.
    pub accept: Duration,
}

/// How an order ended, read from order-svc's database.
#[derive(Clone, Debug)]
pub struct Final {
    pub status: String,
    pub reason: Option<String>,
    /// The order's `updated_at` when it reached this status.
    pub at: DateTime<Utc>,
}

/// Open loop only: did the generator keep to its clock?
#[derive(Clone, Debug, Serialize)]
pub struct Schedule {
    pub asked_per_s: f64,
    pub sent_per_s: f64,
    /// Sends that left more than 10 ms after they were due.
    pub late_sends: u64,
    pub max_lag_ms: f64,
    /// Times the cap on placements in flight (`--max-in-flight`) made it wait.
    pub in_flight_cap_hits: u64,
    pub kept_up: bool,
}

pub struct Outcome {
    pub placed: Vec<Placed>,
    pub finals: HashMap<Uuid, Final>,
    /// Failed placements by cause (`429`, `500`, `connect`, …).
    pub errors: BTreeMap<String, u64>,
    /// Placements sent again (same Idempotency-Key) after a transport error or 502-504.
    pub retries: u64,
    pub started_at: DateTime<Utc>,
    /// From the first order due to the last sent.
    pub dispatch: Duration,
    pub schedule: Option<Schedule>,
    /// Queries the tracker made on order-svc's database (each one a commit there).
    pub tracker_queries: u64,
    /// Failed tracker queries and the last error: orders left unfinished may be unseen.
    pub tracker_errors: u64,
    pub tracker_last_error: Option<String>,
}

impl Outcome {
    pub fn scope(&self, world: &World) -> Scope {
        Scope {
            customers: world.customers.iter().map(|a| a.id).collect(),
            products: world
                .on_sale
                .iter()
                .chain(&world.sold_out)
                .map(|p| p.id)
                .collect(),
            accepted: self.placed.iter().map(|p| p.id).collect(),
        }
    }
}

pub async fn drive(
    target: &Target,
    options: &Options,
    world: &World,
    dbs: &Databases,
    progress: &Progress,
) -> anyhow::Result<Outcome> {
    let counters = Arc::new(Counters::default());
    let total = match options.stop {
        Stop::Orders(n) => Some(n),
        Stop::Duration(_) => None,
    };
    let ticker = progress.orders(total, Arc::clone(&counters));
    let tracker = Arc::new(Tracker::default());
    let follow = tokio::spawn(Arc::clone(&tracker).follow(
        dbs.order.clone(),
        options.poll_interval,
        Arc::clone(&counters),
    ));
    let mix = Arc::new(Mutex::new(Mix::new(options, world)));
    let ctx = Arc::new(Ctx {
        client: world.client.clone(),
        url: target.api("/orders"),
        customers: world.customers.clone(),
        counters: Arc::clone(&counters),
        tracker: Arc::clone(&tracker),
        retries: AtomicU64::new(0),
        errors: Mutex::new(BTreeMap::new()),
        placed: Mutex::new(Vec::new()),
    });

    let started_at = Utc::now();
    let start = Instant::now();
    let (schedule, dispatch) = match options.load {
        Load::Rate(rate) => {
            let s = open_loop(&ctx, &mix, options, rate, start).await;
            (Some(s.0), s.1)
        }
        Load::Concurrency(c) => (None, closed_loop(&ctx, &mix, options, c, start).await),
    };

    // Every placement has its answer; now wait for the sagas that are still going.
    tracker.close();
    let drained = tokio::time::timeout(options.drain_timeout, follow).await;
    if drained.is_err() {
        tracker.stop();
    }
    drop(ticker);

    let placed = std::mem::take(&mut *lock(&ctx.placed));
    let errors = std::mem::take(&mut *lock(&ctx.errors));
    let finals = std::mem::take(&mut *lock(&tracker.finals));
    Ok(Outcome {
        placed,
        finals,
        errors,
        retries: ctx.retries.load(Ordering::Relaxed),
        started_at,
        dispatch,
        schedule,
        tracker_queries: tracker.queries.load(Ordering::Relaxed),
        tracker_errors: tracker.errors.load(Ordering::Relaxed),
        tracker_last_error: lock(&tracker.last_error).take(),
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicking placement task cannot leave these half-updated: take them as they are.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct Ctx {
    client: reqwest::Client,
    url: String,
    customers: Vec<Account>,
    counters: Arc<Counters>,
    tracker: Arc<Tracker>,
    retries: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    placed: Mutex<Vec<Placed>>,
}

/// Orders sent on a clock: order i is due at start + i / rate, whether or not earlier
/// ones have been answered.
async fn open_loop(
    ctx: &Arc<Ctx>,
    mix: &Arc<Mutex<Mix>>,
    options: &Options,
    rate: f64,
    start: Instant,
) -> (Schedule, Duration) {
    let in_flight = Arc::new(Semaphore::new(options.max_in_flight));
    let mut tasks = JoinSet::new();
    let (mut late, mut cap_hits, mut max_lag) = (0u64, 0u64, Duration::ZERO);
    let mut sent = 0u64;
    let mut last_sent = start;
    for i in 0u64.. {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        match options.stop {
            Stop::Orders(n) if i >= n => break,
            Stop::Duration(d) if due >= start + d => break,
            _ => {}
        }
        tokio::time::sleep_until(due).await;
        let permit = match Arc::clone(&in_flight).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                cap_hits += 1;
                match Arc::clone(&in_flight).acquire_owned().await {
                    Ok(permit) => permit,
                    Err(_) => break,
                }
            }
        };
        let now = Instant::now();
        let lag = now.duration_since(due);
        max_lag = max_lag.max(lag);
        if lag > Duration::from_millis(10) {
            late += 1;
        }
        let order = lock(mix).next(i);
        let ctx = Arc::clone(ctx);
        tasks.spawn(async move {
            ctx.place(i, order, due).await;
            drop(permit);
        });
        sent += 1;
        last_sent = now;
    }
    while tasks.join_next().await.is_some() {}
    let span = last_sent.duration_since(start).as_secs_f64();
    // n sends span n - 1 intervals.
    let sent_per_s = if sent > 1 && span > 0.0 {
        (sent - 1) as f64 / span
    } else {
        rate
    };
    let schedule = Schedule {
        asked_per_s: rate,
        sent_per_s,
        late_sends: late,
        max_lag_ms: max_lag.as_secs_f64() * 1e3,
        in_flight_cap_hits: cap_hits,
        kept_up: cap_hits == 0 && late * 100 <= sent,
    };
    (schedule, last_sent.duration_since(start))
}

/// `concurrency` workers, each placing an order and waiting for its end before the next.
async fn closed_loop(
    ctx: &Arc<Ctx>,
    mix: &Arc<Mutex<Mix>>,
    options: &Options,
    concurrency: usize,
    start: Instant,
) -> Duration {
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        let (ctx, mix, next) = (Arc::clone(ctx), Arc::clone(mix), Arc::clone(&next));
        let (stop, drain) = (options.stop, options.drain_timeout);
        workers.spawn(async move {
            let mut last = start;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let now = Instant::now();
                match stop {
                    Stop::Orders(n) if i >= n => break,
                    Stop::Duration(d) if now >= start + d => break,
                    _ => {}
                }
                let order = lock(&mix).next(i);
                last = now;
                match ctx.place(i, order, now).await {
                    Some(ended) => {
                        // An order that never ends is reported by the drain, not here.
                        let _ = tokio::time::timeout(drain, ended).await;
                    }
                    // A failing system must not turn the worker into a busy loop.
                    None => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
            last
        });
    }
    let mut last = start;
    while let Some(done) = workers.join_next().await {
        if let Ok(t) = done {
            last = last.max(t);
        }
    }
    last.duration_since(start)
}

/// One order to place.
struct Planned {
    kind: Kind,
    customer: usize,
    body: Value,
    lines: usize,
    sellers: usize,
}

impl Ctx {
    /// Places one order; on a 202 registers it with the tracker and returns a receiver
    /// that fires when it ends.
    async fn place(&self, i: u64, order: Planned, due: Instant) -> Option<oneshot::Receiver<()>> {
        let customer = &self.customers[order.customer];
        let key = Uuid::new_v4().to_string();
        let mut attempt = 0;
        let result = loop {
            let sent = self
                .client
                .post(&self.url)
                .bearer_auth(&customer.token)
                .header("Idempotency-Key", &key)
                .json(&order.body)
                .send()
                .await;
            let retry = match &sent {
                Err(_) => true,
                Ok(r) => matches!(
                    r.status(),
                    StatusCode::BAD_GATEWAY
                        | StatusCode::SERVICE_UNAVAILABLE
                        | StatusCode::GATEWAY_TIMEOUT
                ),
            };
            // The same key makes a second try safe: it gives the order already made.
            if retry && attempt < 2 {
                attempt += 1;
                self.retries.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            break sent;
        };
        let accepted = Instant::now();
        let failure = match result {
            Err(e) if e.is_timeout() => "timeout".to_owned(),
            Err(e) if e.is_connect() => "connect".to_owned(),
            Err(_) => "transport".to_owned(),
            Ok(r) if r.status() == StatusCode::ACCEPTED => {
                let body: Option<Value> = r.json().await.ok();
                match body
                    .as_ref()
                    .and_then(|b| b["id"].as_str())
                    .and_then(|id| id.parse::<Uuid>().ok())
                {
                    Some(id) => {
                        let placed_at = Utc::now();
                        let (tx, rx) = oneshot::channel();
                        self.tracker.add(id, tx);
                        self.counters.placed.fetch_add(1, Ordering::Relaxed);
                        lock(&self.placed).push(Placed {
                            id,
                            kind: order.kind,
                            lines: order.lines,
                            sellers: order.sellers,
                            placed_at,
                            accept: accepted.duration_since(due),
                        });
                        return Some(rx);
                    }
                    None => "202 without an order id".to_owned(),
                }
            }
            Ok(r) => r.status().as_u16().to_string(),
        };
        tracing_free_log(i, &failure);
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        *lock(&self.errors).entry(failure).or_default() += 1;
        None
    }
}

/// Failed placements are counted, not printed one by one (they would tear the bar);
/// set COMMERCE_BENCH_VERBOSE=1 to see each.
fn tracing_free_log(i: u64, failure: &str) {
    if std::env::var_os("COMMERCE_BENCH_VERBOSE").is_some() {
        eprintln!("bench: order {i} failed: {failure}");
    }
}

/// The order mix: which customer, which products, which card.
struct Mix {
    rng: fastrand::Rng,
    /// For a run of a fixed number of orders, exactly the shares asked, shuffled.
    kinds: Option<Vec<Kind>>,
    declined: f64,
    out_of_stock: f64,
    customers: usize,
    on_sale: Vec<Product>,
    sold_out: Vec<Product>,
    max_lines: usize,
}

impl Mix {
    fn new(options: &Options, world: &World) -> Self {
        let mut rng = fastrand::Rng::with_seed(options.seed);
        let kinds = match options.stop {
            Stop::Orders(n) => {
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                let declined = share(n, options.declined);
                let out = share(n, options.out_of_stock).min(n - declined);
                let mut kinds = vec![Kind::Normal; n];
                kinds[..declined].fill(Kind::Declined);
                kinds[declined..declined + out].fill(Kind::OutOfStock);
                rng.shuffle(&mut kinds);
                Some(kinds)
            }
            Stop::Duration(_) => None,
        };
        Self {
            rng,
            kinds,
            declined: options.declined,
            out_of_stock: options.out_of_stock,
            customers: world.customers.len(),
            on_sale: world.on_sale.clone(),
            sold_out: world.sold_out.clone(),
            max_lines: options.max_lines,
        }
    }

    fn next(&mut self, i: u64) -> Planned {
        let kind = match &self.kinds {
            Some(kinds) => usize::try_from(i)
                .ok()
                .and_then(|i| kinds.get(i).copied())
                .unwrap_or(Kind::Normal),
            None => {
                let x = self.rng.f64();
                if x < self.declined {
                    Kind::Declined
                } else if x < self.declined + self.out_of_stock {
                    Kind::OutOfStock
                } else {
                    Kind::Normal
                }
            }
        };
        let lines = self.rng.usize(1..=self.max_lines);
        let mut products: Vec<Product> = Vec::with_capacity(lines);
        if kind == Kind::OutOfStock {
            let k = self.rng.usize(..self.sold_out.len());
            products.push(self.sold_out[k]);
        }
        while products.len() < lines {
            let p = self.on_sale[self.rng.usize(..self.on_sale.len())];
            if !products.iter().any(|q| q.id == p.id) {
                products.push(p);
            }
        }
        let mut sellers: Vec<Uuid> = products.iter().map(|p| p.seller).collect();
        sellers.sort();
        sellers.dedup();
        let items: Vec<Value> = products
            .iter()
            .map(|p| json!({"product_id": p.id, "quantity": self.rng.i64(1..=3)}))
            .collect();
        let card = if kind == Kind::Declined {
            "pm_card_chargeDeclined"
        } else {
            "pm_card_visa"
        };
        Planned {
            kind,
            // Round robin: spreads the load over the per-user rate limits.
            customer: usize::try_from(i).unwrap_or(0) % self.customers,
            body: json!({"items": items, "payment_method": card}),
            lines,
            sellers: sellers.len(),
        }
    }
}

fn share(n: usize, share: f64) -> usize {
    ((n as f64 * share).round() as usize).min(n)
}

/// Follows accepted orders to their end by reading order-svc's database.
#[derive(Default)]
struct Tracker {
    pending: Mutex<HashMap<Uuid, oneshot::Sender<()>>>,
    finals: Mutex<HashMap<Uuid, Final>>,
    queries: AtomicU64,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// No more orders will be added: stop once none is pending.
    closed: std::sync::atomic::AtomicBool,
    /// Stop now (the drain deadline passed).
    stopped: std::sync::atomic::AtomicBool,
}

impl Tracker {
    fn add(&self, id: Uuid, ended: oneshot::Sender<()>) {
        lock(&self.pending).insert(id, ended);
    }

    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }

    async fn follow(self: Arc<Self>, db: sqlx::PgPool, every: Duration, counters: Arc<Counters>) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.stopped.load(Ordering::SeqCst) {
                return;
            }
            let closed = self.closed.load(Ordering::SeqCst);
            let ids: Vec<Uuid> = lock(&self.pending).keys().copied().collect();
            if ids.is_empty() {
                if closed {
                    return;
                }
                continue;
            }
            self.queries.fetch_add(1, Ordering::Relaxed);
            let rows: Vec<(Uuid, String, Option<String>, DateTime<Utc>)> = match sqlx::query_as(
                "SELECT id, status, status_reason, updated_at FROM orders \
                 WHERE id = ANY($1) AND status <> 'pending'",
            )
            .bind(&ids)
            .fetch_all(&db)
            .await
            {
                Ok(rows) => rows,
                // Retried at the next tick; the drain deadline bounds it.
                Err(e) => {
                    self.errors.fetch_add(1, Ordering::Relaxed);
                    *lock(&self.last_error) = Some(e.to_string());
                    continue;
                }
            };
            for (id, status, reason, at) in rows {
                let waiter = lock(&self.pending).remove(&id);
                lock(&self.finals).insert(id, Final { status, reason, at });
                counters.finished.fetch_add(1, Ordering::Relaxed);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(());
                }
            }
        }
    }
}
