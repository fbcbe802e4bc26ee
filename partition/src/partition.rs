//! [`Partition`]: one KVM VM, from creation through run control to state capture.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::{KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::block::{BackendSlot, BlockBackend, RawImage};
use crate::boot::{self, configure_boot_vcpu, configure_lapic, configure_msrs, vcpu_cpuid};
use crate::bus::{Bus, BusDevice};
use crate::config::{DiskIo, PartitionConfig};
use crate::devices::cmos::Cmos;
use crate::devices::i8042::I8042;
use crate::devices::idle::IdlePort;
use crate::devices::power::PowerControl;
use crate::devices::serial::Uart;
use crate::devices::virtio::{
    Block, BlockConfig, ChangedBlockMap, MmioTransport, Net, QUEUE_NOTIFY_OFFSET, Tap,
};
use crate::error::{Error, Result};
use crate::exit::ExitReason;
use crate::host;
use crate::layout::{
    CMOS_PORT, COM1_IRQ, COM1_PORT, COM2_IRQ, COM2_PORT, I8042_DATA_PORT, IDLE_PORT,
    PM1A_CONTROL_PORT, UART_PORT_SIZE, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE,
};
use crate::memory::{
    self, DirtyRange, PartitionMemory, RamRange, create_memory, map_memory_layers, ram_ranges,
    register_memory,
};
use crate::shell::{Adopted, BuiltOut, VmShape, VmShell, bare_vm};
use crate::software_kvm;
use crate::state::{
    DeviceStates, DiskState, NicState, PartitionState, STATE_VERSION, capture_vcpu, capture_vm,
    restore_vcpu, restore_vm,
};
use crate::teardown::VmHandle;
use crate::vcpu::{RunControl, Vcpu, VcpuContext, VcpuThreads};

/// Where a partition is in its life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Built (booted or restored) but never run.
    Created,
    /// vCPUs are running guest code.
    Running,
    /// Every vCPU is parked outside KVM_RUN with no half-done I/O; state can be captured.
    Paused,
    /// The run ended; the partition cannot run again.
    Stopped(ExitReason),
}

/// Devices added by the integrator next to the partition's own.
#[derive(Default)]
struct ExtraDevices {
    pio: Vec<(u64, u64, Arc<dyn BusDevice>)>,
    mmio: Vec<(u64, u64, Arc<dyn BusDevice>)>,
}

/// Builds a [`Partition`]: booting a kernel ([`build`](Self::build)) or restoring saved state
/// ([`restore`](Self::restore)).
pub struct PartitionBuilder {
    config: PartitionConfig,
    extra: ExtraDevices,
    /// A VM created ahead, to build into instead of creating one.
    shell: Option<VmShell>,
}

impl std::fmt::Debug for PartitionBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl PartitionBuilder {
    /// Adds a device answering port I/O in `[base, base + len)`.
    pub fn pio_device(mut self, base: u16, len: u16, device: Arc<dyn BusDevice>) -> Self {
        self.extra
            .pio
            .push((u64::from(base), u64::from(len), device));
        self
    }

    /// Adds a device answering MMIO in `[base, base + len)` (which should lie in the MMIO gap).
    pub fn mmio_device(mut self, base: u64, len: u64, device: Arc<dyn BusDevice>) -> Self {
        self.extra.mmio.push((base, len, device));
        self
    }

    /// Builds into `shell`, a VM created ahead of time, instead of creating a VM (see
    /// [`VmShell`]): what is left of the VM's set-up depends on the configuration. A shell built
    /// out to another shape than the configuration's (or, for a restore, built out at all) is
    /// dropped and a fresh VM created.
    pub fn shell(mut self, shell: VmShell) -> Self {
        self.shell = Some(shell);
        self
    }

