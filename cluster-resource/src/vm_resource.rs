//! The "Virtual Machine" resource type: one VM of a vmm-core service as a cluster resource.
//!
//! The VM's `EnabledState` is mirrored to the resource state as Hyper-V's resource DLL does it:
//! Off/Saved → Offline; Starting → OnlinePending; Saving/Stopping → OfflinePending;
//! Running/Paused/Pausing/Resuming → Online. Offline follows the `OfflineAction` property.

use std::time::Duration;

use vmm_core::{
    EnabledState, HealthState, RequestedState, ReturnCode, VirtualSystemManagementService, VmId,
};

use crate::error::{ClusterError, Result};
use crate::resource::{ClusterResource, Progress, ResourceState};

/// `OfflineAction`: how Offline takes the VM down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OfflineAction {
    /// 0: turn off.
    TurnOff,
    /// 1: save (Hyper-V's default).
    #[default]
    Save,
    /// 2: shut down through the guest (turned off if it does not comply in time).
    Shutdown,
    /// 3: shut down, forced.
    ShutdownForced,
}

impl OfflineAction {
    /// From the property's number.
    pub fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            0 => OfflineAction::TurnOff,
            1 => OfflineAction::Save,
            2 => OfflineAction::Shutdown,
            3 => OfflineAction::ShutdownForced,
            _ => return None,
        })
    }

    /// From a name as OCF parameters give it (`turn-off`, `save`, `shut-down`, `shut-down-forced`)
    /// or its number.
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "turn-off" | "turnoff" | "off" => Some(OfflineAction::TurnOff),
            "save" => Some(OfflineAction::Save),
            "shut-down" | "shutdown" => Some(OfflineAction::Shutdown),
            "shut-down-forced" | "shutdown-forced" => Some(OfflineAction::ShutdownForced),
            other => other.parse().ok().and_then(Self::from_code),
        }
    }
}

/// The VM resource's private properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmResourceProperties {
    /// `VmId`.
    pub vm: VmId,
    /// `OfflineAction`.
    pub offline_action: OfflineAction,
    /// How long a guest shutdown may take before the VM is turned off.
    pub shutdown_timeout: Duration,
}

/// `Open`: one VM of a service as a cluster resource.
#[derive(Debug, Clone)]
pub struct VmResource {
    service: VirtualSystemManagementService,
    properties: VmResourceProperties,
}

impl VmResource {
    /// `Open`: reads the VM (which must exist) without bringing it online.
    pub fn open(
        service: VirtualSystemManagementService,
        properties: VmResourceProperties,
    ) -> Result<Self> {
        service.get_vm(properties.vm)?;
        Ok(VmResource {
            service,
            properties,
        })
    }

    /// The service the VM belongs to.
    pub fn service(&self) -> &VirtualSystemManagementService {
        &self.service
    }

    /// The properties.
    pub fn properties(&self) -> &VmResourceProperties {
        &self.properties
    }

    /// `VmState`: the VM's `EnabledState` now.
    pub fn vm_state(&self) -> Option<EnabledState> {
        self.service
            .get_vm(self.properties.vm)
            .ok()
            .map(|vm| vm.enabled_state)
    }

    /// Starts a state change; `Pending` when a job took it, `Done` when nothing was needed.
    fn request(&self, requested: RequestedState) -> Result<Progress> {
        let (code, job) = self
            .service
            .request_state_change(self.properties.vm, requested)?;
        match (code, job) {
            (ReturnCode::JobStarted, Some(_)) => Ok(Progress::Pending),
            (ReturnCode::Completed, _) => Ok(Progress::Done),
            (code, _) => Err(ClusterError::Service(format!(
                "{requested:?} refused with return code {}",
                code.code()
            ))),
        }
    }
}

/// The resource state mirroring a VM state (the resource DLL's table).
pub fn resource_state(state: EnabledState) -> ResourceState {
    match state {
        EnabledState::Off | EnabledState::Saved => ResourceState::Offline,
        EnabledState::Starting => ResourceState::OnlinePending,
        EnabledState::Saving | EnabledState::Stopping => ResourceState::OfflinePending,
        _ => ResourceState::Online,
    }
}

