//! The daemon's virtual switches and network adapters (`new-vmswitch`, `add-vmnetworkadapter`,
//! ...): requests on the daemon socket next to the VM ones, answered from the store's
//! `network.json` through the `vswitch` crate. Workers read the same file when they start and
//! open their adapters' TAPs themselves, before they are confined.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use serde::{Deserialize, Serialize};
use vmm_core::{ComputerSystem, EnabledState, ReturnCode, VmId, error_chain};
use vswitch::{
    Adapter, MacAddress, Switch, SwitchError, SwitchKind, SwitchRequest, VirtualSwitches,
};

use crate::api::{ApiError, Response};

/// A network request on the daemon socket (its `op` names never clash with the VM requests').
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum NetRequest {
    /// `new-vmswitch NAME --private|--internal|--external IFACE [--subnet CIDR]`.
    NewVmswitch {
        name: String,
        /// `private`, `internal` or `external`.
        switch_type: String,
        interface: Option<String>,
        subnet: Option<String>,
    },
    /// `get-vmswitch [NAME]`.
    GetVmswitch { name: Option<String> },
    /// `remove-vmswitch NAME`.
    RemoveVmswitch { name: String },
    /// `add-vmnetworkadapter VM [--switch NAME] [--mac M]`.
    AddVmnetworkadapter {
        vm: String,
        switch: Option<String>,
        mac: Option<String>,
    },
    /// `connect-vmnetworkadapter VM --switch NAME`.
    ConnectVmnetworkadapter { vm: String, switch: String },
    /// `disconnect-vmnetworkadapter VM`.
    DisconnectVmnetworkadapter { vm: String },
    /// `get-vmnetworkadapter [VM]`.
    GetVmnetworkadapter { vm: Option<String> },
}

/// A switch as the CLI shows it (Hyper-V's `Get-VMSwitch`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SwitchView {
    pub name: String,
    pub id: String,
    pub switch_type: String,
    pub bridge: String,
    pub subnet: Option<String>,
    pub host_address: Option<Ipv4Addr>,
    pub net_adapter_interface: Option<String>,
    pub ports: usize,
}

/// An adapter as the CLI shows it (Hyper-V's `Get-VMNetworkAdapter`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterView {
    pub vm_name: String,
    pub vm_id: String,
    pub name: String,
    pub id: String,
    pub mac_address: String,
    pub static_mac_address: bool,
    pub switch_name: Option<String>,
    pub ip_addresses: Vec<Ipv4Addr>,
    pub tap: String,
}

static SWITCHES: OnceLock<Result<Arc<Mutex<VirtualSwitches>>, String>> = OnceLock::new();

/// The switch set, shared with the CIM provider (`None` if it could not be loaded).
pub fn shared() -> Option<Arc<Mutex<VirtualSwitches>>> {
    SWITCHES.get().and_then(|s| s.as_ref().ok()).cloned()
}

/// Loads the store's switches and brings the host in line (bridges and TAPs recreated), before
/// any worker starts. A failure is logged; network requests then say why they cannot be served.
pub fn start(store: &Path) {
    let loaded = VirtualSwitches::load(store).and_then(|switches| {
        switches.recreate()?;
        Ok(switches)
    });
    let state = match loaded {
        Ok(switches) => {
            log!(
                "vmms: {} virtual switch(es), {} network adapter(s)",
                switches.state().switches.len(),
                switches.state().adapters.len()
            );
            Ok(Arc::new(Mutex::new(switches)))
        }
        Err(error) => {
            let reason = error_chain(&error);
            log!("vmms: virtual switches unavailable: {reason}");
            Err(reason)
        }
    };
    let _ = SWITCHES.set(state);
}