    /// Creates the VM and loads the boot source; the partition is [`RunState::Created`].
    pub fn build(self) -> Result<Partition> {
        self.config.validate(host::max_vcpus()?)?;
        let ranges = ram_ranges(self.config.memory_mib << 20);
        let shape = VmShape::of(&self.config);
        let adopted = self.shell.and_then(|shell| shell.take(Some(shape)));
        let memory = match &adopted {
            Some(Adopted::BuiltOut(built)) => built.memory.clone(),
            _ => create_memory(&ranges)?,
        };
        let mut cmdline = self.config.boot.cmdline.clone();
        let windows = self.config.disks.len() + self.config.nics.len();
        for index in 0..windows {
            let (base, gsi) = disk_window(index);
            cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{gsi}"));
        }
        let flags = software_kvm::linux_cmdline_flags();
        if !flags.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(flags);
        }
        let machine = boot::MachineDescription {
            vcpus: self.config.vcpus,
            virtio_mmio: (0..windows)
                .map(|index| {
                    let (base, gsi) = disk_window(index);
                    boot::VirtioMmioDevice {
                        base,
                        len: VIRTIO_MMIO_SIZE,
                        gsi,
                    }
                })
                .collect(),
        };
        let loaded = boot::load(&memory, &self.config.boot, cmdline.trim(), &machine)?;
        let partition =
            Partition::assemble_with(self.config, self.extra, adopted, memory, ranges, None)?;
        let boot_vcpu = partition
            .parked
            .first()
            .ok_or(Error::InvalidVcpuCount { count: 0, max: 0 })?;
        configure_boot_vcpu(&boot_vcpu.fd, &partition.memory, loaded.entry)?;
        Ok(partition)
    }

    /// Creates the VM from `state`, with memory mapped copy-on-write from `memory_file` (written by
    /// [`Partition::save_memory`]). The configuration must describe the same machine (vCPUs,
    /// memory size); its boot source is ignored.
    pub fn restore(self, state: &PartitionState, memory_file: &File) -> Result<Partition> {
        self.restore_layered(state, memory_file, &[])
    }

    /// Like [`restore`](Self::restore), with memory from a chain of images: `base` (a full
    /// image) and `deltas` in order (images holding only the pages dirtied since the one before,
    /// written by [`Partition::write_memory_pages`]). Each delta's data runs are mapped
    /// copy-on-write over the base, so the cost stays flat in memory size; later saves write
    /// every page any layer has data in.
    pub fn restore_layered(
        self,
        state: &PartitionState,
        base: &File,
        deltas: &[File],
    ) -> Result<Partition> {
        if state.version != STATE_VERSION {
            return Err(Error::StateVersion {
                found: state.version,
                supported: STATE_VERSION,
            });
        }
        self.config.validate(host::max_vcpus()?)?;
        let ranges = ram_ranges(self.config.memory_mib << 20);
        // The firmware tables in the saved memory describe the saved machine's vCPUs and disks.
        if state.memory != ranges
            || state.vcpus.len() != usize::from(self.config.vcpus)
            || state.devices.disks.len() != self.config.disks.len()
            || state.devices.nics.len() != self.config.nics.len()
        {
            return Err(Error::StateMismatch);
        }
        let memory = map_memory_layers(base, deltas, &ranges)?;
        // Memory mapped from the images: a shell built out around memory of its own cannot
        // serve (it is dropped); a bare one can.
        let adopted = self.shell.and_then(|shell| shell.take(None));
        let mut partition = Partition::assemble_with(
            self.config,
            self.extra,
            adopted,
            memory,
            ranges,
            Some(state),
        )?;
        partition.image_layers = std::iter::once(base)
            .chain(deltas)
            .map(|file| file.try_clone().map_err(Error::MemoryFile))
            .collect::<Result<_>>()?;
        for (vcpu, saved) in partition.parked.iter().zip(&state.vcpus) {
            restore_vcpu(&vcpu.fd, saved)?;
        }
        restore_vm(&partition.vm, &state.vm)?;
        Ok(partition)
    }
}

