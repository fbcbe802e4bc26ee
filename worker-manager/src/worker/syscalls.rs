//! What a confined worker may ask of the kernel: the seccomp allowlist.
//!
//! Built from what a worker was seen to call over a full lifecycle (boot, pause, resume, save,
//! restore, reset, shutdown, console, turn-off; `tests/vmms_confinement.rs` traces one with
//! strace and checks this list against it) after its set-up, i.e. from the first `KVM_RUN` on,
//! plus what a pool worker's set-up calls after it was assigned its VM: a pool worker installs
//! the filter while idle (`confinement::confine_idle`), so that a start does not wait for it.
//! Those set-up calls reach nothing a running worker cannot: other names for file operations it
//! has (`mkdir`, `unlinkat`), Landlock (which can only narrow), the KVM state its
//! reset and restore already set, and a TAP it already holds. Every entry says who needs it.
//! Anything else kills the process (`SECCOMP_RET_KILL_PROCESS`).
//!
//! One filter serves every thread: vCPU threads exist before the filter can be installed, and
//! `SECCOMP_FILTER_FLAG_TSYNC` is the only way to reach them, so the roles share one list.

use std::collections::BTreeMap;

use super::syscall_filter::{ArgMatch, SyscallAction};
use kvm_bindings::{
    KVMIO, kvm_clock_data, kvm_cpuid2, kvm_dirty_log, kvm_fpu, kvm_ioeventfd, kvm_irq_level,
    kvm_irq_routing, kvm_irqchip, kvm_irqfd, kvm_lapic_state, kvm_mp_state, kvm_msr_list, kvm_msrs,
    kvm_pit_config, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_userspace_memory_region,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};

