//! What the service asks of a running guest's integration services and of its disks during a
//! backup: the types crossing the [`Worker`](crate::Worker) seam for Hyper-V's backup integration
//! (the in-guest VSS requestor) and Resilient Change Tracking.
//!
//! On Linux the in-guest requestor is a qemu-guest-agent on the guest's second serial port; the
//! worker owns that port, so the service reaches the agent only through its worker. The worker,
//! not the service, enforces the freeze hold limit: a service killed while the guest is frozen
//! must not leave the guest's file systems frozen.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::worker::DiskOverlay;

/// What the guest agent answered to `guest-info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestAgentInfo {
    /// The agent's version string.
    pub version: String,
    /// The commands it supports and has enabled.
    pub supported_commands: Vec<String>,
}

/// The guest's file systems as its agent reports them (`guest-fsfreeze-status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestFreezeStatus {
    /// Writable: no freeze is in effect.
    Thawed,
    /// Frozen: writes are held until a thaw.
    Frozen,
}

/// Whether the guest's integration agent answers (Hyper-V's heartbeat integration service,
/// `Msvm_HeartbeatComponent.OperationalStatus`): the worker pings it periodically and keeps the
/// last answer, so reading it costs no round trip to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestHeartbeat {
    /// The agent answered the last ping (OK, 2).
    Ok,
    /// The agent has not answered since the guest started (No Contact, 12): booting, or no
    /// agent runs in it.
    NoContact,
    /// The agent answered before but not the last ping (Lost Communication, 13).
    LostCommunication,
}

impl fmt::Display for GuestHeartbeat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GuestHeartbeat::Ok => "OK",
            GuestHeartbeat::NoContact => "No Contact",
            GuestHeartbeat::LostCommunication => "Lost Communication",
        })
    }
}

/// The identity of a change-tracking reference point: the instant a backup captured a disk, from
/// which the next incremental backup copies only what changed (Hyper-V's RCT identifier).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ReferencePointId(Uuid);

impl ReferencePointId {
    /// A fresh random id.
    pub fn new_random() -> Self {
        ReferencePointId(Uuid::new_v4())
    }
}

impl fmt::Display for ReferencePointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for ReferencePointId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(ReferencePointId)
    }
}

/// A backup's point-in-time capture of a running VM's disks ([`Worker::backup_capture`]).
///
/// Inside one short quiesce of the disks (in-flight requests finished, none started) the worker
/// creates each overlay on top of its disk's current image, switches the disk to it, and takes the
/// disk's changed-block map, which restarts empty under `reference`. The images below the overlays
/// are then frozen at that instant and the backup copies them while the guest writes on.
///
/// [`Worker::backup_capture`]: crate::Worker::backup_capture
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupCaptureRequest {
    /// The new top layer of each disk to back up; must not exist.
    pub overlays: Vec<DiskOverlay>,
    /// The reference point this capture starts; the next incremental asks for changes since it.
    pub reference: ReferencePointId,
}

/// Which blocks of one disk changed between two reference points.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedBlocks {
    /// Index of the disk in the VM configuration's `disks`.
    pub disk: usize,
    /// Bytes per block (a power of two).
    pub block_size: u64,
    /// The disk's virtual size in bytes.
    pub disk_size: u64,
    /// Bit `n` (of word `n / 64`, least significant first) set when block `n` was written.
    pub words: Vec<u64>,
}

impl ChangedBlocks {
    /// Whether block `index` changed.
    pub fn is_changed(&self, index: u64) -> bool {
        let word = usize::try_from(index / 64).ok();
        word.and_then(|w| self.words.get(w))
            .is_some_and(|w| w & (1 << (index % 64)) != 0)
    }

    /// How many blocks changed.
    pub fn changed_count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The changed byte ranges `(offset, length)`, adjacent blocks joined, clipped to the disk.
    pub fn changed_ranges(&self) -> Vec<(u64, u64)> {
        let blocks = self.disk_size.div_ceil(self.block_size.max(1));
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for index in (0..blocks).filter(|&i| self.is_changed(i)) {
            let offset = index * self.block_size;
            let length = self.block_size.min(self.disk_size - offset);
            match ranges.last_mut() {
                Some((start, len)) if *start + *len == offset => *len += length,
                _ => ranges.push((offset, length)),
            }
        }
        ranges
    }
}

/// What a [`BackupCaptureRequest`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupCaptureReport {
    /// The reference point the returned changes are relative to: the one the disks' maps were
    /// tracking since the VM's worker started. `None` when the worker cannot vouch for any (the
    /// map was lost in an unclean stop, or never existed): then `changes` covers only this
    /// worker's life and an incremental backup is impossible.
    pub previous_reference: Option<ReferencePointId>,
    /// Why there is no `previous_reference`, in words for the backup's report.
    pub untracked_reason: Option<String>,
    /// Per disk in `overlays`, the blocks written since `previous_reference`.
    pub changes: Vec<ChangedBlocks>,
    /// How long the disks were quiesced.
    pub quiesce: Duration,
}

/// Ends a backup's capture ([`Worker::backup_merge`]): each overlay's blocks are written into the
/// image below it, the disk continues on that image, and the overlay file is removed, while the
/// guest runs. A disk already back on its image is left as it is, so a retry after a crash is
/// safe.
///
/// [`Worker::backup_merge`]: crate::Worker::backup_merge
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupMergeRequest {
    /// The overlays a [`BackupCaptureRequest`] created.
    pub overlays: Vec<DiskOverlay>,
    /// Keep change tracking valid (the backup completed and its reference point stands) or drop
    /// it (the session aborted after the capture took the maps: the next backup must be full).
    pub keep_reference: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_ranges_join_adjacent_blocks_and_clip_to_the_disk() {
        let changes = ChangedBlocks {
            disk: 0,
            block_size: 4096,
            disk_size: 4096 * 5 + 100,
            words: vec![0b10_0110],
        };

        let ranges = changes.changed_ranges();

        assert_eq!(ranges, vec![(4096, 8192), (4096 * 5, 100)]);
        assert_eq!(changes.changed_count(), 3);
        assert!(!changes.is_changed(64 * 9));
    }
}
