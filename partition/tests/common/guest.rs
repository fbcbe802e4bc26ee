//! Driving the embedded test guest from a test: boot or attach, type shell commands, read its
//! status block and compare guest memory.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use partition::{DiskConfig, KernelImage, Partition, PartitionConfig};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmms_guest::protocol::{self, BANNER, PROMPT, RECORD_SIZE, STATUS_GPA, StatusBlock};

use super::Capture;

pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The test guest with `memory_mib` of memory and, if given, `disk` as its record disk.
pub fn guest_config(memory_mib: u64, disk: Option<&Path>) -> PartitionConfig {
    let mut config = PartitionConfig::new(KernelImage::Bytes(Arc::from(vmms_guest::ELF)), "");
    config.memory_mib = memory_mib;
    if let Some(path) = disk {
        let mut disk = DiskConfig::new(path);
        disk.changed_block_size = RECORD_SIZE as u64;
        config.disks.push(disk);
    }
    config
}

/// A zeroed 4 MiB disk image in `dir`.
pub fn blank_disk(dir: &Path) -> PathBuf {
    let path = dir.join("disk.img");
    File::create(&path).unwrap().set_len(4 << 20).unwrap();
    path
}

/// The status block of the guest in `vm`.
pub fn status_of(vm: &Partition) -> StatusBlock {
    let mut bytes = [0u8; protocol::STATUS_BLOCK_SIZE];
    vm.memory()
        .read_slice(&mut bytes, GuestAddress(STATUS_GPA))
        .unwrap();
    StatusBlock::from_bytes(&bytes).unwrap()
}

/// The first guest address where the memories of `a` and `b` differ, if any.
pub fn first_difference(a: &Partition, b: &Partition) -> Option<u64> {
    const CHUNK: usize = 1 << 20;
    let (mut left, mut right) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    for region in a.memory().iter() {
        let mut at = region.start_addr().0;
        let end = at + region.len();
        while at < end {
            let len = CHUNK.min((end - at) as usize);
            a.memory()
                .read_slice(&mut left[..len], GuestAddress(at))
                .unwrap();
            b.memory()
                .read_slice(&mut right[..len], GuestAddress(at))
                .unwrap();
            if let Some(i) = (0..len).find(|&i| left[i] != right[i]) {
                return Some(at + i as u64);
            }
            at += len as u64;
        }
    }
    None
}

/// A running test guest with COM1 captured.
pub struct Guest {
    pub vm: Partition,
    pub out: Capture,
    /// Output offset up to which replies have been consumed.
    seen: usize,
}

impl Guest {
    /// Boots `config` and waits for the shell's first prompt.
    pub fn boot(config: PartitionConfig) -> Self {
        let vm = Partition::new(config).unwrap();
        Self::attach(vm, true)
    }

    /// Runs `vm` with COM1 captured; a booted guest is awaited up to its prompt, a restored one
    /// (`expect_banner` false) is already past it.
    pub fn attach(mut vm: Partition, expect_banner: bool) -> Self {
        let out = Capture::default();
        vm.com1().set_sink(Box::new(out.clone()));
        vm.resume().unwrap();
        let seen = if expect_banner {
            let banner = out.wait_for(BANNER, 0, TIMEOUT);
            out.wait_for(PROMPT, banner, TIMEOUT)
        } else {
            0
        };
        Self { vm, out, seen }
    }

    /// Types `command` and returns the reply line (without echo and prompt).
    pub fn run(&mut self, command: &str) -> String {
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

    /// The guest's status block.
    pub fn status(&self) -> StatusBlock {
        status_of(&self.vm)
    }

    /// Waits until the guest's counter passes `value`; returns it.
    pub fn wait_counter_above(&self, value: u64) -> u64 {
        let deadline = std::time::Instant::now() + TIMEOUT;
        loop {
            let now = self.status().counter;
            if now > value {
                return now;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "guest counter stuck at {now}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}
