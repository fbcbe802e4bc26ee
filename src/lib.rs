//! vmms: the management half of Microsoft Hyper-V — VMMS and the modules around it — rebuilt as
//! embeddable Rust crates over Linux KVM and the rust-vmm crates.
//!
//! This facade re-exports the member crates so an integrator can depend on one crate and reach every
//! module by its Hyper-V role. Each member also stands alone; depend on it directly to take only what
//! you need.
//!
//! | module | Hyper-V module it rebuilds |
//! |---|---|
//! | [`partition`] | child partitions: one KVM VM with its memory, vCPUs, devices and state |
//! | [`core`] | VMMS: the VM catalog, the EnabledState machine, jobs and events |
//! | [`worker_manager`] | the Worker Process Manager: a worker process (`vmwp.exe`) per running VM, its control protocol, supervision and re-attach |
//! | [`snapshot`] | the Snapshot Manager: checkpoint trees, qcow2 disks with backing chains, offline checkpoint operations |
//! | [`guest`] | the test guest embedded as the default boot image |
//! | [`cluster`] | Cluster Resource Control (HVCLUSRES.DLL): the resource contract, ownership and failover on etcd, the OCF agent |
//! | [`wmi`] | the WMI provider (`root/virtualization/v2`): the Msvm_* model, WQL and a CIM-XML endpoint |

pub use cluster_resource as cluster;
pub use partition;
pub use snapshot;
pub use vmm_core as core;
pub use vmms_guest as guest;
pub use wmi_model as wmi;
pub use worker_manager;