impl ClusterResource for VmResource {
    fn online(&self) -> Result<Progress> {
        match self.vm_state() {
            Some(state) if resource_state(state) == ResourceState::Online => {
                if state == EnabledState::Paused {
                    return self.request(RequestedState::Start);
                }
                Ok(Progress::Done)
            }
            Some(EnabledState::Starting) => Ok(Progress::Pending),
            _ => self.request(RequestedState::Start),
        }
    }

    fn offline(&self) -> Result<Progress> {
        match self.vm_state() {
            None => Err(ClusterError::Service(format!(
                "virtual machine {} is gone",
                self.properties.vm
            ))),
            Some(EnabledState::Off | EnabledState::Saved) => Ok(Progress::Done),
            Some(EnabledState::Saving | EnabledState::Stopping) => Ok(Progress::Pending),
            Some(_) => match self.properties.offline_action {
                OfflineAction::TurnOff => self.request(RequestedState::TurnOff),
                OfflineAction::Save => self.request(RequestedState::Save),
                OfflineAction::Shutdown | OfflineAction::ShutdownForced => {
                    let (code, _) = self
                        .service
                        .initiate_shutdown(self.properties.vm, self.properties.shutdown_timeout)?;
                    if code == ReturnCode::JobStarted {
                        Ok(Progress::Pending)
                    } else {
                        self.request(RequestedState::TurnOff)
                    }
                }
            },
        }
    }

    fn terminate(&self) -> Result<()> {
        match self.vm_state() {
            Some(EnabledState::Off | EnabledState::Saved) | None => Ok(()),
            Some(_) => {
                // A busy VM refuses (32774); kill its worker then, which ends any operation.
                if self.request(RequestedState::TurnOff).is_err()
                    && let Ok(vm) = self.service.get_vm(self.properties.vm)
                    && let Some(pid) = vm.process_id
                    && let Ok(pid) = i32::try_from(pid)
                {
                    // SAFETY: kill only sends a signal to the worker process named.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                Ok(())
            }
        }
    }

    fn looks_alive(&self) -> bool {
        self.vm_state()
            .is_some_and(|s| resource_state(s) == ResourceState::Online)
    }

    fn is_alive(&self) -> bool {
        self.service.get_vm(self.properties.vm).is_ok_and(|vm| {
            resource_state(vm.enabled_state) == ResourceState::Online
                && vm.process_id.is_some()
                && !matches!(
                    vm.health_state,
                    HealthState::MajorFailure | HealthState::CriticalFailure
                )
        })
    }

    fn state(&self) -> ResourceState {
        match self.service.get_vm(self.properties.vm) {
            Ok(vm) if vm.health_state == HealthState::CriticalFailure => ResourceState::Failed,
            Ok(vm) => resource_state(vm.enabled_state),
            Err(_) => ResourceState::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_states_mirror_to_resource_states_as_hvclusres_does() {
        assert_eq!(resource_state(EnabledState::Off), ResourceState::Offline);
        assert_eq!(resource_state(EnabledState::Saved), ResourceState::Offline);
        assert_eq!(
            resource_state(EnabledState::Starting),
            ResourceState::OnlinePending
        );
        assert_eq!(
            resource_state(EnabledState::Saving),
            ResourceState::OfflinePending
        );
        assert_eq!(resource_state(EnabledState::Running), ResourceState::Online);
        assert_eq!(resource_state(EnabledState::Paused), ResourceState::Online);
    }

    #[test]
    fn offline_action_parses_names_and_codes() {
        assert_eq!(OfflineAction::parse("save"), Some(OfflineAction::Save));
        assert_eq!(OfflineAction::parse("0"), Some(OfflineAction::TurnOff));
        assert_eq!(
            OfflineAction::parse("shut-down"),
            Some(OfflineAction::Shutdown)
        );
        assert_eq!(OfflineAction::parse("9"), None);
        assert_eq!(OfflineAction::default(), OfflineAction::Save);
    }
}
