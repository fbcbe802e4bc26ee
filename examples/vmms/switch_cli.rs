//! The CLI verbs of virtual switches and network adapters (after Hyper-V's `New-VMSwitch`,
//! `Add-VMNetworkAdapter`, ...), each one request on the daemon socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use clap::{ArgGroup, Subcommand};
use serde::de::DeserializeOwned;

use crate::api::{ApiError, Response, SOCKET};
use crate::cli::{CliError, Output};
use crate::switch::{AdapterView, NetRequest, SwitchView};

/// The network verbs.
#[derive(Debug, Subcommand)]
pub enum NetVerb {
    /// Create a virtual switch: a bridge for VMs only (private), VMs and the host (internal: the
    /// host takes the subnet's first address), or VMs and a host interface's network (external).
    #[command(group(ArgGroup::new("kind").required(true).args(["private", "internal", "external"])))]
    NewVmswitch {
        /// The switch's name.
        name: String,
        /// VMs only.
        #[arg(long)]
        private: bool,
        /// VMs and the host.
        #[arg(long)]
        internal: bool,
        /// VMs and the network of this host interface.
        #[arg(long, value_name = "IFACE")]
        external: Option<String>,
        /// The internal switch's subnet (default: the next free 172.30.N.0/24).
        #[arg(long, value_name = "CIDR")]
        subnet: Option<String>,
    },
    /// Show one virtual switch or all.
    GetVmswitch {
        /// The switch.
        name: Option<String>,
    },
    /// Remove a virtual switch (refused while adapters are connected to it).
    RemoveVmswitch {
        /// The switch.
        name: String,
    },
    /// Give a VM (that is off) a network adapter, optionally connected to a switch.
    AddVmnetworkadapter {
        /// The VM (name or GUID).
        vm: String,
        /// Connect it to this switch.
        #[arg(long)]
        switch: Option<String>,
        /// A static MAC address (default: the next free one of 02:15:5d:xx:xx:xx).
        #[arg(long)]
        mac: Option<String>,
    },
    /// Connect a VM's network adapter to a switch (live while the VM runs).
    ConnectVmnetworkadapter {
        /// The VM (name or GUID).
        vm: String,
        /// The switch.
        #[arg(long)]
        switch: String,
    },
    /// Disconnect a VM's network adapter from its switch.
    DisconnectVmnetworkadapter {
        /// The VM (name or GUID).
        vm: String,
    },
    /// Show the network adapters of one VM or of all.
    GetVmnetworkadapter {
        /// The VM (name or GUID).
        vm: Option<String>,
    },
}

/// Runs one network verb against the daemon of `store`.
pub fn run(store: &Path, output: Output, verb: NetVerb) -> Result<(), CliError> {
    let (name, target, request) = match verb {
        NetVerb::NewVmswitch {
            name,
            private: _,
            internal,
            external,
            subnet,
        } => {
            let switch_type = match (&external, internal) {
                (Some(_), _) => "external",
                (None, true) => "internal",
                (None, false) => "private",
            };
            (
                "new-vmswitch",
                Some(name.clone()),
                NetRequest::NewVmswitch {
                    name,
                    switch_type: switch_type.to_owned(),
                    interface: external,
                    subnet,
                },
            )
        }
        NetVerb::GetVmswitch { name } => (
            "get-vmswitch",
            name.clone(),
            NetRequest::GetVmswitch { name },
        ),
        NetVerb::RemoveVmswitch { name } => (
            "remove-vmswitch",
            Some(name.clone()),
            NetRequest::RemoveVmswitch { name },
        ),
        NetVerb::AddVmnetworkadapter { vm, switch, mac } => (
            "add-vmnetworkadapter",
            Some(vm.clone()),
            NetRequest::AddVmnetworkadapter { vm, switch, mac },
        ),
        NetVerb::ConnectVmnetworkadapter { vm, switch } => (
            "connect-vmnetworkadapter",
            Some(vm.clone()),
            NetRequest::ConnectVmnetworkadapter { vm, switch },
        ),
        NetVerb::DisconnectVmnetworkadapter { vm } => (
            "disconnect-vmnetworkadapter",
            Some(vm.clone()),
            NetRequest::DisconnectVmnetworkadapter { vm },
        ),
        NetVerb::GetVmnetworkadapter { vm } => (
            "get-vmnetworkadapter",
            vm.clone(),
            NetRequest::GetVmnetworkadapter { vm },
        ),
    };
    let fail = |error: ApiError| CliError {
        verb: name,
        target: target.clone(),
        error,
    };
    match &request {
        NetRequest::NewVmswitch { .. } => {
            let switch: SwitchView = call(store, &request).map_err(fail)?;
            print_switches(output, &[switch]);
        }
        NetRequest::GetVmswitch { .. } => {
            let switches: Vec<SwitchView> = call(store, &request).map_err(fail)?;
            print_switches(output, &switches);
        }
        NetRequest::RemoveVmswitch { .. } => {
            call::<serde_json::Value>(store, &request).map_err(fail)?;
        }
        NetRequest::GetVmnetworkadapter { .. } => {
            let adapters: Vec<AdapterView> = call(store, &request).map_err(fail)?;
            print_adapters(output, &adapters);
        }
        _ => {
            let adapter: AdapterView = call(store, &request).map_err(fail)?;
            print_adapters(output, &[adapter]);
        }
    }
    Ok(())
}