/// One child partition: a KVM VM with its memory, vCPUs and devices.
///
/// A partition is built booted ([`PartitionBuilder::build`]) or restored
/// ([`PartitionBuilder::restore`]), then run with [`resume`](Self::resume) and controlled with
/// [`pause`](Self::pause) / [`resume`](Self::resume) / [`stop`](Self::stop). It ends, on its own or
/// when stopped, with an [`ExitReason`]. While paused (or before the first run) its full state can
/// be captured and its memory saved.
pub struct Partition {
    threads: Option<VcpuThreads>,
    parked: Vec<Vcpu>,
    ctx: Arc<VcpuContext>,
    /// Signalled when the run ends (see [`Partition::stop_event`]).
    stop_event: EventFd,
    run_state: RunState,
    com1: Arc<Uart>,
    com2: Arc<Uart>,
    disks: Vec<AttachedDisk>,
    nics: Vec<Arc<MmioTransport<Net>>>,
    ranges: Vec<RamRange>,
    config: PartitionConfig,
    memory: PartitionMemory,
    /// The memory images a restored partition's memory is mapped from (base first): pages with
    /// data in any of them hold something, though no private page shows it.
    image_layers: Vec<File>,
    // Field order is drop order: every vCPU descriptor (in `threads`/`parked`) is closed before the
    // VM's, so the handle's teardown thread, not the owner, destroys the VM.
    vm: VmHandle,
}

impl std::fmt::Debug for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("run_state", &self.run_state)
            .field("vcpus", &self.config.vcpus)
            .field("memory_mib", &self.config.memory_mib)
            .finish_non_exhaustive()
    }
}

/// A virtio-blk disk on the MMIO bus.
#[derive(Debug)]
struct AttachedDisk {
    transport: Arc<MmioTransport<Block>>,
    changed: Arc<ChangedBlockMap>,
    /// What the device's requests go to; replaced while paused by
    /// [`Partition::replace_disk_backend`].
    slot: Arc<BackendSlot>,
}

/// Opens NIC `index` of `config` (its TAP) and puts it behind a virtio-mmio transport in window
/// `window` (after the disks), served by its own I/O thread: receive and transmit never run on a
/// vCPU thread. Restored from `saved` when given.
fn attach_nic(
    vm: &VmFd,
    memory: &PartitionMemory,
    window: usize,
    nic: &crate::config::NicConfig,
    saved: Option<&NicState>,
) -> Result<Arc<MmioTransport<Net>>> {
    let tap = match &nic.tap {
        Some(tap) => tap.try_clone().map_err(|source| {
            Error::Virtio(crate::devices::virtio::VirtioError::Tap {
                name: tap.name().to_owned(),
                source,
            })
        })?,
        None => Tap::open(&nic.tap_name)?,
    };
    let device = Net::new(tap, nic.mac);
    let (base, gsi) = disk_window(window);
    let interrupt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
    let mut transport = match saved {
        Some(state) => MmioTransport::restore(
            device,
            memory.clone(),
            interrupt,
            &state.transport,
            &state.device,
        )?,
        None => MmioTransport::new(device, memory.clone(), interrupt)?,
    };
    vm.register_irqfd(transport.interrupt(), gsi)
        .map_err(Error::Kvm)?;
    let notify = IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET);
    for (queue, notifier) in transport
        .start_io_thread(format!("net{}", window))?
        .iter()
        .enumerate()
    {
        vm.register_ioevent(notifier, &notify, queue as u32)
            .map_err(Error::Kvm)?;
    }
    // A built partition is created paused: frames wait in the TAP until the first resume.
    transport.set_paused(true);
    if saved.is_some() {
        transport.quiesce();
    }
    Ok(Arc::new(transport))
}

/// MMIO base and GSI of disk `index`.
fn disk_window(index: usize) -> (u64, u32) {
    (
        VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE,
        VIRTIO_IRQ_BASE + index as u32,
    )
}

