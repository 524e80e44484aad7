//! Rate limits held in Redis, so they hold across gateway replicas. GCRA (the generic
//! cell rate algorithm): one key per client holding its "theoretical arrival time",
//! read and updated atomically by a Lua script using Redis' own clock.
//!
//! Leases: for a generous limit, one call takes up to a few cells at once (never more
//! than the client has left) and the replica spends them locally, so a busy client does
//! not cost a Redis round trip per request. Every admitted request was paid for in Redis,
//! so the limit is never exceeded; cells a replica leased but did not use within a second
//! are lost, which only makes the limit slightly stricter. One call per client at a time
//! refills a replica's lease: concurrent requests wait for it and share its cells, rather
//! than each taking cells and throwing the others' away. A refused refill is remembered
//! until Redis' retry time, so a client past its limit costs no further Redis calls until
//! then. Small limits lease one cell at a time and are exact.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_redis::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use deadpool_redis::redis::{Client, Script};
use shared::config::RateLimit;

/// Grants up to ARGV[3] cells; returns {granted, remaining, retry_after_us, reset_us}.
const GCRA: &str = r"
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
local fit = math.floor((now + tolerance - tat) / interval)
if fit < 1 then
  return {0, 0, tat + interval - tolerance - now, tat - now}
end
local granted = math.min(fit, want)
local new_tat = tat + granted * interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
return {granted, math.floor((now + tolerance - new_tat) / interval), 0, new_tat - now}
";

/// How long leased cells may wait to be spent.
const LEASE_TTL: Duration = Duration::from_secs(1);
const LEASE_MAX: u32 = 32;
/// Clients with a lease remembered at once per replica.
const LEASES: usize = 100_000;

/// The answer for one request under one policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The burst allowance: requests possible at once from a full bucket.
    pub limit: u32,
    pub remaining: u32,
    /// When denied: how long until one more request is allowed.
    pub retry_after: Duration,
    /// How long until the bucket is full again.
    pub reset: Duration,
}

impl Decision {
    /// The tighter of two decisions: denied beats allowed, fewer remaining beats more.
    pub fn tighter(self, other: Self) -> Self {
        match (self.allowed, other.allowed) {
            (false, true) => self,
            (true, false) => other,
            (false, false) if self.retry_after >= other.retry_after => self,
            (false, false) => other,
            (true, true) if self.remaining <= other.remaining => self,
            (true, true) => other,
        }
    }
}

/// What this replica knows of one client's bucket: cells it took from Redis and has not
/// spent yet, or that Redis refused it until a moment.
#[derive(Default)]
struct Lease {
    cells: u32,
    /// What Redis had left for the client when the lease was taken.
    remaining: u32,
    limit: u32,
    taken: Option<Instant>,
    reset: Duration,
    refused_until: Option<Instant>,
}

impl Lease {
    /// The decision this replica can make without Redis, if any.
    fn local(&mut self) -> Option<Decision> {
        let now = Instant::now();
        if let Some(until) = self.refused_until {
            if now < until {
                return Some(Decision {
                    allowed: false,
                    limit: self.limit,
                    remaining: 0,
                    retry_after: until - now,
                    reset: self.reset.saturating_sub(now - self.taken?),
                });
            }
            self.refused_until = None;
        }
        let taken = self.taken?;
        if self.cells == 0 || now - taken >= LEASE_TTL {
            return None;
        }
        self.cells -= 1;
        Some(Decision {
            allowed: true,
            limit: self.limit,
            remaining: self.remaining + self.cells,
            retry_after: Duration::ZERO,
            reset: self.reset.saturating_sub(now - taken),
        })
    }
}

/// A client's lease and the lock its refills take in turn. The lock holds how many
/// refills ended and whether the last one failed, so that requests which waited for a
/// failed one fail open at once instead of each waiting for Redis again.
#[derive(Default)]
struct Entry {
    lease: Mutex<Lease>,
    refill: tokio::sync::Mutex<Refills>,
}

#[derive(Default)]
struct Refills {
    ended: u64,
    last_failed: bool,
}

