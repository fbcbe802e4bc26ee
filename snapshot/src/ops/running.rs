//! CreateSnapshot of a running VM, the file side: [`prepare`] journals the operation and names
//! the folder and overlays the worker fills and creates; the worker takes the checkpoint and
//! commits it by renaming its staging folder to `state/` inside `checkpoints/.<id>.new/`;
//! [`finish`] then moves the checkpoint into the tree and the live config onto the overlays —
//! or, when the worker did not commit, removes what was made.
//!
//! The worker's rename is the commit point: before it the guest never ran on the overlays, so
//! removing them loses nothing; after it the guest writes to them, so only rolling forward keeps
//! its data. A crashed service finds the journal and decides the same way in [`recover`]; it
//! first waits for a worker that is still taking the checkpoint, which holds an exclusive `flock`
//! on its staging folder until it has committed or given up.
//!
//! A production checkpoint ([`RunningCapture::FrozenDisks`]) captures no state: the worker
//! commits its empty staging folder by renaming it to [`DISKS_SWITCHED`] instead of `state/`,
//! the same commit point under a name that no saved-state reader takes for a state. Once the
//! journal says `Committed`, recovery rolls forward without looking at the marker again (the
//! roll-forward removes it).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vmm_core::checkpoint::{RunningCapture, RunningCheckpoint};
use vmm_core::{CheckpointContent, CheckpointRequest, DiskOverlay};

use crate::durable::{create_dir_all, remove_dir_all, remove_file, rename};
use crate::error::{Error, Result};
use crate::folder::{CONFIG_FILE, STATE_DIR, VmFolder, write_config};
use crate::journal::{JOURNAL_VERSION, JournalEntry, Operation, Stage};
use crate::ops::{begin, new_layer_path};
use crate::tree::{Checkpoint, CheckpointId, CheckpointType, Consistency};
use vmm_core::checkpoint::CreateRequest;
use vmm_core::fault::point as fault_point;

/// The worker's staging folder inside the checkpoint's staging folder.
const WORKER_STAGING: &str = "state.saving";

/// What the worker renames its (empty) staging folder to when it commits a production
/// checkpoint: the disks were switched while the guest was frozen.
pub const DISKS_SWITCHED: &str = "disks.switched";

/// How long recovery waits for a worker still taking a checkpoint (its pre-copy of a large
/// guest under load, then the pause).
const WORKER_WAIT: Duration = Duration::from_secs(300);

/// Journals a running checkpoint of the VM in `folder`, taken as `capture` says, and returns
/// what the worker must do.
pub fn prepare(
    folder: &VmFolder,
    request: &CreateRequest,
    capture: &RunningCapture,
) -> Result<RunningCheckpoint> {
    begin(folder)?;
    let tree = folder.tree()?;
    let config = folder.config()?;
    let disks = folder.disks(&config, &folder.config_path())?;
    let (consistency, content) = match (request.checkpoint_type, capture) {
        (CheckpointType::Standard, RunningCapture::FrozenDisks) => {
            return Err(Error::Service(vmm_core::CheckpointError::InvalidParameter(
                "a standard checkpoint captures the guest's memory, not only its disks".into(),
            )));
        }
        (CheckpointType::ProductionOnly, RunningCapture::SavedState { .. }) => {
            return Err(Error::ProductionUnavailable);
        }
        (_, RunningCapture::FrozenDisks) => {
            (Consistency::Production, CheckpointContent::FrozenDisks)
        }
        (CheckpointType::Production, RunningCapture::SavedState { .. }) => {
            (Consistency::StandardFallback, CheckpointContent::SavedState)
        }
        (CheckpointType::Standard, RunningCapture::SavedState { .. }) => {
            (Consistency::SavedState, CheckpointContent::SavedState)
        }
    };
    let with_state = content == CheckpointContent::SavedState;
    let mut checkpoint = super::create::new_node(&tree, &config, request, consistency, with_state)?;
    if let RunningCapture::SavedState {
        quiesce_failure: Some(reason),
    } = capture
        && consistency == Consistency::StandardFallback
    {
        checkpoint.quiesce_failure = Some(reason.clone());
    }
    let mut live_paths = Vec::new();
    let mut overlays = Vec::new();
    for (index, disk) in disks.iter().enumerate() {
        if disk.read_only {
            live_paths.push(disk.path.clone());
        } else {
            let layer = new_layer_path(folder, &disk.path);
            live_paths.push(layer.clone());
            overlays.push(DiskOverlay {
                disk: index,
                path: layer,
            });
        }
    }
    let new_config = folder.with_disk_paths(&config, &live_paths);
    let current_paths: Vec<PathBuf> = disks.iter().map(|d| d.path.clone()).collect();
    let checkpoint_config = folder.with_disk_paths(&config, &current_paths);
    let new_layers: Vec<PathBuf> = overlays.iter().map(|o| o.path.clone()).collect();

    JournalEntry {
        version: JOURNAL_VERSION,
        stage: Stage::Prepared,
        operation: Operation::CreateRunning {
            checkpoint: checkpoint.clone(),
            new_layers,
            new_config,
        },
    }
    .write(&folder.journal_path())?;
    fault_point("snapshot.running-journal");

    let staging = folder.checkpoint_staging_dir(checkpoint.id);
    let made = (|| {
        remove_dir_all(&staging)?;
        create_dir_all(&staging.join(WORKER_STAGING))?;
        write_config(&staging.join(CONFIG_FILE), &checkpoint_config)
    })();
    if let Err(e) = made {
        let _ = roll_back(folder, &checkpoint, &[]);
        return Err(e);
    }
    let parent_state_dir = tree
        .now
        .and_then(|id| tree.get(id))
        .filter(|parent| parent.has_saved_state && with_state)
        .map(|parent| folder.checkpoint_dir(parent.id).join(STATE_DIR));
    let state_dir = match content {
        CheckpointContent::SavedState => staging.join(STATE_DIR),
        CheckpointContent::FrozenDisks => staging.join(DISKS_SWITCHED),
    };
    Ok(RunningCheckpoint {
        checkpoint,
        request: CheckpointRequest {
            staging: staging.join(WORKER_STAGING),
            state_dir,
            parent_state_dir,
            overlays,
            content,
        },
    })
}

