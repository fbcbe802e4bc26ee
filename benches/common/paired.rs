//! What the side-by-side benches against Firecracker share: the test guest's COM1 output
//! collected from either VMM, and a Firecracker process started from a JSON configuration with
//! COM1 on its stdin and stdout.
//!
//! Included with `#[path]` by benches of two packages (the root's `net`, the partition's
//! `blk_write`), so it depends only on `std` and `serde_json`.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long a bench waits for the guest to print what it expects.
pub const CONSOLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Everything a guest printed, with a condition variable so waiting costs no polling delay.
#[derive(Default)]
pub struct Console {
    text: Mutex<Vec<u8>>,
    grew: Condvar,
}

impl Console {
    /// Appends what the guest printed and wakes the waiters.
    pub fn push(&self, bytes: &[u8]) {
        self.text.lock().unwrap().extend_from_slice(bytes);
        self.grew.notify_all();
    }

    /// Bytes printed so far.
    #[allow(dead_code, reason = "not every bench including this module asks")]
    pub fn len(&self) -> usize {
        self.text.lock().unwrap().len()
    }

    /// Waits until `needle` appears at or after `from`; returns the offset just past it.
    pub fn wait_for(&self, needle: &str, from: usize) -> usize {
        let deadline = Instant::now() + CONSOLE_TIMEOUT;
        let mut text = self.text.lock().unwrap();
        loop {
            if let Some(at) = text
                .get(from..)
                .and_then(|t| t.windows(needle.len()).position(|w| w == needle.as_bytes()))
            {
                return from + at + needle.len();
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| {
                    panic!(
                        "timed out waiting for {needle:?}; output:\n{}",
                        String::from_utf8_lossy(&text)
                    )
                });
            text = self.grew.wait_timeout(text, left).unwrap().0;
        }
    }
}

/// A partition's COM1 sink feeding a [`Console`].
pub struct ConsoleSink(pub Arc<Console>);

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A Firecracker process (`--no-api`), its COM1 on stdin/stdout; killed when dropped.
pub struct Firecracker {
    child: Child,
    /// What the guest printed.
    pub console: Arc<Console>,
}

impl Firecracker {
    /// Starts `binary` with `config` (Firecracker's `--config-file` JSON), written into `dir`.
    pub fn start(binary: &Path, config: &serde_json::Value, dir: &Path) -> Self {
        let config_path = dir.join("config.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let mut child = Command::new(binary)
            .arg("--no-api")
            .arg("--config-file")
            .arg(&config_path)
            .arg("--log-path")
            .arg("/dev/null")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start firecracker");
        let console = Arc::new(Console::default());
        let mut stdout = child.stdout.take().unwrap();
        let sink = Arc::clone(&console);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.push(&buf[..n]);
            }
        });
        Self { child, console }
    }

    /// The Firecracker process's id.
    #[allow(dead_code, reason = "not every bench including this module asks")]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Types `line` and a carriage return on the guest's COM1.
    pub fn type_line(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(format!("{line}\r").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }
}

impl Drop for Firecracker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time the threads of process `pid` have run so far (the kernel's schedstat, in
/// nanoseconds): a VMM's cost beside its wall-clock time, spinning included.
#[allow(dead_code, reason = "not every bench including this module asks")]
pub fn cpu_time(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    let nanos: u64 = tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(nanos)
}