/// Opens disk `index` of `config` and puts it behind a virtio-mmio transport raising `gsi` (restored
/// from `saved` when given).
fn attach_disk(
    vm: &VmFd,
    memory: &PartitionMemory,
    index: usize,
    disk: &crate::config::DiskConfig,
    saved: Option<&DiskState>,
) -> Result<AttachedDisk> {
    let backend: Arc<dyn BlockBackend> = match &disk.backend {
        Some(backend) => backend.clone(),
        None => Arc::new(RawImage::open(&disk.path, disk.read_only)?),
    };
    let changed = Arc::new(ChangedBlockMap::new(
        backend.size(),
        disk.changed_block_size,
    )?);
    let config = BlockConfig {
        read_only: disk.read_only,
        serial: format!("vmms-disk{index}"),
    };
    let slot = Arc::new(BackendSlot::new(backend));
    let block = Block::new(slot.clone(), config, changed.clone())?;
    let (base, gsi) = disk_window(index);
    let interrupt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
    let mut transport = match saved {
        Some(state) => MmioTransport::restore(
            block,
            memory.clone(),
            interrupt,
            &state.transport,
            &state.device,
        )?,
        None => MmioTransport::new(block, memory.clone(), interrupt)?,
    };
    vm.register_irqfd(transport.interrupt(), gsi)
        .map_err(Error::Kvm)?;
    if disk.io == DiskIo::IoThread {
        // Notifications of queue `n` end in the kernel, which signals the I/O thread's eventfd
        // `n`; any other value written to QueueNotify still exits to the transport.
        let notify = IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET);
        for (queue, notifier) in transport
            .start_io_thread(format!("blk{index}"))?
            .iter()
            .enumerate()
        {
            vm.register_ioevent(notifier, &notify, queue as u32)
                .map_err(Error::Kvm)?;
        }
    }
    if saved.is_some() {
        // Requests made available before the capture whose notification was not served yet.
        transport.quiesce();
    }
    Ok(AttachedDisk {
        transport: Arc::new(transport),
        changed,
        slot,
    })
}

/// Creates the KVM VM for `memory` (or takes `shell`'s, created ahead with its TSS and
/// identity-map addresses set): memory slots, then the in-kernel irqchip and PIT.
///
/// The order keeps every ioctl off SRCU grace periods that an earlier one started. A memory-slot
/// change (`KVM_SET_USER_MEMORY_REGION`) ends by waiting for a grace period on the VM's SRCU
/// (`kvm_swap_active_memslots` → `synchronize_srcu_expedited`). Made right after
/// `KVM_CREATE_VM` that takes 0.1 ms; made after `KVM_CREATE_IRQCHIP` and `KVM_CREATE_PIT2`, whose
/// device registrations leave grace periods in flight, it sleeps 4-12 ms (traced on the test hosts,
/// in steps of the host's tick). So memory goes first, then the devices.
///
/// The order is valid on every x86 KVM, VT-x and SVM included, by the KVM API documentation
/// (`Documentation/virt/kvm/api.rst`): `KVM_SET_USER_MEMORY_REGION` states no order against the
/// irqchip or PIT; `KVM_CREATE_IRQCHIP` "sets up future vcpus to have a local APIC", so it only
/// has to precede `KVM_CREATE_VCPU`; `KVM_CREATE_PIT2` "is only valid after enabling in-kernel
/// irqchip support via KVM_CREATE_IRQCHIP"; the `KVM_SET_TSS_ADDR` region "must not conflict with
/// any memory slot" (it lies in the MMIO gap) and `KVM_SET_IDENTITY_MAP_ADDR` "fails if any VCPU
/// has already been created". crosvm, on Intel and AMD hardware, also registers all guest memory
/// right after `KVM_CREATE_VM` (`KvmVm::new`) and creates the irqchip afterwards. The TSS and
/// identity-map addresses are set in the shell, before the memory slots, as QEMU does (see
/// [`VmShell`]).
pub(crate) fn create_vm(
    bare: Option<VmFd>,
    memory: &PartitionMemory,
    dirty_log: bool,
) -> Result<VmHandle> {
    let bare = match bare {
        Some(vm) => vm,
        None => bare_vm()?,
    };
    let vm = VmHandle::new(bare, memory.clone());
    register_memory(&vm, memory, dirty_log)?;
    vm.create_irq_chip().map_err(Error::Kvm)?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(Error::Kvm)?;
    Ok(vm)
}

