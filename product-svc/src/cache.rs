//! The catalog's read-aside cache in Redis: product detail and list pages, as the JSON
//! bodies the API answers with.
//!
//! - **Detail** `<ns>:catalog:product:<id>`, next to a *stamp* `…:<id>:v` that every
//!   change of the product replaces with a new random value. A miss reads the stamp with
//!   the entry (one `MGET`), loads from PostgreSQL, and fills only if the stamp is still
//!   the one it read (a Lua compare-and-set). So a load that read the row before a change
//!   committed can never put the old row back after the change removed it.
//! - **List pages** `<ns>:catalog:list:<generation>:<hash of the query>`. Every change of
//!   any product sets a new generation, so every page computed before it is orphaned at
//!   once and expires on its own.
//! - **Invalidation** runs after the change committed: right after the commit for HTTP
//!   writes (so a client reads its own write), after the consumer's commit for events.
//! - **Single flight:** concurrent misses for one key share one load per process.
//!   Replicas do not coordinate: N replicas make at most N loads of one key at a time.
//! - **Redis down:** every call has a short timeout; a failure makes the cache skip Redis
//!   for a moment and serve from PostgreSQL. Invalidations that could not be delivered
//!   are kept and retried, and until they are delivered this process neither reads nor
//!   fills the cache, so an entry that should have been removed is never served by it.

use std::collections::HashSet;
use std::fmt::Display;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use deadpool_redis::redis::{self, Script, aio::MultiplexedConnection};
use shared::http::{ApiError, FieldError};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::flight::Flights;

/// A Redis call taking longer than this is treated as Redis being down.
const CALL_TIMEOUT: Duration = Duration::from_millis(200);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// After a failure, Redis is left alone this long: requests go to PostgreSQL without
/// waiting for a timeout each.
const DOWN_FOR: Duration = Duration::from_secs(1);
/// How often undelivered invalidations are retried.
const RETRY_EVERY: Duration = Duration::from_millis(250);
/// Past this many undelivered invalidations, the retry removes every product entry.
const PENDING_MAX: usize = 100_000;
/// The list generation is replaced at every change; it expires after a day without one.
const GENERATION_TTL_SECS: u64 = 24 * 60 * 60;

const SERVICE: &str = crate::SERVICE;

/// Fills a product entry only if its stamp is still the one read before the load.
const FILL_IF_UNCHANGED: &str = r"
local current = redis.call('GET', KEYS[2]) or ''
if current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0
";

/// The current list generation (made if there is none) and the page under it.
const READ_PAGE: &str = r"
redis.call('SET', KEYS[1], ARGV[3], 'NX', 'EX', ARGV[4])
local generation = redis.call('GET', KEYS[1])
return {generation, redis.call('GET', ARGV[1] .. generation .. ':' .. ARGV[2])}
";

/// Why a load gave no body; clonable, since every caller of a shared load gets it.
#[derive(Clone, Debug)]
pub enum LoadError {
    Invalid(Vec<FieldError>),
    Failed(Arc<anyhow::Error>),
}

impl From<sqlx::Error> for LoadError {
    fn from(error: sqlx::Error) -> Self {
        Self::Failed(Arc::new(error.into()))
    }
}

impl From<LoadError> for ApiError {
    fn from(error: LoadError) -> Self {
        match error {
            LoadError::Invalid(errors) => Self::Validation(errors),
            LoadError::Failed(error) => Self::Unexpected(anyhow::anyhow!("{error:#}")),
        }
    }
}

/// A response body, or `None` when there is nothing (404).
pub type Loaded = Result<Option<Bytes>, LoadError>;

#[derive(Clone, Copy)]
enum Kind {
    Product,
    List,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Self::Product => "product",
            Self::List => "list",
        }
    }

    fn hit(self) {
        metrics::counter!("cache_hits_total", "service" => SERVICE, "cache" => self.label())
            .increment(1);
    }

    fn miss(self) {
        metrics::counter!("cache_misses_total", "service" => SERVICE, "cache" => self.label())
            .increment(1);
    }

    fn load(self) {
        metrics::counter!("cache_loads_total", "service" => SERVICE, "cache" => self.label())
            .increment(1);
    }
}