/// Syscalls allowed with any arguments: number, name, why.
pub(crate) const ALLOWED: &[(i64, &str, &str)] = &[
    // Memory: the allocator, thread stacks, a reset's fresh guest memory.
    (libc::SYS_brk, "brk", "allocator"),
    (
        libc::SYS_mmap,
        "mmap",
        "allocator, thread stacks, guest memory of a reset",
    ),
    (
        libc::SYS_munmap,
        "munmap",
        "allocator, thread stacks, guest memory released",
    ),
    (libc::SYS_mprotect, "mprotect", "thread stack guard pages"),
    (libc::SYS_madvise, "madvise", "allocator"),
    // Threads: creation is clone with CLONE_THREAD only (see `thread_rules`).
    (libc::SYS_futex, "futex", "locks and condition variables"),
    (
        libc::SYS_set_robust_list,
        "set_robust_list",
        "new threads (glibc)",
    ),
    (libc::SYS_rseq, "rseq", "new threads (glibc)"),
    (
        libc::SYS_sigaltstack,
        "sigaltstack",
        "new threads (std's stack-overflow guard)",
    ),
    (
        libc::SYS_sched_getaffinity,
        "sched_getaffinity",
        "std::thread::available_parallelism",
    ),
    (libc::SYS_sched_yield, "sched_yield", "spinning locks"),
    (libc::SYS_gettid, "gettid", "thread ids"),
    (libc::SYS_getpid, "getpid", "status reports, pid checks"),
    (libc::SYS_exit, "exit", "threads ending"),
    (libc::SYS_exit_group, "exit_group", "the worker ending"),
    // Signals: the vCPU kick (tgkill of our own threads) and its handler.
    (libc::SYS_rt_sigaction, "rt_sigaction", "vCPU kick handler"),
    (
        libc::SYS_rt_sigprocmask,
        "rt_sigprocmask",
        "threads' signal masks",
    ),
    (
        libc::SYS_rt_sigreturn,
        "rt_sigreturn",
        "returning from the kick handler",
    ),
    (
        libc::SYS_restart_syscall,
        "restart_syscall",
        "a sleep resumed after SIGSTOP/SIGCONT",
    ),
    (
        libc::SYS_tgkill,
        "tgkill",
        "kicking vCPU threads out of KVM_RUN",
    ),
    // Time.
    (
        libc::SYS_clock_gettime,
        "clock_gettime",
        "timeouts (usually vDSO)",
    ),
    (libc::SYS_clock_nanosleep, "clock_nanosleep", "sleeps"),
    (libc::SYS_nanosleep, "nanosleep", "sleeps"),
    // Files: saving state and memory, the disks, tidying the runtime folder. Landlock limits
    // which paths these reach.
    (
        libc::SYS_openat,
        "openat",
        "saved-state files, /proc/self/status, /dev/kvm on reset",
    ),
    (libc::SYS_close, "close", "every descriptor"),
    (libc::SYS_read, "read", "sockets, files, eventfds"),
    (
        libc::SYS_write,
        "write",
        "sockets, files, the log, eventfds",
    ),
    (libc::SYS_writev, "writev", "the log"),
    (libc::SYS_pread64, "pread64", "virtio-blk reads"),
    (
        libc::SYS_pwrite64,
        "pwrite64",
        "virtio-blk writes, memory image",
    ),
    (libc::SYS_preadv, "preadv", "virtio-blk reads"),
    (libc::SYS_pwritev, "pwritev", "virtio-blk writes"),
    (libc::SYS_lseek, "lseek", "memory image"),
    (libc::SYS_fsync, "fsync", "saved state durability"),
    (
        libc::SYS_flock,
        "flock",
        "a running checkpoint's staging folder, held until it is committed",
    ),
    (libc::SYS_fdatasync, "fdatasync", "virtio-blk flush"),
    (libc::SYS_ftruncate, "ftruncate", "memory image size"),
    (libc::SYS_fallocate, "fallocate", "memory image holes"),
    (libc::SYS_newfstatat, "newfstatat", "metadata"),
    (libc::SYS_statx, "statx", "metadata"),
    (libc::SYS_fstat, "fstat", "metadata"),
    (
        libc::SYS_fstatfs,
        "fstatfs",
        "imago opening a checkpoint's new overlay",
    ),
    (
        libc::SYS_getdents64,
        "getdents64",
        "syncing and removing folders",
    ),
    (libc::SYS_rename, "rename", "committing the saved state"),
    (
        libc::SYS_linkat,
        "linkat",
        "a delta checkpoint links its parent's memory layers",
    ),
    (libc::SYS_renameat, "renameat", "committing the saved state"),
    (
        libc::SYS_mkdir,
        "mkdir",
        "a pool worker's runtime folder, made if the launcher has not yet",
    ),
    (
        libc::SYS_unlinkat,
        "unlinkat",
        "a pool worker consuming the saved state it restored",
    ),
    (
        libc::SYS_geteuid,
        "geteuid",
        "a pool worker checking its runtime folder's owner",
    ),
    (
        libc::SYS_landlock_add_rule,
        "landlock_add_rule",
        "a pool worker's Landlock rules for its VM",
    ),
    (
        libc::SYS_landlock_restrict_self,
        "landlock_restrict_self",
        "a pool worker confining itself to its VM's files",
    ),
    (
        libc::SYS_unlink,
        "unlink",
        "removing the runtime files on exit",
    ),
    (
        libc::SYS_rmdir,
        "rmdir",
        "removing the runtime folder on exit",
    ),
    (libc::SYS_fcntl, "fcntl", "descriptor flags"),
    (libc::SYS_dup, "dup", "descriptor copies"),
    (
        libc::SYS_eventfd2,
        "eventfd2",
        "cancellation and notification eventfds",
    ),
    (libc::SYS_getrandom, "getrandom", "hash map seeds"),
    // Polling.
    (libc::SYS_poll, "poll", "waiting on descriptors"),
    (libc::SYS_ppoll, "ppoll", "waiting on descriptors"),
    (
        libc::SYS_epoll_create1,
        "epoll_create1",
        "waiting on descriptors",
    ),
    (libc::SYS_epoll_ctl, "epoll_ctl", "waiting on descriptors"),
    (libc::SYS_epoll_wait, "epoll_wait", "waiting on descriptors"),
    (
        libc::SYS_epoll_pwait,
        "epoll_pwait",
        "waiting on descriptors",
    ),
    // The already bound control and console sockets: accepting and talking, never creating.
    (
        libc::SYS_accept4,
        "accept4",
        "control and console connections",
    ),
    (
        libc::SYS_recvfrom,
        "recvfrom",
        "control and console connections",
    ),
    (
        libc::SYS_sendto,
        "sendto",
        "control and console connections",
    ),
    (
        libc::SYS_recvmsg,
        "recvmsg",
        "control and console connections",
    ),
    (
        libc::SYS_sendmsg,
        "sendmsg",
        "control and console connections",
    ),
    (libc::SYS_setsockopt, "setsockopt", "connection timeouts"),
    (libc::SYS_getsockopt, "getsockopt", "connection state"),
    (libc::SYS_shutdown, "shutdown", "closing connections"),
    // Resource reads (rlimits are set before the filter).
    (
        libc::SYS_prlimit64,
        "prlimit64",
        "std reads the stack limit for new threads",
    ),
];

