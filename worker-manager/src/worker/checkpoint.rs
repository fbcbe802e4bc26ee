//! Checkpoints of the running guest (Hyper-V's running-VM checkpoints, done by the worker).
//!
//! Memory is copied while the guest runs: the dirty log is cleared, every page that holds data
//! (or, for a delta, every page dirtied since the parent state) is copied into the staging
//! folder's memory image, then a few passes copy what the guest dirtied meanwhile, until that set
//! is small or stops shrinking. Then one short pause: the pages dirtied during the last pass are
//! copied, device and vCPU state captured (`state.json`, as a save writes it), every listed disk
//! is flushed and switched to a new qcow2 overlay on its current image, and the staging folder is
//! committed by renaming it to the state folder. Only then does the guest run again, on the
//! overlays. A failure before the commit switches the disks back and the guest runs on; a crash
//! before it leaves the old images as they were (the guest never wrote an overlay) and no state
//! folder.
//!
//! Delta memory: the worker keeps the union of every dirty log it read since its "base", the
//! state its memory is known to equal at that point: the checkpoint it committed last, or the
//! state its guest was restored from. When asked for a checkpoint whose parent is that very
//! state (by the manifest's identity) it writes only those pages, as a delta layer over hard
//! links of the parent's layers (see [`super::state_folder`]). Anything else (a reset, a restore
//! from a save without a manifest, another parent) gives a full image.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Instant;

use partition::memory::{DirtyRange, PAGE_SIZE};
use partition::{Partition, PartitionConfig, RunState};
use vmm_core::{CheckpointReport, CheckpointRequest, DiskOverlay, fault};

use super::machine::{STATE_FILE, partition_failure};
use super::overlays::{
    check_overlays, create_overlays, io_failure, remove_overlays, switch_back, switch_disks,
};
use super::state_folder::{MAX_MEMORY_LAYERS, MEMORY_MANIFEST, MemoryManifest};
use crate::protocol::Failure;
use crate::runtime::create_private;

/// Pre-copy passes after the first full copy, at most.
const PRECOPY_PASSES: usize = 4;
/// A dirty set this small is left for the pause.
const SMALL_DIRTY_SET: u64 = 64;

/// What the worker knows about the pages its guest dirtied.
#[derive(Debug, Default)]
pub(crate) struct DirtyTracking {
    /// The identity of the state the guest's memory equalled when `since` started.
    base: Option<String>,
    /// Every page dirtied since then (the union of all dirty logs read since).
    since: Vec<DirtyRange>,
}

impl DirtyTracking {
    /// Tracking from a guest restored from the state with identity `base` (or booted: `None`).
    pub(crate) fn starting_at(base: Option<String>) -> Self {
        DirtyTracking {
            base,
            since: Vec::new(),
        }
    }

    /// Reads (and clears) the partition's dirty log, remembering it in `since`.
    fn read(&mut self, partition: &Partition) -> Result<Vec<DirtyRange>, Failure> {
        let dirty = partition
            .read_dirty_log()
            .map_err(|e| partition_failure(&e))?;
        if self.since.is_empty() {
            self.since = dirty.iter().map(|d| DirtyRange::empty(d.range)).collect();
        }
        for (all, new) in self.since.iter_mut().zip(&dirty) {
            all.merge(new);
        }
        Ok(dirty)
    }

    /// The memory now equals the committed state `state_id`.
    fn committed(&mut self, state_id: String) {
        self.base = Some(state_id);
        self.since.clear();
    }
}

/// How the checkpoint's memory is written.
struct MemoryPlan {
    /// The layer this checkpoint writes.
    file: File,
    /// The folder's manifest (committed with it).
    manifest: MemoryManifest,
    delta: bool,
}

/// An exclusive `flock` on the staging folder for as long as the checkpoint is being taken. The
/// folder is renamed to `state_dir` at the commit; the lock stays on it (the same inode).
pub(crate) struct StagingLock {
    _folder: File,
}