#[derive(Default)]
struct Pending {
    products: HashSet<Uuid>,
    /// Too many to list: remove every product entry.
    everything: bool,
}

struct Inner {
    enabled: bool,
    pool: Option<deadpool_redis::Pool>,
    /// One multiplexed connection taken from the pool and shared: a pooled `get` costs a
    /// PING round trip each time.
    conn: RwLock<Option<MultiplexedConnection>>,
    connecting: tokio::sync::Mutex<()>,
    down_until: Mutex<Option<Instant>>,
    /// Set while invalidations are waiting to be delivered: the cache is then not used.
    dirty: AtomicBool,
    pending: Mutex<Pending>,
    prefix: String,
    product_ttl_ms: u64,
    stamp_ttl_ms: u64,
    list_ttl_ms: u64,
    fill_if_unchanged: Script,
    read_page: Script,
    flights: Flights<Loaded>,
}

#[derive(Clone)]
pub struct Cache(Arc<Inner>);

impl Cache {
    /// `pool` is the service's Redis; `None` or `settings.cache.enabled = false` turns
    /// the cache off: every read goes to PostgreSQL.
    pub fn new(settings: &shared::Settings, pool: Option<deadpool_redis::Pool>) -> Self {
        // Zero from the start, so a hit ratio has its series before the first read.
        for kind in [Kind::Product, Kind::List] {
            for name in [
                "cache_hits_total",
                "cache_misses_total",
                "cache_loads_total",
            ] {
                metrics::counter!(name, "service" => SERVICE, "cache" => kind.label()).increment(0);
            }
        }
        let cache = &settings.cache;
        let product_ttl_ms = cache.product_ttl_secs.max(1) * 1000;
        Self(Arc::new(Inner {
            enabled: cache.enabled && pool.is_some(),
            pool,
            conn: RwLock::default(),
            connecting: tokio::sync::Mutex::default(),
            down_until: Mutex::default(),
            dirty: AtomicBool::new(false),
            pending: Mutex::default(),
            prefix: format!("{}:catalog:", settings.namespace),
            product_ttl_ms,
            // Longer than any load takes, so a stamp cannot expire and come back equal
            // between a miss and its fill.
            stamp_ttl_ms: product_ttl_ms + 60_000,
            list_ttl_ms: cache.list_ttl_secs.max(1) * 1000,
            fill_if_unchanged: Script::new(FILL_IF_UNCHANGED),
            read_page: Script::new(READ_PAGE),
            flights: Flights::default(),
        }))
    }

    fn product_key(&self, id: Uuid) -> String {
        format!("{}product:{id}", self.0.prefix)
    }

    fn generation_key(&self) -> String {
        format!("{}list-generation", self.0.prefix)
    }

    /// The body of product `id`: from Redis, or from `load` (shared with concurrent
    /// misses) and then stored.
    pub async fn product<F>(&self, id: Uuid, load: F) -> Loaded
    where
        F: Future<Output = Loaded> + Send + 'static,
    {
        if !self.0.enabled {
            return load.await;
        }
        let key = self.product_key(id);
        let stamp_key = format!("{key}:v");
        let mut stamp: Option<String> = None;
        if let Some(mut conn) = self.connection().await {
            let mut read = redis::cmd("MGET");
            read.arg(&key).arg(&stamp_key);
            match self
                .call(read.query_async::<(Option<Vec<u8>>, Option<String>)>(&mut conn))
                .await
            {
                Some((Some(body), _)) => {
                    Kind::Product.hit();
                    return Ok(Some(Bytes::from(body)));
                }
                Some((None, current)) => stamp = Some(current.unwrap_or_default()),
                None => {}
            }
        }
        Kind::Product.miss();
        // Callers that read another stamp must not share this load: theirs started
        // after a change this one may not see.
        let flight = format!("product:{id}#{}", stamp.as_deref().unwrap_or("-"));
        let cache = self.clone();
        self.0
            .flights
            .run(flight, async move {
                Kind::Product.load();
                let loaded = load.await;
                if let (Ok(Some(body)), Some(stamp)) = (&loaded, stamp) {
                    cache.fill_product(&key, &stamp_key, &stamp, body).await;
                }
                loaded
            })
            .await
    }