impl Entry {
    fn local(&self) -> Option<Decision> {
        self.lease.lock().unwrap_or_else(|e| e.into_inner()).local()
    }
}

/// Checks go over one multiplexed connection: concurrent checks are pipelined into
/// shared reads and writes instead of each taking a connection and its syscalls.
#[derive(Clone)]
pub struct RateLimiter {
    redis: ConnectionManager,
    prefix: String,
    script: Arc<Script>,
    leases: Arc<quick_cache::sync::Cache<String, Arc<Entry>>>,
}

fn micros(value: i64) -> Duration {
    Duration::from_micros(u64::try_from(value).unwrap_or(0))
}

/// Cells taken per call: a twentieth of the burst, 1 to 32.
fn lease_size(policy: RateLimit) -> u32 {
    (policy.burst / 20).clamp(1, LEASE_MAX)
}

impl RateLimiter {
    /// Connects on first use, and again after Redis comes back.
    pub fn new(redis_url: &str, namespace: &str) -> anyhow::Result<Self> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            // A slow Redis must not hold requests up for long: past this, fail open.
            .set_response_timeout(Some(Duration::from_millis(250)))
            .set_number_of_retries(1);
        let redis = ConnectionManager::new_lazy_with_config(Client::open(redis_url)?, config)?;
        Ok(Self {
            redis,
            prefix: format!("{namespace}:rl"),
            script: Arc::new(Script::new(GCRA)),
            leases: Arc::new(quick_cache::sync::Cache::new(LEASES)),
        })
    }

    /// Counts one request of `id` against `policy` under `scope`.
    pub async fn check(
        &self,
        scope: &str,
        id: &str,
        policy: RateLimit,
    ) -> anyhow::Result<Decision> {
        // Built by hand: `format!` is a measurable share of a proxied request.
        let mut key = String::with_capacity(self.prefix.len() + scope.len() + id.len() + 2);
        for part in [self.prefix.as_str(), ":", scope, ":", id] {
            key.push_str(part);
        }
        let want = lease_size(policy);
        // Microseconds between requests at the sustained rate; at least one.
        let interval = (60_000_000 / i64::from(policy.per_minute.max(1))).max(1);
        let limit = policy.burst.max(1);
        if want == 1 {
            return self.call(&key, interval, limit, want).await.map(|(d, _)| d);
        }
        let entry = self
            .leases
            .get_or_insert_with(&key, || Ok::<_, Infallible>(Arc::default()))
            .unwrap_or_else(|never| match never {});
        if let Some(decision) = entry.local() {
            return Ok(decision);
        }
        // Boxed: most checks end at the lease, and the refill's state would make each of
        // their futures larger.
        Box::pin(self.refill(&entry, &key, interval, limit, want)).await
    }

    /// One call to Redis for the client's lease at a time; requests that waited for it
    /// take from what it left.
    async fn refill(
        &self,
        entry: &Entry,
        key: &str,
        interval: i64,
        limit: u32,
        want: u32,
    ) -> anyhow::Result<Decision> {
        let seen = entry.refill.try_lock().map(|refills| refills.ended).ok();
        let mut refills = entry.refill.lock().await;
        if seen != Some(refills.ended) && refills.last_failed {
            anyhow::bail!("the rate-limit call this request waited for failed");
        }
        // The refill this request waited for may have left cells, or a refusal.
        if let Some(decision) = entry.local() {
            return Ok(decision);
        }
        let called = self.call(key, interval, limit, want).await;
        refills.ended += 1;
        refills.last_failed = called.is_err();
        let (decision, granted) = called?;
        let taken = Instant::now();
        let cells = granted.saturating_sub(1);
        *entry.lease.lock().unwrap_or_else(|e| e.into_inner()) = Lease {
            cells,
            // The decision counts the leased cells as remaining; the lease adds them back
            // as it spends them.
            remaining: decision.remaining.saturating_sub(cells),
            limit,
            taken: Some(taken),
            reset: decision.reset,
            refused_until: (!decision.allowed).then(|| taken + decision.retry_after),
        };
        Ok(decision)
    }

    /// Takes up to `want` cells in Redis: the decision for this request, and the cells
    /// granted (this request's included).
    async fn call(
        &self,
        key: &str,
        interval: i64,
        limit: u32,
        want: u32,
    ) -> anyhow::Result<(Decision, u32)> {
        let mut conn = self.redis.clone();
        // Boxed: small limits call Redis for every request, but the call's state would
        // make the futures of the checks that end at a lease larger.
        let (granted, remaining, retry_after, reset): (i64, i64, i64, i64) = Box::pin(
            self.script
                .key(key)
                .arg(interval)
                .arg(limit)
                .arg(want)
                .invoke_async(&mut conn),
        )
        .await?;
        let granted = u32::try_from(granted).unwrap_or(0);
        let remaining = u32::try_from(remaining).unwrap_or(0);
        let decision = Decision {
            allowed: granted > 0,
            limit,
            remaining: remaining + granted.saturating_sub(1),
            retry_after: micros(retry_after),
            reset: micros(reset),
        };
        Ok((decision, granted))
    }
}