/// One request line to the daemon, one answer line back.
fn call<T: DeserializeOwned>(store: &Path, request: &NetRequest) -> Result<T, ApiError> {
    let socket = store.join(SOCKET);
    let stream = UnixStream::connect(&socket).map_err(|e| {
        ApiError::new(format!(
            "cannot reach the daemon at {}: {e} (is `vmms serve --store {}` running?)",
            socket.display(),
            store.display()
        ))
    })?;
    let mut line = serde_json::to_vec(request).map_err(|e| ApiError::new(e.to_string()))?;
    line.push(b'\n');
    let mut writer = stream
        .try_clone()
        .map_err(|e| ApiError::new(format!("daemon connection: {e}")))?;
    let sent = writer.write_all(&line);
    let mut answer = String::new();
    match (BufReader::new(stream).read_line(&mut answer), sent) {
        (Ok(n), _) if n > 0 => {}
        (_, Err(e)) | (Err(e), _) => return Err(ApiError::new(format!("daemon connection: {e}"))),
        (Ok(_), Ok(())) => return Err(ApiError::new("daemon closed the connection")),
    }
    let response: Response =
        serde_json::from_str(&answer).map_err(|e| ApiError::new(format!("daemon answer: {e}")))?;
    serde_json::from_value(response?).map_err(|e| ApiError::new(format!("daemon answer: {e}")))
}

fn print_switches(output: Output, switches: &[SwitchView]) {
    if output == Output::Json {
        return print_json(switches);
    }
    out!(
        "{:<20} {:<9} {:<8} {:<18} {:<12} {:>5}",
        "Name",
        "Type",
        "Bridge",
        "Subnet",
        "Interface",
        "Ports"
    );
    for s in switches {
        out!(
            "{:<20} {:<9} {:<8} {:<18} {:<12} {:>5}",
            s.name,
            s.switch_type,
            s.bridge,
            s.subnet.as_deref().unwrap_or("-"),
            s.net_adapter_interface.as_deref().unwrap_or("-"),
            s.ports
        );
    }
}

fn print_adapters(output: Output, adapters: &[AdapterView]) {
    if output == Output::Json {
        return print_json(adapters);
    }
    out!(
        "{:<16} {:<17} {:<20} {:<15} {:<9}",
        "VMName",
        "MacAddress",
        "SwitchName",
        "IPAddresses",
        "Tap"
    );
    for a in adapters {
        let ips: Vec<String> = a.ip_addresses.iter().map(ToString::to_string).collect();
        out!(
            "{:<16} {:<17} {:<20} {:<15} {:<9}",
            a.vm_name,
            a.mac_address,
            a.switch_name.as_deref().unwrap_or("-"),
            if ips.is_empty() {
                "-".to_owned()
            } else {
                ips.join(",")
            },
            a.tap
        );
    }
}

fn print_json<T: serde::Serialize + ?Sized>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => out!("{text}"),
        Err(e) => eprintln!("cannot encode output: {e}"),
    }
}