    async fn fill_product(&self, key: &str, stamp_key: &str, stamp: &str, body: &Bytes) {
        let Some(mut conn) = self.connection().await else {
            return;
        };
        let mut fill = self.0.fill_if_unchanged.key(key);
        fill.key(stamp_key)
            .arg(stamp)
            .arg(body.as_ref())
            .arg(self.0.product_ttl_ms);
        self.call(fill.invoke_async::<i64>(&mut conn)).await;
    }

    /// A page of a listing, `query` naming it (every parameter that shapes it).
    pub async fn list<F>(&self, query: &str, load: F) -> Loaded
    where
        F: Future<Output = Loaded> + Send + 'static,
    {
        if !self.0.enabled {
            return load.await;
        }
        let page = {
            use sha2::Digest as _;
            let digest = sha2::Sha256::digest(query.as_bytes());
            digest[..16]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        };
        let pages = format!("{}list:", self.0.prefix);
        let mut generation: Option<String> = None;
        if let Some(mut conn) = self.connection().await {
            let mut read = self.0.read_page.key(self.generation_key());
            read.arg(&pages)
                .arg(&page)
                .arg(Uuid::now_v7().to_string())
                .arg(GENERATION_TTL_SECS);
            match self
                .call(read.invoke_async::<(String, Option<Vec<u8>>)>(&mut conn))
                .await
            {
                Some((_, Some(body))) => {
                    Kind::List.hit();
                    return Ok(Some(Bytes::from(body)));
                }
                Some((current, None)) => generation = Some(current),
                None => {}
            }
        }
        Kind::List.miss();
        let flight = format!("list:{}:{page}", generation.as_deref().unwrap_or("-"));
        let cache = self.clone();
        self.0
            .flights
            .run(flight, async move {
                Kind::List.load();
                let loaded = load.await;
                if let (Ok(Some(body)), Some(generation)) = (&loaded, generation) {
                    // A page of an old generation is never read again: no check needed.
                    if let Some(mut conn) = cache.connection().await {
                        let mut fill = redis::cmd("SET");
                        fill.arg(format!("{pages}{generation}:{page}"))
                            .arg(body.as_ref())
                            .arg("PX")
                            .arg(cache.0.list_ttl_ms);
                        cache.call(fill.query_async::<()>(&mut conn)).await;
                    }
                }
                loaded
            })
            .await
    }

    /// After a change of `product` (its row, stock or images) committed: its entry and
    /// every list page go. If Redis cannot be told now, it will be told later, and the
    /// cache is not used until then.
    pub async fn invalidate(&self, product: Uuid) {
        if !self.0.enabled {
            return;
        }
        // Loads running now may have read the old row: later callers start their own.
        self.0.flights.forget(&format!("product:{product}#"));
        self.0.flights.forget("list:");
        if !self.0.dirty.load(Ordering::Acquire)
            && let Some(mut conn) = self.raw_connection().await
        {
            let sent = self
                .call(self.invalidation(&[product]).query_async::<()>(&mut conn))
                .await;
            if sent.is_some() {
                return;
            }
        }
        self.defer(product);
    }

    /// The commands that invalidate `products` and every list page, in one transaction.
    fn invalidation(&self, products: &[Uuid]) -> redis::Pipeline {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for product in products {
            let key = self.product_key(*product);
            pipe.cmd("SET")
                .arg(format!("{key}:v"))
                .arg(Uuid::now_v7().to_string())
                .arg("PX")
                .arg(self.0.stamp_ttl_ms)
                .ignore();
            pipe.cmd("DEL").arg(key).ignore();
        }
        pipe.cmd("SET")
            .arg(self.generation_key())
            .arg(Uuid::now_v7().to_string())
            .arg("EX")
            .arg(GENERATION_TTL_SECS)
            .ignore();
        pipe
    }

