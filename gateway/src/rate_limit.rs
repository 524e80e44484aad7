//! Rate limits held in Redis, so they hold across gateway replicas. GCRA (the generic
//! cell rate algorithm): one key per client holding its "theoretical arrival time",
//! read and updated atomically by a Lua script using Redis' own clock.
//!
//! Leases: for a generous limit, one call takes up to a few cells at once (never more
//! than the client has left) and the replica spends them locally, so a busy client does
//! not cost a Redis round trip per request. Every admitted request was paid for in Redis;
//! cells are spent within a second of being taken, so a client can exceed its rate by at
//! most what a replica holds (a lease and a half, a thirteenth of its burst), and cells
//! left unspent after that second are lost. One call per client at a time refills a
//! replica's lease: concurrent requests wait for it and share its cells, rather than each
//! taking cells and throwing the others' away. A client that spends half a lease within
//! half a second gets its next lease asked for in the background, so its requests do not
//! wait for Redis at all. A refused refill is remembered until Redis' retry time, so a
//! client past its limit costs no further Redis calls until then. Small limits lease one
//! cell at a time and are exact.

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
    /// Until when the cells may be spent.
    expires: Option<Instant>,
    /// What Redis had left for the client after its last grant.
    remaining: u32,
    limit: u32,
    /// Cells one refill asks for.
    size: u32,
    /// When the client's bucket is full again, as Redis last said.
    full_at: Option<Instant>,
    refused_until: Option<Instant>,
    /// A refill ahead of need is under way.
    ahead: bool,
}

/// What one call to Redis gave.
struct Grant {
    granted: u32,
    /// Cells Redis has left for the client after this grant.
    remaining: u32,
    retry_after: Duration,
    reset: Duration,
}

impl Grant {
    /// The decision for a request that takes one cell of the grant.
    fn decision(&self, limit: u32) -> Decision {
        Decision {
            allowed: self.granted > 0,
            limit,
            remaining: self.remaining + self.granted.saturating_sub(1),
            retry_after: self.retry_after,
            reset: self.reset,
        }
    }
}

impl Lease {
    /// The decision this replica can make without Redis, if any, and whether this request
    /// should start a refill ahead of need.
    fn local(&mut self) -> (Option<Decision>, bool) {
        let now = Instant::now();
        let reset = self
            .full_at
            .map_or(Duration::ZERO, |at| at.saturating_duration_since(now));
        // Cells already paid for are spent even after a refusal.
        if let Some(expires) = self.expires.filter(|&e| self.cells > 0 && now < e) {
            self.cells -= 1;
            // Half the lease gone in under half its life: the rest will likely go before
            // a refill made only once it is gone could answer, so that refill starts now
            // and no request of a busy client waits for Redis.
            let ahead = !self.ahead
                && self.refused_until.is_none()
                && self.cells < self.size / 2
                && expires - now > LEASE_TTL / 2;
            self.ahead |= ahead;
            let decision = Decision {
                allowed: true,
                limit: self.limit,
                remaining: self.remaining + self.cells,
                retry_after: Duration::ZERO,
                reset,
            };
            return (Some(decision), ahead);
        }
        if let Some(until) = self.refused_until {
            if now < until {
                let decision = Decision {
                    allowed: false,
                    limit: self.limit,
                    remaining: 0,
                    retry_after: until - now,
                    reset,
                };
                return (Some(decision), false);
            }
            self.refused_until = None;
        }
        (None, false)
    }

