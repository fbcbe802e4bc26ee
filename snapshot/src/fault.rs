//! Fault injection for crash-safety tests: `VMMS_FAULT=<step>` makes the process SIGKILL itself
//! when it reaches the step of that name, so a test can prove recovery from a crash there.

/// The environment variable naming the step to die at.
pub const FAULT_ENV: &str = "VMMS_FAULT";

/// Kills the process (SIGKILL, no cleanup, as a crash or `kill -9`) if `VMMS_FAULT` names `step`.
pub fn fault_point(step: &str) {
    if std::env::var_os(FAULT_ENV).is_some_and(|v| v == step) {
        // SAFETY: raising a signal at our own process has no memory-safety preconditions.
        unsafe {
            libc::raise(libc::SIGKILL);
        }
    }
}
