//! Progress of a long stage (a sweep, a fine-tune, a gradient datastore, an
//! evaluation), reported the way its reader can see it:
//!
//! * on a terminal, an `indicatif` bar with rate and ETA;
//! * otherwise (a log file, CI, a Slurm job), one `tracing` line at least
//!   every [`LOG_INTERVAL`], written by a ticker thread, so a unit of work
//!   that takes minutes still shows the stage is alive, and one final line.
//!
//! ```
//! let mut p = dsel_progress::Progress::new("sweep pool", 1000, "tok");
//! p.inc(250);
//! p.set_message("shard 1/4");
//! p.finish();
//! ```

use std::io::IsTerminal;
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The longest a stage stays silent in a log when standard error is not a
/// terminal.
pub const LOG_INTERVAL: Duration = Duration::from_secs(30);

/// Where log lines go (a `tracing` info event by default; tests capture).
pub type Sink = Arc<dyn Fn(&str) + Send + Sync>;

#[derive(Debug, Clone)]
struct State {
    label: String,
    unit: &'static str,
    total: u64,
    pos: u64,
    /// Position when timing started (work resumed from a checkpoint does
    /// not count towards the rate).
    start_pos: u64,
    start: Instant,
    message: String,
}

impl State {
    fn line(&self) -> String {
        status_line(
            &self.label,
            self.pos,
            self.total,
            self.unit,
            self.pos.saturating_sub(self.start_pos),
            self.start.elapsed(),
            &self.message,
        )
    }
}

/// A progress reporter; see the crate docs. Dropping it stops the ticker.
pub struct Progress {
    state: Arc<Mutex<State>>,
    bar: Option<ProgressBar>,
    ticker: Option<(Sender<()>, JoinHandle<()>)>,
    sink: Option<Sink>,
    finished: bool,
}

impl Progress {
    /// A reporter for `total` units named `unit` (`tok`, `steps`, `ex`):
    /// a bar when standard error is a terminal, else log lines every
    /// [`LOG_INTERVAL`].
    pub fn new(label: impl Into<String>, total: u64, unit: &'static str) -> Self {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg} ({per_sec}, eta {eta})",
            ) {
                bar.set_style(style);
            }
            let label = label.into();
            bar.set_prefix(label.clone());
            bar.set_message(unit);
            let mut p = Self::build(label, total, unit, None);
            p.bar = Some(bar);
            p
        } else {
            let sink: Sink = Arc::new(|line: &str| tracing::info!("{line}"));
            Self::with_sink(label, total, unit, LOG_INTERVAL, sink)
        }
    }

    /// A reporter that writes its lines to `sink` every `interval` (and at
    /// [`Progress::finish`]), never drawing a bar.
    pub fn with_sink(
        label: impl Into<String>,
        total: u64,
        unit: &'static str,
        interval: Duration,
        sink: Sink,
    ) -> Self {
        let mut p = Self::build(label.into(), total, unit, Some(sink.clone()));
        let (tx, rx) = mpsc::channel::<()>();
        let state = p.state.clone();
        let handle = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                // Until the reporter hangs up (finish or drop).
                while let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(interval) {
                    let line = state.lock().map(|s| s.line()).unwrap_or_default();
                    sink(&line);
                }
            })
            .ok();
        p.ticker = handle.map(|h| (tx, h));
        p
    }

    fn build(label: String, total: u64, unit: &'static str, sink: Option<Sink>) -> Self {
        Progress {
            state: Arc::new(Mutex::new(State {
                label,
                unit,
                total,
                pos: 0,
                start_pos: 0,
                start: Instant::now(),
                message: String::new(),
            })),
            bar: None,
            ticker: None,
            sink,
            finished: false,
        }
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        if let Ok(mut s) = self.state.lock() {
            f(&mut s);
        }
    }

    /// Jump to `pos` without counting it towards the rate (work resumed from
    /// a checkpoint or found done).
    pub fn resume_at(&mut self, pos: u64) {
        self.update(|s| {
            s.pos = pos;
            s.start_pos = pos;
            s.start = Instant::now();
        });
        if let Some(b) = &self.bar {
            b.set_position(pos);
            b.reset_eta();
        }
    }

    /// Count `n` more units done.
    pub fn inc(&mut self, n: u64) {
        self.update(|s| s.pos += n);
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    /// Set the position to `pos` units done.
    pub fn set_position(&mut self, pos: u64) {
        self.update(|s| s.pos = pos);
        if let Some(b) = &self.bar {
            b.set_position(pos);
        }
    }

    /// A short status shown after the counts (`loss 2.31 lr 2e-4`).
    pub fn set_message(&mut self, msg: impl Into<String>) {
        let msg = msg.into();
        if let Some(b) = &self.bar {
            let unit = self.state.lock().map(|s| s.unit).unwrap_or("");
            b.set_message(format!("{unit}  {msg}"));
        }
        self.update(|s| s.message = msg);
    }

    /// The current status line (what the log shows).
    pub fn line(&self) -> String {
        self.state.lock().map(|s| s.line()).unwrap_or_default()
    }

    /// Stop: clear the bar, or write the final line to the log.
    pub fn finish(mut self) {
        self.stop();
        if let Some(sink) = &self.sink {
            sink(&self.line());
        }
        self.finished = true;
    }

    fn stop(&mut self) {
        if let Some((tx, handle)) = self.ticker.take() {
            drop(tx);
            let _ = handle.join();
        }
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if !self.finished {
            self.stop();
        }
    }
}

