//! The Snapshot Manager of Hyper-V, rebuilt: per-VM checkpoint trees, the on-disk checkpoint
//! format, offline checkpoint operations, and qcow2 disks with backing chains.
//!
//! - [`Disk`] / [`open_disk`]: raw or qcow2 images (format from the magic) with their backing
//!   chains, through the `imago` crate, locked as QEMU locks them; [`Disk`] implements
//!   partition's [`partition::block::BlockBackend`], so the virtio-blk device runs on qcow2.
//! - [`commit_into_backing`]: merge one layer into its backing file (`qemu-img commit`).
//! - [`CheckpointTree`] (`checkpoints/tree.json`) and the offline operations on a VM folder
//!   ([`VmFolder`], DESIGN.md §5): [`create_checkpoint`], [`apply_checkpoint`],
//!   [`delete_checkpoint`] (= merge), [`delete_checkpoint_tree`], [`rename_checkpoint`],
//!   [`export_vm`] / [`import_vm`]; each journaled so that [`recover`] finishes or undoes what a
//!   crash interrupted; a running VM's checkpoint is [`prepare_running_checkpoint`]d here, taken
//!   by its worker and [`finish_running_checkpoint`]ed here. [`FolderSnapshotService`] implements
//!   vmm-core's [`VirtualSystemSnapshotService`] (`Msvm_VirtualSystemSnapshotService`) over them.
//!
//! ```
//! # fn main() -> Result<(), snapshot::Error> {
//! let dir = tempfile::tempdir().expect("tempdir");
//! let base = dir.path().join("base.qcow2");
//! let top = dir.path().join("top.qcow2");
//! snapshot::create_qcow2(&base, 1 << 20)?;
//! snapshot::create_overlay(&top, &base)?;
//! let disk = snapshot::open_disk(&top, false)?;
//! disk.write(4096, b"hello").expect("write");
//! let mut back = [0u8; 5];
//! disk.read(4096, &mut back).expect("read");
//! assert_eq!(&back, b"hello");
//! # Ok(()) }
//! ```

mod backend;
mod commit;
mod disk;
pub mod durable;
mod error;
pub mod folder;
pub mod journal;
pub mod lock;
mod ops;
pub mod progress;
mod rebase;
mod service;
pub mod tree;

pub use commit::commit_into_backing;
pub use disk::{
    Allocation, Disk, DiskFormat, Extent, MAX_CHAIN_DEPTH, backing_chain, create_overlay,
    create_overlay_named, create_overlay_sized, create_qcow2, open_disk,
};
pub use error::{Error, Result};
pub use folder::VmFolder;
pub use ops::apply::apply_checkpoint;
pub use ops::create::{CreateRequest, create_checkpoint};
pub use ops::delete::{delete_checkpoint, delete_checkpoint_tree};
pub use ops::export::{ExportMode, ImportMode, export_vm, import_vm};
pub use ops::recover::{Recovery, recover};
pub use ops::running::{
    DISKS_SWITCHED, finish as finish_running_checkpoint, prepare as prepare_running_checkpoint,
};
pub use progress::{NoProgress, Progress, ProgressCounter};
pub use rebase::{rebase_onto_grandparent, set_backing_file};
pub use service::{FolderSnapshotService, rename_checkpoint};
pub use tree::{Checkpoint, CheckpointId, CheckpointTree, CheckpointType, Consistency};
pub use vmm_core::checkpoint::{RunningCapture, RunningCheckpoint, VirtualSystemSnapshotService};
