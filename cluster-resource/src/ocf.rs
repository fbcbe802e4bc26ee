//! The OCF resource agent contract (Pacemaker), over the same [`VmResource`].
//!
//! The agent is an executable called with the action as its only argument and its parameters
//! in `OCF_RESKEY_<name>`: `store` (the vmms store folder) and `vm` (a VM's name or GUID), plus
//! optional `offline_action` (`save`, `turn-off`, `shut-down`) and `shutdown_timeout` (seconds).
//! Every action is idempotent; the exit codes are OCF's.

use std::path::PathBuf;
use std::time::Duration;

use vmm_core::{VirtualSystemManagementService, VmId};

use crate::resource::{ClusterResource, Progress, ResourceState, wait_pending};
use crate::vm_resource::{OfflineAction, VmResource, VmResourceProperties};

/// `OCF_SUCCESS`.
pub const OCF_SUCCESS: u8 = 0;
/// `OCF_ERR_GENERIC`.
pub const OCF_ERR_GENERIC: u8 = 1;
/// `OCF_ERR_ARGS`.
pub const OCF_ERR_ARGS: u8 = 2;
/// `OCF_ERR_UNIMPLEMENTED`.
pub const OCF_ERR_UNIMPLEMENTED: u8 = 3;
/// `OCF_ERR_INSTALLED`.
pub const OCF_ERR_INSTALLED: u8 = 5;
/// `OCF_ERR_CONFIGURED`.
pub const OCF_ERR_CONFIGURED: u8 = 6;
/// `OCF_NOT_RUNNING`.
pub const OCF_NOT_RUNNING: u8 = 7;

/// An OCF action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `start`.
    Start,
    /// `stop`.
    Stop,
    /// `monitor` (also `status`).
    Monitor,
    /// `meta-data`.
    MetaData,
    /// `validate-all`.
    ValidateAll,
    /// `migrate_to` (on the source).
    MigrateTo,
    /// `migrate_from` (on the target).
    MigrateFrom,
}

impl Action {
    /// Parses the action argument; `None` for an unknown one (exit [`OCF_ERR_UNIMPLEMENTED`]).
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "start" => Action::Start,
            "stop" => Action::Stop,
            "monitor" | "status" => Action::Monitor,
            "meta-data" => Action::MetaData,
            "validate-all" => Action::ValidateAll,
            "migrate_to" => Action::MigrateTo,
            "migrate_from" => Action::MigrateFrom,
            _ => return None,
        })
    }
}

/// The agent's parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// `OCF_RESKEY_store`.
    pub store: PathBuf,
    /// `OCF_RESKEY_vm`: name or GUID.
    pub vm: String,
    /// `OCF_RESKEY_offline_action`.
    pub offline_action: OfflineAction,
    /// `OCF_RESKEY_shutdown_timeout`.
    pub shutdown_timeout: Duration,
    /// `OCF_RESKEY_CRM_meta_timeout` (ms): the action's budget.
    pub timeout: Duration,
}

impl Params {
    /// Reads the parameters through `var` (the environment); the OCF exit code on bad input.
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Self, (u8, String)> {
        let key = |name: &str| var(&format!("OCF_RESKEY_{name}")).filter(|v| !v.is_empty());
        let store =
            key("store").ok_or((OCF_ERR_CONFIGURED, "parameter store is required".into()))?;
        let vm = key("vm").ok_or((OCF_ERR_CONFIGURED, "parameter vm is required".into()))?;
        let offline_action = match key("offline_action") {
            None => OfflineAction::Save,
            Some(text) => OfflineAction::parse(&text).ok_or((
                OCF_ERR_CONFIGURED,
                format!("offline_action {text:?}: use save, turn-off or shut-down"),
            ))?,
        };
        let seconds = |name: &str, default: u64| -> Result<u64, (u8, String)> {
            match key(name) {
                None => Ok(default),
                Some(text) => text
                    .parse()
                    .map_err(|_| (OCF_ERR_CONFIGURED, format!("{name} {text:?}: not a number"))),
            }
        };
        let shutdown_timeout = Duration::from_secs(seconds("shutdown_timeout", 30)?);
        let timeout = match key("CRM_meta_timeout").and_then(|t| t.parse::<u64>().ok()) {
            Some(ms) => Duration::from_millis(ms),
            None => Duration::from_secs(90),
        };
        Ok(Params {
            store: PathBuf::from(store),
            vm,
            offline_action,
            shutdown_timeout,
            timeout,
        })
    }
}

