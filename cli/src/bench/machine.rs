//! What the machine did while the load ran. On a virtual machine the host can take CPU
//! back (steal time), and a PostgreSQL without autovacuum lets its tables bloat from run
//! to run: both change the figures, so the report says how they stood.

use serde::Serialize;
use sqlx::PgPool;

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    /// Share of all cores' time spent working (user, system, interrupts) during the load.
    pub busy_pct: f64,
    /// Share of all cores' time the hypervisor gave to others during the load.
    pub stolen_pct: f64,
    /// Core-seconds spent working during the load: divided by the orders, what an order
    /// costs the whole machine (services, broker, database, the generator itself).
    pub busy_core_s: f64,
    /// The PostgreSQL server's `autovacuum` setting (`None`: could not be read).
    pub autovacuum: Option<bool>,
}

/// Cumulative CPU times of all cores, from `/proc/stat` (Linux; elsewhere none).
#[derive(Clone, Copy, Debug)]
pub(crate) struct CpuTimes {
    busy: u64,
    steal: u64,
    total: u64,
}

impl CpuTimes {
    pub(crate) fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        parse(stat.lines().next()?)
    }
}

/// The `cpu` line: user nice system idle iowait irq softirq steal (then guest time,
/// which user already counts).
fn parse(line: &str) -> Option<CpuTimes> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = fields
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = v[..] else {
        return None;
    };
    Some(CpuTimes {
        busy: user + nice + system + irq + softirq,
        steal,
        total: user + nice + system + idle + iowait + irq + softirq + steal,
    })
}

impl Machine {
    pub(crate) async fn between(
        before: Option<CpuTimes>,
        after: Option<CpuTimes>,
        window: std::time::Duration,
        db: &PgPool,
    ) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let (busy_pct, stolen_pct, busy_core_s) = match (before, after) {
            (Some(a), Some(b)) if b.total > a.total => {
                let total = (b.total - a.total) as f64;
                let busy = (b.busy - a.busy) as f64;
                (
                    busy * 100.0 / total,
                    (b.steal - a.steal) as f64 * 100.0 / total,
                    // The window's wall time is its total ticks over the cores.
                    busy / total * window.as_secs_f64() * cores as f64,
                )
            }
            _ => (f64::NAN, f64::NAN, f64::NAN),
        };
        let autovacuum = sqlx::query_scalar::<_, String>("SHOW autovacuum")
            .fetch_one(db)
            .await
            .ok()
            .map(|v| v == "on");
        Self {
            cores,
            busy_pct,
            stolen_pct,
            busy_core_s,
            autovacuum,
        }
    }

    /// `orders`: those placed during the load, to say what one cost.
    pub fn summary(&self, orders: usize) -> String {
        let per_order = if orders > 0 && self.busy_core_s.is_finite() {
            format!(
                " ({:.1} ms of CPU per order)",
                self.busy_core_s * 1e3 / orders as f64
            )
        } else {
            String::new()
        };
        let autovacuum = match self.autovacuum {
            Some(true) => "on",
            Some(false) => "off (dead rows pile up from run to run)",
            None => "unknown",
        };
        format!(
            "{} cores, {:.0}% busy{per_order}, {:.0}% taken by the hypervisor; PostgreSQL autovacuum {autovacuum}",
            self.cores, self.busy_pct, self.stolen_pct
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_line_gives_busy_stolen_and_total_time() {
        let t = parse("cpu  100 5 50 800 10 3 2 30 7 0").expect("a cpu line");
        assert_eq!(t.busy, 160);
        assert_eq!(t.steal, 30);
        assert_eq!(t.total, 1000);
        assert!(parse("cpu0 1 2 3 4 5 6 7 8").is_none());
        assert!(parse("cpu  1 2 x").is_none());
    }
}
