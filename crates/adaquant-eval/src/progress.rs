//! Progress reporting: an indicatif bar with ETA on terminals, plain timestamped lines otherwise (logs, Slurm).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// One phase of work measured in units (tokens or items).
pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    unit: &'static str,
    total: u64,
    done: u64,
    start: Instant,
    last_line: Instant,
    quiet: bool,
}

impl Progress {
    /// A bar for `total` units labelled `label`; plain lines when stderr is not a terminal.
    pub fn new(label: impl Into<String>, total: u64, unit: &'static str) -> Progress {
        let label = label.into();
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template("{msg:28} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_message(label.clone());
            b
        });
        Progress { bar, label, unit, total, done: 0, start: Instant::now(), last_line: Instant::now(), quiet: false }
    }

    /// A progress that reports nothing (tests, nested phases).
    pub fn hidden() -> Progress {
        let mut p = Progress::new("", 0, "");
        p.bar = None;
        p.quiet = true;
        p
    }

    /// Adds `n` finished units.
    pub fn inc(&mut self, n: usize) {
        self.done += n as u64;
        if let Some(b) = &self.bar {
            b.inc(n as u64);
        } else if !self.quiet && self.last_line.elapsed() >= Duration::from_secs(15) {
            self.last_line = Instant::now();
            let el = self.start.elapsed().as_secs_f64();
            let rate = self.done as f64 / el.max(1e-9);
            let eta = (self.total.saturating_sub(self.done)) as f64 / rate.max(1e-9);
            eprintln!(
                "[{}] {}/{} {} ({rate:.1} {}/s, elapsed {el:.0} s, eta {eta:.0} s)",
                self.label, self.done, self.total, self.unit, self.unit
            );
        }
    }

    /// Ends the phase and returns its wall time in seconds.
    pub fn finish(self) -> f64 {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        self.start.elapsed().as_secs_f64()
    }
}
