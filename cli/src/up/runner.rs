//! One service's life cycle: start, forward output, report readiness, restart on crash, stop.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::pin::pin;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::backoff::Backoff;
use super::output::{Prefix, Printer};
use super::ready;
use super::service::Service;

/// Services log human-readable text (instead of JSON) in this environment.
const ENVIRONMENT_VAR: &str = "COMMERCE__ENVIRONMENT";
/// The worker threads of a service's runtime; set to the service's share of the cores
/// unless given.
const WORKER_THREADS_VAR: &str = "COMMERCE__RUNTIME__WORKER_THREADS";
/// How long to wait for a dead child's last output; a grandchild may hold the pipe open.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// What the supervisor wants from every child; it only ever moves forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Run,
    /// SIGTERM sent; wait for the child to exit.
    Stop,
    /// Grace period over or second Ctrl-C: SIGKILL whatever is left.
    Kill,
}

/// How a runner finished.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The child ignored SIGTERM and had to be killed.
    pub killed: bool,
}

/// How one child process's run ended.
enum End {
    Crashed(io::Result<ExitStatus>),
    Stopped(Outcome),
}

/// Supervises one service until the supervisor stops.
pub struct Runner {
    svc: Service,
    out: Printer,
    prefix: Prefix,
    http: reqwest::Client,
    phase: watch::Receiver<Phase>,
    ready_tx: mpsc::UnboundedSender<&'static str>,
}

/// A started child process and the tasks forwarding its output.
struct Running {
    child: Child,
    pid: Pid,
    output: Vec<JoinHandle<()>>,
    started: Instant,
}

impl Runner {
    pub fn new(
        svc: Service,
        out: Printer,
        http: reqwest::Client,
        phase: watch::Receiver<Phase>,
        ready_tx: mpsc::UnboundedSender<&'static str>,
    ) -> Self {
        let prefix = out.service_prefix(svc.name, svc.index);
        Self {
            svc,
            out,
            prefix,
            http,
            phase,
            ready_tx,
        }
    }

    /// Starts the child right away, so services start in the caller's order, and returns
    /// the future that keeps it running until a stop is requested.
    pub fn start(self) -> impl Future<Output = Outcome> + Send + 'static {
        let first = self.spawn();
        self.run(first)
    }

    /// Restarts the service with backoff whenever it exits on its own.
    async fn run(mut self, mut attempt: Result<Running>) -> Outcome {
        let mut backoff = Backoff::default();
        loop {
            let delay = match attempt {
                Ok(running) => {
                    let started = running.started;
                    match self.supervise(running).await {
                        End::Stopped(outcome) => return outcome,
                        End::Crashed(status) => {
                            let delay = backoff.delay_after(started.elapsed());
                            self.report_crash(&status, delay);
                            delay
                        }
                    }
                }
                Err(err) => {
                    let delay = backoff.delay_after(Duration::ZERO);
                    self.out.info(format!(
                        "{} failed to start: {err:#}; retrying in {}s",
                        self.svc.name,
                        delay.as_secs()
                    ));
                    delay
                }
            };
            if self.stopped_while_sleeping(delay).await {
                return Outcome::default();
            }
            attempt = self.spawn();
        }
    }

    fn spawn(&self) -> Result<Running> {
        let mut cmd = Command::new(&self.svc.exe);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Out of the terminal's process group: a Ctrl-C reaches only the supervisor,
            // which then stops every child the same way a `kill` would.
            .process_group(0)
            // Never leak a child if this task is dropped or panics.
            .kill_on_drop(true);
        if std::env::var_os(ENVIRONMENT_VAR).is_none() {
            cmd.env(ENVIRONMENT_VAR, "development");
        }
        if std::env::var_os(WORKER_THREADS_VAR).is_none() {
            cmd.env(WORKER_THREADS_VAR, self.svc.worker_threads.to_string());
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot run {}", self.svc.exe.display()))?;
        let started = Instant::now();
        let raw_pid = child
            .id()
            .context("the child exited before it was tracked")?;
        let pid = Pid::from_raw(i32::try_from(raw_pid).context("pid out of range")?);
        let output = self.forward_output(&mut child);
        self.out.info(format!(
            "{} started (pid {raw_pid}, port {})",
            self.svc.name, self.svc.port
        ));
        Ok(Running {
            child,
            pid,
            output,
            started,
        })
    }

    fn forward_output(&self, child: &mut Child) -> Vec<JoinHandle<()>> {
        let stdout = child.stdout.take().map(|s| self.forward(s));
        let stderr = child.stderr.take().map(|s| self.forward(s));
        stdout.into_iter().chain(stderr).collect()
    }

    fn forward(&self, stream: impl AsyncRead + Unpin + Send + 'static) -> JoinHandle<()> {
        let (out, prefix) = (self.out, self.prefix.clone());
        tokio::spawn(async move {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            // Bytes, not `lines()`: output that is not UTF-8 is still shown.
            while matches!(reader.read_until(b'\n', &mut line).await, Ok(n) if n > 0) {
                out.line(&prefix, &line);
                line.clear();
            }
        })
    }

    /// Waits for the child to exit or for a stop request, reporting readiness meanwhile.
    async fn supervise(&mut self, mut running: Running) -> End {
        let mut readiness = pin!(ready::wait_until_ready(
            self.http.clone(),
            self.out,
            self.svc.name,
            self.svc.port,
            running.started,
        ));
        let mut awaiting_ready = true;
        loop {
            tokio::select! {
                status = running.child.wait() => return self.exited(&mut running, status).await,
                () = wait_phase(&mut self.phase, Phase::Stop) => {
                    return End::Stopped(self.stop(running).await);
                }
                elapsed = &mut readiness, if awaiting_ready => {
                    awaiting_ready = false;
                    self.report_ready(elapsed);
                }
            }
        }
    }

    /// A child that exits just as the supervisor stops has not crashed: it is not restarted.
    async fn exited(&self, running: &mut Running, status: io::Result<ExitStatus>) -> End {
        running.drain_output().await;
        if *self.phase.borrow() == Phase::Run {
            return End::Crashed(status);
        }
        self.report_exit(&status);
        End::Stopped(Outcome::default())
    }

    /// SIGTERM, then wait; SIGKILL once the supervisor says so.
    async fn stop(&mut self, mut running: Running) -> Outcome {
        signal(running.pid, Signal::SIGTERM);
        let (status, killed) = tokio::select! {
            status = running.child.wait() => (status, false),
            () = wait_phase(&mut self.phase, Phase::Kill) => kill_now(&mut running).await,
        };
        running.drain_output().await;
        self.report_exit(&status);
        Outcome { killed }
    }

    /// Sleeps before a restart; true if a stop was requested meanwhile.
    async fn stopped_while_sleeping(&mut self, delay: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(delay) => false,
            () = wait_phase(&mut self.phase, Phase::Stop) => true,
        }
    }

    fn report_ready(&self, elapsed: Duration) {
        let name = self.svc.name;
        self.out
            .info(format!("{name} ready ({} ms)", elapsed.as_millis()));
        // The receiver only goes away at shutdown, when readiness no longer matters.
        let _ = self.ready_tx.send(name);
    }

    fn report_crash(&self, status: &io::Result<ExitStatus>, delay: Duration) {
        self.out.info(format!(
            "{} exited with {}; restarting in {}s",
            self.svc.name,
            describe(status),
            delay.as_secs()
        ));
    }

    fn report_exit(&self, status: &io::Result<ExitStatus>) {
        self.out.info(format!(
            "{} exited with {}",
            self.svc.name,
            describe(status)
        ));
    }
}

