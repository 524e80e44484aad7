//! `commerce bench floor`: PostgreSQL's own commit rate, measured with pgbench (from PATH)
//! at a given number of clients, in a scratch database of the namespace
//! (`<ns>_bench_floor`, dropped afterwards). The saga can place at most about
//! `commits/s ÷ commits per order` orders per second on the same server.
//!
//! Two workloads: one single-row INSERT per transaction, the cheapest commit there is,
//! and pgbench's own TPC-B-like transaction (three UPDATEs, a SELECT and an INSERT),
//! closer in shape to a saga commit, which carries about five statements.

use std::str::FromStr as _;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Serialize;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions as _, Connection as _};

use crate::Target;

/// What each of pgbench's transactions does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// One single-row INSERT.
    Insert,
    /// pgbench's built-in TPC-B-like transaction, at a scale of one branch per client so
    /// that clients do not queue on one row.
    TpcbLike,
}

impl Workload {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Insert => "single-row insert",
            Self::TpcbLike => "TPC-B-like (3 UPDATEs, SELECT, INSERT)",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Floor {
    pub workload: Workload,
    pub clients: usize,
    pub duration_s: f64,
    /// pgbench's tps: each transaction is one workload transaction, committed.
    pub commits_per_s: f64,
    pub transactions: u64,
    /// What pgbench says it ran (`transaction type:`).
    pub pgbench_transaction: String,
}

const INSERT: &str = "INSERT INTO floor DEFAULT VALUES;\n";

pub async fn run(
    target: &Target,
    workload: Workload,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<Floor> {
    anyhow::ensure!(clients > 0, "the floor needs at least one client");
    let secs = duration.as_secs().max(1);
    let database = target.database("bench_floor");
    let quoted = format!("\"{}\"", database.replace('"', "\"\""));
    let server_url = target.postgres.database_url("postgres");
    let mut server = PgConnectOptions::from_str(&server_url)
        .context("COMMERCE__POSTGRES__URL")?
        .connect()
        .await
        .context("connecting to PostgreSQL")?;
    let drop = format!("DROP DATABASE IF EXISTS {quoted} WITH (FORCE)");
    sqlx::raw_sql(sqlx::AssertSqlSafe(drop.clone()))
        .execute(&mut server)
        .await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {quoted}")))
        .execute(&mut server)
        .await?;
    let url = target.postgres.database_url(&database);
    let result = async {
        let run = match workload {
            Workload::Insert => {
                let mut db = PgConnectOptions::from_str(&url)?.connect().await?;
                sqlx::raw_sql(
                    "CREATE TABLE floor (id BIGSERIAL PRIMARY KEY, \
                     at TIMESTAMPTZ NOT NULL DEFAULT now())",
                )
                .execute(&mut db)
                .await?;
                db.close().await?;
                vec![Arg::Script(INSERT)]
            }
            Workload::TpcbLike => {
                pgbench(&url, &[Arg::Init { scale: clients }]).await?;
                vec![Arg::Builtin("tpcb-like")]
            }
        };
        let mut args = vec![Arg::Clients(clients), Arg::Seconds(secs)];
        args.extend(run);
        parse_run(&pgbench(&url, &args).await?)
    }
    .await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
        .execute(&mut server)
        .await?;
    let run = result?;
    Ok(Floor {
        workload,
        clients,
        duration_s: secs as f64,
        commits_per_s: run.tps,
        transactions: run.transactions,
        pgbench_transaction: run.transaction_type,
    })
}

/// What one pgbench call does.
enum Arg {
    /// Fills the standard tables (`pgbench -i`) at a scale.
    Init {
        scale: usize,
    },
    /// Clients of a run, with prepared statements and no vacuum before it.
    Clients(usize),
    Seconds(u64),
    /// A script's text, written to a file for pgbench.
    Script(&'static str),
    Builtin(&'static str),
}

/// Runs pgbench and returns its output; the connection goes in PG* variables, not the
/// command line, so that a password does not show in the process list.
async fn pgbench(url: &str, args: &[Arg]) -> anyhow::Result<String> {
    let parsed = reqwest::Url::parse(url).context("COMMERCE__POSTGRES__URL is not a URL")?;
    let mut command = tokio::process::Command::new("pgbench");
    let mut script_file = None;
    for arg in args {
        match *arg {
            Arg::Init { scale } => {
                command.args(["--initialize", "--quiet"]);
                command.arg(format!("--scale={scale}"));
            }
            Arg::Clients(clients) => {
                let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
                command.args(["--no-vacuum", "--protocol=prepared"]);
                command.arg(format!("--client={clients}"));
                command.arg(format!("--jobs={}", clients.min(threads)));
            }
            Arg::Seconds(secs) => {
                command.arg(format!("--time={secs}"));
            }
            Arg::Script(text) => {
                let path = std::env::temp_dir()
                    .join(format!("commerce-bench-floor-{}.sql", std::process::id()));
                std::fs::write(&path, text)?;
                command.arg(format!("--file={}", path.display()));
                script_file = Some(path);
            }
            Arg::Builtin(name) => {
                command.arg(format!("--builtin={name}"));
            }
        }
    }
    command
        .arg(parsed.path().trim_start_matches('/'))
        .env("PGHOST", parsed.host_str().unwrap_or("127.0.0.1"))
        .env("PGPORT", parsed.port().unwrap_or(5432).to_string())
        .env("PGUSER", parsed.username())
        .kill_on_drop(true);
    if let Some(password) = parsed.password() {
        command.env("PGPASSWORD", password);
    }
    for (key, value) in parsed.query_pairs() {
        if key == "sslmode" {
            command.env("PGSSLMODE", value.as_ref());
        }
    }
    let output = command.output().await;
    if let Some(path) = script_file {
        let _ = std::fs::remove_file(path);
    }
    let output = output.context(
        "running pgbench (install it: apt-get install postgresql-contrib, or the \
         postgresql-client package of your PostgreSQL version)",
    )?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!(
            "pgbench failed ({}): {}{}",
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(stdout)
}

/// What pgbench reported of a run.
#[derive(Debug, PartialEq)]
struct Run {
    tps: f64,
    transactions: u64,
    /// Its `transaction type:` line: the script's file or the built-in's name.
    transaction_type: String,
}

fn parse_run(stdout: &str) -> anyhow::Result<Run> {
    parse(stdout).with_context(|| format!("pgbench's output has no tps line:\n{stdout}"))
}

/// `transaction type: …`, `tps = 1234.5 (without initial connection time)` and
/// `number of transactions actually processed: 12345`.
fn parse(stdout: &str) -> Option<Run> {
    let line = |prefix: &str| stdout.lines().find_map(|l| l.trim().strip_prefix(prefix));
    let tps = line("tps = ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())?;
    let transactions = line("number of transactions actually processed: ")
        .and_then(|rest| rest.split('/').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let transaction_type = line("transaction type: ").unwrap_or_default().to_owned();
    Some(Run {
        tps,
        transactions,
        transaction_type,
    })
}

#[cfg(test)]
mod tests {
    use super::{Run, parse};

    #[test]
    fn reads_pgbench_output() {
        let out = "transaction type: floor.sql\nscaling factor: 1\n\
                   number of transactions actually processed: 41234\n\
                   latency average = 0.970 ms\n\
                   initial connection time = 3.120 ms\n\
                   tps = 4123.456789 (without initial connection time)\n";
        let run = Run {
            tps: 4123.456789,
            transactions: 41234,
            transaction_type: "floor.sql".to_owned(),
        };
        assert_eq!(parse(out), Some(run));
        assert_eq!(parse("nothing here"), None);
    }
}
