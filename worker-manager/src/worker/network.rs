//! The VM's network adapters, from the store's virtual switch file (`network.json`, which the
//! service keeps): each adapter's TAP is opened here, before the process is confined, and handed
//! to the partition as an open descriptor. A reset or restore later in the life of the worker
//! reuses the descriptor (a duplicate of it), so the confined worker never needs `/dev/net/tun`.
//!
//! The TAPs are persistent interfaces the service created and attached to their switch; the
//! worker only holds them open, so a service restart leaves the guest's network untouched.

use std::path::Path;
use std::sync::Arc;

use partition::devices::virtio::Tap;
use partition::{NicConfig, PartitionConfig};
use vmm_core::VmId;

use crate::error::{Error, Result};

/// Adds VM `vm`'s adapters to `config`, with their TAPs open. A test guest is told the address
/// of its first adapter that has one (`ip=` on its command line).
pub fn attach_adapters(
    config: &mut PartitionConfig,
    store: &Path,
    vm: VmId,
    test_guest: bool,
) -> Result<()> {
    let switches = vswitch::VirtualSwitches::load(store)
        .map_err(|e| Error::io(store.join(vswitch::NETWORK_FILE), std::io::Error::other(e)))?;
    let id = vm.to_string();
    for adapter in switches.adapters_of(&id) {
        let tap = Tap::open(&adapter.tap).map_err(partition::Error::from)?;
        config.nics.push(NicConfig {
            mac: adapter.mac,
            tap_name: adapter.tap.clone(),
            tap: Some(Arc::new(tap)),
        });
    }
    if test_guest && let Some(ip) = switches.adapters_of(&id).find_map(|a| a.ipv4) {
        config.boot.cmdline.push_str(&format!(" ip={ip}"));
    }
    Ok(())
}