// The request numbers of linux/kvm.h, computed the way the kernel headers do (kvm-ioctls keeps
// its own private).
vmm_sys_util::ioctl_io_nr!(KVM_GET_API_VERSION, KVMIO, 0x00);
vmm_sys_util::ioctl_io_nr!(KVM_CREATE_VM, KVMIO, 0x01);
vmm_sys_util::ioctl_iowr_nr!(KVM_GET_MSR_INDEX_LIST, KVMIO, 0x02, kvm_msr_list);
vmm_sys_util::ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
vmm_sys_util::ioctl_io_nr!(KVM_GET_VCPU_MMAP_SIZE, KVMIO, 0x04);
vmm_sys_util::ioctl_iowr_nr!(KVM_GET_SUPPORTED_CPUID, KVMIO, 0x05, kvm_cpuid2);
vmm_sys_util::ioctl_io_nr!(KVM_CREATE_VCPU, KVMIO, 0x41);
vmm_sys_util::ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
vmm_sys_util::ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_userspace_memory_region
);
vmm_sys_util::ioctl_io_nr!(KVM_SET_TSS_ADDR, KVMIO, 0x47);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_IDENTITY_MAP_ADDR, KVMIO, 0x48, u64);
vmm_sys_util::ioctl_io_nr!(KVM_CREATE_IRQCHIP, KVMIO, 0x60);
vmm_sys_util::ioctl_iow_nr!(KVM_IRQ_LINE, KVMIO, 0x61, kvm_irq_level);
vmm_sys_util::ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
vmm_sys_util::ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
vmm_sys_util::ioctl_iow_nr!(KVM_CREATE_PIT2, KVMIO, 0x77, kvm_pit_config);
vmm_sys_util::ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
vmm_sys_util::ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
vmm_sys_util::ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_FPU, KVMIO, 0x8d, kvm_fpu);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_LAPIC, KVMIO, 0x8f, kvm_lapic_state);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_CPUID2, KVMIO, 0x90, kvm_cpuid2);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
vmm_sys_util::ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
// linux/kvm.h declares KVM_SET_IRQCHIP with _IOR, and the number carries that.
vmm_sys_util::ioctl_ior_nr!(KVM_SET_IRQCHIP, KVMIO, 0x63, kvm_irqchip);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_CLOCK, KVMIO, 0x7b, kvm_clock_data);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_PIT2, KVMIO, 0xa0, kvm_pit_state2);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_MP_STATE, KVMIO, 0x99, kvm_mp_state);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_XSAVE, KVMIO, 0xa5, kvm_xsave);
vmm_sys_util::ioctl_iow_nr!(KVM_SET_XCRS, KVMIO, 0xa7, kvm_xcrs);