#[cfg(test)]
mod tests {
    use deadpool_redis::redis::AsyncCommands as _;

    use super::*;

    const REDIS: &str = "redis://127.0.0.1:6379";

    async fn connection() -> deadpool_redis::redis::aio::MultiplexedConnection {
        Client::open(REDIS)
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("redis")
    }

    /// Removes the keys a test's namespace left in Redis.
    async fn forget(ns: &str) {
        let mut redis = connection().await;
        let keys: Vec<String> = redis.keys(format!("{ns}:rl:*")).await.expect("keys");
        if !keys.is_empty() {
            let _: () = redis.del(keys).await.expect("del");
        }
    }

    fn namespace() -> String {
        format!("t{}", uuid::Uuid::now_v7().simple())
    }

    /// A limiter in a namespace of its own, for `forget` to clean up.
    fn limiter() -> (String, RateLimiter) {
        let ns = namespace();
        let limiter = RateLimiter::new(REDIS, &ns).expect("limiter");
        (ns, limiter)
    }

    fn decision(allowed: bool, remaining: u32, retry_ms: u64) -> Decision {
        Decision {
            allowed,
            limit: 10,
            remaining,
            retry_after: Duration::from_millis(retry_ms),
            reset: Duration::ZERO,
        }
    }

    #[test]
    fn the_tighter_decision_wins() {
        let open = decision(true, 5, 0);
        let low = decision(true, 1, 0);
        let shut = decision(false, 0, 300);
        let shut_longer = decision(false, 0, 900);
        assert_eq!(open.tighter(low), low);
        assert_eq!(open.tighter(shut), shut);
        assert_eq!(shut.tighter(open), shut);
        assert_eq!(shut.tighter(shut_longer), shut_longer);
    }

    #[tokio::test]
    async fn a_burst_is_allowed_then_the_next_request_waits_one_interval() {
        let (ns, limiter) = limiter();
        let policy = RateLimit {
            per_minute: 60,
            burst: 3,
        };
        let mut remaining = Vec::new();
        for _ in 0..3 {
            let decision = limiter
                .check("ip", "198.51.100.7", policy)
                .await
                .expect("redis");
            assert!(decision.allowed);
            remaining.push(decision.remaining);
        }
        assert_eq!(remaining, [2, 1, 0]);
        let denied = limiter
            .check("ip", "198.51.100.7", policy)
            .await
            .expect("redis");
        assert!(!denied.allowed);
        assert!(
            denied.retry_after > Duration::from_millis(900)
                && denied.retry_after <= Duration::from_secs(1),
            "{denied:?}"
        );
        let other = limiter
            .check("ip", "198.51.100.8", policy)
            .await
            .expect("redis");
        assert!(other.allowed, "each client has its own allowance");
        forget(&ns).await;
    }