    /// Adds a grant to the cells still unspent; a refusal is kept until its retry time.
    fn add(&mut self, grant: &Grant, limit: u32, size: u32) {
        let now = Instant::now();
        if self.expires.is_none_or(|e| now >= e) {
            self.cells = 0;
        }
        self.limit = limit;
        self.size = size;
        self.remaining = grant.remaining;
        self.full_at = Some(now + grant.reset);
        if grant.granted == 0 {
            self.refused_until = Some(now + grant.retry_after);
        } else {
            // Cells left of the last grant live as long as the new ones: at most half a
            // lease, since a refill ahead starts only once half is spent.
            self.cells += grant.granted;
            self.expires = Some(now + LEASE_TTL);
            self.refused_until = None;
        }
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
    fn lease(&self) -> std::sync::MutexGuard<'_, Lease> {
        self.lease.lock().unwrap_or_else(|e| e.into_inner())
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

/// One client's policy as the Redis script takes it.
#[derive(Clone, Copy)]
struct Ask {
    /// Microseconds between requests at the sustained rate; at least one.
    interval: i64,
    limit: u32,
    want: u32,
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
        let ask = Ask {
            interval: (60_000_000 / i64::from(policy.per_minute.max(1))).max(1),
            limit: policy.burst.max(1),
            want: lease_size(policy),
        };
        if ask.want == 1 {
            return Ok(self.call(&key, ask).await?.decision(ask.limit));
        }
        let entry = self
            .leases
            .get_or_insert_with(&key, || Ok::<_, Infallible>(Arc::default()))
            .unwrap_or_else(|never| match never {});
        let (decision, ahead) = entry.lease().local();
        if ahead {
            self.refill_ahead(Arc::clone(&entry), key.clone(), ask);
        }
        if let Some(decision) = decision {
            return Ok(decision);
        }
        // Boxed: most checks end at the lease, and the refill's state would make each of
        // their futures larger.
        let (decision, ahead) = Box::pin(self.refill(&entry, &key, ask)).await?;
        if ahead {
            self.refill_ahead(entry, key, ask);
        }
        Ok(decision)
    }

    /// One call to Redis for the client's lease at a time; requests that waited for it
    /// take from what it left.
    async fn refill(&self, entry: &Entry, key: &str, ask: Ask) -> anyhow::Result<(Decision, bool)> {
        let seen = entry.refill.try_lock().map(|refills| refills.ended).ok();
        let mut refills = entry.refill.lock().await;
        if seen != Some(refills.ended) && refills.last_failed {
            anyhow::bail!("the rate-limit call this request waited for failed");
        }
        // The refill this request waited for may have left cells, or a refusal.
        if let (Some(decision), ahead) = entry.lease().local() {
            return Ok((decision, ahead));
        }
        self.call_and_add(entry, &mut refills, key, ask).await?;
        match entry.lease().local() {
            (Some(decision), ahead) => Ok((decision, ahead)),
            // Unreachable: a grant leaves a cell or a refusal.
            (None, _) => anyhow::bail!("the rate-limit lease was empty after a refill"),
        }
    }

    /// Takes the client's next lease in the background while requests spend what is left
    /// of this one; requests that run out first wait for it as for any refill.
    fn refill_ahead(&self, entry: Arc<Entry>, key: String, ask: Ask) {
        let limiter = self.clone();
        tokio::spawn(async move {
            let mut refills = entry.refill.lock().await;
            let added = limiter.call_and_add(&entry, &mut refills, &key, ask).await;
            entry.lease().ahead = false;
            if let Err(error) = added {
                tracing::warn!(%error, "rate-limit refill ahead failed");
            }
        });
    }

    /// One call to Redis under the client's refill lock: its outcome is recorded for the
    /// requests waiting on the lock, and what it granted joins the lease.
    async fn call_and_add(
        &self,
        entry: &Entry,
        refills: &mut Refills,
        key: &str,
        ask: Ask,
    ) -> anyhow::Result<()> {
        let called = self.call(key, ask).await;
        refills.ended += 1;
        refills.last_failed = called.is_err();
        entry.lease().add(&called?, ask.limit, ask.want);
        Ok(())
    }

    /// Asks Redis for up to `ask.want` cells.
    async fn call(&self, key: &str, ask: Ask) -> anyhow::Result<Grant> {
        let mut conn = self.redis.clone();
        // Boxed: small limits call Redis for every request, but the call's state would
        // make the futures of the checks that end at a lease larger.
        let (granted, remaining, retry_after, reset): (i64, i64, i64, i64) = Box::pin(
            self.script
                .key(key)
                .arg(ask.interval)
                .arg(ask.limit)
                .arg(ask.want)
                .invoke_async(&mut conn),
        )
        .await?;
        Ok(Grant {
            granted: u32::try_from(granted).unwrap_or(0),
            remaining: u32::try_from(remaining).unwrap_or(0),
            retry_after: micros(retry_after),
            reset: micros(reset),
        })
    }
}

#[cfg(test)]
mod tests {
    use deadpool_redis::redis::AsyncCommands as _;
    use deadpool_redis::redis::aio::MultiplexedConnection;