/// The `meta-data` XML.
pub fn meta_data() -> String {
    r#"<?xml version="1.0"?>
<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">
<!-- Attributes as Debian's resource-agents ra-api-1.dtd declares them (ocf-tester validates). -->
<resource-agent name="vmms" version="0.1">
  <version>1.1</version>
  <longdesc lang="en">Runs one virtual machine of a vmms store (Hyper-V's management architecture over KVM) as a cluster resource: start boots it or restores its saved state, stop saves it (or turns it off or shuts it down, per offline_action), monitor reports whether its worker runs the guest.</longdesc>
  <shortdesc lang="en">vmms virtual machine</shortdesc>
  <parameters>
    <parameter name="store" required="1" unique="0">
      <longdesc lang="en">The vmms store folder, on storage every node sees.</longdesc>
      <shortdesc lang="en">Store folder</shortdesc>
      <content type="string" default=""/>
    </parameter>
    <parameter name="vm" required="1" unique="0">
      <longdesc lang="en">The virtual machine's name or GUID in the store.</longdesc>
      <shortdesc lang="en">VM name or GUID</shortdesc>
      <content type="string" default=""/>
    </parameter>
    <parameter name="offline_action" required="0" unique="0">
      <longdesc lang="en">How stop takes the VM down: save (keeps its memory), turn-off, or shut-down (through the guest, turned off if it does not comply in time).</longdesc>
      <shortdesc lang="en">OfflineAction</shortdesc>
      <content type="string" default="save"/>
    </parameter>
    <parameter name="shutdown_timeout" required="0" unique="0">
      <longdesc lang="en">Seconds a guest shutdown may take before the VM is turned off.</longdesc>
      <shortdesc lang="en">Shutdown timeout</shortdesc>
      <content type="integer" default="30"/>
    </parameter>
  </parameters>
  <actions>
    <action name="start" timeout="90s"/>
    <action name="stop" timeout="90s"/>
    <action name="monitor" depth="0" timeout="30s" interval="10s"/>
    <action name="migrate_to" timeout="120s"/>
    <action name="migrate_from" timeout="60s"/>
    <action name="meta-data" timeout="5s"/>
    <action name="validate-all" timeout="5s"/>
  </actions>
</resource-agent>
"#
    .to_owned()
}

/// Finds the VM `name_or_id` names in the service.
pub fn find_vm(service: &VirtualSystemManagementService, name_or_id: &str) -> Option<VmId> {
    if let Ok(id) = name_or_id.parse::<VmId>() {
        return service.get_vm(id).ok().map(|vm| vm.id);
    }
    service
        .list_vms()
        .into_iter()
        .find(|vm| vm.name == name_or_id)
        .map(|vm| vm.id)
}

/// Runs `action` (not `meta-data`) on the VM; returns the OCF exit code and a message for stderr.
pub fn run(
    action: Action,
    params: &Params,
    service: VirtualSystemManagementService,
) -> (u8, String) {
    let Some(vm) = find_vm(&service, &params.vm) else {
        // A probe of a VM that is not here is "not running"; anything else is misconfigured.
        return match action {
            Action::Monitor => (OCF_NOT_RUNNING, format!("no VM {} in the store", params.vm)),
            Action::Stop => (OCF_SUCCESS, format!("no VM {} in the store", params.vm)),
            _ => (
                OCF_ERR_CONFIGURED,
                format!("no VM {} in the store", params.vm),
            ),
        };
    };
    let properties = VmResourceProperties {
        vm,
        offline_action: params.offline_action,
        shutdown_timeout: params.shutdown_timeout,
    };
    let resource = match VmResource::open(service, properties) {
        Ok(resource) => resource,
        Err(error) => return (OCF_ERR_GENERIC, error.to_string()),
    };
    let budget = params.timeout.saturating_sub(Duration::from_secs(2));
    match action {
        Action::ValidateAll => (OCF_SUCCESS, String::new()),
        Action::Monitor => {
            if resource.is_alive() {
                (OCF_SUCCESS, String::new())
            } else if resource.state() == ResourceState::Offline {
                (OCF_NOT_RUNNING, "not running".into())
            } else {
                (OCF_ERR_GENERIC, format!("resource {:?}", resource.state()))
            }
        }
        // migrate_from: the source saved the VM (migrate_to); restoring it here confirms it runs.
        Action::Start | Action::MigrateFrom => {
            settle(&resource, resource.online(), ResourceState::Online, budget)
        }
        Action::Stop | Action::MigrateTo => {
            // migrate_to is a quick migration: the source saves, the target's start restores.
            let result = if action == Action::MigrateTo {
                VmResource::open(
                    resource_service(&resource),
                    VmResourceProperties {
                        offline_action: OfflineAction::Save,
                        ..resource.properties().clone()
                    },
                )
                .and_then(|saving| saving.offline())
            } else {
                resource.offline()
            };
            settle(&resource, result, ResourceState::Offline, budget)
        }
        Action::MetaData => (OCF_SUCCESS, String::new()),
    }
}

fn resource_service(resource: &VmResource) -> VirtualSystemManagementService {
    resource.service().clone()
}

fn settle(
    resource: &VmResource,
    started: crate::error::Result<Progress>,
    goal: ResourceState,
    budget: Duration,
) -> (u8, String) {
    match started {
        Ok(Progress::Done) if resource.state() == goal => (OCF_SUCCESS, String::new()),
        Ok(_) => match wait_pending(resource, goal, budget) {
            Ok(()) => (OCF_SUCCESS, String::new()),
            Err(error) => (OCF_ERR_GENERIC, error.to_string()),
        },
        Err(error) => (OCF_ERR_GENERIC, error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_store_is_not_configured() {
        let result = Params::from_env(|k| (k == "OCF_RESKEY_vm").then(|| "g".to_owned()));
        assert_eq!(result.map_err(|e| e.0), Err(OCF_ERR_CONFIGURED));
    }

    #[test]
    fn parameters_and_meta_timeout_are_read() {
        let params = Params::from_env(|k| match k {
            "OCF_RESKEY_store" => Some("/s".into()),
            "OCF_RESKEY_vm" => Some("g".into()),
            "OCF_RESKEY_offline_action" => Some("turn-off".into()),
            "OCF_RESKEY_CRM_meta_timeout" => Some("20000".into()),
            _ => None,
        })
        .expect("params");
        assert_eq!(params.offline_action, OfflineAction::TurnOff);
        assert_eq!(params.timeout, Duration::from_secs(20));
    }

    #[test]
    fn unknown_action_is_none() {
        assert_eq!(Action::parse("promote"), None);
        assert_eq!(Action::parse("monitor"), Some(Action::Monitor));
    }

    proptest::proptest! {
        #[test]
        fn parameter_parsing_never_panics(store in ".*", vm in ".*", action in ".*", t in ".*") {
            let _ = Params::from_env(|k| match k {
                "OCF_RESKEY_store" => Some(store.clone()),
                "OCF_RESKEY_vm" => Some(vm.clone()),
                "OCF_RESKEY_offline_action" => Some(action.clone()),
                "OCF_RESKEY_shutdown_timeout" => Some(t.clone()),
                _ => None,
            });
        }
    }
}
