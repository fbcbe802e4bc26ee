//! Slow tier: a real Linux 6.1 kernel (built by `scripts/guest-image.sh`) boots through each of our
//! entry paths — bzImage, ELF vmlinux (64-bit boot protocol) and the PVH entry — and Linux's own
//! virtio-blk driver finds our disk with its exact capacity and partition table.
//!
//! The ELF and PVH boots run on two vCPUs: the kernel finds the RSDP through the zero page or the
//! PVH start info, lists our ACPI tables, takes its CPUs from the MADT and brings the second one up
//! with INIT/SIPI ("smp: Brought up 1 node, 2 CPUs"), on hardware KVM and on this host's software
//! KVM alike (there only because the partition hides KVM's hypercall-based PV features, whose
//! `vmcall` never returns under kvm_pvm).
//!
//! The 1-vCPU boots (bzImage, ELF vmlinux and PVH) use the image's uniprocessor kernel and go on,
//! on every host, to the virtio disk and `Run /init`: they are the check that Linux's own
//! virtio-blk driver accepts our device. They do not use the SMP + ACPI kernel because on a
//! software KVM (kvm_pvm) that kernel stalls or crawls after its CPUs are up (see
//! `whole_boot_reachable` and scripts/guest-image/smp.fragment), with any of the clock and timer
//! command-line options tried, while the uniprocessor kernel reaches init in about a minute.
//!
//! The 2-vCPU boots use the SMP + ACPI kernel; on hardware KVM they too go on to the disk and
//! `Run /init`, on a software KVM they end once every CPU is up. Without the image the tests skip,
//! except under CI where a missing image means the set-up step failed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Capture;
use kvm_bindings::KVM_MP_STATE_UNINITIALIZED;
use partition::{
    BootProtocol, DiskConfig, Error, KernelImage, MacAddress, NicConfig, Partition,
    PartitionConfig, software_kvm,
};

/// Longest time any marker may take to appear after the previous one.
const MARKER_TIMEOUT: Duration = Duration::from_secs(240);

struct GuestImage {
    manifest: HashMap<String, String>,
}

impl GuestImage {
    /// The image the script built, or `None` (with the reason printed) when there is none.
    fn find() -> Option<Self> {
        let dir = match std::env::var_os("VMMS_GUEST_IMAGE_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => {
                let script =
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/guest-image.sh");
                let out = std::process::Command::new(script)
                    .arg("--print-dir")
                    .output()
                    .ok()?;
                PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
            }
        };
        let manifest = match std::fs::read_to_string(dir.join("manifest.env")) {
            Ok(text) => text,
            Err(_) => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "CI must build the guest image first: scripts/guest-image.sh"
                );
                eprintln!(
                    "skipped: no Linux guest image in {} (run scripts/guest-image.sh)",
                    dir.display()
                );
                return None;
            }
        };
        let manifest = manifest
            .lines()
            .filter_map(|line| line.split_once('='))
            .filter(|(key, _)| !key.starts_with('#'))
            .map(|(key, value)| {
                (
                    key.trim().to_owned(),
                    value.trim().trim_matches('"').to_owned(),
                )
            })
            .collect();
        Some(Self { manifest })
    }

    fn get(&self, key: &str) -> &str {
        self.manifest
            .get(key)
            .unwrap_or_else(|| panic!("manifest.env has no {key}"))
    }

    fn path(&self, key: &str) -> PathBuf {
        PathBuf::from(self.get(key))
    }
}

/// How long a software KVM gets to bring the application processor up before the test looks at
/// what the kernel's INIT/SIPI did instead.
const AP_BRINGUP_WAIT: Duration = Duration::from_secs(90);

