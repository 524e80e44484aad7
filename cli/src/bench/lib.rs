//! The saga load generator behind `commerce bench` (DESIGN.md §9).
//!
//! It makes its own customers, sellers and products through the gateway, places orders
//! (`POST /api/v1/orders` with an `Idempotency-Key`) at a fixed rate (open loop) or with
//! a fixed number of sagas in flight (closed loop), waits for every order to end `paid`
//! or `cancelled` (read from order-svc's database), reports throughput and latency, and
//! checks the saga's invariants (DESIGN.md §5, docs/SAGA.md) against the services'
//! databases with read-only SQL. `commerce bench floor` measures PostgreSQL's own
//! single-row commit rate with pgbench, the ceiling the saga's commits per order set.
//!
//! Everything made by one run belongs to its accounts, so a run beside a development
//! system, or a second run in the same namespace, checks only its own orders.

pub mod check;
pub mod cli;
pub mod commits;
pub mod floor;
mod load;
pub mod machine;
mod progress;
pub mod report;
mod setup;

use std::time::Duration;

use shared::config::PostgresSettings;

pub use check::{Scope, Violation};
pub use report::Report;

/// The system to drive: its gateway, and where its databases are (read only).
#[derive(Clone, Debug)]
pub struct Target {
    /// `http://host:port` of the gateway, without `/api/v1`.
    pub gateway: String,
    /// The namespace: databases are `<namespace>_<service>`.
    pub namespace: String,
    pub postgres: PostgresSettings,
}

impl Target {
    pub(crate) fn database(&self, service: &str) -> String {
        format!("{}_{service}", self.namespace)
    }

    pub(crate) fn api(&self, path: &str) -> String {
        format!("{}/api/v1{path}", self.gateway.trim_end_matches('/'))
    }
}

/// How orders are sent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Load {
    /// Open loop: this many orders per second, on a clock, whatever the system does.
    Rate(f64),
    /// Closed loop: this many sagas in flight; each worker places an order, waits for
    /// its end (paid or cancelled), then places the next.
    Concurrency(usize),
}

/// When to stop placing orders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Orders(u64),
    Duration(Duration),
}

/// One run's parameters.
#[derive(Clone, Debug)]
pub struct Options {
    pub load: Load,
    pub stop: Stop,
    /// Share of orders paid with `pm_card_chargeDeclined` (expected: payment_declined).
    pub declined: f64,
    /// Share of orders with a line of a sold-out product (expected: out_of_stock).
    pub out_of_stock: f64,
    pub customers: usize,
    pub sellers: usize,
    /// Products on sale, spread over the sellers (each seller also has one sold out).
    pub products: usize,
    /// Lines per order: 1 to this many.
    pub max_lines: usize,
    /// Open loop: placements waiting for their answer at most; past it the generator
    /// falls behind its clock (and says so).
    pub max_in_flight: usize,
    /// How long to wait for the last orders to end after the last was placed.
    pub drain_timeout: Duration,
    /// How long the invariants may take to hold after the orders ended (mail is sent
    /// after `order.paid`, a void may follow a cancel).
    pub settle_timeout: Duration,
    /// How often order-svc's database is read for orders that ended.
    pub poll_interval: Duration,
    /// Measure commits per order from pg_stat_database (adds about half a minute:
    /// PostgreSQL publishes an idle backend's counters up to 10 s late).
    pub measure_commits: bool,
    /// Draw a progress bar on stderr (only when it is a terminal).
    pub progress: bool,
    /// Seed of the order mix, for a repeatable run.
    pub seed: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            load: Load::Rate(50.0),
            stop: Stop::Orders(1000),
            declined: 0.1,
            out_of_stock: 0.1,
            customers: 20,
            sellers: 4,
            products: 20,
            max_lines: 3,
            max_in_flight: 1000,
            drain_timeout: Duration::from_secs(120),
            settle_timeout: Duration::from_secs(60),
            poll_interval: Duration::from_millis(50),
            measure_commits: true,
            progress: true,
            seed: fastrand::u64(..),
        }
    }
}

impl Options {
    pub fn validate(&self) -> anyhow::Result<()> {
        use anyhow::ensure;
        ensure!(
            (0.0..=1.0).contains(&self.declined) && (0.0..=1.0).contains(&self.out_of_stock),
            "--declined and --out-of-stock are shares between 0 and 1"
        );
        ensure!(
            self.declined + self.out_of_stock <= 1.0,
            "--declined plus --out-of-stock must be at most 1 (an order is one or the other)"
        );
        match self.load {
            Load::Rate(r) => ensure!(r.is_finite() && r > 0.0, "--rate must be above 0"),
            Load::Concurrency(c) => ensure!(c > 0, "--concurrency must be at least 1"),
        }
        match self.stop {
            Stop::Orders(n) => ensure!(n > 0, "--orders must be at least 1"),
            Stop::Duration(d) => ensure!(!d.is_zero(), "--duration must be above 0"),
        }
        ensure!(self.customers > 0, "--customers must be at least 1");
        ensure!(self.sellers > 0, "--sellers must be at least 1");
        ensure!(
            self.products >= self.sellers,
            "--products must be at least --sellers (each seller sells one or more)"
        );
        ensure!(
            (1..=10).contains(&self.max_lines) && self.max_lines <= self.products,
            "--max-lines must be 1 to 10 and at most --products"
        );
        ensure!(self.max_in_flight > 0, "--max-in-flight must be at least 1");
        Ok(())
    }
}

/// Sets up, drives the load, waits for every order, measures and checks.
pub async fn run(target: &Target, options: &Options) -> anyhow::Result<Report> {
    options.validate()?;
    let progress = progress::Progress::new(options.progress);
    let dbs = check::Databases::connect(target).await?;
    let world = setup::prepare(target, options, &dbs, &progress).await?;

    let commits_before = if options.measure_commits {
        progress.phase("waiting for PostgreSQL's statistics to settle");
        Some(commits::Baseline::measure(target).await?)
    } else {
        None
    };

    let cpu_before = machine::CpuTimes::now();
    let load_started = std::time::Instant::now();
    let outcome = load::drive(target, options, &world, &dbs, &progress).await?;
    let machine = machine::Machine::between(
        cpu_before,
        machine::CpuTimes::now(),
        load_started.elapsed(),
        &dbs.order,
    )
    .await;

    let commits = match commits_before {
        Some(before) => {
            progress.phase("waiting for PostgreSQL's statistics to settle");
            Some(before.finish(target, &outcome, &world).await?)
        }
        None => None,
    };

    progress.phase("checking the invariants");
    let scope = outcome.scope(&world);
    let violations = check::settled(&dbs, &scope, options.settle_timeout).await?;
    progress.done();
    let mut report = Report::new(target, options, &world, outcome, commits, scope, violations);
    report.machine = Some(machine);
    Ok(report)
}
