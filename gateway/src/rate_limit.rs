//! Rate limits held in Redis, so they hold across gateway replicas. GCRA (the generic
//! cell rate algorithm): one key per client holding its "theoretical arrival time",
//! read and updated atomically by a Lua script using Redis' own clock.

use std::time::Duration;

use deadpool_redis::redis::Script;
use shared::config::RateLimit;

const GCRA: &str = r"
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if tat == nil or tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - tolerance
if allow_at > now then
  return {0, 0, allow_at - now, tat - now}
end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000))
return {1, math.floor((now - allow_at) / interval), 0, new_tat - now}
";

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

#[derive(Clone)]
pub struct RateLimiter {
    pool: deadpool_redis::Pool,
    prefix: String,
    script: std::sync::Arc<Script>,
}

fn micros(value: i64) -> Duration {
    Duration::from_micros(u64::try_from(value).unwrap_or(0))
}

impl RateLimiter {
    pub fn new(pool: deadpool_redis::Pool, namespace: &str) -> Self {
        Self {
            pool,
            prefix: format!("{namespace}:rl"),
            script: std::sync::Arc::new(Script::new(GCRA)),
        }
    }

    /// Counts one request of `id` against `policy` under `scope`.
    pub async fn check(
        &self,
        scope: &str,
        id: &str,
        policy: RateLimit,
    ) -> anyhow::Result<Decision> {
        let interval = 60_000_000 / i64::from(policy.per_minute.max(1));
        let mut conn = self.pool.get().await?;
        let (allowed, remaining, retry_after, reset): (i64, i64, i64, i64) = self
            .script
            .key(format!("{}:{scope}:{id}", self.prefix))
            .arg(interval)
            .arg(policy.burst.max(1))
            .invoke_async(&mut conn)
            .await?;
        Ok(Decision {
            allowed: allowed == 1,
            limit: policy.burst.max(1),
            remaining: u32::try_from(remaining).unwrap_or(0),
            retry_after: micros(retry_after),
            reset: micros(reset),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