/// Creates `count` vCPUs with their CPUID, reset MSRs and local APIC wiring.
pub(crate) fn create_vcpus(vm: &VmFd, count: u8) -> Result<Vec<Vcpu>> {
    let mut vcpus = Vec::with_capacity(usize::from(count));
    for index in 0..count {
        let fd = vm.create_vcpu(u64::from(index)).map_err(Error::Kvm)?;
        fd.set_cpuid2(&vcpu_cpuid(index, count)?)
            .map_err(Error::Kvm)?;
        configure_msrs(&fd)?;
        configure_lapic(&fd)?;
        vcpus.push(Vcpu { fd, index });
    }
    Ok(vcpus)
}

fn irq_eventfd(vm: &VmFd, gsi: u32) -> Result<EventFd> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
    vm.register_irqfd(&evt, gsi).map_err(Error::Kvm)?;
    Ok(evt)
}

impl Partition {
    /// A builder for a partition described by `config`.
    pub fn builder(config: PartitionConfig) -> PartitionBuilder {
        PartitionBuilder {
            config,
            extra: ExtraDevices::default(),
            shell: None,
        }
    }

    /// Builds and boots a partition with no extra devices (see [`PartitionBuilder::build`]).
    pub fn new(config: PartitionConfig) -> Result<Self> {
        Self::builder(config).build()
    }

    /// Creates the VM, its in-kernel devices, memory slots, vCPUs and emulated devices; `saved`
    /// supplies device state on restore.
    fn assemble_with(
        config: PartitionConfig,
        extra: ExtraDevices,
        adopted: Option<Adopted>,
        memory: PartitionMemory,
        ranges: Vec<RamRange>,
        saved: Option<&PartitionState>,
    ) -> Result<Self> {
        let (vm, parked) = match adopted {
            Some(Adopted::BuiltOut(built)) => {
                let BuiltOut { vcpus, vm, .. } = *built;
                (vm, vcpus)
            }
            Some(Adopted::Bare(bare)) => {
                let vm = create_vm(Some(bare), &memory, config.dirty_log)?;
                let parked = create_vcpus(&vm, config.vcpus)?;
                (vm, parked)
            }
            None => {
                let vm = create_vm(None, &memory, config.dirty_log)?;
                let parked = create_vcpus(&vm, config.vcpus)?;
                (vm, parked)
            }
        };

        let stop_event = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        let control = Arc::new(RunControl::notifying(
            stop_event.try_clone().map_err(Error::EventFd)?,
        ));
        let com1_irq = irq_eventfd(&vm, COM1_IRQ)?;
        let com2_irq = irq_eventfd(&vm, COM2_IRQ)?;
        let (com1, com2) = match saved {
            Some(state) => (
                Uart::from_state(&state.devices.com1, com1_irq)?,
                Uart::from_state(&state.devices.com2, com2_irq)?,
            ),
            None => (Uart::new(com1_irq), Uart::new(com2_irq)),
        };
        let com1 = Arc::new(com1);
        let com2 = Arc::new(com2);

        let mut io_bus = Bus::new();
        io_bus.insert(com1.clone(), u64::from(COM1_PORT), UART_PORT_SIZE)?;
        io_bus.insert(com2.clone(), u64::from(COM2_PORT), UART_PORT_SIZE)?;
        io_bus.insert(
            Arc::new(I8042::new(control.clone())),
            u64::from(I8042_DATA_PORT),
            5,
        )?;
        io_bus.insert(Arc::new(Cmos::default()), u64::from(CMOS_PORT), 2)?;
        io_bus.insert(
            Arc::new(PowerControl::new(control.clone())),
            u64::from(PM1A_CONTROL_PORT),
            2,
        )?;
        io_bus.insert(Arc::new(IdlePort), u64::from(IDLE_PORT), 4)?;
        for (base, len, device) in extra.pio {
            io_bus.insert(device, base, len)?;
        }
        let mut mmio_bus = Bus::new();
        let mut disks = Vec::with_capacity(config.disks.len());
        for (index, disk) in config.disks.iter().enumerate() {
            let saved_disk = match saved {
                Some(state) => Some(state.devices.disks.get(index).ok_or(Error::StateMismatch)?),
                None => None,
            };
            let attached = attach_disk(&vm, &memory, index, disk, saved_disk)?;
            mmio_bus.insert(
                attached.transport.clone(),
                disk_window(index).0,
                VIRTIO_MMIO_SIZE,
            )?;
            disks.push(attached);
        }
        let mut nics = Vec::with_capacity(config.nics.len());
        for (index, nic) in config.nics.iter().enumerate() {
            let saved_nic = match saved {
                Some(state) => Some(state.devices.nics.get(index).ok_or(Error::StateMismatch)?),
                None => None,
            };
            let window = config.disks.len() + index;
            let transport = attach_nic(&vm, &memory, window, nic, saved_nic)?;
            mmio_bus.insert(transport.clone(), disk_window(window).0, VIRTIO_MMIO_SIZE)?;
            nics.push(transport);
        }
        for (base, len, device) in extra.mmio {
            mmio_bus.insert(device, base, len)?;
        }

        let ctx = Arc::new(VcpuContext {
            io_bus,
            mmio_bus,
            memory: memory.clone(),
            control,
        });
        Ok(Self {
            threads: None,
            parked,
            ctx,
            stop_event,
            run_state: RunState::Created,
            com1,
            com2,
            disks,
            nics,
            ranges,
            config,
            memory,
            image_layers: Vec::new(),
            vm,
        })
    }

