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

#[allow(
    unused_imports,
    reason = "each test binary uses a different part of this module"
)]
pub use vmms_guest::fixture::tiny_elf;

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
