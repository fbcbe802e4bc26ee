//! [`VirtualSwitches`]: the persisted switches and adapters and the host side of each request.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use partition::devices::virtio::Tap;

use crate::model::{Adapter, NetworkState, Switch, SwitchKind, valid_switch_name};
use crate::netlink::{Netlink, link_index};
use crate::{Ipv4Subnet, MacAddress, Result, SwitchError};

/// Name of the switch and adapter file in the store.
pub const NETWORK_FILE: &str = "network.json";

/// A host change to take back when a later step of the same request fails.
#[derive(Debug)]
enum Undo {
    DeleteLink(u32),
}

/// The virtual switches and network adapters of one store.
///
/// Each request checks its input first, then changes the host, then writes `network.json`; if a
/// host step or the write fails, the host steps already taken are undone, so the host and the
/// file never disagree about a refused request. Host changes act on the calling thread's network
/// namespace.
#[derive(Debug)]
pub struct VirtualSwitches {
    path: PathBuf,
    state: NetworkState,
}

fn host(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SwitchError {
    let what = what.into();
    move |source| SwitchError::Host { what, source }
}

impl VirtualSwitches {
    /// Loads `<store>/network.json` (empty if absent). Nothing on the host changes.
    pub fn load(store: &Path) -> Result<Self> {
        let path = store.join(NETWORK_FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| SwitchError::Corrupt {
                path: path.clone(),
                source,
            })?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => NetworkState::default(),
            Err(source) => return Err(SwitchError::Store { path, source }),
        };
        Ok(Self { path, state })
    }

    /// Everything known.
    pub fn state(&self) -> &NetworkState {
        &self.state
    }

    /// The switch `name`.
    pub fn switch(&self, name: &str) -> Result<&Switch> {
        self.state
            .switch(name)
            .ok_or_else(|| SwitchError::NoSuchSwitch(name.to_owned()))
    }

    /// The adapters of VM `vm`.
    pub fn adapters_of<'a>(&'a self, vm: &'a str) -> impl Iterator<Item = &'a Adapter> + 'a {
        self.state.adapters.iter().filter(move |a| a.vm == vm)
    }

    /// Brings the host in line with the file after a service start (or a host reboot): every
    /// switch's bridge and every adapter's TAP exist, are up and connected; existing ones are
    /// kept as they are (a running worker's TAP stays).
    pub fn recreate(&self) -> Result<()> {
        let mut netlink = Netlink::open().map_err(host("netlink socket"))?;
        for switch in &self.state.switches {
            if link_index(&switch.bridge).is_none() {
                create_bridge(&mut netlink, switch)?;
            }
        }
        for adapter in &self.state.adapters {
            if link_index(&adapter.tap).is_none() {
                create_tap(&adapter.tap)?;
            }
            let tap = link_index(&adapter.tap)
                .ok_or_else(|| SwitchError::NoSuchInterface(adapter.tap.clone()))?;
            let master = match &adapter.switch {
                Some(name) => self.bridge_index(name)?,
                None => 0,
            };
            netlink
                .set_master(tap, master)
                .map_err(host(format!("attach {}", adapter.tap)))?;
            netlink
                .set_up(tap, true)
                .map_err(host(format!("bring up {}", adapter.tap)))?;
        }
        Ok(())
    }

    /// Creates switch `name`: a bridge, with the host's address on it (internal, in `subnet` or
    /// the next free `172.30.N.0/24`) or a host interface as a port (external).
    pub fn new_switch(
        &mut self,
        name: &str,
        kind: SwitchRequest,
        subnet: Option<Ipv4Subnet>,
    ) -> Result<Switch> {
        if !valid_switch_name(name) {
            return Err(SwitchError::InvalidName(name.to_owned()));
        }
        if self.state.switch(name).is_some() {
            return Err(SwitchError::SwitchExists(name.to_owned()));
        }
        let kind = match (kind, subnet) {
            (SwitchRequest::Internal, Some(subnet)) => SwitchKind::Internal { subnet },
            (SwitchRequest::Internal, None) => SwitchKind::Internal {
                subnet: self
                    .state
                    .free_subnet()
                    .ok_or(SwitchError::InvalidSubnet(String::new()))?,
            },
            (_, Some(_)) => return Err(SwitchError::SubnetNotInternal),
            (SwitchRequest::Private, None) => SwitchKind::Private,
            (SwitchRequest::External(interface), None) => {
                if link_index(&interface).is_none() {
                    return Err(SwitchError::NoSuchInterface(interface));
                }
                SwitchKind::External { interface }
            }
        };
        let switch = Switch {
            name: name.to_owned(),
            id: uuid::Uuid::new_v4().to_string(),
            kind,
            bridge: self.state.free_bridge_name(),
        };
        let mut netlink = Netlink::open().map_err(host("netlink socket"))?;
        let undo = create_bridge(&mut netlink, &switch)?;
        self.state.switches.push(switch.clone());
        if let Err(error) = self.save() {
            self.state.switches.pop();
            rollback(&mut netlink, undo);
            return Err(error);
        }
        Ok(switch)
    }

    /// Removes switch `name`; refused while adapters are connected to it (as Hyper-V does). An
    /// external switch gives its host interface back first.
    pub fn remove_switch(&mut self, name: &str) -> Result<()> {
        let switch = self.switch(name)?.clone();
        let ports = self.state.ports(name);
        if ports > 0 {
            return Err(SwitchError::SwitchInUse {
                name: name.to_owned(),
                ports,
            });
        }
        let mut netlink = Netlink::open().map_err(host("netlink socket"))?;
        if let SwitchKind::External { interface } = &switch.kind
            && let Some(index) = link_index(interface)
        {
            netlink
                .set_master(index, 0)
                .map_err(host(format!("release {interface}")))?;
        }
        if let Some(index) = link_index(&switch.bridge) {
            netlink
                .delete_link(index)
                .map_err(host(format!("delete bridge {}", switch.bridge)))?;
        }
        self.state.switches.retain(|s| s.name != name);
        self.save()
    }

    /// Gives VM `vm` a network adapter: `mac` (unicast, unused in the store) or one from the
    /// pool, a persistent TAP, connected to `switch` if given (taking the next free address of an
    /// internal switch's subnet).
    pub fn add_adapter(
        &mut self,
        vm: &str,
        switch: Option<&str>,
        mac: Option<MacAddress>,
    ) -> Result<Adapter> {
        let static_mac = mac.is_some();
        let mac = match mac {
            Some(mac) => mac,
            None => self.state.free_mac().ok_or(SwitchError::MacPoolExhausted)?,
        };
        if !mac.is_unicast() {
            return Err(SwitchError::MulticastMac(mac));
        }
        if let Some(other) = self.state.adapters.iter().find(|a| a.mac == mac) {
            return Err(SwitchError::DuplicateMac {
                mac,
                vm: other.vm.clone(),
            });
        }
        let (bridge, ipv4) = match switch {
            Some(name) => self.port_of(name)?,
            None => (0, None),
        };
        let adapter = Adapter {
            vm: vm.to_owned(),
            id: uuid::Uuid::new_v4().to_string(),
            mac,
            static_mac,
            switch: switch.map(str::to_owned),
            tap: self.state.free_tap_name(),
            ipv4,
        };
        let mut netlink = Netlink::open().map_err(host("netlink socket"))?;
        let undo = create_tap(&adapter.tap)?;
        let attached = netlink
            .set_master(undo, bridge)
            .and_then(|()| netlink.set_up(undo, true))
            .map_err(host(format!("attach {}", adapter.tap)));
        if let Err(error) = attached {
            rollback(&mut netlink, Undo::DeleteLink(undo));
            return Err(error);
        }
        self.state.adapters.push(adapter.clone());
        if let Err(error) = self.save() {
            self.state.adapters.pop();
            rollback(&mut netlink, Undo::DeleteLink(undo));
            return Err(error);
        }
        Ok(adapter)
    }

    /// Connects VM `vm`'s (first) adapter to `switch`, moving it off its current one.
    pub fn connect(&mut self, vm: &str, switch: &str) -> Result<Adapter> {
        let position = self.adapter_position(vm)?;
        if self.state.adapters[position].switch.as_deref() == Some(switch) {
            return Ok(self.state.adapters[position].clone());
        }
        let (bridge, ipv4) = self.port_of(switch)?;
        self.move_port(position, Some(switch.to_owned()), bridge, ipv4)
    }

    /// Disconnects VM `vm`'s (first) adapter from its switch; the adapter stays.
    pub fn disconnect(&mut self, vm: &str) -> Result<Adapter> {
        let position = self.adapter_position(vm)?;
        self.move_port(position, None, 0, None)
    }

    /// Removes every adapter of VM `vm` (the VM is deleted): their TAPs go too.
    pub fn remove_adapters_of(&mut self, vm: &str) -> Result<()> {
        let mut netlink = Netlink::open().map_err(host("netlink socket"))?;
        for adapter in self.adapters_of(vm) {
            if let Some(index) = link_index(&adapter.tap) {
                netlink
                    .delete_link(index)
                    .map_err(host(format!("delete {}", adapter.tap)))?;
            }
        }
        self.state.adapters.retain(|a| a.vm != vm);
        self.save()
    }

    fn adapter_position(&self, vm: &str) -> Result<usize> {
        self.state
            .adapters
            .iter()
            .position(|a| a.vm == vm)
            .ok_or_else(|| SwitchError::NoAdapter(vm.to_owned()))
    }

    fn move_port(
        &mut self,
        position: usize,
        switch: Option<String>,
        bridge: u32,
        ipv4: Option<Ipv4Addr>,
    ) -> Result<Adapter> {
        let before = self.state.adapters[position].clone();
        let tap = link_index(&before.tap)
            .ok_or_else(|| SwitchError::NoSuchInterface(before.tap.clone()))?;
        let mut netlink = Netlink::open().map_err(host("netlink socket"))?;
        netlink
            .set_master(tap, bridge)
            .map_err(host(format!("attach {}", before.tap)))?;
        let adapter = &mut self.state.adapters[position];
        adapter.switch = switch;
        adapter.ipv4 = ipv4;
        let after = adapter.clone();
        if let Err(error) = self.save() {
            let previous = match &before.switch {
                Some(name) => self.bridge_index(name).unwrap_or(0),
                None => 0,
            };
            let _ = netlink.set_master(tap, previous);
            self.state.adapters[position] = before;
            return Err(error);
        }
        Ok(after)
    }

    /// The bridge index of switch `name` and, for an internal switch, the next free address.
    fn port_of(&self, name: &str) -> Result<(u32, Option<Ipv4Addr>)> {
        let switch = self.switch(name)?;
        let ipv4 = match &switch.kind {
            SwitchKind::Internal { subnet } => Some(
                self.state
                    .free_address(subnet)
                    .ok_or(SwitchError::SubnetFull(*subnet))?,
            ),
            _ => None,
        };
        Ok((self.bridge_index(name)?, ipv4))
    }

    fn bridge_index(&self, name: &str) -> Result<u32> {
        let switch = self.switch(name)?;
        link_index(&switch.bridge)
            .ok_or_else(|| SwitchError::NoSuchInterface(switch.bridge.clone()))
    }

    fn save(&self) -> Result<()> {
        let bytes =
            serde_json::to_vec_pretty(&self.state).map_err(|source| SwitchError::Corrupt {
                path: self.path.clone(),
                source,
            })?;
        vmm_core::atomic_file::write_atomic(&self.path, &bytes).map_err(|source| {
            SwitchError::Store {
                path: self.path.clone(),
                source,
            }
        })
    }
}

