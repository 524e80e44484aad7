//! Restart delays for crashing services.

use std::time::Duration;

const INITIAL: Duration = Duration::from_secs(1);
const MAX: Duration = Duration::from_secs(30);
/// A run this long counts as healthy, so the next crash starts over at `INITIAL`.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// Exponential backoff: 1 s, 2 s, 4 s … capped at 30 s.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: INITIAL }
    }
}

impl Backoff {
    /// The delay before restarting a process that ran for `uptime`.
    pub fn delay_after(&mut self, uptime: Duration) -> Duration {
        if uptime >= STABLE_AFTER {
            self.next = INITIAL;
        }
        let delay = self.next;
        self.next = (delay * 2).min(MAX);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(delays: &[Duration]) -> Vec<u64> {
        delays.iter().map(Duration::as_secs).collect()
    }

    #[test]
    fn doubles_up_to_cap() {
        let mut backoff = Backoff::default();
        let delays: Vec<_> = (0..7)
            .map(|_| backoff.delay_after(Duration::ZERO))
            .collect();
        assert_eq!(secs(&delays), [1, 2, 4, 8, 16, 30, 30]);
    }

    #[test]
    fn resets_after_a_stable_run() {
        let mut backoff = Backoff::default();
        for _ in 0..4 {
            backoff.delay_after(Duration::from_secs(5));
        }
        assert_eq!(backoff.delay_after(STABLE_AFTER), INITIAL);
        assert_eq!(backoff.delay_after(Duration::ZERO), INITIAL * 2);
    }
}