    /// Runs the vCPUs: the first run of a created partition, or the continuation of a paused one.
    pub fn resume(&mut self) -> Result<()> {
        match self.run_state {
            RunState::Created | RunState::Paused => {}
            ref other => {
                return Err(Error::InvalidRunState {
                    operation: "resume",
                    state: format!("{other:?}"),
                });
            }
        }
        let vcpus = std::mem::take(&mut self.parked);
        for nic in &self.nics {
            nic.set_paused(false);
        }
        self.threads = Some(VcpuThreads::spawn(vcpus, &self.ctx)?);
        self.run_state = RunState::Running;
        Ok(())
    }

    /// Kicks every vCPU out of the guest, completes half-done I/O and parks them. If the guest stopped
    /// on its own meanwhile, the partition is [`RunState::Stopped`] instead.
    pub fn pause(&mut self) -> Result<()> {
        let threads = match (&self.run_state, self.threads.take()) {
            (RunState::Running, Some(threads)) => threads,
            (other, threads) => {
                self.threads = threads;
                return Err(Error::InvalidRunState {
                    operation: "pause",
                    state: format!("{other:?}"),
                });
            }
        };
        self.parked = threads.join(&self.ctx, false);
        // With the vCPUs parked nothing new arrives: finish what the guest submitted, so nothing
        // is in flight (or waiting) while the partition is paused and its state captured.
        for disk in &self.disks {
            disk.transport.quiesce();
        }
        // Nothing from the network reaches guest memory while paused; what the guest queued
        // for sending goes out now.
        for nic in &self.nics {
            nic.set_paused(true);
            nic.quiesce();
        }
        self.run_state = match self.ctx.control.exit_reason() {
            Some(reason) => RunState::Stopped(reason),
            None => RunState::Paused,
        };
        Ok(())
    }