/// Answers `request` if it is a network request (`None` otherwise): `resolve` finds a VM by name
/// or GUID, `vms` lists them.
pub fn answer(
    request: &[u8],
    resolve: &dyn Fn(&str) -> Result<VmId, ApiError>,
    vms: &dyn Fn() -> Vec<ComputerSystem>,
) -> Option<Vec<u8>> {
    let request = serde_json::from_slice::<NetRequest>(request).ok()?;
    let response: Response = handle(request, resolve, vms);
    Some(serde_json::to_vec(&response).unwrap_or_else(|e| {
        format!(r#"{{"Err":{{"code":null,"message":"cannot encode answer: {e}"}}}}"#).into_bytes()
    }))
}

/// A VM was removed: its adapters (and their TAPs) go too.
pub fn vm_removed(vm: VmId) {
    if let Some(Ok(switches)) = SWITCHES.get() {
        let mut switches = switches.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(error) = switches.remove_adapters_of(&vm.to_string()) {
            log!(
                "vmms: {vm}: cannot remove its network adapters: {}",
                error_chain(&error)
            );
        }
    }
}

fn handle(
    request: NetRequest,
    resolve: &dyn Fn(&str) -> Result<VmId, ApiError>,
    vms: &dyn Fn() -> Vec<ComputerSystem>,
) -> Response {
    let switches = match SWITCHES.get() {
        Some(Ok(switches)) => switches,
        Some(Err(reason)) => {
            return Err(ApiError::new(format!(
                "virtual switches unavailable: {reason}"
            )));
        }
        None => return Err(ApiError::new("virtual switches unavailable")),
    };
    let mut switches = switches.lock().unwrap_or_else(PoisonError::into_inner);
    let names = || -> Vec<(String, String)> {
        vms()
            .into_iter()
            .map(|vm| (vm.id.to_string(), vm.name))
            .collect()
    };
    let value = match request {
        NetRequest::NewVmswitch {
            name,
            switch_type,
            interface,
            subnet,
        } => {
            let kind = match (switch_type.as_str(), interface) {
                ("private", None) => SwitchRequest::Private,
                ("internal", None) => SwitchRequest::Internal,
                ("external", Some(interface)) => SwitchRequest::External(interface),
                _ => {
                    return Err(invalid(
                        "give one of --private, --internal, --external IFACE",
                    ));
                }
            };
            let subnet = subnet
                .map(|s| s.parse())
                .transpose()
                .map_err(|e: SwitchError| invalid(e.to_string()))?;
            let switch = switches.new_switch(&name, kind, subnet).map_err(refused)?;
            json(&switch_view(&switch, 0))
        }
        NetRequest::GetVmswitch { name } => {
            let state = switches.state();
            let list: Vec<SwitchView> = match name {
                Some(name) => vec![switch_view(
                    switches.switch(&name).map_err(refused)?,
                    state.ports(&name),
                )],
                None => state
                    .switches
                    .iter()
                    .map(|s| switch_view(s, state.ports(&s.name)))
                    .collect(),
            };
            json(&list)
        }
        NetRequest::RemoveVmswitch { name } => {
            switches.remove_switch(&name).map_err(refused)?;
            serde_json::Value::Null
        }
        NetRequest::AddVmnetworkadapter { vm, switch, mac } => {
            let id = resolve(&vm)?;
            let state = vms()
                .into_iter()
                .find(|v| v.id == id)
                .map(|v| v.enabled_state);
            if state != Some(EnabledState::Off) {
                return Err(ApiError::with_code(
                    ReturnCode::InvalidState.code(),
                    "a network adapter is added to a VM that is off",
                ));
            }
            let mac = mac
                .map(|m| m.parse::<MacAddress>())
                .transpose()
                .map_err(|e| invalid(e.to_string()))?;
            let adapter = switches
                .add_adapter(&id.to_string(), switch.as_deref(), mac)
                .map_err(refused)?;
            json(&adapter_view(&adapter, &names()))
        }
        NetRequest::ConnectVmnetworkadapter { vm, switch } => {
            let id = resolve(&vm)?;
            let adapter = switches
                .connect(&id.to_string(), &switch)
                .map_err(refused)?;
            json(&adapter_view(&adapter, &names()))
        }
        NetRequest::DisconnectVmnetworkadapter { vm } => {
            let id = resolve(&vm)?;
            let adapter = switches.disconnect(&id.to_string()).map_err(refused)?;
            json(&adapter_view(&adapter, &names()))
        }
        NetRequest::GetVmnetworkadapter { vm } => {
            let id = vm
                .map(|vm| resolve(&vm))
                .transpose()?
                .map(|id| id.to_string());
            let names = names();
            let list: Vec<AdapterView> = switches
                .state()
                .adapters
                .iter()
                .filter(|a| id.as_ref().is_none_or(|id| &a.vm == id))
                .map(|a| adapter_view(a, &names))
                .collect();
            json(&list)
        }
    };
    Ok(value)
}

fn switch_view(switch: &Switch, ports: usize) -> SwitchView {
    let (subnet, host_address, interface) = match &switch.kind {
        SwitchKind::Private => (None, None, None),
        SwitchKind::Internal { subnet } => {
            (Some(subnet.to_string()), Some(subnet.host_address()), None)
        }
        SwitchKind::External { interface } => (None, None, Some(interface.clone())),
    };
    SwitchView {
        name: switch.name.clone(),
        id: switch.id.clone(),
        switch_type: switch.kind.name().to_owned(),
        bridge: switch.bridge.clone(),
        subnet,
        host_address,
        net_adapter_interface: interface,
        ports,
    }
}

fn adapter_view(adapter: &Adapter, names: &[(String, String)]) -> AdapterView {
    let vm_name = names
        .iter()
        .find(|(id, _)| *id == adapter.vm)
        .map_or_else(String::new, |(_, name)| name.clone());
    AdapterView {
        vm_name,
        vm_id: adapter.vm.clone(),
        name: "Network Adapter".to_owned(),
        id: adapter.id.clone(),
        mac_address: adapter.mac.to_string(),
        static_mac_address: adapter.static_mac,
        switch_name: adapter.switch.clone(),
        ip_addresses: adapter.ipv4.into_iter().collect(),
        tap: adapter.tap.clone(),
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::with_code(ReturnCode::InvalidParameter.code(), message)
}

/// A refused request: Hyper-V's code for the kind of refusal, and the reason.
fn refused(error: SwitchError) -> ApiError {
    let code = match &error {
        SwitchError::SwitchInUse { .. } => ReturnCode::InvalidState,
        SwitchError::Host { .. } | SwitchError::Store { .. } | SwitchError::Corrupt { .. } => {
            ReturnCode::Failed
        }
        _ => ReturnCode::InvalidParameter,
    };
    ApiError::with_code(code.code(), error_chain(&error))
}

fn json<T: Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}
