//! The `commerce bench` command line.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use shared::Settings;

use crate::floor::Workload;
use crate::{Load, Options, Stop, Target};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: Option<BenchCommand>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// PostgreSQL's commit rate (pgbench), the ceiling of the saga
    ///
    /// Runs pgbench from PATH against a scratch database `<ns>_bench_floor` (dropped
    /// afterwards). Divide by the commits one order needs (`commerce bench` measures
    /// them) for the most orders/s this server can take.
    Floor(FloorArgs),
}

#[derive(Debug, Args)]
struct Where {
    /// The gateway [default: COMMERCE__GATEWAY__URL, else http://127.0.0.1:COMMERCE__GATEWAY__PORT]
    #[arg(long)]
    gateway: Option<String>,
    /// The system's namespace (its databases are <ns>_order, …) [default: COMMERCE__NAMESPACE]
    #[arg(long)]
    namespace: Option<String>,
}

impl Where {
    fn target(&self) -> anyhow::Result<Target> {
        let settings = Settings::load().context("loading the settings (COMMERCE__…)")?;
        let gateway = self.gateway.clone().unwrap_or_else(|| {
            settings
                .gateway
                .url
                .clone()
                .unwrap_or_else(|| format!("http://127.0.0.1:{}", settings.gateway.port))
        });
        Ok(Target {
            gateway,
            namespace: self.namespace.clone().unwrap_or(settings.namespace),
            postgres: settings.postgres,
        })
    }
}

/// Places orders through the gateway and checks the saga's invariants.
#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    target: Where,
    /// Open loop: orders per second, on a clock [default: 50 unless --concurrency]
    #[arg(long, conflicts_with = "concurrency")]
    rate: Option<f64>,
    /// Closed loop: sagas in flight (each worker waits for its order to end)
    #[arg(long)]
    concurrency: Option<usize>,
    /// Place this many orders [default: 1000 unless --duration]
    #[arg(long, conflicts_with = "duration")]
    orders: Option<u64>,
    /// Place orders for this long (e.g. 30s, 2m)
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Share of orders paid with a declined card (pm_card_chargeDeclined)
    #[arg(long, default_value_t = 0.1)]
    declined: f64,
    /// Share of orders with a line of a sold-out product
    #[arg(long, default_value_t = 0.1)]
    out_of_stock: f64,
    /// Customers placing the orders (round robin; each has the gateway's per-user limit)
    #[arg(long, default_value_t = 20)]
    customers: usize,
    #[arg(long, default_value_t = 4)]
    sellers: usize,
    /// Products on sale (each seller also gets one sold-out product)
    #[arg(long, default_value_t = 20)]
    products: usize,
    /// Lines per order: 1 to this many
    #[arg(long, default_value_t = 3)]
    max_lines: usize,
    /// Open loop: most placements awaiting their answer; past it the generator falls behind
    #[arg(long, default_value_t = 1000)]
    max_in_flight: usize,
    /// How long to wait for the last orders to end
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// How long the invariants may take to hold after the orders ended
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    settle_timeout: Duration,
    /// Skip measuring commits per order (saves about 30 s of waiting for PostgreSQL's statistics)
    #[arg(long)]
    no_commits: bool,
    /// Afterwards run pgbench's floor at the same concurrency and compare
    #[arg(long)]
    floor: bool,
    /// Clients of the floor in open-loop runs (closed loop: --concurrency)
    #[arg(long, default_value_t = 10)]
    floor_clients: usize,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    floor_duration: Duration,
    /// pgbench's transaction for the floor; several, comma-separated, run one after another
    #[arg(long, value_enum, value_delimiter = ',', default_value = "insert")]
    floor_workload: Vec<Workload>,
    /// Seed of the order mix, for a repeatable mix
    #[arg(long)]
    seed: Option<u64>,
    /// Print the report as JSON on stdout (no progress bar)
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct FloorArgs {
    #[command(flatten)]
    target: Where,
    /// pgbench clients (use the bench's --concurrency)
    #[arg(long, visible_alias = "concurrency", default_value_t = 10)]
    clients: usize,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// pgbench's transaction
    #[arg(long, value_enum, default_value = "insert")]
    workload: Workload,
    /// Also print the ceiling: commits/s ÷ this many commits per order
    #[arg(long)]
    commits_per_order: Option<f64>,
    #[arg(long)]
    json: bool,
}

/// `250ms`, `30s`, `2m`, or plain seconds.
fn parse_duration(raw: &str) -> Result<Duration, String> {
    let raw = raw.trim();
    let (number, unit) = raw
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((raw, "s"), |i| raw.split_at(i));
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{raw:?} is not a duration (e.g. 500ms, 30s, 2m)"))?;
    let secs = match unit {
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{raw:?}: unit must be ms, s, m or h")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{raw:?}: {e}"))
}

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        Some(BenchCommand::Floor(floor)) => run_floor(floor).await,
        None => run_bench(args.run).await,
    }
}

async fn run_floor(args: FloorArgs) -> anyhow::Result<ExitCode> {
    let target = args.target.target()?;
    let floor = crate::floor::run(&target, args.workload, args.clients, args.duration).await?;
    let ceiling = args.commits_per_order.map(|c| floor.commits_per_s / c);
    if args.json {
        let mut value = serde_json::to_value(&floor)?;
        if let Some(ceiling) = ceiling {
            value["ceiling_orders_per_s"] = ceiling.into();
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!(
            "pgbench floor: {:.0} commits/s ({} {} transactions, {} clients, {} s)",
            floor.commits_per_s,
            floor.transactions,
            floor.workload.describe(),
            floor.clients,
            floor.duration_s
        );
        if let (Some(c), Some(ceiling)) = (args.commits_per_order, ceiling) {
            println!(
                "ceiling: {:.0} ÷ {c} commits per order = {ceiling:.1} orders/s",
                floor.commits_per_s
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn run_bench(args: RunArgs) -> anyhow::Result<ExitCode> {
    let target = args.target.target()?;
    let load = match (args.rate, args.concurrency) {
        (_, Some(c)) => Load::Concurrency(c),
        (Some(r), None) => Load::Rate(r),
        (None, None) => Load::Rate(50.0),
    };
    let stop = match (args.orders, args.duration) {
        (_, Some(d)) => Stop::Duration(d),
        (Some(n), None) => Stop::Orders(n),
        (None, None) => Stop::Orders(1000),
    };
    let options = Options {
        load,
        stop,
        declined: args.declined,
        out_of_stock: args.out_of_stock,
        customers: args.customers,
        sellers: args.sellers,
        products: args.products,
        max_lines: args.max_lines,
        max_in_flight: args.max_in_flight,
        drain_timeout: args.drain_timeout,
        settle_timeout: args.settle_timeout,
        measure_commits: !args.no_commits,
        progress: !args.json,
        seed: args.seed.unwrap_or_else(|| fastrand::u64(..)),
        ..Options::default()
    };
    let mut report = crate::run(&target, &options).await?;
    if args.floor {
        let clients = match load {
            Load::Concurrency(c) => c,
            Load::Rate(_) => args.floor_clients,
        };
        for workload in args.floor_workload {
            if !args.json {
                eprintln!(
                    "bench: running pgbench for the floor ({})",
                    workload.describe()
                );
            }
            let floor = crate::floor::run(&target, workload, clients, args.floor_duration).await?;
            report.compare(floor);
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.summary());
    }
    Ok(if report.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("3 weeks").is_err());
    }
}
