//! A Hyper-V style child partition: one KVM virtual machine.
//!
//! In Hyper-V the hypervisor runs each VM in a child partition and the VM's worker process drives it.
//! This crate is that partition over Linux KVM and the rust-vmm crates: guest memory
//! ([`memory`]), vCPU threads whose exits dispatch through an address-range [`bus`], boot of Linux
//! kernels (bzImage, ELF vmlinux, PVH) with linux-loader, the devices a guest needs (8250 UARTs,
//! i8042 reset, ACPI power-off, RTC, virtio-mmio block), run control (run, pause, resume, stop, each
//! run ending with an [`ExitReason`]) and full state capture and restore ([`state`]).
//!
//! It knows nothing of processes, files or networks beyond what one VM needs: a worker process (see
//! the `worker-manager` crate) owns a `Partition` and decides where its state goes.
//!
//! ```no_run
//! use partition::{KernelImage, Partition, PartitionConfig};
//!
//! let config = PartitionConfig::new(KernelImage::Path("vmlinux".into()), "console=ttyS0");
//! let mut vm = Partition::new(config)?;
//! vm.com1().set_sink(Box::new(std::io::stdout()));
//! vm.resume()?;
//! let reason = vm.wait(None);
//! println!("guest stopped: {reason:?}");
//! # Ok::<(), partition::Error>(())
//! ```

pub mod block;
mod boot;
pub mod bus;
pub mod config;
pub mod devices;
pub mod error;
pub mod exit;
mod host;
pub mod layout;
pub mod memory;
mod partition;
mod shell;
pub mod software_kvm;
pub mod state;
mod teardown;
mod vcpu;

pub use boot::EntryPoint;
pub use config::{
    BootProtocol, BootSource, DiskConfig, DiskIo, KernelImage, NicConfig, PartitionConfig,
};
pub use devices::virtio::MacAddress;
pub use error::{Error, Result};
pub use exit::ExitReason;
pub use host::prepare as prepare_host;
pub use partition::{Partition, PartitionBuilder, RunState};
pub use shell::{VmShape, VmShell};
pub use state::PartitionState;
