//! A progress bar on stderr that appears only when it helps: stderr is a terminal, `--quiet`
//! was not given, and the work has already taken more than a second (short runs stay
//! silent). Counts elements of P processed (per pass over the data).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How long work runs before the bar is drawn.
const SHOW_AFTER: Duration = Duration::from_secs(1);

/// A hidden-at-first progress bar.
pub struct Progress {
    bar: ProgressBar,
    start: Instant,
    allowed: bool,
    shown: AtomicBool,
}

impl Progress {
    /// A bar that may be shown if `quiet` is false and stderr is a terminal.
    pub fn new(quiet: bool) -> Self {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::hidden());
        if let Ok(style) = ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] [{wide_bar}] {percent:>3}% {human_pos}/{human_len} \
             elements, eta {eta}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        Progress {
            bar,
            start: Instant::now(),
            allowed: !quiet && std::io::stderr().is_terminal(),
            shown: AtomicBool::new(false),
        }
    }

    /// Sets the total amount of work.
    pub fn set_total(&self, total: u64) {
        self.bar.set_length(total);
    }

    /// A handle for another thread to advance the bar.
    pub fn bar(&self) -> ProgressBar {
        self.bar.clone()
    }

    /// Advances the bar.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    /// Shows the bar once the work has run long enough; call it regularly.
    pub fn tick(&self) {
        if self.allowed && !self.shown.load(Ordering::Relaxed) && self.start.elapsed() > SHOW_AFTER
        {
            self.shown.store(true, Ordering::Relaxed);
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
            self.bar.enable_steady_tick(Duration::from_millis(200));
        }
    }

    /// Removes the bar from the terminal.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
