//! The embedded test guest on real KVM: console shell, virtio-blk records and the changed-block
//! map, pause/resume, state capture and restore, and the dirty-page log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::Capture;
use partition::{
    DiskConfig, KernelImage, Partition, PartitionConfig, PartitionState, VmShape, VmShell,
};
use vm_memory::{Bytes, GuestAddress};
use vmms_guest::protocol::{self, BANNER, PROMPT, RECORD_SIZE, STATUS_GPA, StatusBlock};

const TIMEOUT: Duration = Duration::from_secs(30);
const DISK_BYTES: u64 = 4 << 20;

fn guest_config(disk: Option<&Path>) -> PartitionConfig {
    let mut config = PartitionConfig::new(KernelImage::Bytes(Arc::from(vmms_guest::ELF)), "");
    config.memory_mib = 32;
    if let Some(path) = disk {
        let mut disk = DiskConfig::new(path);
        disk.changed_block_size = RECORD_SIZE as u64;
        config.disks.push(disk);
    }
    config
}

fn blank_disk(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("disk.img");
    File::create(&path).unwrap().set_len(DISK_BYTES).unwrap();
    path
}

/// A running test guest with COM1 captured, past its first prompt.
struct Guest {
    vm: Partition,
    out: Capture,
    /// Output offset up to which replies have been consumed.
    seen: usize,
}

impl Guest {
    fn boot(config: PartitionConfig) -> Self {
        let vm = Partition::new(config).unwrap();
        Self::attach(vm, true)
    }

    fn attach(mut vm: Partition, expect_banner: bool) -> Self {
        let out = Capture::default();
        vm.com1().set_sink(Box::new(out.clone()));
        vm.resume().unwrap();
        let seen = if expect_banner {
            out.wait_for(BANNER, 0, TIMEOUT)
        } else {
            0
        };
        let seen = if expect_banner {
            out.wait_for(PROMPT, seen, TIMEOUT)
        } else {
            seen
        };
        Self { vm, out, seen }
    }

    /// Types `command` and returns the reply line (without echo and prompt).
    fn run(&mut self, command: &str) -> String {
        self.vm
            .com1()
            .send_all(format!("{command}\r").as_bytes(), TIMEOUT)
            .unwrap();
        let echoed = self
            .out
            .wait_for(&format!("{command}\r\n"), self.seen, TIMEOUT);
        let end = self.out.wait_for(PROMPT, echoed, TIMEOUT);
        self.seen = end;
        let text = self.out.text();
        text[echoed..end - PROMPT.len()].trim_end().to_owned()
    }

    fn status(&self) -> StatusBlock {
        let mut bytes = [0u8; protocol::STATUS_BLOCK_SIZE];
        self.vm
            .memory()
            .read_slice(&mut bytes, GuestAddress(STATUS_GPA))
            .unwrap();
        StatusBlock::from_bytes(&bytes).unwrap()
    }

    fn wait_counter_above(&self, value: u64) -> u64 {
        for _ in 0..3000 {
            let now = self.status().counter;
            if now > value {
                return now;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("guest counter stuck at {}", self.status().counter);
    }
}

#[test]
fn test_guest_prints_its_banner_and_answers_the_shell() {
    require_kvm!();
    let mut guest = Guest::boot(guest_config(None));

    let echo = guest.run("echo hello partition");
    let status = guest.run("status");

    assert_eq!(echo, "hello partition");
    assert!(status.starts_with("counter="), "status reply: {status:?}");
    assert_eq!(guest.status().magic, protocol::STATUS_MAGIC);
}

#[test]
fn partition_built_into_a_shell_created_ahead_runs_its_own_config() {
    require_kvm!();
    // Created before the configuration exists, as a pool worker does.
    let shell = VmShell::create().unwrap();
    let mut config = guest_config(None);
    config.memory_mib = 48;
    config.vcpus = 2;

    let vm = Partition::builder(config).shell(shell).build().unwrap();
    let mut guest = Guest::attach(vm, true);
    let echo = guest.run("echo built into a shell");
    let dirtied = guest.run("dirty 64");
    let counter = guest.wait_counter_above(0);
    guest.vm.pause().unwrap();
    let state = guest.vm.capture_state().unwrap();

    assert_eq!(echo, "built into a shell");
    assert!(
        dirtied.starts_with("dirtied 64 pages"),
        "dirty reply: {dirtied:?}"
    );
    assert!(counter > 0);
    assert_eq!(state.vcpus.len(), 2);
    assert_eq!(state.memory.iter().map(|r| r.len).sum::<u64>(), 48 << 20);
}

#[test]
fn shell_built_out_to_the_config_s_shape_runs_the_guest() {
    require_kvm!();
    let mut config = guest_config(None);
    config.memory_mib = 48;
    config.vcpus = 2;
    let shell = VmShell::create_for(VmShape::of(&config)).unwrap();

    let vm = Partition::builder(config).shell(shell).build().unwrap();
    let mut guest = Guest::attach(vm, true);
    let dirtied = guest.run("dirty 64");
    guest.vm.pause().unwrap();
    let state = guest.vm.capture_state().unwrap();

    assert!(
        dirtied.starts_with("dirtied 64 pages"),
        "dirty reply: {dirtied:?}"
    );
    assert_eq!(state.vcpus.len(), 2);
    assert_eq!(state.memory.iter().map(|r| r.len).sum::<u64>(), 48 << 20);
}

#[test]
fn shell_built_out_to_another_shape_gives_way_to_the_config() {
    require_kvm!();
    let mut config = guest_config(None);
    config.memory_mib = 48;
    let mut other = VmShape::of(&config);
    other.memory_mib = 16;
    let shell = VmShell::create_for(other).unwrap();

    let vm = Partition::builder(config).shell(shell).build().unwrap();
    let mut guest = Guest::attach(vm, true);
    let echo = guest.run("echo still booted");
    guest.vm.pause().unwrap();
    let state = guest.vm.capture_state().unwrap();

    assert_eq!(echo, "still booted");
    assert_eq!(state.memory.iter().map(|r| r.len).sum::<u64>(), 48 << 20);
}

#[test]
fn guest_records_land_on_disk_intact_and_exactly_their_blocks_are_marked_changed() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let disk = blank_disk(dir.path());
    let mut guest = Guest::boot(guest_config(Some(&disk)));
    let changed = guest.vm.changed_blocks(0).unwrap().clone();
    changed.take();

    let reply = guest.run("write 40");
    let blocks: Vec<u64> = changed.take().iter().collect();

    assert_eq!(reply, "wrote 40 records, total 40");
    vmms_guest::verify_records(File::open(&disk).unwrap(), 40).unwrap();
    assert_eq!(blocks, (0..40).collect::<Vec<_>>());
}

#[test]
fn pause_freezes_the_guest_counter_and_resume_moves_it() {
    require_kvm!();
    let mut guest = Guest::boot(guest_config(None));
    let before = guest.wait_counter_above(0);

    guest.vm.pause().unwrap();
    let frozen = guest.status().counter;
    std::thread::sleep(Duration::from_millis(300));
    let still = guest.status().counter;
    guest.vm.resume().unwrap();
    let after = guest.wait_counter_above(still);

    assert!(frozen >= before);
    assert_eq!(still, frozen);
    assert!(after > still);
}

#[test]
fn restored_guest_continues_from_the_exact_counter_with_its_disk_and_shell() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let disk = blank_disk(dir.path());
    let mut guest = Guest::boot(guest_config(Some(&disk)));
    guest.run("write 12");
    guest.vm.pause().unwrap();
    let saved = guest.status();
    let state_json = guest.vm.capture_state().unwrap().to_json().unwrap();
    let memory_path = dir.path().join("memory.bin");
    guest
        .vm
        .save_memory(&mut File::create(&memory_path).unwrap())
        .unwrap();
    drop(guest);

