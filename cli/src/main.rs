//! `commerce`: the project's command-line tool.

mod dlq;
mod keys;
mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "commerce",
    version,
    about = "Commerce project command-line tool"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every service as a supervised child process (development)
    ///
    /// Each service's output is shown prefixed with its name; readiness is reported and
    /// crashed services are restarted with backoff. Ctrl-C or SIGTERM stops all services
    /// gracefully (SIGTERM, then SIGKILL after the grace period); a second Ctrl-C kills them.
    Up(up::UpArgs),
    /// Manage user-svc's token-signing keys (rotation)
    Keys(keys::KeysArgs),
    /// Drive the order saga through the gateway; report orders/s, latency, invariants
    ///
    /// Against a running system (`make up`): makes its own customers, sellers and
    /// products, places orders at --rate (open loop) or --concurrency (closed loop), waits
    /// for each to end paid or cancelled, and checks DESIGN.md §5's invariants against the
    /// services' databases (read only). Exits non-zero if any is broken.
    Bench(Box<bench::cli::BenchArgs>),
    /// Dead letters of every service: list by cause, show, replay, discard, audit
    ///
    /// Talks to the gateway with an admin token (--token or COMMERCE_TOKEN), or logs in
    /// with --email (the password is asked for). Tables by default; --json for scripts.
    Dlq(Box<dlq::DlqArgs>),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(args) => up::run(args).await,
        Command::Keys(args) => keys::run(args),
        Command::Bench(args) => bench::cli::run(*args).await,
        Command::Dlq(args) => dlq::run(*args).await,
    };
    result.unwrap_or_else(|err| {
        eprintln!("error: {err:#}");
        ExitCode::FAILURE
    })
}
