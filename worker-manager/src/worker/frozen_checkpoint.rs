//! Production checkpoints of the running guest, the worker's side: no memory or device state,
//! only the disks switched to new overlays while the guest's file systems are frozen by its
//! integration agent (the service asked for the freeze through this worker).
//!
//! The overlays are created while the guest runs; then one short pause: the freeze is checked
//! (still held: the guest answered it and no thaw was sent, not even by the hold limit), every
//! disk switched, the freeze checked again, and the empty staging folder committed by renaming
//! it to `state_dir`, the same commit point as a standard checkpoint. With the vCPUs parked the
//! guest cannot act on a thaw, so a freeze still held at the second check was held at the switch.
//! A failure before the commit switches the disks back and the guest runs on its old images.

use std::time::Instant;

use partition::{Partition, PartitionConfig};
use vmm_core::{CheckpointContent, CheckpointReport, CheckpointRequest, fault};

use super::checkpoint::{StagingLock, check_request, commit, pause_for_switch, running_before};
use super::machine::partition_failure;
use super::overlays::{create_overlays, remove_overlays, switch_back, switch_disks};
use crate::protocol::Failure;

/// Takes the production checkpoint `request` describes (see the module notes); the partition
/// is left running if it was, paused otherwise. `freeze_held` says whether the guest's freeze is
/// held right now.
pub(crate) fn frozen_disks(
    partition: &mut Partition,
    config: &mut PartitionConfig,
    request: &CheckpointRequest,
    freeze_held: &dyn Fn() -> bool,
) -> Result<CheckpointReport, Failure> {
    let started = Instant::now();
    if request.content != CheckpointContent::FrozenDisks {
        return Err(Failure::failed("not a production checkpoint request"));
    }
    let was_running = running_before(partition)?;
    check_request(config, request)?;
    if !freeze_held() {
        return Err(not_frozen("before the checkpoint began"));
    }
    // Held until this function returns, as for a standard checkpoint (the service's recovery
    // waits on it).
    let _in_progress = StagingLock::take(&request.staging)?;
    // Flushed while the guest runs (frozen, it writes nothing new), the pause has little to do.
    for overlay in &request.overlays {
        if let Some(disk) = partition.disk_backend(overlay.disk) {
            disk.flush()
                .map_err(|e| Failure::failed(format!("cannot flush the disk: {e}")))?;
        }
    }
    create_overlays(partition, config, &request.overlays)?;
    fault::point("worker.checkpoint.after-precopy");

    let pause_started = pause_for_switch(partition, was_running, &request.overlays)?;
    let committed = switch_and_commit(partition, config, request, freeze_held);
    if was_running {
        let resumed = partition.resume().map_err(|e| partition_failure(&e));
        // After a commit the checkpoint stands even if the guest cannot resume.
        if committed.is_ok() {
            resumed?;
        }
    }
    committed?;
    fault::point("worker.checkpoint.after-commit");
    Ok(CheckpointReport {
        pause: pause_started.elapsed(),
        total: started.elapsed(),
        memory_bytes: 0,
        delta: false,
        pages_dirtied_during_copy: 0,
    })
}

/// Inside the pause: the freeze checked, the disks switched, the freeze checked again, the
/// commit. On error the disks are back on their images, no overlay and no `state_dir` exist.
fn switch_and_commit(
    partition: &mut Partition,
    config: &mut PartitionConfig,
    request: &CheckpointRequest,
    freeze_held: &dyn Fn() -> bool,
) -> Result<(), Failure> {
    if !freeze_held() {
        remove_overlays(&request.overlays);
        return Err(not_frozen("before the guest was paused"));
    }
    let mut switched = Vec::new();
    let result = switch_disks(partition, config, &request.overlays, &mut switched)
        .and_then(|()| {
            fault::point("worker.checkpoint.after-overlays");
            match freeze_held() {
                true => Ok(()),
                false => Err(not_frozen("while the disks were switched")),
            }
        })
        .and_then(|()| commit(request));
    if let Err(failure) = result {
        switch_back(partition, config, switched);
        remove_overlays(&request.overlays);
        return Err(failure);
    }
    Ok(())
}

fn not_frozen(when: &str) -> Failure {
    Failure::invalid_state(format!(
        "the guest's file systems were not frozen {when} (no freeze held, or thawed at its \
         hold limit)"
    ))
}
