//! Shared fixtures for the partition integration tests.
#![allow(dead_code, missing_docs)]

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod guest;

/// Returns early (skipping the test, with the reason printed) when /dev/kvm is missing.
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("skipped: /dev/kvm is not available on this host");
            return;
        }
    };
}

/// A serial sink that keeps everything written to it, for assertions.
#[derive(Clone, Default)]
pub struct Capture(pub Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Waits until the output contains `needle` (after byte offset `from`); returns the offset just
    /// past it, or panics with the output after `timeout`.
    pub fn wait_for(&self, needle: &str, from: usize, timeout: Duration) -> usize {
        let start = Instant::now();
        loop {
            let text = self.text();
            if let Some(at) = text.get(from..).and_then(|t| t.find(needle)) {
                return from + at + needle.len();
            }
            assert!(
                start.elapsed() < timeout,
                "timed out waiting for {needle:?}; output so far:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// The smallest ELF64 linux-loader accepts: one PT_LOAD of `code` at 1 MiB, entry at its start.
pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
    let mut elf = vec![0u8; 0x78];
    elf[0..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2;
    elf[5] = 1;
    elf[6] = 1;
    elf[16..18].copy_from_slice(&2u16.to_le_bytes());
    elf[18..20].copy_from_slice(&0x3eu16.to_le_bytes());
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes());
    elf[32..40].copy_from_slice(&0x40u64.to_le_bytes());
    elf[52..54].copy_from_slice(&0x40u16.to_le_bytes());
    elf[54..56].copy_from_slice(&0x38u16.to_le_bytes());
    elf[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = 0x40;
    elf[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
    elf[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes());
    elf[ph + 8..ph + 16].copy_from_slice(&0x78u64.to_le_bytes());
    elf[ph + 16..ph + 24].copy_from_slice(&0x10_0000u64.to_le_bytes());
    elf[ph + 24..ph + 32].copy_from_slice(&0x10_0000u64.to_le_bytes());
    elf[ph + 32..ph + 40].copy_from_slice(&(code.len() as u64).to_le_bytes());
    elf[ph + 40..ph + 48].copy_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(code);
    elf
}

/// 64-bit code: print `text` on COM1, then power off through the PM1a port.
pub fn print_and_power_off(text: &[u8]) -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for &b in text {
        code.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    code.extend_from_slice(&[0x66, 0xba, 0x04, 0x06]); // mov dx, 0x604
    code.extend_from_slice(&[0x66, 0xb8, 0x00, 0x20]); // mov ax, 0x2000 (SLP_EN)
    code.extend_from_slice(&[0x66, 0xef]); // out dx, ax
    code.extend_from_slice(&[0xeb, 0xfe]); // jmp $
    code
}