impl Running {
    /// Lets the child's last lines reach the screen before its exit is reported.
    async fn drain_output(&mut self) {
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        for handle in &mut self.output {
            if tokio::time::timeout_at(deadline, &mut *handle)
                .await
                .is_err()
            {
                handle.abort();
            }
        }
    }
}

/// Returns the exit status and whether the child really had to be killed.
async fn kill_now(running: &mut Running) -> (io::Result<ExitStatus>, bool) {
    if let Ok(Some(status)) = running.child.try_wait() {
        return (Ok(status), false);
    }
    signal(running.pid, Signal::SIGKILL);
    (running.child.wait().await, true)
}

/// Resolves once the supervisor has reached `at_least`.
async fn wait_phase(phase: &mut watch::Receiver<Phase>, at_least: Phase) {
    // An error means the supervisor is gone, which is as final as any phase.
    let _ = phase.wait_for(|current| *current >= at_least).await;
}

/// Signals the child's whole process group (it leads one), so helpers it spawned go too.
/// Only called before the child is reaped, so the pid cannot have been reused.
fn signal(pid: Pid, signal: Signal) {
    if killpg(pid, signal).is_err() {
        // The child may have moved to a group of its own; it must still get the signal.
        // An error here means it is already gone, which is what we want.
        let _ = kill(pid, signal);
    }
}

/// "code 1" or "signal SIGKILL": shorter than `ExitStatus`'s own Display.
fn describe(status: &io::Result<ExitStatus>) -> String {
    match status {
        Ok(status) => match (status.code(), status.signal()) {
            (Some(code), _) => format!("code {code}"),
            (None, Some(raw)) => match Signal::try_from(raw) {
                Ok(sig) => format!("signal {}", sig.as_str()),
                Err(_) => format!("signal {raw}"),
            },
            (None, None) => status.to_string(),
        },
        Err(err) => format!("unknown status ({err})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_exit_statuses() {
        assert_eq!(describe(&Ok(ExitStatus::from_raw(1 << 8))), "code 1");
        assert_eq!(describe(&Ok(ExitStatus::from_raw(9))), "signal SIGKILL");
    }
}
