//! A checkpoint as WMI shows it: an `Msvm_VirtualSystemSettingData` of type
//! `Microsoft:Hyper-V:Snapshot:Realized`, linked to its VM by `Msvm_SnapshotOfVirtualSystem`,
//! to its parent by `Msvm_ParentChildSettingData`, and marked as "Now"'s parent by
//! `Msvm_MostCurrentSnapshotInBranch`. Built from vmm-core's checkpoint tree.

use std::path::PathBuf;

use vmm_core::VmId;
use vmm_core::checkpoint::{Checkpoint, CheckpointId};

use super::CimObject;
use crate::instance::Instance;
use crate::path::ObjectPath;
use crate::value::CimType::Uint16;

const VSSD: &str = "Msvm_VirtualSystemSettingData";

/// One checkpoint's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotSettingData {
    /// The VM it belongs to.
    pub vm: VmId,
    /// The node of the tree.
    pub checkpoint: Checkpoint,
    /// Its folder (`vms/<VM>/checkpoints/<id>`).
    pub configuration_data_root: PathBuf,
}

impl SnapshotSettingData {
    /// `InstanceID` of checkpoint `id`: `Microsoft:<GUID>`, upper case as Hyper-V writes it.
    pub fn instance_id(id: CheckpointId) -> String {
        format!("Microsoft:{}", id.to_string().to_uppercase())
    }

    /// The path of checkpoint `id`'s settings.
    pub fn path_of(id: CheckpointId) -> ObjectPath {
        ObjectPath::new(VSSD, &[("InstanceID", &Self::instance_id(id))])
    }

    /// The checkpoint a settings `InstanceID` names, if it has the form of one (a VM's own
    /// settings have the same form: the caller tells them apart by looking both up).
    pub fn checkpoint_of(instance_id: &str) -> Option<CheckpointId> {
        instance_id.strip_prefix("Microsoft:")?.parse().ok()
    }
}

impl CimObject for SnapshotSettingData {
    const CLASS: &'static str = VSSD;

    fn to_instance(&self) -> Instance {
        let cp = &self.checkpoint;
        let root = self.configuration_data_root.display().to_string();
        Instance::new(VSSD)
            .string("InstanceID", Some(Self::instance_id(cp.id)))
            .string("Caption", Some("Virtual Machine Checkpoint"))
            .string("Description", Some("Settings of a checkpoint"))
            .string("ElementName", Some(cp.name.clone()))
            .string("VirtualSystemIdentifier", Some(self.vm.to_string()))
            .string(
                "VirtualSystemType",
                Some("Microsoft:Hyper-V:Snapshot:Realized"),
            )
            .timestamp("CreationTime", Some(cp.created))
            .string("ConfigurationDataRoot", Some(root.clone()))
            .string("ConfigurationFile", Some("config.json"))
            .string("SuspendDataRoot", Some(format!("{root}/state")))
            .string("Parent", cp.parent.map(|p| Self::path_of(p).to_string()))
            .boolean("IsSaved", Some(cp.has_saved_state))
            .integer(
                "UserSnapshotType",
                Uint16,
                Some(cp.requested_type.user_snapshot_type()),
            )
    }

    fn path(&self) -> ObjectPath {
        Self::path_of(self.checkpoint.id)
    }
}