/// The kind of switch `new-vmswitch` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SwitchRequest {
    /// `--private`.
    Private,
    /// `--internal`.
    Internal,
    /// `--external IFACE`.
    External(String),
}

/// Creates `switch`'s bridge and does its kind's part; on failure deletes what it created.
/// Returns the bridge's index (what undoes it).
fn create_bridge(netlink: &mut Netlink, switch: &Switch) -> Result<Undo> {
    netlink
        .create_link(&switch.bridge, "bridge")
        .map_err(host(format!("create bridge {}", switch.bridge)))?;
    let index = link_index(&switch.bridge)
        .ok_or_else(|| SwitchError::NoSuchInterface(switch.bridge.clone()))?;
    let configured = (|| -> Result<()> {
        match &switch.kind {
            SwitchKind::Private => {}
            SwitchKind::Internal { subnet } => netlink
                .add_address(index, subnet.host_address(), subnet.prefix)
                .map_err(host(format!("address {}", subnet.host_address())))?,
            SwitchKind::External { interface } => {
                let port = link_index(interface)
                    .ok_or_else(|| SwitchError::NoSuchInterface(interface.clone()))?;
                netlink
                    .set_master(port, index)
                    .map_err(host(format!("attach {interface}")))?;
            }
        }
        netlink
            .set_up(index, true)
            .map_err(host(format!("bring up {}", switch.bridge)))
    })();
    match configured {
        Ok(()) => Ok(Undo::DeleteLink(index)),
        Err(error) => {
            rollback(netlink, Undo::DeleteLink(index));
            Err(error)
        }
    }
}

/// Creates the persistent TAP `name` (with the vnet header, as the partition opens it); returns
/// its index.
fn create_tap(name: &str) -> Result<u32> {
    let tap = Tap::open(name).map_err(|error| SwitchError::Host {
        what: format!("create tap {name}"),
        source: std::io::Error::other(error),
    })?;
    tap.set_persistent(true)
        .map_err(host(format!("make tap {name} persistent")))?;
    drop(tap);
    link_index(name).ok_or_else(|| SwitchError::NoSuchInterface(name.to_owned()))
}

fn rollback(netlink: &mut Netlink, undo: Undo) {
    match undo {
        Undo::DeleteLink(index) => {
            let _ = netlink.delete_link(index);
        }
    }
}