    fn defer(&self, product: Uuid) {
        let mut pending = self.0.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending.products.len() >= PENDING_MAX {
            pending.everything = true;
            pending.products.clear();
        } else if !pending.everything {
            pending.products.insert(product);
        }
        self.0.dirty.store(true, Ordering::Release);
        metrics::gauge!("cache_invalidations_pending", "service" => SERVICE)
            .set(pending.products.len() as f64);
        tracing::debug!(%product, "cache invalidation deferred: Redis is unreachable");
    }

    /// Delivers deferred invalidations; `true` when none is left.
    async fn deliver(&self) -> bool {
        let (products, everything) = {
            let pending = self.0.pending.lock().unwrap_or_else(|e| e.into_inner());
            if pending.products.is_empty() && !pending.everything {
                return true;
            }
            (
                pending.products.iter().copied().collect::<Vec<_>>(),
                pending.everything,
            )
        };
        let Some(mut conn) = self.raw_connection().await else {
            return false;
        };
        if everything && !self.remove_every_product(&mut conn).await {
            return false;
        }
        for chunk in products.chunks(500) {
            let sent = self
                .call(self.invalidation(chunk).query_async::<()>(&mut conn))
                .await;
            if sent.is_none() {
                return false;
            }
        }
        if products.is_empty() {
            // `everything` alone: the list pages still need a new generation.
            let sent = self
                .call(self.invalidation(&[]).query_async::<()>(&mut conn))
                .await;
            if sent.is_none() {
                return false;
            }
        }
        let mut pending = self.0.pending.lock().unwrap_or_else(|e| e.into_inner());
        for product in &products {
            pending.products.remove(product);
        }
        if everything {
            pending.everything = false;
        }
        let done = pending.products.is_empty() && !pending.everything;
        // Under the lock, so a deferral made meanwhile keeps the flag set.
        self.0.dirty.store(!done, Ordering::Release);
        metrics::gauge!("cache_invalidations_pending", "service" => SERVICE)
            .set(pending.products.len() as f64);
        if done {
            tracing::info!("deferred cache invalidations delivered; using the cache again");
        }
        done
    }

