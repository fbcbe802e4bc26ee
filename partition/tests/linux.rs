//! Slow tier: a real Linux 6.1 kernel (built by `scripts/guest-image.sh`) boots through each of our
//! entry paths — bzImage, ELF vmlinux (64-bit boot protocol) and the PVH entry — and Linux's own
//! virtio-blk driver finds our disk with its exact capacity and partition table.
//!
//! The ELF and PVH boots run on two vCPUs: the kernel finds the RSDP through the zero page or the
//! PVH start info, lists our ACPI tables, takes its CPUs from the MADT and brings the second one up
//! with INIT/SIPI. On hardware KVM both CPUs must come up. On a software KVM (kvm_pvm) the
//! application processor's real-mode trampoline may not get through the CPL0 emulator; there the
//! tests assert what the host allows: the tables parsed, both CPUs allowed, and the second vCPU
//! taken out of its wait-for-SIPI state by the kernel's INIT/SIPI (its KVM mp_state).
//!
//! On a software KVM the kernel reaches `Run /init` in about a minute and its /init then dies on its
//! first system call (no userspace can run there); on hardware KVM it gets to the init marker. The
//! tests assert only what both reach. Without the image the tests skip, except under CI where a
//! missing image means the set-up step failed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Capture;
use kvm_bindings::KVM_MP_STATE_UNINITIALIZED;
use partition::{
    BootProtocol, DiskConfig, Error, KernelImage, Partition, PartitionConfig, software_kvm,
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

/// Boots `kernel` on `vcpus` vCPUs with the image's initramfs and a private copy of its disk, and
/// checks the serial log for each conformance marker in order, printing when each appeared. Returns
/// the still-running partition and its serial log.
fn boot_to_init(
    image: &GuestImage,
    kernel: &str,
    protocol: BootProtocol,
    vcpus: u8,
) -> (Partition, Capture) {
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
    let start = Instant::now();
    vm.resume().unwrap();

    let sectors = image.get("DISK_SECTORS");
    let markers = [
        format!("Linux version {}", image.get("KERNEL_VERSION")),
        format!("[vda] {sectors} 512-byte logical blocks"),
        " vda: vda1 vda2".to_owned(),
        "Run /init as init process".to_owned(),
    ];
    let mut at = 0;
    for marker in &markers {
        at = out.wait_for(marker, at, MARKER_TIMEOUT);
        eprintln!(
            "{kernel} ({protocol:?}, {vcpus} vCPUs): {marker:?} after {:.1} s",
            start.elapsed().as_secs_f64()
        );
    }
    (vm, out)
}

/// Asserts the kernel found every vCPU in our ACPI tables and started them: all of them on hardware
/// KVM; on a software KVM, at least the INIT/SIPI reaching every application processor.
fn assert_every_cpu_found(vm: &mut Partition, out: &Capture, vcpus: u8) {
    let text = out.text();
    let expected = [
        "ACPI: RSDP 0x00000000000E0000".to_owned(),
        "ACPI: XSDT 0x".to_owned(),
        "ACPI: APIC 0x".to_owned(),
        "ACPI: DSDT 0x".to_owned(),
        "INT_SRC_OVR (bus 0 bus_irq 9 global_irq 9 high level)".to_owned(),
        "Using ACPI (MADT) for SMP configuration information".to_owned(),
        format!("smpboot: Allowing {vcpus} CPUs, 0 hotplug CPUs"),
    ];
    for line in &expected {
        assert!(text.contains(line.as_str()), "no {line:?} in:\n{text}");
    }
    let smp_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("smp") || l.contains("CPU"))
        .collect();
    eprintln!(
        "what the kernel said about its CPUs:\n{}",
        smp_lines.join("\n")
    );
    let all_up = format!("Brought up 1 node, {vcpus} CPUs");
    if !software_kvm::is_software_kvm() {
        assert!(text.contains(&all_up), "no {all_up:?} in:\n{text}");
        assert!(
            text.contains(&format!("Total of {vcpus} processors activated")),
            "{text}"
        );
        return;
    }
    if text.contains(&all_up) {
        return;
    }
    // kvm_pvm: the kernel sent INIT/SIPI; show that it reached the vCPU (KVM took it out of the
    // wait-for-SIPI state) and where the application processor is.
    vm.pause().unwrap();
    let state = vm.capture_state().unwrap();
    for (index, ap) in state.vcpus.iter().enumerate().skip(1) {
        eprintln!(
            "vCPU {index}: mp_state {}, cs {:#x} (base {:#x}), rip {:#x}, cr0 {:#x}",
            ap.mp_state.mp_state, ap.sregs.cs.selector, ap.sregs.cs.base, ap.regs.rip, ap.sregs.cr0
        );
        assert_ne!(
            ap.mp_state.mp_state, KVM_MP_STATE_UNINITIALIZED,
            "vCPU {index} never received INIT/SIPI"
        );
    }
}

#[test]
fn linux_bzimage_boots_to_init_and_finds_our_virtio_disk() {
    require_kvm!();
    let Some(image) = GuestImage::find() else {
        return;
    };

    let (mut vm, _) = boot_to_init(&image, "BZIMAGE", BootProtocol::Linux64, 1);
    vm.stop();
}

#[test]
fn linux_elf_vmlinux_on_two_vcpus_boots_to_init_finds_our_disk_and_both_cpus() {
    require_kvm!();
    let Some(image) = GuestImage::find() else {
        return;
    };

    let (mut vm, out) = boot_to_init(&image, "VMLINUX", BootProtocol::Linux64, 2);

    assert_every_cpu_found(&mut vm, &out, 2);
    vm.stop();
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

    let (mut vm, out) = boot_to_init(&image, "VMLINUX", BootProtocol::Pvh, 2);

    assert_every_cpu_found(&mut vm, &out, 2);
    vm.stop();
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
