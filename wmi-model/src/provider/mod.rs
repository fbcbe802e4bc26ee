//! The provider: answers CIM operations from vmm-core's live state.
//!
//! One [`Provider`] serves every connection. It keeps nothing of its own about VMs or jobs —
//! each operation reads the service — except the indication subscriptions, which are the
//! provider's own objects.

mod args;
mod assoc;
mod devices;
mod dispatch;
mod instances;
mod methods;
mod network;
mod snapshot_methods;

use std::sync::Arc;

use vmm_core::VirtualSystemManagementService;

use crate::indication::Subscriptions;
use crate::model::ConsoleGeometry;

pub use args::{Args, TypedArg};
pub use network::SharedSwitches;

/// The WMI provider over one vmm-core service.
#[derive(Debug)]
pub struct Provider {
    pub(crate) vmms: VirtualSystemManagementService,
    pub(crate) host: String,
    subscriptions: Arc<Subscriptions>,
    /// The virtual switches and adapters, when the integrator has them.
    pub(crate) network: Option<SharedSwitches>,
    /// The console framebuffer of running VMs, when the integrator serves consoles.
    pub(crate) console: Option<ConsoleGeometry>,
}

impl Provider {
    /// A provider for `vmms`, naming the host `host` (`Msvm_ComputerSystem.Name` of the host and
    /// `SystemName` of the services).
    pub fn new(vmms: VirtualSystemManagementService, host: impl Into<String>) -> Self {
        Provider {
            vmms,
            host: host.into(),
            subscriptions: Arc::new(Subscriptions::default()),
            network: None,
            console: None,
        }
    }

    /// Serves the networking classes from `switches` (shared with whoever else changes them).
    pub fn with_network(mut self, switches: SharedSwitches) -> Self {
        self.network = Some(switches);
        self
    }

    /// Shows each running VM's display (`Msvm_SyntheticDisplayController`, `Msvm_VideoHead`):
    /// the console framebuffer the integrator's console server draws.
    pub fn with_console(mut self, geometry: ConsoleGeometry) -> Self {
        self.console = Some(geometry);
        self
    }

    /// The service underneath.
    pub fn service(&self) -> &VirtualSystemManagementService {
        &self.vmms
    }

    /// The host name used in paths.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The indication subscriptions clients have created.
    pub fn subscriptions(&self) -> &Arc<Subscriptions> {
        &self.subscriptions
    }
}

/// The machine's host name (`/proc/sys/kernel/hostname`), or `localhost`.
pub fn local_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}
