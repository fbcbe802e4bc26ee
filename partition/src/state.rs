//! The saved state of a partition: every vCPU, the in-kernel irqchip, PIT and clock, and every
//! device — everything but guest memory, which is saved to its own file.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Msrs, kvm_clock_data,
    kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::devices::serial::UartState;
use crate::devices::virtio::{BlockState, MmioTransportState, NetState};
use crate::error::{Error, Result};
use crate::memory::RamRange;

/// Version of [`PartitionState`]'s layout; restore refuses any other.
pub const STATE_VERSION: u32 = 1;

/// Architectural state of one vCPU.
#[allow(missing_docs)]
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub msrs: Vec<kvm_msr_entry>,
    pub lapic: kvm_lapic_state,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
}

/// State of the VM-wide in-kernel devices.
#[allow(missing_docs)]
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// State of the emulated devices.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceStates {
    /// The console UART.
    pub com1: UartState,
    /// The integration-channel UART.
    pub com2: UartState,
    /// Each disk, in configuration order.
    pub disks: Vec<DiskState>,
    /// Each network adapter, in configuration order.
    #[serde(default)]
    pub nics: Vec<NicState>,
}

/// State of one virtio-net adapter: its transport (queues, negotiated features) and the device
/// (MAC, link).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NicState {
    /// The virtio-mmio transport.
    pub transport: MmioTransportState,
    /// The network device.
    pub device: NetState,
}

/// State of one virtio-blk disk: its transport (queues, negotiated features) and the device.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskState {
    /// The virtio-mmio transport.
    pub transport: MmioTransportState,
    /// The block device.
    pub device: BlockState,
}

/// The full state of a paused partition, minus guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct PartitionState {
    /// [`STATE_VERSION`] when written.
    pub version: u32,
    /// The RAM ranges the memory file holds, in file order.
    pub memory: Vec<RamRange>,
    /// One entry per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Irqchip, PIT, clock.
    pub vm: VmState,
    /// Emulated devices.
    pub devices: DeviceStates,
}

impl PartitionState {
    /// Parses a state written by [`serde_json`], checking its version.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        let state: Self =
            serde_json::from_slice(bytes).map_err(|e| Error::InvalidState(e.to_string()))?;
        if state.version != STATE_VERSION {
            return Err(Error::StateVersion {
                found: state.version,
                supported: STATE_VERSION,
            });
        }
        Ok(state)
    }

    /// The state as JSON.
    pub fn to_json(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| Error::InvalidState(e.to_string()))
    }
}

/// Reads the MSRs in `indices`; returns them and how many KVM_GET_MSRS read (it stops at the first
/// MSR it cannot read).
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<(Msrs, usize)> {
    let entries: Vec<_> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| Error::MsrsTooMany)?;
    let read = vcpu.get_msrs(&mut msrs).map_err(Error::Kvm)?;
    Ok((msrs, read))
}

/// The MSRs KVM can save on this host, in the order it lists them.
pub(crate) fn saveable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>> {
    let mut indices: Vec<u32> = kvm
        .get_msr_index_list()
        .map_err(Error::Kvm)?
        .as_slice()
        .to_vec();
    // Drop each MSR this host refuses to read, one at a time, until the whole list reads.
    loop {
        let (_, read) = read_msrs(vcpu, &indices)?;
        if read == indices.len() {
            return Ok(indices);
        }
        indices.remove(read);
    }
}

/// Reads the state of one (parked) vCPU.
pub(crate) fn capture_vcpu(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState> {
    let (msrs, read) = read_msrs(vcpu, msr_indices)?;
    if read != msr_indices.len() {
        return Err(Error::MsrRejected {
            index: msr_indices[read],
        });
    }
    Ok(VcpuState {
        // mp_state and events first: reading them lets KVM flush pending events consistently.
        mp_state: vcpu.get_mp_state().map_err(Error::Kvm)?,
        events: vcpu.get_vcpu_events().map_err(Error::Kvm)?,
        regs: vcpu.get_regs().map_err(Error::Kvm)?,
        sregs: vcpu.get_sregs().map_err(Error::Kvm)?,
        xsave: vcpu.get_xsave().map_err(Error::Kvm)?,
        xcrs: vcpu.get_xcrs().map_err(Error::Kvm)?,
        lapic: vcpu.get_lapic().map_err(Error::Kvm)?,
        msrs: msrs.as_slice().to_vec(),
    })
}

/// Writes `state` into a freshly created vCPU (its CPUID already set).
pub(crate) fn restore_vcpu(vcpu: &VcpuFd, state: &VcpuState) -> Result<()> {
    vcpu.set_mp_state(state.mp_state).map_err(Error::Kvm)?;
    vcpu.set_regs(&state.regs).map_err(Error::Kvm)?;
    vcpu.set_sregs(&state.sregs).map_err(Error::Kvm)?;
    // SAFETY: `state.xsave` is a legacy-sized kvm_xsave as KVM_GET_XSAVE returned it; KVM reads no
    // more than that structure.
    unsafe { vcpu.set_xsave(&state.xsave) }.map_err(Error::Kvm)?;
    vcpu.set_xcrs(&state.xcrs).map_err(Error::Kvm)?;
    vcpu.set_lapic(&state.lapic).map_err(Error::Kvm)?;
    let msrs = Msrs::from_entries(&state.msrs).map_err(|_| Error::MsrsTooMany)?;
    let set = vcpu.set_msrs(&msrs).map_err(Error::Kvm)?;
    if set != state.msrs.len() {
        return Err(Error::MsrRejected {
            index: state.msrs[set].index,
        });
    }
    vcpu.set_vcpu_events(&state.events).map_err(Error::Kvm)
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(Error::Kvm)?;
    Ok(chip)
}

/// Reads the VM-wide state.
pub(crate) fn capture_vm(vm: &VmFd) -> Result<VmState> {
    Ok(VmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(Error::Kvm)?,
        clock: vm.get_clock().map_err(Error::Kvm)?,
    })
}

/// Writes the VM-wide state into a VM created with an irqchip and PIT.
pub(crate) fn restore_vm(vm: &VmFd, state: &VmState) -> Result<()> {
    for (chip, id) in [
        (&state.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&state.ioapic, KVM_IRQCHIP_IOAPIC),
    ] {
        if chip.chip_id != id {
            return Err(Error::InvalidState(format!(
                "irqchip {} saved as chip {}",
                id, chip.chip_id
            )));
        }
        vm.set_irqchip(chip).map_err(Error::Kvm)?;
    }
    vm.set_pit2(&state.pit).map_err(Error::Kvm)?;
    // Only the clock value: the flags describe how it was read, not how to set it.
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(Error::Kvm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_state_parser(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = PartitionState::from_json(&bytes);
        }

        #[test]
        fn arbitrary_json_objects_are_rejected_not_panicked(keys in proptest::collection::vec("[a-z]{1,8}", 0..8), n in any::<i64>()) {
            let object: serde_json::Map<String, serde_json::Value> =
                keys.into_iter().map(|k| (k, serde_json::json!(n))).collect();
            let text = serde_json::Value::Object(object).to_string();
            prop_assert!(PartitionState::from_json(text.as_bytes()).is_err());
        }
    }
}
