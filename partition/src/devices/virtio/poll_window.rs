//! How long a device's I/O thread polls a queue after serving it (virtio notification
//! suppression).
//!
//! A notification costs the notifying vCPU an exit (a few microseconds on hardware, more on a
//! software KVM). A driver that submits one request after another (a guest writing a file) can do
//! without: after a batch, the I/O thread sets `VRING_USED_F_NO_NOTIFY` and watches the available
//! ring for a short window, so the next request is served without the driver notifying. Linux's
//! driver honours the flag, as the test guest's does.
//!
//! The window adapts, like KVM's halt polling: it grows (doubling from [`POLL_START`] up to
//! [`POLL_MAX`]) while the driver's next notification follows the last batch within
//! [`POLL_MAX`] (a longer window would have caught it), and shrinks (halving, then off) when the
//! driver was quiet for longer. A guest that is idle costs at most one window per batch.
//!
//! Polling only pays when the driver's vCPU runs meanwhile on another CPU: a thread that spins
//! on the CPU the vCPU needs only delays the request it waits for. So it is off when the process
//! may run on a single CPU ([`may_poll`]).

use std::time::{Duration, Instant};

/// The first window once polling starts.
pub(super) const POLL_START: Duration = Duration::from_micros(16);
/// The longest window, and the longest gap between batches polling tries to bridge (KVM's
/// default halt-polling limit).
pub(super) const POLL_MAX: Duration = Duration::from_micros(200);

/// One queue's polling window.
#[derive(Clone, Copy, Debug)]
pub(super) struct PollWindow {
    window: Duration,
    /// When serving its last used buffer ended (before any polling); `None` before the first.
    last_batch: Option<Instant>,
    enabled: bool,
}

impl PollWindow {
    /// A window that starts closed; `enabled: false` keeps it closed for good.
    pub(super) fn new(enabled: bool) -> Self {
        Self {
            window: Duration::ZERO,
            last_batch: None,
            enabled,
        }
    }

    /// How long to poll after the batch about to be served.
    pub(super) fn window(&self) -> Duration {
        self.window
    }

    /// The driver notified at `now`: the window, if any, did not catch its request. Grow it if
    /// the gap since the last batch was short enough to bridge, shrink it otherwise.
    pub(super) fn notified(&mut self, now: Instant) {
        if !self.enabled {
            return;
        }
        let bridgeable = self
            .last_batch
            .is_some_and(|last| now.saturating_duration_since(last) <= POLL_MAX);
        self.window = if bridgeable {
            (self.window * 2).clamp(POLL_START, POLL_MAX)
        } else if self.window / 2 < POLL_START {
            Duration::ZERO
        } else {
            self.window / 2
        };
    }

    /// A notification was served: `served_at` is when its last used buffer was (`None`: it found
    /// nothing to serve).
    pub(super) fn batch_done(&mut self, served_at: Option<Instant>) {
        if served_at.is_some() {
            self.last_batch = served_at;
        }
    }
}

/// Whether this process may run on more than one CPU (its affinity mask and CPU quota), so
/// that a polling I/O thread and the vCPU it waits for can run at the same time.
pub(super) fn may_poll() -> bool {
    std::thread::available_parallelism().is_ok_and(|cpus| cpus.get() >= 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_grows_while_notifications_follow_batches_closely() {
        let mut poll = PollWindow::new(true);
        let start = Instant::now();
        let mut windows = Vec::new();
        for round in 0..6u32 {
            let batch = start + Duration::from_micros(u64::from(round) * 1000);
            poll.batch_done(Some(batch));
            poll.notified(batch + Duration::from_micros(50));
            windows.push(poll.window());
        }
        assert_eq!(windows[0], POLL_START);
        assert!(windows.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*windows.last().unwrap(), POLL_MAX);
    }

    #[test]
    fn window_closes_when_the_driver_is_quiet() {
        let mut poll = PollWindow::new(true);
        let start = Instant::now();
        poll.batch_done(Some(start));
        poll.notified(start + Duration::from_micros(10));
        assert!(poll.window() > Duration::ZERO);
        for round in 1..10u64 {
            let batch = start + Duration::from_millis(round * 10);
            poll.batch_done(Some(batch));
            poll.notified(batch + Duration::from_millis(5));
        }
        assert_eq!(poll.window(), Duration::ZERO);
    }

    #[test]
    fn disabled_window_never_opens() {
        let mut poll = PollWindow::new(false);
        let now = Instant::now();
        poll.batch_done(Some(now));
        poll.notified(now);
        assert_eq!(poll.window(), Duration::ZERO);
    }
}