    #[tokio::test]
    async fn a_lease_serves_several_requests_with_one_redis_call() {
        let (ns, limiter) = limiter();
        // One cell a minute: Redis' state moves only when cells are taken.
        let policy = RateLimit {
            per_minute: 1,
            burst: 100,
        };
        let mut redis = connection().await;
        let key = format!("{ns}:rl:user:u1");
        let tat = async |redis: &mut deadpool_redis::redis::aio::MultiplexedConnection| -> f64 {
            redis
                .get::<_, String>(&key)
                .await
                .expect("key")
                .parse()
                .expect("number")
        };
        let first = limiter.check("user", "u1", policy).await.expect("decision");
        assert_eq!(first.remaining, 99);
        let after_first = tat(&mut redis).await;
        for expected in [98, 97, 96, 95] {
            let decision = limiter.check("user", "u1", policy).await.expect("decision");
            assert_eq!(decision.remaining, expected);
        }
        assert_eq!(tat(&mut redis).await, after_first, "spent from the lease");
        limiter.check("user", "u1", policy).await.expect("decision");
        assert!(tat(&mut redis).await > after_first, "the next lease");
        forget(&ns).await;
    }

    #[tokio::test]
    async fn concurrent_requests_of_one_client_share_leases_and_get_the_whole_burst() {
        let (ns, limiter) = limiter();
        let policy = RateLimit {
            per_minute: 1,
            burst: 100,
        };
        let decisions =
            futures_util::future::join_all((0..100).map(|_| limiter.check("user", "u1", policy)))
                .await;
        let admitted = decisions
            .into_iter()
            .map(|d| u32::from(d.expect("decision").allowed))
            .sum::<u32>();
        // Only a lease left unspent for a second could strand cells.
        assert!(
            admitted <= 100 && admitted >= 100 - lease_size(policy),
            "{admitted} of a burst of 100 admitted"
        );
        forget(&ns).await;
    }

    #[tokio::test]
    async fn a_client_past_its_limit_is_refused_without_asking_redis_again_until_its_retry_time() {
        let (ns, limiter) = limiter();
        let policy = RateLimit {
            per_minute: 1,
            burst: 40,
        };
        let mut admitted = 0;
        for _ in 0..40 {
            admitted += u32::from(
                limiter
                    .check("ip", "192.0.2.9", policy)
                    .await
                    .expect("decision")
                    .allowed,
            );
        }
        assert_eq!(admitted, 40);
        let refused = limiter
            .check("ip", "192.0.2.9", policy)
            .await
            .expect("decision");
        assert!(!refused.allowed);
        assert!(refused.retry_after > Duration::from_secs(50), "{refused:?}");
        // Were Redis asked, it would now grant a fresh burst.
        forget(&ns).await;
        let again = limiter
            .check("ip", "192.0.2.9", policy)
            .await
            .expect("decision");
        assert!(!again.allowed, "{again:?}");
        assert!(again.retry_after <= refused.retry_after, "{again:?}");
        forget(&ns).await;
    }

    #[tokio::test]
    async fn replicas_with_leases_never_admit_more_than_the_limit() {
        let ns = namespace();
        let replicas = [
            RateLimiter::new(REDIS, &ns).expect("limiter"),
            RateLimiter::new(REDIS, &ns).expect("limiter"),
        ];
        let policy = RateLimit {
            per_minute: 1,
            burst: 100,
        };
        let mut admitted = 0;
        for i in 0..300 {
            let decision = replicas[i % 2]
                .check("ip", "203.0.113.5", policy)
                .await
                .expect("decision");
            admitted += u32::from(decision.allowed);
        }
        let stranded = 2 * lease_size(policy);
        assert!(admitted <= 100 && admitted >= 100 - stranded, "{admitted}");
        forget(&ns).await;
    }

    #[tokio::test]
    async fn very_high_limits_are_checked_not_failed_open() {
        let (ns, limiter) = limiter();
        let policy = RateLimit {
            per_minute: 1_000_000_000,
            burst: 100_000_000,
        };
        for _ in 0..100 {
            let decision = limiter
                .check("user", "u1", policy)
                .await
                .expect("a decision, not an error");
            assert!(decision.allowed);
        }
        forget(&ns).await;
    }
}