/// Builds and starts `kernel` on `vcpus` vCPUs with the image's initramfs and a private copy of its
/// disk; returns the partition, its serial log, the disk's folder and when it started.
fn start(
    image: &GuestImage,
    kernel: &str,
    protocol: BootProtocol,
    vcpus: u8,
) -> (Partition, Capture, tempfile::TempDir, Instant) {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.img");
    std::fs::copy(image.path("DISK"), &disk).unwrap();
    let mut config = PartitionConfig::new(
        KernelImage::Path(image.path(kernel)),
        image.get("CMDLINE_ALWAYS"),
    );
    config.boot.initrd = Some(image.path("INITRAMFS"));
    config.boot.protocol = protocol;
    config.memory_mib = 128;
    config.vcpus = vcpus;
    config.disks.push(DiskConfig::new(&disk));
    let out = Capture::default();
    let mut vm = Partition::new(config).unwrap();
    vm.com1().set_sink(Box::new(out.clone()));
    let started = Instant::now();
    vm.resume().unwrap();
    (vm, out, dir, started)
}

/// Waits for each marker in order from `at`, printing when each appeared (since the guest's log
/// began); returns where the last one ended.
fn expect_in_order(
    out: &Capture,
    markers: &[String],
    mut at: usize,
    label: &str,
    start: Instant,
) -> usize {
    for marker in markers {
        at = out.wait_for(marker, at, MARKER_TIMEOUT);
        eprintln!(
            "{label}: {marker:?} after {:.1} s",
            start.elapsed().as_secs_f64()
        );
    }
    at
}

/// The disk and init markers every boot of the uniprocessor kernel reaches (and, on hardware KVM,
/// every boot of the SMP one).
fn disk_and_init_markers(image: &GuestImage) -> Vec<String> {
    vec![
        format!(
            "[vda] {} 512-byte logical blocks",
            image.get("DISK_SECTORS")
        ),
        " vda: vda1 vda2".to_owned(),
        "Run /init as init process".to_owned(),
    ]
}

/// Whether the whole boot (disk and init markers) of the SMP + ACPI kernel can be waited for here.
/// On a software KVM (kvm_pvm) it stalls after its CPUs are up: with kvm-clock at the switch of
/// clocksource ("Switched to clocksource kvm-clock" never comes), and with `no-kvmclock` (alone,
/// with `noapictimer`, or with `clocksource=tsc tsc=reliable`) it gets at best through the
/// initramfs but far too slowly to reach virtio-blk within the marker timeout; so there the SMP
/// tests end once every CPU is up (the 1-vCPU boots of the uniprocessor kernel check the disk).
fn whole_boot_reachable() -> bool {
    !software_kvm::is_software_kvm()
}

/// Boots the uniprocessor `kernel` on one vCPU: on every host it must find the disk with its exact
/// capacity and partition table and run init.
fn boot_to_init(image: &GuestImage, kernel: &str, protocol: BootProtocol) {
    let (mut vm, out, _dir, started) = start(image, kernel, protocol, 1);
    let label = format!("{kernel} ({protocol:?}, 1 vCPU)");
    let mut markers = vec![format!("Linux version {}", image.get("KERNEL_VERSION"))];
    markers.extend(disk_and_init_markers(image));
    expect_in_order(&out, &markers, 0, &label, started);
    vm.stop();
}