/// KVM ioctls the worker issues from its first `KVM_RUN` on — the run loop, state capture,
/// dirty logging, and a reset that builds a fresh VM in the same process — and those with which
/// a pool worker, filtered while idle, restores a saved state into its own VM
/// (`KVM_SET_XSAVE`, `KVM_SET_IRQCHIP`, …), with their linux/kvm.h names.
fn kvm_ioctls() -> [(std::os::raw::c_ulong, &'static str); 42] {
    macro_rules! named {
        ($($name:ident),* $(,)?) => { [$(($name(), stringify!($name))),*] };
    }
    named![
        KVM_RUN,
        KVM_GET_API_VERSION,
        KVM_CHECK_EXTENSION,
        KVM_GET_VCPU_MMAP_SIZE,
        KVM_GET_SUPPORTED_CPUID,
        KVM_GET_MSR_INDEX_LIST,
        KVM_CREATE_VM,
        KVM_CREATE_VCPU,
        KVM_CREATE_IRQCHIP,
        KVM_CREATE_PIT2,
        KVM_SET_TSS_ADDR,
        KVM_SET_IDENTITY_MAP_ADDR,
        KVM_SET_USER_MEMORY_REGION,
        KVM_SET_GSI_ROUTING,
        KVM_IRQ_LINE,
        KVM_IRQFD,
        KVM_IOEVENTFD,
        KVM_GET_DIRTY_LOG,
        KVM_SET_CPUID2,
        KVM_GET_REGS,
        KVM_SET_REGS,
        KVM_GET_SREGS,
        KVM_SET_SREGS,
        KVM_SET_FPU,
        KVM_GET_XSAVE,
        KVM_GET_XCRS,
        KVM_GET_MSRS,
        KVM_SET_MSRS,
        KVM_GET_LAPIC,
        KVM_SET_LAPIC,
        KVM_GET_VCPU_EVENTS,
        KVM_GET_MP_STATE,
        KVM_GET_IRQCHIP,
        KVM_GET_PIT2,
        KVM_GET_CLOCK,
        KVM_SET_IRQCHIP,
        KVM_SET_CLOCK,
        KVM_SET_PIT2,
        KVM_SET_MP_STATE,
        KVM_SET_VCPU_EVENTS,
        KVM_SET_XSAVE,
        KVM_SET_XCRS,
    ]
}

/// `TUNSETOFFLOAD` (`_IOW('T', 208, unsigned int)`): a NIC's driver negotiating its offloads
/// (virtio-net activation and reset) tells the TAP which ones the guest takes.
const TUNSETOFFLOAD: u64 = 0x4004_54d0;

/// `TUNSETIFF` (`_IOW('T', 202, int)`): a pool worker, filtered while idle, attaching its TAP.
/// On a descriptor that is attached already it fails; opening `/dev/net/tun` for another is
/// Landlock's to refuse once the worker runs.
const TUNSETIFF: u64 = 0x4004_54ca;

/// `TUNSETVNETHDRSZ` (`_IOW('T', 216, int)`): the virtio-net header size of a TAP being attached.
const TUNSETVNETHDRSZ: u64 = 0x4004_54d8;

/// Non-KVM ioctls: `FIONBIO` (std's `set_nonblocking`), `FIOCLEX` and the TAP's.
const OTHER_IOCTLS: &[u64] = &[
    libc::FIONBIO,
    libc::FIOCLEX,
    TUNSETOFFLOAD,
    TUNSETIFF,
    TUNSETVNETHDRSZ,
];

/// Everything the allowlist lets a confined worker call, by name: syscalls as the kernel and
/// strace name them, and `ioctl` requests by their linux/kvm.h names. For tests and audits.
pub fn allowlist_names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = ALLOWED.iter().map(|&(_, name, _)| name).collect();
    names.extend(["ioctl", "clone", "clone3", "prctl"]);
    names.extend(kvm_ioctls().iter().map(|&(_, name)| name));
    names.extend([
        "FIONBIO",
        "FIOCLEX",
        "TUNSETOFFLOAD",
        "TUNSETIFF",
        "TUNSETVNETHDRSZ",
    ]);
    names.sort_unstable();
    names
}

