//! Hyper-V's virtual switches on Linux.
//!
//! A Hyper-V host connects each VM's synthetic network adapter to a port of a virtual switch:
//! private (VMs only), internal (VMs and the host, which gets an address on it) or external
//! (bridged to a physical NIC). Here a switch is a Linux bridge the service owns and a port is a
//! TAP interface, one per adapter, created persistent so it outlives a worker or service restart.
//! Everything is set up through rtnetlink ([`netlink`]), never by running `ip`.
//!
//! [`VirtualSwitches`] is the persisted set of switches and adapters (`network.json` in the
//! store, written atomically): it checks requests (names, MAC addresses, host interfaces), does
//! the host side, and undoes what it did when a step fails, so a refused request leaves nothing
//! behind.

mod manager;
mod model;
pub mod netlink;

pub use manager::{NETWORK_FILE, SwitchRequest, VirtualSwitches};
pub use model::{
    Adapter, DEFAULT_SUBNET_BASE, Ipv4Subnet, MAC_PREFIX, NetworkState, Switch, SwitchKind,
};
pub use partition::devices::virtio::MacAddress;

/// What went wrong with a switch or adapter request.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    /// A switch of that name exists.
    #[error("a virtual switch named {0:?} already exists")]
    SwitchExists(String),
    /// No switch of that name.
    #[error("no virtual switch named {0:?}")]
    NoSuchSwitch(String),
    /// The switch still has adapters connected.
    #[error("virtual switch {name:?} has {ports} connected adapter(s); disconnect them first")]
    SwitchInUse {
        /// The switch.
        name: String,
        /// Adapters connected to it.
        ports: usize,
    },
    /// A switch name that is empty, too long or has characters other than letters, digits,
    /// `-`, `_`, `.` and spaces.
    #[error("invalid virtual switch name {0:?}")]
    InvalidName(String),
    /// The host interface of an external switch does not exist.
    #[error("host network interface {0:?} does not exist")]
    NoSuchInterface(String),
    /// A MAC address that is multicast or all zeros.
    #[error("mac address {0} is not a unicast address")]
    MulticastMac(MacAddress),
    /// A MAC address another adapter has.
    #[error("mac address {mac} is already used by an adapter of vm {vm}")]
    DuplicateMac {
        /// The address.
        mac: MacAddress,
        /// The VM whose adapter has it.
        vm: String,
    },
    /// No adapter of that VM.
    #[error("vm {0} has no network adapter")]
    NoAdapter(String),
    /// A subnet that does not parse or has no room for a host and a guest.
    #[error("invalid subnet {0:?} (want a.b.c.d/prefix with prefix 8..=30)")]
    InvalidSubnet(String),
    /// Every address of the switch's subnet is taken.
    #[error("subnet {0} of the switch has no free address")]
    SubnetFull(Ipv4Subnet),
    /// A subnet given to a switch that is not internal.
    #[error("only an internal switch has a subnet")]
    SubnetNotInternal,
    /// No free local MAC address left (the pool has 2^24).
    #[error("no free mac address")]
    MacPoolExhausted,
    /// A host networking request failed.
    #[error("{what} failed")]
    Host {
        /// What was being done.
        what: String,
        /// The kernel's answer.
        #[source]
        source: std::io::Error,
    },
    /// The network file could not be read or written.
    #[error("network file {path}")]
    Store {
        /// The file.
        path: std::path::PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The network file is not valid.
    #[error("network file {path} is corrupt")]
    Corrupt {
        /// The file.
        path: std::path::PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, SwitchError>;