/// Ends the running checkpoint `running` after the worker answered: rolls forward when the
/// worker committed, back otherwise ([`Error::NotTaken`]).
pub fn finish(folder: &VmFolder, running: &RunningCheckpoint) -> Result<Checkpoint> {
    let Some(entry) = JournalEntry::read(&folder.journal_path())? else {
        return Err(Error::RecoveryNeeded("running create".into()));
    };
    let Operation::CreateRunning {
        checkpoint,
        new_layers,
        new_config,
    } = entry.operation
    else {
        return Err(Error::RecoveryNeeded(entry.operation.name().into()));
    };
    if checkpoint.id != running.checkpoint.id {
        return Err(Error::RecoveryNeeded("running create".into()));
    }
    if entry.stage == Stage::Committed || committed(folder, checkpoint.id) {
        roll_forward(folder, &checkpoint, &new_layers, &new_config)?;
        Ok(checkpoint)
    } else {
        roll_back(folder, &checkpoint, &new_layers)?;
        Err(Error::NotTaken)
    }
}

/// Recovery of an interrupted running create: a committed one is finished; a prepared one
/// waits for the worker, then is decided by the commit point. Returns whether it rolled
/// forward.
pub(crate) fn recover(
    folder: &VmFolder,
    stage: Stage,
    checkpoint: &Checkpoint,
    new_layers: &[PathBuf],
    new_config: &serde_json::Value,
) -> Result<bool> {
    if stage == Stage::Committed {
        roll_forward(folder, checkpoint, new_layers, new_config)?;
        return Ok(true);
    }
    wait_for_worker(folder, checkpoint.id)?;
    if committed(folder, checkpoint.id) {
        roll_forward(folder, checkpoint, new_layers, new_config)?;
        Ok(true)
    } else {
        roll_back(folder, checkpoint, new_layers)?;
        Ok(false)
    }
}

/// Whether the worker committed: its state folder (or a production checkpoint's marker) is in
/// the staging folder, or the staging folder was already moved into place by an earlier
/// roll-forward.
fn committed(folder: &VmFolder, id: CheckpointId) -> bool {
    let staging = folder.checkpoint_staging_dir(id);
    let target = folder.checkpoint_dir(id);
    [STATE_DIR, DISKS_SWITCHED]
        .iter()
        .any(|name| staging.join(name).is_dir() || target.join(name).is_dir())
}

/// Blocks until no worker holds the staging folder's lock (a worker still taking the
/// checkpoint), for at most [`WORKER_WAIT`].
fn wait_for_worker(folder: &VmFolder, id: CheckpointId) -> Result<()> {
    let staging = folder.checkpoint_staging_dir(id);
    // The worker locks its own folder, which it renames to `state` when it commits.
    let candidates = [
        staging.join(STATE_DIR),
        staging.join(DISKS_SWITCHED),
        staging.join(WORKER_STAGING),
    ];
    let Some(dir) = candidates.iter().find_map(|p| File::open(p).ok()) else {
        return Ok(());
    };
    let deadline = Instant::now() + WORKER_WAIT;
    loop {
        // SAFETY: flock on a descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            // Released at once: all we needed was to know the worker is done.
            // SAFETY: as above.
            unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_UN) };
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::WorkerStillCheckpointing(staging));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The steps after the commit point; idempotent.
fn roll_forward(
    folder: &VmFolder,
    checkpoint: &Checkpoint,
    new_layers: &[PathBuf],
    new_config: &serde_json::Value,
) -> Result<()> {
    JournalEntry {
        version: JOURNAL_VERSION,
        stage: Stage::Committed,
        operation: Operation::CreateRunning {
            checkpoint: checkpoint.clone(),
            new_layers: new_layers.to_vec(),
            new_config: new_config.clone(),
        },
    }
    .write(&folder.journal_path())?;
    fault_point("snapshot.running-committed");
    let staging = folder.checkpoint_staging_dir(checkpoint.id);
    let target = folder.checkpoint_dir(checkpoint.id);
    if staging.is_dir() && !target.exists() {
        remove_dir_all(&staging.join(WORKER_STAGING))?;
        rename(&staging, &target)?;
    }
    fault_point("snapshot.running-folder");
    // A production checkpoint's marker has served: the journal says committed.
    remove_dir_all(&target.join(DISKS_SWITCHED))?;
    super::create::finish(folder, checkpoint, new_config)
}

/// Undoes a running create that the worker did not commit.
fn roll_back(folder: &VmFolder, checkpoint: &Checkpoint, new_layers: &[PathBuf]) -> Result<()> {
    for layer in new_layers {
        remove_file(layer)?;
    }
    remove_dir_all(&folder.checkpoint_staging_dir(checkpoint.id))?;
    JournalEntry::clear(&folder.journal_path())
}