    let state = PartitionState::from_json(&state_json).unwrap();
    let memory = File::open(&memory_path).unwrap();
    let vm = Partition::builder(guest_config(Some(&disk)))
        .restore(&state, &memory)
        .unwrap();
    let restored_counter = {
        let mut bytes = [0u8; protocol::STATUS_BLOCK_SIZE];
        vm.memory()
            .read_slice(&mut bytes, GuestAddress(STATUS_GPA))
            .unwrap();
        StatusBlock::from_bytes(&bytes).unwrap().counter
    };
    let mut restored = Guest::attach(vm, false);
    let moved = restored.wait_counter_above(saved.counter);
    let reply = restored.run("write 3");

    assert_eq!(restored_counter, saved.counter);
    assert!(moved > saved.counter);
    assert_eq!(reply, "wrote 3 records, total 15");
    vmms_guest::verify_records(File::open(&disk).unwrap(), 15).unwrap();
}

/// Pages the guest writes besides the ones `dirty` touches: its status page (counter, ticks) and
/// the few pages of its CPL3 stack and data the shell uses while it reads the command and replies.
const DIRTY_LOG_NOISE_PAGES: u64 = 16;

#[test]
fn dirty_log_holds_the_pages_the_guest_dirtied_and_little_else() {
    require_kvm!();
    let mut config = guest_config(None);
    config.dirty_log = true;
    let mut guest = Guest::boot(config);
    guest.run("echo warm");
    guest.vm.read_dirty_log().unwrap();

    let reply = guest.run("dirty 50");
    guest.vm.pause().unwrap();
    let pages: Vec<u64> = guest
        .vm
        .read_dirty_log()
        .unwrap()
        .iter()
        .flat_map(|r| r.pages().collect::<Vec<_>>())
        .collect();

    let base = protocol::DIRTY_BASE;
    assert_eq!(reply, format!("dirtied 50 pages at {base:#x}"));
    let touched: Vec<u64> = (0..50).map(|i| base + i * 4096).collect();
    assert!(
        touched.iter().all(|p| pages.contains(p)),
        "missing dirtied pages in {pages:x?}"
    );
    let others = pages.iter().filter(|p| !touched.contains(p)).count() as u64;
    eprintln!(
        "dirty log: {others} pages besides the 50 dirtied: {:x?}",
        pages
            .iter()
            .filter(|p| !touched.contains(p))
            .collect::<Vec<_>>()
    );
    assert!(
        others <= DIRTY_LOG_NOISE_PAGES,
        "{others} other dirty pages: {pages:x?}"
    );
}

#[test]
fn guest_halt_powers_off_and_reboot_resets() {
    require_kvm!();
    let mut halted = Guest::boot(guest_config(None));
    let mut rebooted = Guest::boot(guest_config(None));

    halted.vm.com1().send_all(b"halt\r", TIMEOUT).unwrap();
    rebooted.vm.com1().send_all(b"reboot\r", TIMEOUT).unwrap();

    assert_eq!(
        halted.vm.wait(Some(TIMEOUT)),
        Some(partition::ExitReason::PowerOff)
    );
    assert_eq!(
        rebooted.vm.wait(Some(TIMEOUT)),
        Some(partition::ExitReason::Reset)
    );
}

#[test]
fn guest_and_partition_agree_on_the_idle_port() {
    assert_eq!(protocol::IDLE_PORT, partition::layout::IDLE_PORT);
}
