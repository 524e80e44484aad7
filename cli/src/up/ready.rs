//! Readiness: polling each service's `/ready` and the one-time "all ready" summary.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::time::{Instant, MissedTickBehavior};

use super::output::{self, Printer};

const POLL_INTERVAL: Duration = Duration::from_millis(500);
const WARN_AFTER: Duration = Duration::from_secs(60);

/// The HTTP client used for readiness probes.
pub fn client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        // Probes go to 127.0.0.1; a developer's HTTP(S)_PROXY must not intercept them.
        .no_proxy()
        .timeout(Duration::from_secs(2))
        // A restarted service would otherwise be probed over its predecessor's dead connection.
        .pool_max_idle_per_host(0)
        .build()
        .context("cannot build the readiness HTTP client")
}

/// Polls until `/ready` answers 200, warning once if that takes too long; returns the wait.
pub async fn wait_until_ready(
    http: reqwest::Client,
    out: Printer,
    name: &'static str,
    port: u16,
    started: Instant,
) -> Duration {
    let url = format!("http://127.0.0.1:{port}/ready");
    let mut ticks = tokio::time::interval(POLL_INTERVAL);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut warned = false;
    loop {
        ticks.tick().await;
        if is_ready(&http, &url).await {
            return started.elapsed();
        }
        if !warned && started.elapsed() >= WARN_AFTER {
            warned = true;
            out.info(format!(
                "warning: {name} is not ready after {} s (still polling {url})",
                WARN_AFTER.as_secs()
            ));
        }
    }
}

async fn is_ready(http: &reqwest::Client, url: &str) -> bool {
    http.get(url)
        .send()
        .await
        .is_ok_and(|response| response.status() == reqwest::StatusCode::OK)
}

/// Tracks which services have been ready at least once, for the summary line.
#[derive(Debug)]
pub struct Tracker {
    pending: HashSet<&'static str>,
    total: usize,
    started: Instant,
    gateway_port: Option<u16>,
}

impl Tracker {
    pub fn new(names: impl IntoIterator<Item = &'static str>, gateway_port: Option<u16>) -> Self {
        let pending: HashSet<_> = names.into_iter().collect();
        Self {
            total: pending.len(),
            pending,
            started: Instant::now(),
            gateway_port,
        }
    }

    /// Records that `name` is ready; returns the summary the first time all of them are.
    pub fn mark_ready(&mut self, name: &str) -> Option<String> {
        let was_last = self.pending.remove(name) && self.pending.is_empty();
        was_last.then(|| summary(self.total, self.started.elapsed(), self.gateway_port))
    }
}

fn summary(total: usize, elapsed: Duration, gateway_port: Option<u16>) -> String {
    let mut line = format!(
        "all {} ready in {:.1}s",
        output::services(total),
        elapsed.as_secs_f64()
    );
    if let Some(port) = gateway_port {
        line.push_str(&format!(" — gateway at http://127.0.0.1:{port}"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_mentions_gateway_when_running() {
        assert_eq!(
            summary(8, Duration::from_millis(3240), Some(8080)),
            "all 8 services ready in 3.2s — gateway at http://127.0.0.1:8080"
        );
        assert_eq!(
            summary(1, Duration::from_millis(400), None),
            "all 1 service ready in 0.4s"
        );
    }

    #[test]
    fn summary_only_once() {
        let mut tracker = Tracker::new(["a", "b"], None);
        assert!(tracker.mark_ready("a").is_none());
        assert!(tracker.mark_ready("a").is_none());
        assert!(tracker.mark_ready("b").is_some());
        assert!(tracker.mark_ready("b").is_none());
        assert!(tracker.mark_ready("a").is_none());
    }
}
