//! What the run is doing, on stderr: a spinner for each phase and, while orders flow, a
//! bar with placed / finished / errors and the rate at which orders end. Without a
//! terminal, phases are printed as lines instead; with `--json`, nothing.

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Counters the load loop keeps and the bar shows.
#[derive(Default)]
pub struct Counters {
    pub placed: AtomicU64,
    pub finished: AtomicU64,
    pub errors: AtomicU64,
}

impl Counters {
    pub fn get(&self) -> (u64, u64, u64) {
        (
            self.placed.load(Ordering::Relaxed),
            self.finished.load(Ordering::Relaxed),
            self.errors.load(Ordering::Relaxed),
        )
    }
}

pub struct Progress {
    bar: ProgressBar,
    /// Print phases as lines (stderr is not a terminal).
    lines: bool,
}

impl Progress {
    pub fn new(enabled: bool) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = if enabled && terminal {
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(8))
        } else {
            ProgressBar::hidden()
        };
        Self {
            bar,
            lines: enabled && !terminal,
        }
    }

    /// A phase without a known length.
    pub fn phase(&self, what: &str) {
        if self.lines {
            eprintln!("bench: {what}");
        }
        self.bar.reset();
        self.bar.unset_length();
        self.bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        self.bar.set_message(what.to_owned());
        self.bar.enable_steady_tick(Duration::from_millis(120));
    }

    /// Orders flowing: a bar of finished orders out of `total` (None: a timed run).
    /// The returned guard updates the message until dropped.
    pub fn orders(&self, total: Option<u64>, counters: Arc<Counters>) -> Ticker {
        if self.lines {
            eprintln!("bench: placing orders");
        }
        self.bar.reset();
        let template = match total {
            Some(total) => {
                self.bar.set_length(total);
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}"
            }
            None => {
                self.bar.unset_length();
                "{spinner} [{elapsed_precise}] {msg}"
            }
        };
        self.bar.set_style(
            ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        let bar = self.bar.clone();
        let task = tokio::spawn(async move {
            let mut last = (Instant::now(), 0u64);
            let mut rate = 0.0;
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let (placed, finished, errors) = counters.get();
                let now = Instant::now();
                let dt = now.duration_since(last.0).as_secs_f64();
                if dt >= 1.0 {
                    // Finished orders per second over the last second or so.
                    rate = finished.saturating_sub(last.1) as f64 / dt;
                    last = (now, finished);
                }
                bar.set_position(finished);
                bar.set_message(format!(
                    "placed {placed}  finished {finished}  errors {errors}  {rate:.0} orders/s"
                ));
            }
        });
        Ticker(task)
    }

    pub fn done(&self) {
        self.bar.finish_and_clear();
    }
}

/// Stops updating the bar when dropped.
pub struct Ticker(tokio::task::JoinHandle<()>);

impl Drop for Ticker {
    fn drop(&mut self) {
        self.0.abort();
    }
}