/// `sweep pool: 1,250/5,000 tok (25%), 310 tok/s, elapsed 4s, eta 12s; msg`.
/// The rate is over `done_here` units done in `elapsed` (resumed work not
/// counted); no ETA before anything is done.
pub fn status_line(
    label: &str,
    pos: u64,
    total: u64,
    unit: &str,
    done_here: u64,
    elapsed: Duration,
    message: &str,
) -> String {
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 {
        done_here as f64 / secs
    } else {
        0.0
    };
    let pct = if total > 0 {
        100.0 * pos as f64 / total as f64
    } else {
        100.0
    };
    let eta = if rate > 0.0 && pos < total {
        format!(
            ", eta {}",
            human(Duration::from_secs_f64((total - pos) as f64 / rate))
        )
    } else {
        String::new()
    };
    let rate = if rate >= 10.0 {
        format!("{rate:.0}")
    } else {
        format!("{rate:.2}")
    };
    let msg = if message.is_empty() {
        String::new()
    } else {
        format!("; {message}")
    };
    format!(
        "{label}: {pos}/{total} {unit} ({pct:.0}%), {rate} {unit}/s, elapsed {}{eta}{msg}",
        human(elapsed)
    )
}

/// `4s`, `3m05s`, `1h02m`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_has_counts_rate_and_eta() {
        let l = status_line(
            "sweep pool",
            250,
            1000,
            "tok",
            250,
            Duration::from_secs(5),
            "",
        );
        assert_eq!(
            l,
            "sweep pool: 250/1000 tok (25%), 50 tok/s, elapsed 5s, eta 15s"
        );
        // Resumed work does not count towards the rate; no ETA before any
        // work is done here, nor when done.
        let l = status_line("x", 500, 1000, "ex", 0, Duration::from_secs(5), "shard 2");
        assert_eq!(l, "x: 500/1000 ex (50%), 0.00 ex/s, elapsed 5s; shard 2");
        let l = status_line("x", 10, 10, "steps", 10, Duration::from_secs(3725), "");
        assert_eq!(l, "x: 10/10 steps (100%), 0.00 steps/s, elapsed 1h02m");
        assert_eq!(human(Duration::from_secs(185)), "3m05s");
    }

    #[test]
    fn the_log_gets_a_line_every_interval_even_without_progress_and_a_final_one() {
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let sink_lines = lines.clone();
        let sink: Sink = Arc::new(move |l: &str| sink_lines.lock().unwrap().push(l.to_string()));
        let mut p = Progress::with_sink("LESS pool", 8, "ex", Duration::from_millis(5), sink);
        p.inc(3);
        p.set_message("epoch 1");
        // No further progress: the ticker alone keeps writing.
        let waited = Instant::now();
        while lines.lock().unwrap().len() < 3 {
            assert!(
                waited.elapsed() < Duration::from_secs(20),
                "no ticker lines"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        p.finish();
        let lines = lines.lock().unwrap();
        assert!(lines[0].starts_with("LESS pool: 3/8 ex (38%)"), "{lines:?}");
        assert!(lines[0].ends_with("; epoch 1"), "{lines:?}");
        let n = lines.len();
        // finish stops the ticker before its final line.
        assert!(lines[n - 1].starts_with("LESS pool: 3/8 ex"), "{lines:?}");
    }
}
