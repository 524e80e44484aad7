//! `commerce`: the project's command-line tool.

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
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Up(args) => up::run(args).await,
        Command::Keys(args) => keys::run(args),
    };
    result.unwrap_or_else(|err| {
        eprintln!("error: {err:#}");
        ExitCode::FAILURE
    })
}