/// Whether `needle` appears after `from` within `timeout` (no panic when it does not).
fn appears_within(out: &Capture, needle: &str, from: usize, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if out.text().get(from..).is_some_and(|t| t.contains(needle)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Boots `kernel` on two vCPUs: the kernel must list our ACPI tables, take its CPUs from the MADT
/// and bring the second one up. On hardware KVM the boot then goes on to the disk and init
/// markers. Should a software KVM not get the application processor through the kernel's
/// trampoline, the test shows at least that the INIT/SIPI reached the second vCPU.
fn boot_two_vcpus(image: &GuestImage, kernel: &str, protocol: BootProtocol) {
    let (mut vm, out, _dir, started) = start(image, kernel, protocol, 2);
    let label = format!("{kernel} ({protocol:?}, 2 vCPUs)");
    let markers = [
        format!("Linux version {}", image.get("KERNEL_VERSION")),
        "ACPI: RSDP 0x00000000000E0000".to_owned(),
        "ACPI: XSDT 0x".to_owned(),
        "ACPI: FACP 0x".to_owned(),
        "ACPI: DSDT 0x".to_owned(),
        "ACPI: APIC 0x".to_owned(),
        "ACPI: INT_SRC_OVR (bus 0 bus_irq 9 global_irq 9 high level)".to_owned(),
        "ACPI: Using ACPI (MADT) for SMP configuration information".to_owned(),
        "smpboot: Allowing 2 CPUs, 0 hotplug CPUs".to_owned(),
        "x86: Booting SMP configuration:".to_owned(),
    ];
    let at = expect_in_order(&out, &markers, 0, &label, started);
    let all_up = "smp: Brought up 1 node, 2 CPUs";
    if software_kvm::is_software_kvm() && !appears_within(&out, all_up, at, AP_BRINGUP_WAIT) {
        vm.pause().unwrap();
        let state = vm.capture_state().unwrap();
        for (index, cpu) in state.vcpus.iter().enumerate() {
            eprintln!(
                "{label}: vCPU {index} mp_state {}, cs {:#x} (base {:#x}), rip {:#x}, cr0 {:#x}",
                cpu.mp_state.mp_state,
                cpu.sregs.cs.selector,
                cpu.sregs.cs.base,
                cpu.regs.rip,
                cpu.sregs.cr0
            );
        }
        assert_ne!(
            state.vcpus[1].mp_state.mp_state, KVM_MP_STATE_UNINITIALIZED,
            "the second vCPU never received INIT/SIPI"
        );
        eprintln!(
            "{label}: software KVM: the kernel found both CPUs and sent INIT/SIPI, which reached \
             vCPU 1, but \"{all_up}\" did not appear within {AP_BRINGUP_WAIT:?}; log:\n{}",
            out.text()
        );
        vm.stop();
        return;
    }
    let mut rest = vec![
        all_up.to_owned(),
        "smpboot: Total of 2 processors activated".to_owned(),
    ];
    if whole_boot_reachable() {
        rest.extend(disk_and_init_markers(image));
    }
    expect_in_order(&out, &rest, at, &label, started);
    vm.stop();
}

#[test]
fn linux_bzimage_boots_to_init_and_finds_our_virtio_disk() {
    require_kvm!();
    let Some(image) = GuestImage::find() else {
        return;
    };

    boot_to_init(&image, "BZIMAGE_UP", BootProtocol::Linux64);
}

#[test]
fn linux_elf_vmlinux_boots_to_init_and_finds_our_virtio_disk() {
    require_kvm!();
    let Some(image) = GuestImage::find() else {
        return;
    };

    boot_to_init(&image, "VMLINUX_UP", BootProtocol::Linux64);
}

#[test]
fn linux_pvh_entry_boots_to_init_and_finds_our_virtio_disk() {
    require_kvm!();
    let Some(image) = GuestImage::find() else {
        return;
    };
    if image.get("HAS_PVH_NOTE") != "1" {
        eprintln!("skipped: this kernel carries no PVH entry note");
        return;
    }

    boot_to_init(&image, "VMLINUX_UP", BootProtocol::Pvh);
}

#[test]
fn linux_elf_vmlinux_on_two_vcpus_boots_to_init_finds_our_disk_and_both_cpus() {
    require_kvm!();
    let Some(image) = GuestImage::find() else {
        return;
    };

    boot_two_vcpus(&image, "VMLINUX", BootProtocol::Linux64);
}

#[test]
fn linux_pvh_entry_on_two_vcpus_boots_to_init_finds_our_disk_and_both_cpus() {
    require_kvm!();
    let Some(image) = GuestImage::find() else {
        return;
    };
    if image.get("HAS_PVH_NOTE") != "1" {
        eprintln!("skipped: this kernel carries no PVH entry note");
        return;
    }

    boot_two_vcpus(&image, "VMLINUX", BootProtocol::Pvh);
}

/// virtio's `DRIVER_OK` status bit and virtio-net's `VIRTIO_NET_F_MAC` feature bit.
const DRIVER_OK: u32 = 4;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;

#[test]
fn linux_virtio_net_driver_probes_our_nic_as_eth0_with_its_mac() {
    require_kvm!();
    let Some(image) = GuestImage::find() else {
        return;
    };
    let config_text = std::fs::read_to_string(image.path("KERNEL_UP_CONFIG")).unwrap();
    if !config_text.lines().any(|l| l == "CONFIG_VIRTIO_NET=y") {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must build the guest image with virtio-net: scripts/guest-image.sh"
        );
        eprintln!("skipped: this guest image predates virtio-net (run scripts/guest-image.sh)");
        return;
    }
    // A network namespace of the test's own for the TAP (nextest runs each test in its own
    // process; the partition's threads inherit the namespace).
    // SAFETY: unshare takes flags by value.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
    let mac = MacAddress([0x02, 0x15, 0x5d, 0x4c, 0x69, 0x6e]);
    // The kernel's own IP autoconfiguration opens eth0 without a userspace and reports it.
    let cmdline = format!(
        "{} ip=192.168.77.2::::vmms:eth0:off",
        image.get("CMDLINE_ALWAYS")
    );
    let mut config = PartitionConfig::new(KernelImage::Path(image.path("VMLINUX_UP")), cmdline);
    config.boot.initrd = Some(image.path("INITRAMFS"));
    config.memory_mib = 128;
    config.nics.push(NicConfig::new(mac, "vmslinux0"));
    let out = Capture::default();
    let mut vm = Partition::new(config).unwrap();
    vm.com1().set_sink(Box::new(out.clone()));
    let started = Instant::now();
    vm.resume().unwrap();
    let label = "vmlinux-up with a NIC (1 vCPU)";

    let markers = [
        format!("Linux version {}", image.get("KERNEL_VERSION")),
        "IP-Config: Complete:".to_owned(),
        "device=eth0, hwaddr=02:15:5d:4c:69:6e, ipaddr=192.168.77.2".to_owned(),
    ];
    expect_in_order(&out, &markers, 0, label, started);
    vm.pause().unwrap();
    let state = vm.capture_state().unwrap();
    vm.stop();

    // The driver that took eth0 is Linux's virtio_net on our device: it finished its probe
    // (DRIVER_OK) having read the MAC from our config space, and the device kept that MAC.
    let nic = &state.devices.nics[0];
    assert_ne!(
        nic.transport.status & DRIVER_OK,
        0,
        "{:#x}",
        nic.transport.status
    );
    assert_ne!(nic.transport.acked_features & VIRTIO_NET_F_MAC, 0);
    assert_eq!(nic.device.mac, mac);
}

#[test]
fn truncated_linux_bzimage_fails_to_load_with_a_clear_error() {
    require_kvm!();
    let Some(image) = GuestImage::find() else {
        return;
    };
    let bytes = std::fs::read(image.path("BZIMAGE")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("bzImage");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();

    let err = Partition::new(PartitionConfig::new(KernelImage::Path(cut), "")).unwrap_err();

    assert!(matches!(err, Error::KernelTruncated { .. }), "{err:?}");
}

#[test]
fn corrupted_linux_vmlinux_fails_to_load_with_a_clear_error() {
    require_kvm!();
    let Some(image) = GuestImage::find() else {
        return;
    };
    let mut bytes = std::fs::read(image.path("VMLINUX")).unwrap();
    // Point the program headers past the end of the file.
    bytes[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("vmlinux");
    std::fs::write(&bad, &bytes).unwrap();

    let err = Partition::new(PartitionConfig::new(KernelImage::Path(bad), "")).unwrap_err();

    assert!(matches!(err, Error::KernelLoad(_)), "{err:?}");
}
