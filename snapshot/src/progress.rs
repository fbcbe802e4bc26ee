//! Progress of long operations (copies, merges), for jobs' `PercentComplete` and progress bars.

/// Receives progress of one operation. Called from the thread running the operation.
pub trait Progress {
    /// The operation will move about `bytes` more bytes in total (may be called several times;
    /// totals add up).
    fn add_total(&mut self, bytes: u64);
    /// `bytes` more bytes were moved.
    fn advance(&mut self, bytes: u64);
}

/// Discards progress.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn add_total(&mut self, _bytes: u64) {}
    fn advance(&mut self, _bytes: u64) {}
}

/// Counts progress; `percent()` gives a job's `PercentComplete`.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProgressCounter {
    /// Bytes announced.
    pub total: u64,
    /// Bytes done.
    pub done: u64,
}

impl ProgressCounter {
    /// 0..=100; 100 when nothing was announced.
    pub fn percent(&self) -> u8 {
        if self.total == 0 {
            return 100;
        }
        (self.done.min(self.total) * 100 / self.total) as u8
    }
}

impl Progress for ProgressCounter {
    fn add_total(&mut self, bytes: u64) {
        self.total += bytes;
    }
    fn advance(&mut self, bytes: u64) {
        self.done += bytes;
    }
}
