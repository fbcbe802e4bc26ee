//! Fault injection for crash-safety tests: `VMMS_FAULT=<step>` makes the process SIGKILL itself
//! when it reaches the step of that name, so a test can prove recovery from a crash there.
//!
//! Same variable and syntax as vmm-core's fault points (`step`, `step:delay=MS`, comma-separated
//! lists), with step names under `snapshot.`, so one setting can aim at either; the lead may
//! replace this with vmm-core's when the crates share it.

use std::sync::OnceLock;
use std::time::Duration;

/// The environment variable naming the steps to fail at.
pub const FAULT_ENV: &str = "VMMS_FAULT";

/// Kills the process (SIGKILL, no cleanup, as a crash or `kill -9`) if `VMMS_FAULT` names `step`;
/// sleeps there instead for `step:delay=MS`.
pub fn fault_point(step: &str) {
    static SPEC: OnceLock<Option<String>> = OnceLock::new();
    let Some(spec) = SPEC.get_or_init(|| std::env::var(FAULT_ENV).ok()) else {
        return;
    };
    for entry in spec.split(',').map(str::trim) {
        match entry.split_once(":delay=") {
            Some((name, ms)) if name == step => {
                std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(10_000)));
            }
            None if entry == step => {
                // SAFETY: raising a signal at our own process has no memory-safety preconditions.
                unsafe {
                    libc::raise(libc::SIGKILL);
                }
            }
            _ => {}
        }
    }
}