/// Entries of the allowlist that one lifecycle of the test guest need not call, and why they
/// are there anyway. The confinement test checks the allowlist holds nothing beyond what a
/// traced lifecycle called plus this margin.
pub const ALLOWANCE_MARGIN: &[(&str, &str)] = &[
    (
        "clone3",
        "answered ENOSYS (glibc then creates threads with clone, whose flags are checked)",
    ),
    (
        "clock_gettime",
        "normally served by the vDSO without a syscall",
    ),
    ("sched_yield", "contended spin locks"),
    ("nanosleep", "sleeps on older glibc"),
    ("writev", "vectored log writes"),
    (
        "preadv",
        "vectored virtio-blk reads (multi-segment requests)",
    ),
    (
        "pwritev",
        "vectored virtio-blk writes (multi-segment requests)",
    ),
    (
        "pread64",
        "virtio-blk reads (the test guest's workload only writes)",
    ),
    (
        "pwrite64",
        "virtio-blk writes (lifecycles without a disk workload)",
    ),
    ("lseek", "memory image positioning"),
    ("fdatasync", "virtio-blk flush requests"),
    (
        "fsync",
        "saved-state durability (lifecycles without a save)",
    ),
    ("ftruncate", "memory image size"),
    ("fallocate", "memory image holes"),
    (
        "linkat",
        "delta checkpoints (lifecycles without a running checkpoint)",
    ),
    (
        "fstatfs",
        "imago opening a checkpoint's overlay (lifecycles without a running checkpoint)",
    ),
    (
        "flock",
        "a running checkpoint's staging folder (lifecycles without a running checkpoint)",
    ),
    ("fstat", "metadata on older glibc"),
    ("newfstatat", "metadata"),
    ("dup", "descriptor copies"),
    ("eventfd2", "eventfds made after set-up"),
    ("getrandom", "hash map seeds made after set-up"),
    (
        "TUNSETOFFLOAD",
        "a network adapter's driver negotiating offloads (VMs without a NIC)",
    ),
    (
        "poll",
        "waiting on descriptors (event loops that wait on more than one)",
    ),
    ("ppoll", "polling on other libcs"),
    ("epoll_create1", "event loops of the data-path threads"),
    ("epoll_ctl", "event loops of the data-path threads"),
    ("epoll_wait", "event loops of the data-path threads"),
    ("epoll_pwait", "event loops of the data-path threads"),
    ("recvmsg", "sockets read with ancillary data"),
    ("sendmsg", "sockets written with ancillary data"),
    ("getsockopt", "socket state"),
    ("renameat", "renames on other libcs"),
    (
        "rename",
        "committing a saved state (lifecycles without a save)",
    ),
    ("rmdir", "removing an empty folder"),
    ("unlink", "removing a runtime file"),
    ("restart_syscall", "a sleep resumed after SIGSTOP/SIGCONT"),
    ("sched_getaffinity", "std::thread::available_parallelism"),
    ("prlimit64", "std reads the stack limit for new threads"),
    ("FIONBIO", "std's set_nonblocking"),
    ("FIOCLEX", "std's set_cloexec"),
    ("KVM_GET_API_VERSION", "a reset that opens /dev/kvm again"),
    (
        "KVM_CHECK_EXTENSION",
        "a reset in a process that had not asked KVM its facts yet",
    ),
    (
        "KVM_GET_SUPPORTED_CPUID",
        "a reset in a process that had not asked KVM its facts yet",
    ),
    (
        "shutdown",
        "closing a connection whose peer is still writing",
    ),
    (
        "KVM_SET_GSI_ROUTING",
        "interrupt routing of later device models",
    ),
    (
        "KVM_IRQ_LINE",
        "edge interrupts of devices without an irqfd",
    ),
    ("KVM_IRQFD", "completion interrupts of the data path"),
    ("KVM_IOEVENTFD", "queue notifications of the data path"),
    ("KVM_GET_DIRTY_LOG", "incremental checkpoints and backups"),
    ("KVM_SET_IDENTITY_MAP_ADDR", "a reset's VM set-up on VT-x"),
    // A pool worker's set-up after its assignment, under the filter it installed while idle.
    ("mkdir", "a pool worker making its runtime folder"),
    ("unlinkat", "a pool worker consuming its restored state"),
    ("geteuid", "a pool worker checking its runtime folder"),
    ("landlock_add_rule", "a pool worker's Landlock rules"),
    ("landlock_restrict_self", "a pool worker's Landlock domain"),
    ("KVM_SET_IRQCHIP", "a pool worker restoring a saved state"),
    ("KVM_SET_CLOCK", "a pool worker restoring a saved state"),
    ("KVM_SET_PIT2", "a pool worker restoring a saved state"),
    ("KVM_SET_MP_STATE", "a pool worker restoring a saved state"),
    (
        "KVM_SET_VCPU_EVENTS",
        "a pool worker restoring a saved state",
    ),
    ("KVM_SET_XSAVE", "a pool worker restoring a saved state"),
    ("KVM_SET_XCRS", "a pool worker restoring a saved state"),
    ("TUNSETIFF", "a pool worker attaching its TAP"),
    ("TUNSETVNETHDRSZ", "a pool worker attaching its TAP"),
];

/// The allowlist as the filter's policy: anything not listed kills the process.
pub(crate) fn allowlist() -> BTreeMap<i64, SyscallAction> {
    let mut list: BTreeMap<i64, SyscallAction> = ALLOWED
        .iter()
        .map(|&(syscall, _, _)| (syscall, SyscallAction::Allow))
        .collect();
    list.insert(libc::SYS_ioctl, SyscallAction::AllowIfAny(ioctl_rules()));
    // `clone` only for threads: `CLONE_THREAD` set, so no new process can ever be made.
    let thread = libc::CLONE_THREAD as u64;
    list.insert(
        libc::SYS_clone,
        SyscallAction::AllowIfAny(vec![ArgMatch::masked_eq(0, thread, thread)]),
    );
    // Naming a new thread (std names vCPU, control and console threads), and no new privileges
    // (Landlock sets it again for a pool worker; the kernel only ever lets it be set).
    list.insert(
        libc::SYS_prctl,
        SyscallAction::AllowIfAny(vec![
            ArgMatch::low_eq(0, libc::PR_SET_NAME as u64),
            ArgMatch::low_eq(0, libc::PR_SET_NO_NEW_PRIVS as u64),
        ]),
    );
    // clone3's flags live in memory seccomp cannot read: it fails with ENOSYS, and glibc then
    // falls back to clone, whose flags are checked.
    list.insert(libc::SYS_clone3, SyscallAction::Errno(libc::ENOSYS as u16));
    list
}