    use super::*;

    const REDIS: &str = "redis://127.0.0.1:6379";

    async fn connection() -> MultiplexedConnection {
        Client::open(REDIS)
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("redis")
    }

    /// Waits for the limiters' refills ahead to end, then removes the keys the test's
    /// namespace left in Redis.
    async fn forget(ns: &str, limiters: &[&RateLimiter]) {
        testkit::eventually("the refills ahead to end", async || {
            let running = limiters
                .iter()
                .flat_map(|limiter| limiter.leases.iter())
                .any(|(_, entry)| entry.lease().ahead);
            (!running).then_some(())
        })
        .await;
        testkit::delete_redis_keys(ns, REDIS)
            .await
            .expect("the namespace's keys deleted");
    }

    /// The "theoretical arrival time" Redis holds for a key: it moves only when cells
    /// are taken.
    async fn tat(redis: &mut MultiplexedConnection, key: &str) -> f64 {
        let tat: String = redis.get(key).await.expect("key");
        tat.parse().expect("number")
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
        forget(&ns, &[&limiter]).await;
    }

    #[tokio::test]
    async fn a_lease_serves_several_requests_and_the_next_is_taken_before_it_runs_out() {
        let (ns, limiter) = limiter();
        // One cell a minute: Redis' state moves only when cells are taken. Leases of 5.
        let policy = RateLimit {
            per_minute: 1,
            burst: 100,
        };
        let mut redis = connection().await;
        let key = format!("{ns}:rl:user:u1");
        let first = limiter.check("user", "u1", policy).await.expect("decision");
        assert_eq!(first.remaining, 99);
        let after_first = tat(&mut redis, &key).await;
        for expected in [98, 97] {
            let decision = limiter.check("user", "u1", policy).await.expect("decision");
            assert_eq!(decision.remaining, expected);
        }
        assert_eq!(
            tat(&mut redis, &key).await,
            after_first,
            "spent from the lease"
        );
        // This one leaves one cell of five: the next lease is asked for now, not when a
        // request finds none left.
        let decision = limiter.check("user", "u1", policy).await.expect("decision");
        assert_eq!(decision.remaining, 96);
        testkit::eventually("the next lease taken ahead", || {
            let (mut redis, key) = (redis.clone(), key.clone());
            async move { (tat(&mut redis, &key).await != after_first).then_some(()) }
        })
        .await;
        // The count goes on across the two leases.
        for expected in [95, 94, 93] {
            let decision = limiter.check("user", "u1", policy).await.expect("decision");
            assert_eq!(decision.remaining, expected);
        }
        forget(&ns, &[&limiter]).await;
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
        forget(&ns, &[&limiter]).await;
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
        forget(&ns, &[&limiter]).await;
        let again = limiter
            .check("ip", "192.0.2.9", policy)
            .await
            .expect("decision");
        assert!(!again.allowed, "{again:?}");
        assert!(again.retry_after <= refused.retry_after, "{again:?}");
        forget(&ns, &[&limiter]).await;
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
        forget(&ns, &[&replicas[0], &replicas[1]]).await;
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
        forget(&ns, &[&limiter]).await;
    }
}