    /// Deletes every product entry (after too many undelivered invalidations to list).
    async fn remove_every_product(&self, conn: &mut MultiplexedConnection) -> bool {
        let pattern = format!("{}product:*", self.0.prefix);
        let mut cursor: u64 = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000);
            let Some((next, keys)) = self
                .call(scan.query_async::<(u64, Vec<String>)>(conn))
                .await
            else {
                return false;
            };
            let entries: Vec<_> = keys.into_iter().filter(|k| !k.ends_with(":v")).collect();
            if !entries.is_empty() {
                let mut unlink = redis::cmd("UNLINK");
                unlink.arg(entries);
                if self.call(unlink.query_async::<()>(conn)).await.is_none() {
                    return false;
                }
            }
            if next == 0 {
                return true;
            }
            cursor = next;
        }
    }

    /// Retries deferred invalidations until shutdown, then once more.
    pub async fn run_retries(self, shutdown: CancellationToken) {
        if !self.0.enabled {
            return;
        }
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(RETRY_EVERY) => {}
            }
            if self.0.dirty.load(Ordering::Acquire) {
                self.deliver().await;
            }
        }
        if self.0.dirty.load(Ordering::Acquire) && !self.deliver().await {
            tracing::warn!("stopping with undelivered cache invalidations; entries expire by TTL");
        }
    }

    /// A connection for reads and fills: none while invalidations wait to be delivered.
    async fn connection(&self) -> Option<MultiplexedConnection> {
        if self.0.dirty.load(Ordering::Acquire) {
            return None;
        }
        self.raw_connection().await
    }

    /// The shared connection, made if needed; none while Redis is considered down.
    async fn raw_connection(&self) -> Option<MultiplexedConnection> {
        let pool = self.0.pool.as_ref()?;
        if self.is_down() {
            return None;
        }
        if let Some(conn) = self.current() {
            return Some(conn);
        }
        // One connection attempt at a time; the others wait for its result.
        let _connecting = self.0.connecting.lock().await;
        if let Some(conn) = self.current() {
            return Some(conn);
        }
        if self.is_down() {
            return None;
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, pool.get()).await {
            Ok(Ok(conn)) => {
                let conn = deadpool_redis::Connection::take(conn);
                *self.0.conn.write().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
                Some(conn)
            }
            Ok(Err(error)) => {
                self.failed(error);
                None
            }
            Err(_) => {
                self.failed(format_args!("no connection within {CONNECT_TIMEOUT:?}"));
                None
            }
        }
    }

    fn current(&self) -> Option<MultiplexedConnection> {
        self.0
            .conn
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn is_down(&self) -> bool {
        self.0
            .down_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|until| Instant::now() < until)
    }

    /// Runs one Redis call under the time limit; `None` if it failed.
    async fn call<T>(&self, call: impl Future<Output = redis::RedisResult<T>>) -> Option<T> {
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(value)) => Some(value),
            Ok(Err(error)) => {
                self.failed(error);
                None
            }
            Err(_) => {
                self.failed(format_args!("no answer within {CALL_TIMEOUT:?}"));
                None
            }
        }
    }

    /// Drops the connection and leaves Redis alone for [`DOWN_FOR`].
    fn failed(&self, error: impl Display) {
        *self.0.conn.write().unwrap_or_else(|e| e.into_inner()) = None;
        let mut down = self.0.down_until.lock().unwrap_or_else(|e| e.into_inner());
        let was_up = down.is_none_or(|until| Instant::now() >= until);
        *down = Some(Instant::now() + DOWN_FOR);
        drop(down);
        metrics::counter!("cache_errors_total", "service" => SERVICE).increment(1);
        if was_up {
            tracing::warn!(%error, "Redis call failed; serving from PostgreSQL for now");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use testkit::{TcpProxy, TestEnv, eventually};
    use tokio::sync::watch;

    use super::*;

    const REDIS: &str = "127.0.0.1:6379";

    /// A cache on the real Redis (reached at `address`), in the test's namespace, whose
    /// keys go when `env` does.
    fn cache_at(env: &TestEnv, address: &str) -> Cache {
        let settings = env.settings();
        let pool = deadpool_redis::Config::from_url(format!("redis://{address}"))
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .expect("pool");
        Cache::new(&settings, Some(pool))
    }

    fn body(text: &'static str) -> Loaded {
        Ok(Some(Bytes::from_static(text.as_bytes())))
    }

    /// A load of `text` that counts itself in `loads`.
    fn counted(
        loads: &Arc<AtomicUsize>,
        text: &'static str,
    ) -> impl Future<Output = Loaded> + Send + 'static {
        let loads = loads.clone();
        async move {
            loads.fetch_add(1, Ordering::SeqCst);
            body(text)
        }
    }

    fn text(loaded: Loaded) -> String {
        match loaded {
            Ok(Some(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
            other => panic!("expected a body, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_load_that_raced_a_change_never_puts_the_old_value_back() {
        let env = TestEnv::new();
        let cache = cache_at(&env, REDIS);
        let id = Uuid::now_v7();
        let loads = Arc::new(AtomicUsize::new(0));

        // A reader misses and reads the old row; the change commits and invalidates
        // before the reader gets to fill.
        let (release, mut released) = watch::channel(false);
        let racing = {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .product(id, async move {
                        let _ = released.wait_for(|go| *go).await;
                        body("old")
                    })
                    .await
            })
        };
        let prefix = format!("product:{id}#");
        eventually("the racing load to start", || async {
            (cache.0.flights.in_flight(&prefix) == 1).then_some(())
        })
        .await;
        cache.invalidate(id).await;
        release.send_replace(true);
        assert_eq!(text(racing.await.expect("reader")), "old", "what it read");

        assert_eq!(text(cache.product(id, counted(&loads, "new")).await), "new");
        assert_eq!(
            text(cache.product(id, counted(&loads, "wrong")).await),
            "new"
        );
        assert_eq!(loads.load(Ordering::SeqCst), 1, "the second read was a hit");
    }

    #[tokio::test]
    async fn a_change_orphans_every_list_page() {
        let env = TestEnv::new();
        let cache = cache_at(&env, REDIS);
        let loads = Arc::new(AtomicUsize::new(0));
        assert_eq!(
            text(cache.list("q=tea", counted(&loads, "page 1")).await),
            "page 1"
        );
        assert_eq!(
            text(cache.list("q=tea", counted(&loads, "wrong")).await),
            "page 1"
        );
        assert_eq!(
            text(cache.list("q=cup", counted(&loads, "other")).await),
            "other"
        );
        assert_eq!(loads.load(Ordering::SeqCst), 2);

        cache.invalidate(Uuid::now_v7()).await;
        assert_eq!(
            text(cache.list("q=tea", counted(&loads, "page 2")).await),
            "page 2"
        );
        assert_eq!(
            text(cache.list("q=cup", counted(&loads, "other 2")).await),
            "other 2"
        );
        assert_eq!(loads.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn without_redis_reads_load_and_missed_invalidations_are_delivered_later() {
        let proxy = TcpProxy::start(REDIS.parse().expect("address")).await;
        let env = TestEnv::new();
        let cache = cache_at(&env, &proxy.address().to_string());
        let stop = CancellationToken::new();
        let retries = tokio::spawn(cache.clone().run_retries(stop.clone()));
        let id = Uuid::now_v7();
        let loads = Arc::new(AtomicUsize::new(0));
        assert_eq!(text(cache.product(id, counted(&loads, "v1")).await), "v1");
        assert_eq!(
            text(cache.product(id, counted(&loads, "wrong")).await),
            "v1"
        );
        assert_eq!(loads.load(Ordering::SeqCst), 1);

        proxy.cut();
        let started = Instant::now();
        assert_eq!(
            text(cache.product(id, counted(&loads, "v1 again")).await),
            "v1 again"
        );
        assert!(started.elapsed() < Duration::from_secs(1), "no long wait");
        // The change cannot reach Redis, where "v1" still is.
        cache.invalidate(id).await;
        assert!(cache.0.dirty.load(Ordering::Acquire));
        assert_eq!(text(cache.product(id, counted(&loads, "v2")).await), "v2");

        proxy.restore();
        eventually("the cache to be used again", || async {
            let before = loads.load(Ordering::SeqCst);
            let read = text(cache.product(id, counted(&loads, "v2")).await);
            assert_eq!(read, "v2", "never the entry the change replaced");
            (loads.load(Ordering::SeqCst) == before).then_some(())
        })
        .await;
        assert!(!cache.0.dirty.load(Ordering::Acquire));
        stop.cancel();
        retries.await.expect("retries stop");
    }

    #[tokio::test]
    async fn a_disabled_cache_always_loads() {
        let mut settings = shared::Settings::default();
        settings.cache.enabled = false;
        let pool = deadpool_redis::Config::from_url(format!("redis://{REDIS}"))
            .create_pool(Some(deadpool_redis::Runtime::Tokio1))
            .expect("pool");
        let cache = Cache::new(&settings, Some(pool));
        let loads = Arc::new(AtomicUsize::new(0));
        let id = Uuid::now_v7();
        for _ in 0..3 {
            assert_eq!(text(cache.product(id, counted(&loads, "db")).await), "db");
        }
        assert_eq!(loads.load(Ordering::SeqCst), 3);
    }
}
