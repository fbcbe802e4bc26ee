//! When each step of a worker's start-up ended, for breaking a VM start down (benches/daemon.rs).
//!
//! Off unless [`START_TRACE_ENV`] is set in the worker's environment (a daemon's workers inherit
//! it). Then the worker logs one line once it reported ready:
//! `worker <GUID>: start trace: main=<ns> config=<ns> … ready=<ns>`, each value the
//! `CLOCK_MONOTONIC` time in nanoseconds at which that step ended (`main`: when `run` began;
//! `assigned` instead for a pool worker: when it received its VM), a
//! clock every process on the host shares, so a parent can place the steps next to its own.
//! Steps are marked with `mark` from wherever they end, without threading a recorder through.
//!
//! The guest's first console byte usually comes after the worker reported ready, so it gets a
//! line of its own, `worker: start trace: first_byte=<ns>`, written once by the vCPU thread that
//! saw it (`first_output`: one relaxed atomic load per console write while tracing is off).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use vmm_core::VmId;

/// Environment variable that turns the start trace on (any value).
pub const START_TRACE_ENV: &str = "VMMS_WORKER_START_TRACE";

/// Marker before the steps in the worker's log line.
pub const START_TRACE_MARKER: &str = "start trace:";

/// The steps so far; `None` while tracing is off.
static STEPS: Mutex<Option<Vec<(&'static str, u64)>>> = Mutex::new(None);

/// Tracing is on and the guest's first console byte is still to come.
static AWAITING_FIRST_BYTE: AtomicBool = AtomicBool::new(false);

/// `CLOCK_MONOTONIC` now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec it is given, which is valid and ours.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

fn steps() -> std::sync::MutexGuard<'static, Option<Vec<(&'static str, u64)>>> {
    STEPS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Starts the trace (recording `main` now) if [`START_TRACE_ENV`] is set.
pub(crate) fn begin() {
    begin_at("main");
}

/// Starts the trace with `step` (a pool worker's starts at `assigned`: when it received its VM).
pub(crate) fn begin_at(step: &'static str) {
    if std::env::var_os(START_TRACE_ENV).is_some() {
        *steps() = Some(vec![(step, monotonic_ns())]);
        AWAITING_FIRST_BYTE.store(true, Ordering::Relaxed);
    }
}

/// Called on each console write: logs when the guest's first byte arrived (once, while tracing).
/// Nothing but one atomic load when tracing is off or the byte was logged already.
pub(crate) fn first_output() {
    if AWAITING_FIRST_BYTE.load(Ordering::Relaxed)
        && AWAITING_FIRST_BYTE.swap(false, Ordering::Relaxed)
    {
        log_line!("worker: {START_TRACE_MARKER} first_byte={}", monotonic_ns());
    }
}

/// Records that `step` ended now (nothing while tracing is off).
pub(crate) fn mark(step: &'static str) {
    if let Some(steps) = steps().as_mut() {
        steps.push((step, monotonic_ns()));
    }
}

/// Logs the trace and ends it (see the module notes); nothing while tracing is off.
pub(crate) fn log(vm: VmId) {
    if let Some(steps) = steps().take() {
        let list: Vec<String> = steps
            .iter()
            .map(|(step, ns)| format!("{step}={ns}"))
            .collect();
        log_line!("worker {vm}: {START_TRACE_MARKER} {}", list.join(" "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_clock_moves_forward() {
        let before = monotonic_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));

        assert!(monotonic_ns() >= before + 2_000_000);
    }
}
