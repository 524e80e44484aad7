//! The run's results: a human summary, or JSON for scripts.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::check::{Scope, Violation};
use crate::commits::Commits;
use crate::floor::Floor;
use crate::load::{Kind, Outcome, Schedule};
use crate::machine::Machine;
use crate::setup::World;
use crate::{Load, Options, Stop, Target};

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub run: Run,
    pub schedule: Option<Schedule>,
    /// Orders the gateway accepted (202).
    pub placed: u64,
    /// Placements that failed, by cause (status code, `connect`, `timeout`, …).
    pub errors: BTreeMap<String, u64>,
    pub retries: u64,
    /// Accepted orders that reached paid or cancelled before the drain deadline.
    pub finished: u64,
    pub unfinished: u64,
    /// Failed reads of order-svc's database while following the orders.
    pub tracking_errors: u64,
    pub tracking_last_error: Option<String>,
    pub throughput: Throughput,
    pub latency_ms: Latencies,
    /// Final states: `paid`, `cancelled/out_of_stock`, ….
    pub outcomes: BTreeMap<String, u64>,
    /// For each kind of order asked for: how many, and how they ended.
    pub by_kind: BTreeMap<Kind, KindOutcome>,
    /// Orders that ended other than their kind means (e.g. reservation_expired under
    /// overload); not an invariant violation, but worth a look.
    pub unexpected: u64,
    pub commits: Option<Commits>,
    /// One per pgbench workload run.
    pub floors: Vec<FloorComparison>,
    /// How busy the machine was and what the host took, during the load.
    pub machine: Option<Machine>,
    pub violations: Vec<Violation>,
    /// What was checked (not in the JSON: it lists every id).
    #[serde(skip)]
    pub scope: Scope,
}