fn ioctl_rules() -> Vec<ArgMatch> {
    kvm_ioctls()
        .into_iter()
        .map(|(request, _)| u64::from(request as u32))
        .chain(OTHER_IOCTLS.iter().copied())
        .map(|request| ArgMatch::low_eq(1, request))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::syscall_filter::{self, ALLOW, KILL_PROCESS, Verdict};

    const X86_64: u32 = 0xc000_003e;

    fn verdict(nr: i64, args: [u64; 6]) -> Verdict {
        let program = syscall_filter::compile(&allowlist()).unwrap();
        syscall_filter::run(&program, X86_64, nr as u32, &args).0
    }

    #[test]
    fn kvm_run_is_allowed_and_other_ioctls_kill() {
        let tiocsti = 0x5412;

        assert_eq!(verdict(libc::SYS_ioctl, [5, KVM_RUN(), 0, 0, 0, 0]), ALLOW);
        assert_eq!(
            verdict(libc::SYS_ioctl, [5, tiocsti, 0, 0, 0, 0]),
            KILL_PROCESS
        );
    }

    #[test]
    fn clone_is_allowed_for_threads_only() {
        let thread = (libc::CLONE_VM | libc::CLONE_THREAD | libc::CLONE_SIGHAND) as u64;
        let process = libc::SIGCHLD as u64;

        assert_eq!(verdict(libc::SYS_clone, [thread, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(
            verdict(libc::SYS_clone, [process, 0, 0, 0, 0, 0]),
            KILL_PROCESS
        );
    }

    #[test]
    fn clone3_fails_with_enosys() {
        let enosys = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;

        assert_eq!(verdict(libc::SYS_clone3, [0; 6]), enosys);
    }

    #[test]
    fn prctl_only_names_threads_and_sets_no_new_privileges() {
        let name = libc::PR_SET_NAME as u64;
        let no_new_privs = libc::PR_SET_NO_NEW_PRIVS as u64;
        let dumpable = libc::PR_SET_DUMPABLE as u64;

        assert_eq!(verdict(libc::SYS_prctl, [name, 0, 0, 0, 0, 0]), ALLOW);
        assert_eq!(
            verdict(libc::SYS_prctl, [no_new_privs, 1, 0, 0, 0, 0]),
            ALLOW
        );
        assert_eq!(
            verdict(libc::SYS_prctl, [dumpable, 1, 0, 0, 0, 0]),
            KILL_PROCESS
        );
    }

    #[test]
    fn every_allowed_syscall_passes_with_any_arguments() {
        for &(nr, name, _) in ALLOWED {
            assert_eq!(verdict(nr, [u64::MAX; 6]), ALLOW, "{name}");
        }
    }

    #[test]
    fn process_creation_exec_and_sockets_kill() {
        for nr in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_bind,
            libc::SYS_ptrace,
            libc::SYS_kill,
            // Landlock does not cover modes and owners.
            libc::SYS_chmod,
            libc::SYS_fchmodat,
            libc::SYS_chown,
        ] {
            assert_eq!(verdict(nr, [0; 6]), KILL_PROCESS, "syscall {nr}");
        }
    }

    #[test]
    fn kvm_request_numbers_match_the_kernel_headers() {
        // Values from linux/kvm.h as compiled for x86_64.
        assert_eq!(KVM_RUN(), 0xae80);
        assert_eq!(KVM_SET_USER_MEMORY_REGION(), 0x4020_ae46);
        assert_eq!(KVM_GET_REGS(), 0x8090_ae81);
        assert_eq!(KVM_GET_SUPPORTED_CPUID(), 0xc008_ae05);
        assert_eq!(KVM_SET_IRQCHIP(), 0x8208_ae63);
        assert_eq!(KVM_SET_XSAVE(), 0x5000_aea5);
        assert_eq!(KVM_SET_VCPU_EVENTS(), 0x4040_aea0);
    }
}
