//! The persisted description of switches and adapters, and the pools their addresses come from.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{MacAddress, SwitchError};

/// The locally administered prefix of generated MAC addresses: Hyper-V's OUI 00:15:5D with the
/// locally-administered bit set, so they never collide with a vendor's burnt-in address.
pub const MAC_PREFIX: [u8; 3] = [0x02, 0x15, 0x5d];
/// Internal switches without a subnet get `172.30.N.0/24`, N the first one no switch uses.
pub const DEFAULT_SUBNET_BASE: [u8; 2] = [172, 30];

/// The kind of a virtual switch (Hyper-V's `SwitchType`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "type")]
pub enum SwitchKind {
    /// VMs only.
    Private,
    /// VMs and the host, which takes the subnet's first address on the bridge.
    Internal {
        /// The switch's subnet.
        subnet: Ipv4Subnet,
    },
    /// VMs and the network of a host interface, which becomes a port of the bridge.
    External {
        /// The host interface.
        interface: String,
    },
}

impl SwitchKind {
    /// Hyper-V's name of the kind.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Private => "Private",
            Self::Internal { .. } => "Internal",
            Self::External { .. } => "External",
        }
    }
}

/// A virtual switch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switch {
    /// Its name (unique).
    pub name: String,
    /// Its id (Hyper-V's switch GUID; `Msvm_VirtualEthernetSwitch.Name`).
    pub id: String,
    /// Private, internal or external.
    #[serde(flatten)]
    pub kind: SwitchKind,
    /// The Linux bridge that is the switch.
    pub bridge: String,
}

/// A VM's network adapter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adapter {
    /// The VM it belongs to (its id).
    pub vm: String,
    /// Its id (the adapter's instance id).
    pub id: String,
    /// Its MAC address.
    pub mac: MacAddress,
    /// Whether the MAC was given (Hyper-V's `StaticMacAddress`) rather than taken from the pool.
    #[serde(default)]
    pub static_mac: bool,
    /// The switch it is connected to, if any.
    pub switch: Option<String>,
    /// Its TAP interface (the switch port).
    pub tap: String,
    /// The guest's address on an internal switch.
    pub ipv4: Option<Ipv4Addr>,
}

/// Everything in `network.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetworkState {
    /// Switches, in creation order.
    pub switches: Vec<Switch>,
    /// Adapters, in creation order.
    pub adapters: Vec<Adapter>,
}

impl NetworkState {
    /// The switch `name`.
    pub fn switch(&self, name: &str) -> Option<&Switch> {
        self.switches.iter().find(|s| s.name == name)
    }

    /// Adapters connected to switch `name`.
    pub fn ports(&self, name: &str) -> usize {
        self.adapters
            .iter()
            .filter(|a| a.switch.as_deref() == Some(name))
            .count()
    }

    /// The first `vmsbrN` name no switch uses.
    pub(crate) fn free_bridge_name(&self) -> String {
        (0..)
            .map(|n| format!("vmsbr{n}"))
            .find(|name| !self.switches.iter().any(|s| &s.bridge == name))
            .unwrap_or_default()
    }

    /// The first `vmstapN` name no adapter uses.
    pub(crate) fn free_tap_name(&self) -> String {
        (0..)
            .map(|n| format!("vmstap{n}"))
            .find(|name| !self.adapters.iter().any(|a| &a.tap == name))
            .unwrap_or_default()
    }

    /// The first `172.30.N.0/24` no internal switch has.
    pub(crate) fn free_subnet(&self) -> Option<Ipv4Subnet> {
        (0..=255u8)
            .map(|n| Ipv4Subnet {
                network: Ipv4Addr::new(DEFAULT_SUBNET_BASE[0], DEFAULT_SUBNET_BASE[1], n, 0),
                prefix: 24,
            })
            .find(|candidate| {
                !self.switches.iter().any(|s| {
                    matches!(&s.kind, SwitchKind::Internal { subnet } if subnet.overlaps(candidate))
                })
            })
    }

