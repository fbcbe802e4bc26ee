//! Typed views of the model's classes, each built from vmm-core's state and rendered as a CIM
//! [`Instance`]. Nothing here is invented: every value comes from the service.

mod computer_system;
mod firmware;
mod job;
mod network;
mod service;
mod settings;
mod shutdown;
mod snapshot;
mod summary;
mod video;

pub use computer_system::{ComputerSystem, HostComputerSystem};
pub use firmware::{BiosElement, BootSourceSettingData};
pub use job::ConcreteJob;
pub use network::{
    EthernetPortAllocation, EthernetSwitch, EthernetSwitchSettingData, InternalEthernetPort,
    SwitchManagementService, SyntheticEthernetPort,
};
pub use service::{ManagementService, SnapshotService};
pub(crate) use settings::resources_of as settings_of;
pub use settings::{
    MemorySettingData, ProcessorSettingData, ResourceSettings, StorageAllocationSettingData,
    SystemSettings, VirtualSystemSettingData,
};
pub use shutdown::{SHUTDOWN_TIMEOUT, ShutdownComponent};
pub use snapshot::SnapshotSettingData;
pub use summary::SummaryInformation;
pub use video::{ConsoleGeometry, SyntheticDisplayController, VideoHead};

use crate::instance::Instance;
use crate::path::ObjectPath;

/// A typed model object that renders as a CIM instance.
pub trait CimObject {
    /// The CIM class name.
    const CLASS: &'static str;
    /// The instance with every property.
    fn to_instance(&self) -> Instance;
    /// The instance path (keys only).
    fn path(&self) -> ObjectPath;
}
