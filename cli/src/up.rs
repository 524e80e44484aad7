//! `commerce up`: runs every service as a supervised child process, for development.

mod backoff;
mod output;
mod ready;
mod runner;
mod service;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::builder::PossibleValuesParser;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use output::Printer;
use ready::Tracker;
use runner::{Outcome, Phase, Runner};
use service::Service;

// The help text lives on `Command::Up`; a doc comment here would override it.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Directory holding the service executables [default: the directory of this executable]
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,

    /// Run only these services (comma-separated)
    #[arg(
        long,
        value_name = "SERVICE,...",
        value_delimiter = ',',
        value_parser = PossibleValuesParser::new(service::NAMES),
    )]
    only: Vec<String>,

    /// Seconds to wait for services to exit after SIGTERM before killing them
    #[arg(long, value_name = "SECS", default_value_t = 20)]
    grace_period_secs: u64,
}

/// Runs the services until SIGINT/SIGTERM/SIGHUP; fails (exit 1) if one had to be killed.
pub async fn run(args: UpArgs) -> Result<ExitCode> {
    let bin_dir = match args.bin_dir {
        Some(dir) => dir,
        None => service::default_bin_dir()?,
    };
    let services = service::resolve(&args.only, &bin_dir)?;
    // Listen before spawning anything, so an early Ctrl-C cannot orphan a child.
    let mut signals = StopSignals::new()?;
    let out = Printer::detect();
    let http = ready::client()?;
    let (phase_tx, phase_rx) = watch::channel(Phase::Run);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let mut tracker = Tracker::new(services.iter().map(|svc| svc.name), gateway_port(&services));

    out.info(format!(
        "starting {} from {}",
        output::services(services.len()),
        bin_dir.display()
    ));
    let mut runners = JoinSet::new();
    for svc in services {
        let runner = Runner::new(svc, out, http.clone(), phase_rx.clone(), ready_tx.clone());
        runners.spawn(runner.start());
    }

    let received = run_until_signal(&mut signals, &mut ready_rx, &mut tracker, out).await;
    let grace = Duration::from_secs(args.grace_period_secs);
    out.info(format!(
        "received {received}; stopping {} (grace period {}s, Ctrl-C again to kill)",
        output::services(runners.len()),
        grace.as_secs()
    ));
    let killed = stop_all(runners, &mut signals, &phase_tx, grace, out).await;
    Ok(if killed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn gateway_port(services: &[Service]) -> Option<u16> {
    services
        .iter()
        .find(|svc| svc.name == "gateway")
        .map(|svc| svc.port)
}

/// Reports the "all ready" summary until a stop signal arrives; returns its name.
async fn run_until_signal(
    signals: &mut StopSignals,
    ready_rx: &mut mpsc::UnboundedReceiver<&'static str>,
    tracker: &mut Tracker,
    out: Printer,
) -> &'static str {
    loop {
        tokio::select! {
            received = signals.recv() => return received,
            Some(name) = ready_rx.recv() => {
                if let Some(summary) = tracker.mark_ready(name) {
                    out.info(summary);
                }
            }
        }
    }
}

/// Asks every runner to stop, escalating to SIGKILL after the grace period or on a
/// second signal; returns whether any child had to be killed.
async fn stop_all(
    mut runners: JoinSet<Outcome>,
    signals: &mut StopSignals,
    phase_tx: &watch::Sender<Phase>,
    grace: Duration,
    out: Printer,
) -> bool {
    phase_tx.send_replace(Phase::Stop);
    let mut escalated = false;
    let mut killed = false;
    let grace_over = tokio::time::sleep(grace);
    tokio::pin!(grace_over);
    loop {
        tokio::select! {
            joined = runners.join_next() => match joined {
                None => break,
                Some(Ok(outcome)) => killed |= outcome.killed,
                Some(Err(err)) => {
                    // The runner's child was killed when the runner was dropped.
                    out.info(format!("a service runner failed: {err}"));
                    killed = true;
                }
            },
            () = &mut grace_over, if !escalated => {
                escalated = true;
                out.info(format!("grace period of {}s is over; killing what is left", grace.as_secs()));
                phase_tx.send_replace(Phase::Kill);
            }
            received = signals.recv(), if !escalated => {
                escalated = true;
                out.info(format!("received {received} again; killing what is left"));
                phase_tx.send_replace(Phase::Kill);
            }
        }
    }
    out.info(if killed {
        "stopped; some services had to be killed"
    } else {
        "all services stopped"
    });
    killed
}

/// SIGINT (Ctrl-C), SIGTERM and SIGHUP, all meaning "stop".
struct StopSignals {
    interrupt: Signal,
    terminate: Signal,
    /// The terminal closed. Children are in their own process group so the kernel would not
    /// hang them up; without this they would outlive the supervisor and keep their ports.
    hangup: Signal,
}

impl StopSignals {
    fn new() -> Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            hangup: signal(SignalKind::hangup()).context("cannot listen for SIGHUP")?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.hangup.recv() => "SIGHUP",
        }
    }
}
