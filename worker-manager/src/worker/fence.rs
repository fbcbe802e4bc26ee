//! Fencing in a cluster: a worker runs its guest only while the token it started under is the
//! VM's newest (`<vm folder>/fence`, written by the owner node before it launches a worker).
//!
//! A node that lost the VM's ownership may be frozen or cut off while its worker runs on. The new
//! owner writes its newer token before it starts its own worker, and this worker, seeing a token
//! that is not the one it started with, ends at once (no save, no flush: nothing more written),
//! so it stops running the guest before the new owner's worker can open the disks. Outside a
//! cluster there is no fence file and nothing here runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often the fence file is read.
const POLL: Duration = Duration::from_millis(100);

/// Exit code of a worker that ended because a newer owner fenced it off.
pub const EXIT_FENCED: i32 = 3;

/// Reads the token in a fence file; `None` when there is none (not clustered).
pub fn read_token(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Starts watching `path` if it holds a token now: the process exits with [`EXIT_FENCED`] as soon
/// as the file names another token (or goes away).
pub(crate) fn watch(path: PathBuf) -> std::io::Result<()> {
    let Some(token) = read_token(&path) else {
        return Ok(());
    };
    log_line!("worker: fencing token {token}");
    std::thread::Builder::new()
        .name("fence".into())
        .spawn(move || {
            while read_token(&path) == Some(token) {
                std::thread::sleep(POLL);
            }
            log_line!("worker: fencing token {token} is stale; stopping the guest");
            // SAFETY: _exit ends the process at once without running any code of ours; the
            // guest's memory and every descriptor go with it, which is the point.
            unsafe { libc::_exit(EXIT_FENCED) }
        })
        .map(drop)
}
