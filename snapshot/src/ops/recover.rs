//! Recovery after a crash: finish or undo the operation the journal names.

use std::path::Path;

use crate::error::Result;
use crate::folder::VmFolder;
use crate::journal::{JournalEntry, Operation, Stage};
use crate::progress::NoProgress;

pub use vmm_core::checkpoint::Recovery;

/// Finishes or rolls back what a crash left in the VM folder `vm_dir`. Call it before any other
/// operation on the folder after a daemon start; it is idempotent (a crash during recovery is
/// recovered by the next call).
pub fn recover(vm_dir: &Path) -> Result<Recovery> {
    let folder = VmFolder::new(vm_dir);
    let Some(entry) = JournalEntry::read(&folder.journal_path())? else {
        return Ok(Recovery::Clean);
    };
    let name = entry.operation.name();
    match (entry.stage, entry.operation) {
        (
            Stage::Prepared,
            Operation::Create {
                checkpoint,
                new_layers,
                ..
            },
        ) => {
            super::create::roll_back(&folder, &checkpoint, &new_layers)?;
        }
        (
            Stage::Committed,
            Operation::Create {
                checkpoint,
                new_config,
                ..
            },
        ) => {
            super::create::finish(&folder, &checkpoint, &new_config)?;
            return Ok(Recovery::RolledForward(name));
        }
        (Stage::Prepared, Operation::Apply { new_layers, .. }) => {
            super::apply::roll_back(&folder, &new_layers)?;
        }
        (
            Stage::Committed,
            Operation::Apply {
                checkpoint,
                discard_layers,
                new_config,
                with_state,
                ..
            },
        ) => {
            super::apply::finish(
                &folder,
                checkpoint,
                &new_config,
                &discard_layers,
                with_state,
            )?;
            return Ok(Recovery::RolledForward(name));
        }
        (
            stage,
            Operation::CreateRunning {
                checkpoint,
                new_layers,
                new_config,
            },
        ) => {
            if super::running::recover(&folder, stage, &checkpoint, &new_layers, &new_config)? {
                return Ok(Recovery::RolledForward(name));
            }
        }
        (_, Operation::Delete { checkpoints }) => {
            super::delete::finish(&folder, &checkpoints, &mut NoProgress)?;
            return Ok(Recovery::RolledForward(name));
        }
        (_, Operation::Export { staging, .. }) => {
            super::export::roll_back(&folder, &staging)?;
        }
    }
    Ok(Recovery::RolledBack(name))
}
