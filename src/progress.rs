//! How long-running library work (imports, reconstructions, training, sampling, verification)
//! reports progress without knowing who watches: the command line draws an `indicatif` bar,
//! the server and tests pass `&()` (nothing), a sweep worker could record events.

/// Receives progress of one piece of work. Every method has a do-nothing default; all may be
/// called from worker threads.
pub trait Progress: Send + Sync {
    /// The total amount of work, in the unit the work counts (bytes, images, steps).
    fn set_length(&self, _total: u64) {}
    /// `n` more units are done.
    fn inc(&self, _n: u64) {}
    /// The work is at `position` units (work that resumes part-way sets this first).
    fn set_position(&self, _position: u64) {}
    /// A short status line (current loss, the file being read).
    fn set_message(&self, _message: String) {}
    /// A line a person must see even while a bar is drawn (a refused file, a warning).
    fn note(&self, _line: &str) {}
}

/// No one is watching.
impl Progress for () {}

/// A terminal progress bar; notes are printed above it.
impl Progress for indicatif::ProgressBar {
    fn set_length(&self, total: u64) {
        indicatif::ProgressBar::set_length(self, total);
    }
    fn inc(&self, n: u64) {
        indicatif::ProgressBar::inc(self, n);
    }
    fn set_position(&self, position: u64) {
        indicatif::ProgressBar::set_position(self, position);
    }
    fn set_message(&self, message: String) {
        indicatif::ProgressBar::set_message(self, message);
    }
    fn note(&self, line: &str) {
        // Printed whether or not the bar is drawn (it is hidden off a terminal).
        self.suspend(|| eprintln!("{line}"));
    }
}
