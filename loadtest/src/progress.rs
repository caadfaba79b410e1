//! The one-line progress display on stderr while a scenario runs.
//!
//! On a terminal the line is redrawn in place; when stderr is a file or a pipe (CI logs), a fresh line
//! is printed now and then instead, so logs stay readable.

use std::io::{self, IsTerminal, Write};
use std::time::{Duration, Instant};

/// How often a non-terminal stderr gets a new progress line.
const LOG_LINE_INTERVAL: Duration = Duration::from_secs(1);

/// A progress line that redraws itself on a terminal and prints sparingly elsewhere.
pub struct ProgressLine {
    /// Whether stderr is a terminal, so `\r` redraws work.
    terminal: bool,
    /// When a line was last printed (non-terminal only).
    last_line: Option<Instant>,
    /// The text last printed (non-terminal only), so `finish` does not repeat it.
    last_text: String,
}

impl ProgressLine {
    /// A progress line on this process's stderr.
    pub fn new() -> ProgressLine {
        ProgressLine {
            terminal: io::stderr().is_terminal(),
            last_line: None,
            last_text: String::new(),
        }
    }

    /// Shows `text` as the current progress.
    pub fn update(&mut self, text: &str) {
        let mut err = io::stderr().lock();
        if self.terminal {
            // \x1b[K clears what a longer previous line left behind.
            let _ = write!(err, "\r{text}\x1b[K");
        } else if self
            .last_line
            .is_none_or(|at| at.elapsed() >= LOG_LINE_INTERVAL)
        {
            let _ = writeln!(err, "{text}");
            self.last_line = Some(Instant::now());
            self.last_text = text.to_string();
        }
        let _ = err.flush();
    }

    /// Leaves `text` as the final state of the line.
    pub fn finish(&mut self, text: &str) {
        let mut err = io::stderr().lock();
        if self.terminal {
            let _ = writeln!(err, "\r{text}\x1b[K");
        } else if self.last_text != text {
            let _ = writeln!(err, "{text}");
        }
    }
}

impl Default for ProgressLine {
    fn default() -> Self {
        ProgressLine::new()
    }
}
