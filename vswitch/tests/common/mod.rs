//! Fixtures of the network tests: a private network namespace, test guests with a NIC, their
//! console, and a host-side ICMP pinger.
#![allow(dead_code, missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use partition::{KernelImage, MacAddress, NicConfig, Partition, PartitionConfig};
use vmms_guest::protocol::{BANNER, PROMPT};

pub const TIMEOUT: Duration = Duration::from_secs(60);

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

/// Moves the calling thread (and the threads it starts from now on: vCPUs, I/O threads) into a
/// network namespace of its own, so bridges and TAPs never touch the host's interfaces.
pub fn enter_private_netns() {
    // SAFETY: unshare takes flags by value; only this thread's namespace changes.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(
        rc,
        0,
        "unshare(CLONE_NEWNET): {}",
        std::io::Error::last_os_error()
    );
}

/// A serial sink that keeps everything written to it.
#[derive(Clone, Default, Debug)]
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

    /// Waits until the output after `from` contains `needle`; returns the offset past it.
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
}

/// A test guest with one NIC on TAP `tap`, address `ip`.
pub fn guest_config(mac: MacAddress, tap: &str, ip: Ipv4Addr) -> PartitionConfig {
    let mut config = PartitionConfig::new(
        KernelImage::Bytes(Arc::from(vmms_guest::ELF)),
        format!("ip={ip}"),
    );
    config.memory_mib = 32;
    config.nics.push(NicConfig::new(mac, tap));
    config
}

/// A running test guest and its console.
#[derive(Debug)]
pub struct Guest {
    pub vm: Partition,
    pub out: Capture,
    pub seen: usize,
}

impl Guest {
    /// Starts `config` and waits for the shell; returns the guest and its `net: ` line.
    pub fn start(config: PartitionConfig) -> (Self, String) {
        let mut vm = Partition::new(config).unwrap();
        let out = Capture::default();
        vm.com1().set_sink(Box::new(out.clone()));
        vm.resume().unwrap();
        let net = out.wait_for("net: ", 0, TIMEOUT);
        let line_end = out.wait_for("\r\n", net, TIMEOUT);
        let line = out.text()[net..line_end - 2].to_owned();
        let seen = out.wait_for(BANNER, line_end, TIMEOUT);
        let seen = out.wait_for(PROMPT, seen, TIMEOUT);
        (Self { vm, out, seen }, line)
    }

    /// Wraps a restored (not yet resumed) partition and resumes it.
    pub fn resume_restored(mut vm: Partition) -> Self {
        let out = Capture::default();
        vm.com1().set_sink(Box::new(out.clone()));
        vm.resume().unwrap();
        Self { vm, out, seen: 0 }
    }

    /// Types `command` and returns its output (up to the next prompt).
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
        self.out.text()[echoed..end - PROMPT.len()]
            .trim_end()
            .to_owned()
    }
}

/// Sends ICMP echo requests to `target` from the host (a raw socket in the calling thread's
/// namespace), one at a time; returns how many were answered within `timeout` each.
pub fn host_ping(target: Ipv4Addr, count: u16, timeout: Duration) -> u16 {
    // SAFETY: plain socket(2), checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(target).to_be(),
        },
        sin_zero: [0; 8],
    };
    let id: u16 = 0x4242;
    let mut answered = 0;
    for seq in 0..count {
        let mut packet = [0u8; 16];
        packet[0] = 8;
        packet[4..6].copy_from_slice(&id.to_be_bytes());
        packet[6..8].copy_from_slice(&seq.to_be_bytes());
        packet[8..16].copy_from_slice(b"vmmsping");
        let sum = checksum(&packet);
        packet[2..4].copy_from_slice(&sum.to_be_bytes());
        // SAFETY: valid buffer and address of the sizes given.
        let sent = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            )
        };
        assert!(sent > 0, "sendto: {}", std::io::Error::last_os_error());
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let mut pfd = libc::pollfd {
                fd: socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) };
            if ready <= 0 {
                break;
            }
            let mut reply = [0u8; 1500];
            // SAFETY: valid buffer.
            let n = unsafe {
                libc::recv(
                    socket.as_raw_fd(),
                    reply.as_mut_ptr().cast(),
                    reply.len(),
                    0,
                )
            };
            if n < 28 {
                continue;
            }
            let icmp = &reply[usize::from(reply[0] & 0xf) * 4..n as usize];
            if icmp[0] == 0
                && icmp[4..6] == id.to_be_bytes()
                && icmp[6..8] == seq.to_be_bytes()
                && reply[12..16] == target.octets()
            {
                answered += 1;
                break;
            }
        }
    }
    answered
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|p| u32::from(u16::from_be_bytes([p[0], *p.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