#[derive(Clone, Debug, Serialize)]
pub struct Run {
    pub run_id: String,
    pub namespace: String,
    pub gateway: String,
    /// `open` (rate) or `closed` (concurrency).
    pub mode: &'static str,
    pub rate: Option<f64>,
    pub concurrency: Option<usize>,
    pub orders: Option<u64>,
    pub duration_s: Option<f64>,
    pub declined: f64,
    pub out_of_stock: f64,
    pub customers: usize,
    pub sellers: usize,
    pub products: usize,
    pub seed: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Throughput {
    /// Orders accepted per second while placing.
    pub placed_per_s: f64,
    /// Orders that ended per second, from the first placement to the last end.
    pub finished_per_s: f64,
    pub window_s: f64,
}

#[derive(Clone, Debug, Serialize, Default)]
pub struct Latencies {
    /// 202 to `paid` (the order's updated_at), paid orders.
    pub paid: Option<Percentiles>,
    /// 202 to `cancelled`, cancelled orders.
    pub cancelled: Option<Percentiles>,
    /// Due (open loop) or sent (closed loop) to the 202.
    pub accept: Option<Percentiles>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(mut ms: Vec<f64>) -> Option<Self> {
        if ms.is_empty() {
            return None;
        }
        ms.sort_by(f64::total_cmp);
        // Nearest rank.
        let at = |q: f64| ms[((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
        Some(Self {
            count: ms.len(),
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
            max: ms[ms.len() - 1],
        })
    }
}

#[derive(Clone, Debug, Serialize, Default)]
pub struct KindOutcome {
    pub placed: u64,
    /// Expected final state, e.g. `paid` or `cancelled/out_of_stock`.
    pub expected: String,
    pub as_expected: u64,
    /// Ended otherwise, by final state.
    pub otherwise: BTreeMap<String, u64>,
    pub unfinished: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct FloorComparison {
    pub floor: Floor,
    /// `commits_per_s ÷ commits per order` (measured, else estimated).
    pub ceiling_orders_per_s: f64,
    pub commits_per_order: f64,
    pub commits_per_order_source: &'static str,
    /// Achieved orders/s as a share of the ceiling.
    pub achieved_share: f64,
}

fn state(status: &str, reason: Option<&str>) -> String {
    match reason {
        Some(reason) => format!("{status}/{reason}"),
        None => status.to_owned(),
    }
}

impl Report {
    pub(crate) fn new(
        target: &Target,
        options: &Options,
        world: &World,
        outcome: Outcome,
        commits: Option<Commits>,
        scope: Scope,
        violations: Vec<Violation>,
    ) -> Self {
        let (mode, rate, concurrency) = match options.load {
            Load::Rate(r) => ("open", Some(r), None),
            Load::Concurrency(c) => ("closed", None, Some(c)),
        };
        let (orders, duration_s) = match options.stop {
            Stop::Orders(n) => (Some(n), None),
            Stop::Duration(d) => (None, Some(d.as_secs_f64())),
        };
        let run = Run {
            run_id: world.run_id.clone(),
            namespace: target.namespace.clone(),
            gateway: target.gateway.clone(),
            mode,
            rate,
            concurrency,
            orders,
            duration_s,
            declined: options.declined,
            out_of_stock: options.out_of_stock,
            customers: world.customers.len(),
            sellers: world.sellers.len(),
            products: world.on_sale.len(),
            seed: options.seed,
        };

        let mut outcomes = BTreeMap::new();
        let mut by_kind: BTreeMap<Kind, KindOutcome> = BTreeMap::new();
        let (mut paid, mut cancelled, mut accept) = (Vec::new(), Vec::new(), Vec::new());
        let mut unexpected = 0;
        let mut last_end = None;
        for p in &outcome.placed {
            accept.push(p.accept.as_secs_f64() * 1e3);
            let (status, reason) = p.kind.expected();
            let k = by_kind.entry(p.kind).or_default();
            k.placed += 1;
            k.expected = state(status, reason);
            let Some(end) = outcome.finals.get(&p.id) else {
                k.unfinished += 1;
                continue;
            };
            let ended = state(&end.status, end.reason.as_deref());
            *outcomes.entry(ended.clone()).or_default() += 1;
            if ended == k.expected {
                k.as_expected += 1;
            } else {
                unexpected += 1;
                *k.otherwise.entry(ended).or_default() += 1;
            }
            let ms = (end.at - p.placed_at)
                .num_microseconds()
                .unwrap_or(0)
                .max(0) as f64
                / 1e3;
            if end.status == "paid" {
                paid.push(ms);
            } else {
                cancelled.push(ms);
            }
            last_end = last_end.max(Some(end.at));
        }
        let placed = outcome.placed.len() as u64;
        let finished = outcome.finals.len() as u64;
        let window_s = last_end
            .map(|end| (end - outcome.started_at).num_milliseconds().max(1) as f64 / 1e3)
            .unwrap_or(0.0);
        let dispatch_s = outcome.dispatch.as_secs_f64();
        let throughput = Throughput {
            placed_per_s: if dispatch_s > 0.0 {
                placed as f64 / dispatch_s
            } else {
                0.0
            },
            finished_per_s: if window_s > 0.0 {
                finished as f64 / window_s
            } else {
                0.0
            },
            window_s,
        };
        Self {
            run,
            schedule: outcome.schedule,
            placed,
            errors: outcome.errors,
            retries: outcome.retries,
            finished,
            unfinished: placed - finished.min(placed),
            tracking_errors: outcome.tracker_errors,
            tracking_last_error: outcome.tracker_last_error,
            throughput,
            latency_ms: Latencies {
                paid: Percentiles::of(paid),
                cancelled: Percentiles::of(cancelled),
                accept: Percentiles::of(accept),
            },
            outcomes,
            by_kind,
            unexpected,
            commits,
            floors: Vec::new(),
            machine: None,
            violations,
            scope,
        }
    }

    /// Puts the run next to pgbench's floor.
    pub fn compare(&mut self, floor: Floor) {
        let (per_order, source) = match &self.commits {
            Some(c) if c.per_order > 0.0 => (c.per_order, "measured"),
            Some(c) => (c.estimated_per_order, "estimated"),
            None => {
                let mean = if self.placed == 0 {
                    0.0
                } else {
                    // Without measurements: the estimate for the orders asked.
                    self.by_kind
                        .iter()
                        .map(|(k, o)| crate::commits::estimate(*k, 2, 1) as f64 * o.placed as f64)
                        .sum::<f64>()
                        / self.placed as f64
                };
                (mean, "estimated (2 lines, 1 seller)")
            }
        };
        let ceiling = if per_order > 0.0 {
            floor.commits_per_s / per_order
        } else {
            0.0
        };
        self.floors.push(FloorComparison {
            achieved_share: if ceiling > 0.0 {
                self.throughput.finished_per_s / ceiling
            } else {
                0.0
            },
            ceiling_orders_per_s: ceiling,
            commits_per_order: per_order,
            commits_per_order_source: source,
            floor,
        });
    }

    /// The human summary.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let r = &self.run;
        let load = match (r.rate, r.concurrency) {
            (Some(rate), _) => format!("open loop at {rate} orders/s"),
            (_, Some(c)) => format!("closed loop, {c} sagas in flight"),
            _ => String::new(),
        };
        let stop = match (r.orders, r.duration_s) {
            (Some(n), _) => format!("{n} orders"),
            (_, Some(d)) => format!("{d} s"),
            _ => String::new(),
        };
        let _ = writeln!(
            s,
            "commerce bench {} (namespace {}, gateway {})",
            r.run_id, r.namespace, r.gateway
        );
        let _ = writeln!(
            s,
            "  load      {load}, {stop}; declined {:.0}%, out of stock {:.0}%; {} customers, \
             {} sellers, {} products; seed {}",
            r.declined * 100.0,
            r.out_of_stock * 100.0,
            r.customers,
            r.sellers,
            r.products,
            r.seed
        );
        if let Some(machine) = &self.machine {
            let _ = writeln!(
                s,
                "  machine   {}",
                machine.summary(self.scope.accepted.len())
            );
        }
        if let Some(sc) = &self.schedule {
            let _ = writeln!(
                s,
                "  schedule  asked {:.1}/s, sent {:.1}/s, {} late sends (>10 ms), max lag {:.1} ms{}",
                sc.asked_per_s,
                sc.sent_per_s,
                sc.late_sends,
                sc.max_lag_ms,
                if sc.kept_up {
                    String::new()
                } else {
                    format!(
                        "; COULD NOT KEEP UP (in-flight cap hit {} times)",
                        sc.in_flight_cap_hits
                    )
                }
            );
        }
        let errors: Vec<String> = self
            .errors
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        let _ = writeln!(
            s,
            "  orders    {} placed, {} finished, {} unfinished, {} failed to place{}{}",
            self.placed,
            self.finished,
            self.unfinished,
            self.errors.values().sum::<u64>(),
            if errors.is_empty() {
                String::new()
            } else {
                format!(" ({})", errors.join(", "))
            },
            if self.retries > 0 {
                format!(", {} retries", self.retries)
            } else {
                String::new()
            }
        );
        if let Some(error) = &self.tracking_last_error {
            let _ = writeln!(
                s,
                "  tracking  {} failed reads of order-svc's database, last: {error}",
                self.tracking_errors
            );
        }
        let _ = writeln!(
            s,
            "  rate      {:.1} orders/s sustained (ended, over {:.1} s); placed at {:.1}/s",
            self.throughput.finished_per_s, self.throughput.window_s, self.throughput.placed_per_s
        );
        for (name, p) in [
            ("paid", &self.latency_ms.paid),
            ("cancelled", &self.latency_ms.cancelled),
            ("202", &self.latency_ms.accept),
        ] {
            if let Some(p) = p {
                let what = if name == "202" {
                    "placement (due to 202)".to_owned()
                } else {
                    format!("202 → {name}")
                };
                let _ = writeln!(
                    s,
                    "  latency   {what:<22} p50 {:.1} ms  p95 {:.1} ms  p99 {:.1} ms  max {:.1} ms  (n={})",
                    p.p50, p.p95, p.p99, p.max, p.count
                );
            }
        }
        for (state, n) in &self.outcomes {
            let _ = writeln!(s, "  ended     {state:<32} {n}");
        }
        for (kind, k) in &self.by_kind {
            let otherwise: Vec<String> = k
                .otherwise
                .iter()
                .map(|(st, n)| format!("{st}: {n}"))
                .collect();
            let _ = writeln!(
                s,
                "  asked     {:<12} {} placed, {} ended {} as expected{}{}",
                kind.name(),
                k.placed,
                k.as_expected,
                k.expected,
                if otherwise.is_empty() {
                    String::new()
                } else {
                    format!(", otherwise {}", otherwise.join(", "))
                },
                if k.unfinished > 0 {
                    format!(", {} unfinished", k.unfinished)
                } else {
                    String::new()
                }
            );
        }
        if let Some(c) = &self.commits {
            let dbs: Vec<String> = c
                .per_database
                .iter()
                .map(|(db, n)| format!("{db} {n}"))
                .collect();
            let _ = writeln!(
                s,
                "  commits   {:.1} per order measured ({} over {} orders: {}; background {:.1}/s removed); \
                 {:.1} estimated from the code ({:.1} for a paid order)",
                c.per_order,
                c.total,
                c.orders,
                dbs.join(", "),
                c.background_per_s,
                c.estimated_per_order,
                c.estimated_per_paid_order
            );
        }
        for f in &self.floors {
            let _ = writeln!(
                s,
                "  floor     pgbench {} {:.0} commits/s at {} clients ÷ {:.1} commits per order ({}) = \
                 {:.1} orders/s ceiling; achieved {:.1} orders/s ({:.0}%)",
                f.floor.workload.describe(),
                f.floor.commits_per_s,
                f.floor.clients,
                f.commits_per_order,
                f.commits_per_order_source,
                f.ceiling_orders_per_s,
                self.throughput.finished_per_s,
                f.achieved_share * 100.0
            );
        }
        if self.violations.is_empty() {
            let _ = writeln!(
                s,
                "  invariants hold ({} orders, {} products checked)",
                self.scope.accepted.len(),
                self.scope.products.len()
            );
        } else {
            let _ = writeln!(s, "  INVARIANTS BROKEN: {}", self.violations.len());
            for v in self.violations.iter().take(50) {
                let _ = writeln!(s, "    {v}");
            }
            if self.violations.len() > 50 {
                let _ = writeln!(
                    s,
                    "    … and {} more (--json lists all)",
                    self.violations.len() - 50
                );
            }
        }
        s
    }
}