impl StagingLock {
    pub(crate) fn take(staging: &Path) -> Result<Self, Failure> {
        let folder = File::open(staging).map_err(|e| io_failure("open the staging folder", e))?;
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(folder.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(io_failure(
                "lock the staging folder",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(StagingLock { _folder: folder })
    }
}

/// Takes the checkpoint `request` describes (see the module notes); the partition is left
/// running if it was, paused otherwise.
pub(crate) fn checkpoint(
    partition: &mut Partition,
    config: &mut PartitionConfig,
    tracking: &mut DirtyTracking,
    request: &CheckpointRequest,
) -> Result<CheckpointReport, Failure> {
    let started = Instant::now();
    let was_running = running_before(partition)?;
    check_request(config, request)?;
    // Held until this function returns: a service that restarts meanwhile waits on it before it
    // decides whether the checkpoint was committed (snapshot's recovery of a running create).
    let _in_progress = StagingLock::take(&request.staging)?;
    let plan = plan_memory(tracking, request)?;
    let image_len = partition.memory_image_len();
    plan.file
        .set_len(image_len)
        .map_err(|e| io_failure("size the memory image", e))?;

    // Pre-copy, while the guest runs.
    let first = tracking.read(partition)?;
    drop(first);
    let mut written = if plan.delta {
        tracking.since.clone()
    } else {
        partition
            .memory_data_pages()
            .map_err(|e| partition_failure(&e))?
    };
    copy(partition, &written, &plan.file)?;
    let mut dirtied = 0u64;
    let mut previous = u64::MAX;
    for _ in 0..PRECOPY_PASSES {
        let dirty = tracking.read(partition)?;
        let count = count(&dirty);
        dirtied += count;
        copy(partition, &dirty, &plan.file)?;
        merge(&mut written, &dirty);
        if count <= SMALL_DIRTY_SET || count >= previous {
            break;
        }
        previous = count;
    }
    // The bulk is made durable before the pause, and the manifest written (it names files, not
    // contents); only the last pages and the state are synced inside it.
    plan.file
        .sync_data()
        .map_err(|e| io_failure("sync the memory image", e))?;
    write_manifest(&request.staging, &plan.manifest)?;
    // The overlays too: their headers name the current images, which do not change.
    create_overlays(partition, config, &request.overlays)?;
    fault::point("worker.checkpoint.after-precopy");

    let pause_started = pause_for_switch(partition, was_running, &request.overlays)?;
    let paused = paused_part(partition, config, tracking, request, &plan, &mut written);
    let (dirty_in_pause, state_id) = match paused {
        Ok(done) => done,
        Err(failure) => {
            if was_running {
                // Best effort: the reply says the checkpoint failed either way.
                let _ = partition.resume();
            }
            return Err(failure);
        }
    };
    fault::point("worker.checkpoint.after-commit");
    tracking.committed(state_id);
    if was_running {
        partition.resume().map_err(|e| partition_failure(&e))?;
    }
    let pause = pause_started.elapsed();
    Ok(CheckpointReport {
        pause,
        total: started.elapsed(),
        memory_bytes: count(&written) * PAGE_SIZE,
        delta: plan.delta,
        pages_dirtied_during_copy: dirtied + dirty_in_pause,
    })
}

/// Everything done while the guest is paused, up to and including the commit. On error the
/// disks are back on their old images and `state_dir` does not exist.
fn paused_part(
    partition: &mut Partition,
    config: &mut PartitionConfig,
    tracking: &mut DirtyTracking,
    request: &CheckpointRequest,
    plan: &MemoryPlan,
    written: &mut Vec<DirtyRange>,
) -> Result<(u64, String), Failure> {
    let mut switched = Vec::new();
    let mut dirty_in_pause = 0;
    let result = final_copy(partition, tracking, plan, written, &request.staging)
        .and_then(|dirty| {
            dirty_in_pause = dirty;
            switch_disks(partition, config, &request.overlays, &mut switched)
        })
        .and_then(|()| {
            fault::point("worker.checkpoint.after-overlays");
            commit(request)
        });
    if let Err(failure) = result {
        switch_back(partition, config, switched);
        remove_overlays(&request.overlays);
        return Err(failure);
    }
    Ok((dirty_in_pause, plan.manifest.state_id.clone()))
}

/// Copies the pages dirtied since the last pass and writes the device and vCPU state (the
/// commit fsyncs both, with the folder); returns how many pages it copied.
fn final_copy(
    partition: &Partition,
    tracking: &mut DirtyTracking,
    plan: &MemoryPlan,
    written: &mut Vec<DirtyRange>,
    staging: &Path,
) -> Result<u64, Failure> {
    let dirty = tracking.read(partition)?;
    copy(partition, &dirty, &plan.file)?;
    merge(written, &dirty);
    write_state(partition, staging)?;
    Ok(count(&dirty))
}

/// Refuses a request that names a disk that is not there, read-only or listed twice, an overlay
/// or state folder that already exists, or a staging folder that does not.
/// The worker's commit point of a running checkpoint: its staging folder renamed to the
/// committed one. Before it the service rolls the checkpoint back, after it forward.
pub(super) fn commit(request: &CheckpointRequest) -> Result<(), Failure> {
    fault::point("worker.checkpoint.before-commit");
    vmm_core::atomic_file::commit_dir(&request.staging, &request.state_dir).map_err(|e| {
        Failure::failed(format!(
            "cannot commit {}: {e}",
            request.state_dir.display()
        ))
    })
}

/// Pauses a running guest for a checkpoint's disk switch; returns when the pause began. A guest
/// that cannot be paused, or stopped meanwhile, fails the checkpoint, and the overlays made for
/// it are removed.
pub(super) fn pause_for_switch(
    partition: &mut Partition,
    was_running: bool,
    overlays: &[DiskOverlay],
) -> Result<Instant, Failure> {
    let pause_started = Instant::now();
    if was_running {
        let paused = partition.pause().map_err(|e| partition_failure(&e));
        let stopped = match partition.run_state() {
            RunState::Stopped(reason) => Some(Failure::invalid_state(format!(
                "guest stopped during the checkpoint: {reason}"
            ))),
            _ => None,
        };
        if let Some(failure) = paused.err().or(stopped) {
            remove_overlays(overlays);
            return Err(failure);
        }
    }
    fault::point("worker.checkpoint.after-pause");
    Ok(pause_started)
}

/// Whether the guest runs (a checkpoint leaves it running) or is paused; a guest that stopped
/// has nothing to checkpoint.
pub(crate) fn running_before(partition: &Partition) -> Result<bool, Failure> {
    match partition.run_state() {
        RunState::Running => Ok(true),
        RunState::Paused | RunState::Created => Ok(false),
        RunState::Stopped(reason) => Err(Failure::invalid_state(format!(
            "guest has stopped: {reason}"
        ))),
    }
}

pub(crate) fn check_request(
    config: &PartitionConfig,
    request: &CheckpointRequest,
) -> Result<(), Failure> {
    if !request.staging.is_dir() {
        return Err(Failure::failed(format!(
            "staging folder {} does not exist",
            request.staging.display()
        )));
    }
    if request.state_dir.exists() {
        return Err(Failure::failed(format!(
            "{} already exists",
            request.state_dir.display()
        )));
    }
    check_overlays(config, &request.overlays)
}

/// A delta on the parent's layers when the worker's tracking proves it exact and the parent's
/// layers link into `staging`; a full image otherwise.
fn plan_memory(
    tracking: &DirtyTracking,
    request: &CheckpointRequest,
) -> Result<MemoryPlan, Failure> {
    let staging = &request.staging;
    let parent = request
        .parent_state_dir
        .as_deref()
        .and_then(|dir| MemoryManifest::read(dir).ok().flatten().map(|m| (dir, m)))
        .filter(|(_, m)| {
            tracking.base.as_deref() == Some(m.state_id.as_str())
                && m.layers.len() < MAX_MEMORY_LAYERS
        });
    if let Some((dir, manifest)) = parent
        && link_layers(dir, staging, &manifest.layers).is_ok()
    {
        let name = manifest.next_layer_name();
        let file = create_private(&staging.join(&name))
            .map_err(|e| io_failure("create the memory image", e))?;
        let mut layers = manifest.layers;
        layers.push(name);
        return Ok(MemoryPlan {
            file,
            manifest: MemoryManifest::new(layers),
            delta: true,
        });
    }
    let name = super::machine::MEMORY_FILE.to_owned();
    let file = create_private(&staging.join(&name))
        .map_err(|e| io_failure("create the memory image", e))?;
    Ok(MemoryPlan {
        file,
        manifest: MemoryManifest::new(vec![name]),
        delta: false,
    })
}

/// Hard-links `layers` of `from` into `to`; on failure removes the links it made.
fn link_layers(from: &Path, to: &Path, layers: &[String]) -> std::io::Result<()> {
    for (done, name) in layers.iter().enumerate() {
        if let Err(error) = std::fs::hard_link(from.join(name), to.join(name)) {
            for made in &layers[..done] {
                let _ = std::fs::remove_file(to.join(made));
            }
            return Err(error);
        }
    }
    Ok(())
}

fn copy(partition: &Partition, pages: &[DirtyRange], out: &File) -> Result<u64, Failure> {
    partition
        .write_memory_pages(pages, out)
        .map_err(|e| partition_failure(&e))
}

fn count(pages: &[DirtyRange]) -> u64 {
    pages.iter().map(DirtyRange::count).sum()
}

fn merge(into: &mut Vec<DirtyRange>, more: &[DirtyRange]) {
    if into.is_empty() {
        *into = more.iter().map(|d| DirtyRange::empty(d.range)).collect();
    }
    for (all, new) in into.iter_mut().zip(more) {
        all.merge(new);
    }
}

/// Writes `state.json` (fsynced) into `dir`.
fn write_state(partition: &Partition, dir: &Path) -> Result<(), Failure> {
    let state = partition
        .capture_state()
        .map_err(|e| partition_failure(&e))?;
    let json = state
        .to_json()
        .map_err(|e| Failure::failed(format!("cannot encode the state: {e}")))?;
    let mut file =
        create_private(&dir.join(STATE_FILE)).map_err(|e| io_failure("create state.json", e))?;
    // Not synced here: the commit fsyncs every file of the folder, this one included.
    file.write_all(&json)
        .map_err(|e| io_failure("write state.json", e))
}

fn write_manifest(dir: &Path, manifest: &MemoryManifest) -> Result<(), Failure> {
    let json = serde_json::to_vec_pretty(manifest)
        .map_err(|e| Failure::failed(format!("cannot encode the manifest: {e}")))?;
    let mut file = create_private(&dir.join(MEMORY_MANIFEST))
        .map_err(|e| io_failure("create memory.json", e))?;
    file.write_all(&json)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_failure("write memory.json", e))
}
