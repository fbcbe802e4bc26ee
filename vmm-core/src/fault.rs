//! Fault injection at named steps, for crash-safety tests of real processes.
//!
//! A multi-step operation that must survive a crash at any instant (save, start, restore, remove,
//! shutdown; later checkpoint and backup) calls [`point`] between its steps with a stable name
//! such as `"save.before-worker"` or `"worker.save.before-commit"`. Normally that is one cached
//! lookup. When the environment variable [`FAULT_ENV`] names the step, the process dies there:
//!
//! ```text
//! VMMS_FAULT=save.before-worker                  SIGKILL at that step
//! VMMS_FAULT=worker.save.before-commit:delay=2000  sleep 2 s there (a window to kill others in)
//! VMMS_FAULT=a,b:delay=500                       several steps
//! ```
//!
//! The variable is read once per process. Workers inherit it from the daemon that spawns them, so
//! one setting reaches both sides; step names say which process they belong to (`worker.` for
//! the worker side). Tests set it; nothing else should.
//!
//! The same steps are where a start's time goes, so a benchmark can [`observe`] them: its
//! function is called at every step this process passes (benches/daemon.rs times them).

use std::sync::OnceLock;
use std::time::Duration;

/// The environment variable naming the steps at which to fail.
pub const FAULT_ENV: &str = "VMMS_FAULT";

/// What to do at a step.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    /// SIGKILL this process: the harshest crash, nothing runs after it.
    Kill,
    /// Sleep, opening a window in which a test can kill or stop another process.
    Delay(Duration),
}

/// One `step[:delay=MS]` entry of the variable.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fault {
    step: String,
    action: Action,
}

fn parse(spec: &str) -> Vec<Fault> {
    spec.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| match entry.split_once(":delay=") {
            Some((step, ms)) => Fault {
                step: step.to_owned(),
                // A malformed delay is a test bug; a long default makes it obvious, not silent.
                action: Action::Delay(Duration::from_millis(ms.parse().unwrap_or(10_000))),
            },
            None => Fault {
                step: entry.to_owned(),
                action: Action::Kill,
            },
        })
        .collect()
}

fn faults() -> &'static [Fault] {
    static FAULTS: OnceLock<Vec<Fault>> = OnceLock::new();
    FAULTS.get_or_init(|| std::env::var(FAULT_ENV).map_or_else(|_| Vec::new(), |s| parse(&s)))
}

/// Where [`observe`] put its function.
static OBSERVER: OnceLock<fn(&str)> = OnceLock::new();

/// Has `observer` called with the name of every step this process passes from now on (once per
/// process; a second call changes nothing and returns `false`). For timing steps, not for tests
/// of behaviour: the observer runs on whatever thread passes the step, with its locks held.
pub fn observe(observer: fn(&str)) -> bool {
    OBSERVER.set(observer).is_ok()
}

/// Marks the step `name`: returns at once unless [`FAULT_ENV`] names it, in which case this
/// process is killed (or sleeps) here.
pub fn point(name: &str) {
    if let Some(observer) = OBSERVER.get() {
        observer(name);
    }
    for fault in faults().iter().filter(|f| f.step == name) {
        match fault.action {
            Action::Kill => {
                eprintln!("fault injection: killed at {name}");
                // raise() goes through tgkill, which a confined worker's seccomp filter allows
                // (kill is not): the process dies of SIGKILL, not of a filter violation.
                // SAFETY: raise only sends a signal to this thread; no memory is involved.
                unsafe { libc::raise(libc::SIGKILL) };
            }
            Action::Delay(delay) => {
                eprintln!("fault injection: {delay:?} delay at {name}");
                std::thread::sleep(delay);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_with_and_without_delay_parse() {
        let faults = parse("save.before-worker, worker.save.before-commit:delay=250,");

        assert_eq!(
            faults,
            [
                Fault {
                    step: "save.before-worker".into(),
                    action: Action::Kill
                },
                Fault {
                    step: "worker.save.before-commit".into(),
                    action: Action::Delay(Duration::from_millis(250))
                },
            ]
        );
    }
}