    /// A MAC from the pool no adapter has: `02:15:5d` and the next three bytes counting up from
    /// the highest used.
    pub(crate) fn free_mac(&self) -> Option<MacAddress> {
        let used = |mac: MacAddress| self.adapters.iter().any(|a| a.mac == mac);
        let start = self
            .adapters
            .iter()
            .filter(|a| a.mac.0[..3] == MAC_PREFIX)
            .map(|a| u32::from_be_bytes([0, a.mac.0[3], a.mac.0[4], a.mac.0[5]]))
            .max()
            .map_or(1, |n| n + 1);
        (0..1u32 << 24)
            .map(|i| (start + i) % (1 << 24))
            .filter(|&n| n != 0)
            .map(|n| {
                let [_, a, b, c] = n.to_be_bytes();
                MacAddress([MAC_PREFIX[0], MAC_PREFIX[1], MAC_PREFIX[2], a, b, c])
            })
            .find(|&mac| !used(mac))
    }

    /// The next address of `subnet` after the host's that no adapter has.
    pub(crate) fn free_address(&self, subnet: &Ipv4Subnet) -> Option<Ipv4Addr> {
        subnet
            .guest_addresses()
            .find(|ip| !self.adapters.iter().any(|a| a.ipv4 == Some(*ip)))
    }
}

/// An IPv4 subnet, `network/prefix`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Subnet {
    /// The network address (host bits zero).
    pub network: Ipv4Addr,
    /// The prefix length, 8..=30.
    pub prefix: u8,
}

impl Ipv4Subnet {
    fn mask(&self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }

    /// The host's address on the switch: the subnet's first.
    pub fn host_address(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Addresses for guests: from the second up to the one before broadcast.
    pub fn guest_addresses(&self) -> impl Iterator<Item = Ipv4Addr> {
        let base = u32::from(self.network);
        let last = base | !self.mask();
        (base + 2..last).map(Ipv4Addr::from)
    }

    fn overlaps(&self, other: &Self) -> bool {
        let mask = self.mask() & other.mask();
        u32::from(self.network) & mask == u32::from(other.network) & mask
    }
}

impl fmt::Display for Ipv4Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl fmt::Debug for Ipv4Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Ipv4Subnet {
    type Err = SwitchError;

    /// Parses `a.b.c.d/prefix` (host bits are cleared).
    fn from_str(text: &str) -> Result<Self, SwitchError> {
        let bad = || SwitchError::InvalidSubnet(text.to_owned());
        let (address, prefix) = text.split_once('/').ok_or_else(bad)?;
        let address: Ipv4Addr = address.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix.parse().map_err(|_| bad())?;
        if !(8..=30).contains(&prefix) {
            return Err(bad());
        }
        let subnet = Self {
            network: address,
            prefix,
        };
        Ok(Self {
            network: Ipv4Addr::from(u32::from(address) & subnet.mask()),
            prefix,
        })
    }
}

impl Serialize for Ipv4Subnet {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ipv4Subnet {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Whether `name` is a usable switch name.
pub(crate) fn valid_switch_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ' '))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn subnet_parses_and_clears_host_bits() {
        let subnet: Ipv4Subnet = "10.1.2.77/24".parse().expect("valid");

        assert_eq!(subnet.to_string(), "10.1.2.0/24");
        assert_eq!(subnet.host_address(), Ipv4Addr::new(10, 1, 2, 1));
        assert_eq!(
            subnet.guest_addresses().next(),
            Some(Ipv4Addr::new(10, 1, 2, 2))
        );
        assert_eq!(subnet.guest_addresses().count(), 253);
    }

    #[test]
    fn subnet_without_room_is_rejected() {
        assert!("10.0.0.0/31".parse::<Ipv4Subnet>().is_err());
        assert!("10.0.0.0".parse::<Ipv4Subnet>().is_err());
    }

    #[test]
    fn pool_mac_is_local_unicast_and_unused() {
        let mut state = NetworkState::default();
        let first = state.free_mac().expect("a free mac");
        state.adapters.push(Adapter {
            vm: "a".into(),
            id: "1".into(),
            mac: first,
            static_mac: false,
            switch: None,
            tap: "vmstap0".into(),
            ipv4: None,
        });

        let second = state.free_mac().expect("a free mac");

        assert!(first.is_unicast() && first.is_local());
        assert_ne!(first, second);
    }

    proptest! {
        #[test]
        fn subnet_parser_never_panics(text in "\\PC*") {
            let _ = text.parse::<Ipv4Subnet>();
            let _ = text.parse::<MacAddress>();
        }
    }
}