    /// Ends the run (from any state) and returns its reason: the guest's own if it stopped first,
    /// [`ExitReason::Stopped`] otherwise.
    pub fn stop(&mut self) -> ExitReason {
        if let RunState::Stopped(reason) = &self.run_state {
            return reason.clone();
        }
        match self.threads.take() {
            Some(threads) => self.parked = threads.join(&self.ctx, true),
            None => self.ctx.control.request_stop(ExitReason::Stopped),
        }
        let reason = self
            .ctx
            .control
            .exit_reason()
            .unwrap_or(ExitReason::Stopped);
        self.run_state = RunState::Stopped(reason.clone());
        reason
    }

    /// Waits until the guest stops on its own (or `timeout` passes: `None` is returned and the
    /// partition keeps running).
    pub fn wait(&mut self, timeout: Option<Duration>) -> Option<ExitReason> {
        if let RunState::Stopped(reason) = &self.run_state {
            return Some(reason.clone());
        }
        if self.run_state != RunState::Running {
            return None;
        }
        self.ctx.control.wait_for_exit(timeout)?;
        Some(self.stop())
    }

    /// A descriptor that becomes readable when the run ends: the guest stopped on its own, or
    /// [`stop`](Self::stop) ended it. An owner polls it next to its other descriptors instead of
    /// waking periodically to call [`wait`](Self::wait); once it is readable, `wait` returns at
    /// once. It stays readable from then on (the partition never reads it), and it is valid for
    /// as long as the partition is.
    pub fn stop_event(&self) -> BorrowedFd<'_> {
        // SAFETY: the eventfd is owned by `self` and stays open for the borrow's lifetime.
        unsafe { BorrowedFd::borrow_raw(self.stop_event.as_raw_fd()) }
    }

    /// Where the partition is in its life.
    pub fn run_state(&self) -> &RunState {
        &self.run_state
    }

    /// The configuration the partition was built from.
    pub fn config(&self) -> &PartitionConfig {
        &self.config
    }

    /// Guest memory (shared; reading it while the partition runs sees live values).
    pub fn memory(&self) -> &PartitionMemory {
        &self.memory
    }

    /// COM1, the console UART.
    pub fn com1(&self) -> &Arc<Uart> {
        &self.com1
    }

    /// COM2, the integration-channel UART.
    pub fn com2(&self) -> &Arc<Uart> {
        &self.com2
    }

    /// The changed-block map of disk `index` (configuration order): every block the guest wrote
    /// since the map was last taken, for incremental backup.
    pub fn changed_blocks(&self, index: usize) -> Option<&Arc<ChangedBlockMap>> {
        self.disks.get(index).map(|d| &d.changed)
    }

    /// The backend disk `index` (configuration order) reads and writes now.
    pub fn disk_backend(&self, index: usize) -> Option<Arc<dyn BlockBackend>> {
        self.disks.get(index).map(|d| d.slot.current())
    }

    /// Points disk `index` at `backend` (named `path`) and returns the backend it replaces, which
    /// the caller flushes and closes. Only while paused (or not yet run): no request is in
    /// flight then, so the guest sees one disk whose later writes go to the new backend. The new
    /// backend must have the same size and read-only flag. The disk's changed-block map goes on
    /// recording across the switch; its saved device state is unaffected.
    pub fn replace_disk_backend(
        &mut self,
        index: usize,
        path: std::path::PathBuf,
        backend: Arc<dyn BlockBackend>,
    ) -> Result<Arc<dyn BlockBackend>> {
        self.require_parked("replace a disk of")?;
        let disk = self
            .disks
            .get(index)
            .ok_or(Error::DiskReplacement { index })?;
        let old = disk
            .slot
            .replace(backend.clone())
            .map_err(|_| Error::DiskReplacement { index })?;
        if let Some(config) = self.config.disks.get_mut(index) {
            config.path = path;
            config.backend = Some(backend);
        }
        Ok(old)
    }

    fn require_parked(&self, operation: &'static str) -> Result<()> {
        match self.run_state {
            RunState::Created | RunState::Paused => Ok(()),
            ref other => Err(Error::InvalidRunState {
                operation,
                state: format!("{other:?}"),
            }),
        }
    }

    /// Captures every vCPU, the irqchip, PIT, clock and devices. The partition must be paused (or
    /// not yet run).
    pub fn capture_state(&self) -> Result<PartitionState> {
        self.require_parked("capture state")?;
        let msr_indices = match self.parked.first() {
            Some(vcpu) => host::msrs_to_save(&vcpu.fd)?,
            None => &[],
        };
        let vcpus = self
            .parked
            .iter()
            .map(|vcpu| capture_vcpu(&vcpu.fd, msr_indices))
            .collect::<Result<Vec<_>>>()?;
        Ok(PartitionState {
            version: STATE_VERSION,
            memory: self.ranges.clone(),
            vcpus,
            vm: capture_vm(&self.vm)?,
            devices: DeviceStates {
                com1: self.com1.state(),
                com2: self.com2.state(),
                disks: self
                    .disks
                    .iter()
                    .map(|d| DiskState {
                        transport: d.transport.state(),
                        device: d.transport.device_state(),
                    })
                    .collect(),
                nics: self
                    .nics
                    .iter()
                    .map(|n| NicState {
                        transport: n.state(),
                        device: n.device_state(),
                    })
                    .collect(),
            },
        })
    }

    /// Writes the memory image to `out` from its current position: RAM ranges in address order,
    /// as long as guest memory, with data only where memory holds some (pages the guest or the
    /// VMM touched, and pages a restored partition's own image had data in) and holes elsewhere,
    /// so saving costs what the guest used. Anything `out` held past its position is dropped. The
    /// partition must be paused (or not yet run). Returns the bytes of data written.
    pub fn save_memory(&self, out: &mut File) -> Result<u64> {
        self.require_parked("save memory")?;
        memory::save_memory(&self.memory, &self.image_layers, out)
    }

    /// Length of a memory image of this partition (the RAM ranges one after another).
    pub fn memory_image_len(&self) -> u64 {
        self.ranges.iter().map(|r| r.len).sum()
    }

    /// The pages that hold something now (see [`save_memory`](Self::save_memory)), in the
    /// dirty log's form. Callable while the guest runs (for a pre-copy).
    pub fn memory_data_pages(&self) -> Result<Vec<DirtyRange>> {
        let runs = memory::pages_with_data(&self.memory, &self.image_layers)?;
        Ok(self
            .ranges
            .iter()
            .zip(&runs)
            .map(|(range, runs)| DirtyRange::from_runs(*range, runs))
            .collect())
    }

    /// Copies `pages` of guest memory into the memory image `out` (at least
    /// [`memory_image_len`](Self::memory_image_len) long) at their image offsets; returns the
    /// bytes written. Callable while the guest runs: a page the guest writes meanwhile may be
    /// copied torn, and the caller copies the pages the dirty log names again once paused (a
    /// pre-copy). Writes nothing else, so an image written with only dirtied pages is a delta
    /// for [`PartitionBuilder::restore_layered`].
    pub fn write_memory_pages(&self, pages: &[DirtyRange], out: &File) -> Result<u64> {
        let runs: Vec<_> = self
            .ranges
            .iter()
            .map(|range| {
                pages
                    .iter()
                    .find(|p| p.range == *range)
                    .map(DirtyRange::runs)
                    .unwrap_or_default()
            })
            .collect();
        memory::write_runs(&self.memory, &runs, out, 0)
    }

    /// Reads and clears the dirty-page log: pages written since the previous call (or since the
    /// partition was built). Needs `dirty_log` in the configuration.
    pub fn read_dirty_log(&self) -> Result<Vec<DirtyRange>> {
        if !self.config.dirty_log {
            return Err(Error::DirtyLogDisabled);
        }
        memory::read_dirty_log(&self.vm, &self.memory)
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        if let Some(threads) = self.threads.take() {
            self.parked = threads.join(&self.ctx, true);
        }
    }
}
