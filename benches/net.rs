//! virtio-net end to end, with the test guest on an internal virtual switch (a real bridge and
//! TAP, in a network namespace of the bench's own):
//! - ICMP round trip: the host pings the guest (a raw socket), one echo request at a time;
//! - guest → host UDP: the guest's `udp <host> <port> N 1024`, timed from typing the command to
//!   the last datagram read on the host socket, as payload megabits per second.
//!
//! The guest runs with `idle_us=0` (it polls without parking), so the round trip is the device's
//! and not the guest's idle period.
//!
//! With `VMMS_FIRECRACKER=<path to a firecracker binary>` the bench runs the same guest and
//! workloads under Firecracker (its virtio-net over a TAP on the same bridge) and under the
//! partition in interleaved rounds (`VMMS_PAIRED_ROUNDS`, default 7), one VM alive at a time,
//! and prints the medians and their ratios.
#![allow(missing_docs)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use partition::{KernelImage, MacAddress, NicConfig, Partition, PartitionConfig};
use vmms_guest::protocol::PROMPT;
use vswitch::{SwitchRequest, VirtualSwitches};

#[path = "common/paired.rs"]
mod paired;
use paired::{CONSOLE_TIMEOUT as TIMEOUT, Console, ConsoleSink};

const HOST: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const UDP_PORT: u16 = 6000;
const UDP_COUNT: u64 = 4000;
const UDP_SIZE: usize = 1024;
const PINGS_PER_ROUND: usize = 200;

/// A test guest with a NIC, under either VMM.
trait NetGuest {
    fn console(&self) -> &Console;
    fn type_line(&mut self, line: &str);
    fn ip(&self) -> Ipv4Addr;
}

struct Ours {
    vm: Partition,
    console: Arc<Console>,
    ip: Ipv4Addr,
}

impl Ours {
    fn start(mac: MacAddress, tap: &str, ip: Ipv4Addr) -> Self {
        let mut config = PartitionConfig::new(
            KernelImage::Bytes(Arc::from(vmms_guest::ELF)),
            format!("console=ttyS0 ip={ip} idle_us=0"),
        );
        config.nics.push(NicConfig::new(mac, tap));
        let mut vm = Partition::new(config).unwrap();
        let console = Arc::new(Console::default());
        vm.com1()
            .set_sink(Box::new(ConsoleSink(Arc::clone(&console))));
        vm.resume().unwrap();
        console.wait_for(PROMPT, 0);
        Self { vm, console, ip }
    }
}

impl NetGuest for Ours {
    fn console(&self) -> &Console {
        &self.console
    }
    fn type_line(&mut self, line: &str) {
        self.vm
            .com1()
            .send_all(format!("{line}\r").as_bytes(), TIMEOUT)
            .unwrap();
    }
    fn ip(&self) -> Ipv4Addr {
        self.ip
    }
}

struct Firecracker {
    vm: paired::Firecracker,
    ip: Ipv4Addr,
    _dir: tempfile::TempDir,
}

impl Firecracker {
    fn start(binary: &Path, mac: MacAddress, tap: &str, ip: Ipv4Addr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmms-guest.elf");
        std::fs::write(&kernel, vmms_guest::ELF).unwrap();
        let config = serde_json::json!({
            "boot-source": {
                "kernel_image_path": kernel,
                "boot_args": format!("console=ttyS0 ip={ip} idle_us=0"),
            },
            "drives": [],
            "network-interfaces": [{
                "iface_id": "net0",
                "guest_mac": mac.to_string(),
                "host_dev_name": tap,
            }],
            "machine-config": { "vcpu_count": 1, "mem_size_mib": 64 },
        });
        let vm = paired::Firecracker::start(binary, &config, dir.path());
        vm.console.wait_for(PROMPT, 0);
        Self { vm, ip, _dir: dir }
    }
}

impl NetGuest for Firecracker {
    fn console(&self) -> &Console {
        &self.vm.console
    }
    fn type_line(&mut self, line: &str) {
        self.vm.type_line(line);
    }
    fn ip(&self) -> Ipv4Addr {
        self.ip
    }
}

/// A raw ICMP socket of the bench's namespace.
struct Pinger {
    socket: OwnedFd,
    seq: u16,
}

impl Pinger {
    fn new() -> Self {
        // SAFETY: plain socket(2), checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        Self { socket, seq: 0 }
    }

    /// One echo request to `target`; the round trip, or `None` after a second.
    fn ping(&mut self, target: Ipv4Addr) -> Option<Duration> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut packet = [0u8; 64];
        packet[0] = 8;
        packet[4..6].copy_from_slice(&0x4e54u16.to_be_bytes());
        packet[6..8].copy_from_slice(&seq.to_be_bytes());
        let mut sum: u32 = packet
            .chunks(2)
            .map(|p| u32::from(u16::from_be_bytes([p[0], p[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        packet[2..4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(target).to_be(),
            },
            sin_zero: [0; 8],
        };
        let start = Instant::now();
        // SAFETY: valid buffer and address of the sizes given.
        unsafe {
            libc::sendto(
                self.socket.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            )
        };
        let deadline = start + Duration::from_secs(1);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let mut pfd = libc::pollfd {
                fd: self.socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) } <= 0 {
                return None;
            }
            let mut reply = [0u8; 1500];
            // SAFETY: valid buffer.
            let n = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    reply.as_mut_ptr().cast(),
                    reply.len(),
                    0,
                )
            };
            if n < 28 {
                continue;
            }
            let icmp = &reply[usize::from(reply[0] & 0xf) * 4..n as usize];
            if icmp[0] == 0 && icmp[6..8] == seq.to_be_bytes() {
                return Some(start.elapsed());
            }
        }
        None
    }
}

/// Median round trip of `count` pings.
fn ping_round(guest: &dyn NetGuest, pinger: &mut Pinger, count: usize) -> Duration {
    // The first ping after a boot also resolves the guest's address.
    let _ = pinger.ping(guest.ip());
    let times: Vec<Duration> = (0..count).filter_map(|_| pinger.ping(guest.ip())).collect();
    assert!(times.len() * 10 >= count * 9, "too many pings lost");
    median(times)
}

/// One UDP burst: (payload megabits per second, datagrams received).
fn udp_round(guest: &mut dyn NetGuest, socket: &UdpSocket) -> (f64, u64) {
    let from = guest.console().len();
    let command = format!("udp {HOST} {UDP_PORT} {UDP_COUNT} {UDP_SIZE}");
    let start = Instant::now();
    guest.type_line(&command);
    let mut buf = [0u8; 2048];
    let mut received = 0;
    let mut last = start;
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    while received < UDP_COUNT {
        match socket.recv(&mut buf) {
            Ok(_) => {
                received += 1;
                last = Instant::now();
            }
            Err(_) => break,
        }
    }
    guest.console().wait_for("sent ", from);
    let seconds = (last - start).as_secs_f64();
    let megabits = (received * UDP_SIZE as u64 * 8) as f64 / 1e6;
    (megabits / seconds, received)
}

fn median<T: PartialOrd + Copy>(mut values: Vec<T>) -> T {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

struct Network {
    _store: tempfile::TempDir,
    ours: (MacAddress, String, Ipv4Addr),
    theirs: (MacAddress, String, Ipv4Addr),
    socket: UdpSocket,
}

/// An internal switch with two adapters, in a network namespace of this process's main thread.
fn network() -> Network {
    // SAFETY: unshare takes flags by value; this thread and what it starts move namespaces.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
    let store = tempfile::tempdir().unwrap();
    let mut switches = VirtualSwitches::load(store.path()).unwrap();
    switches
        .new_switch(
            "bench",
            SwitchRequest::Internal,
            Some("10.99.0.0/24".parse().unwrap()),
        )
        .unwrap();
    let mut adapter = |vm: &str| {
        let a = switches.add_adapter(vm, Some("bench"), None).unwrap();
        (a.mac, a.tap, a.ipv4.unwrap())
    };
    let ours = adapter("ours");
    let theirs = adapter("firecracker");
    let socket = UdpSocket::bind((HOST, UDP_PORT)).unwrap();
    let size: libc::c_int = 16 << 20;
    // SAFETY: SO_RCVBUFFORCE reads an int from a valid pointer.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&raw const size).cast(),
            size_of::<libc::c_int>() as u32,
        )
    };
    Network {
        _store: store,
        ours,
        theirs,
        socket,
    }
}

fn paired_with_firecracker(net: &Network, binary: &Path) {
    let rounds: usize = std::env::var("VMMS_PAIRED_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    let mut pinger = Pinger::new();
    let (mut rtt_ours, mut rtt_theirs, mut udp_ours, mut udp_theirs) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut lost_ours, mut lost_theirs) = (0, 0);
    for _ in 0..rounds {
        {
            let (mac, tap, ip) = &net.theirs;
            let mut fc = Firecracker::start(binary, *mac, tap, *ip);
            rtt_theirs.push(ping_round(&fc, &mut pinger, PINGS_PER_ROUND));
            let (rate, got) = udp_round(&mut fc, &net.socket);
            udp_theirs.push(rate);
            lost_theirs += UDP_COUNT - got;
        }
        {
            let (mac, tap, ip) = &net.ours;
            let mut ours = Ours::start(*mac, tap, *ip);
            rtt_ours.push(ping_round(&ours, &mut pinger, PINGS_PER_ROUND));
            let (rate, got) = udp_round(&mut ours, &net.socket);
            udp_ours.push(rate);
            lost_ours += UDP_COUNT - got;
        }
    }
    let (ro, rt) = (median(rtt_ours), median(rtt_theirs));
    let (uo, ut) = (median(udp_ours), median(udp_theirs));
    println!("{rounds} interleaved rounds, medians (ratio: partition / firecracker)");
    println!(
        "  icmp round trip ({PINGS_PER_ROUND} per round): partition {:.1} us, firecracker {:.1} us, ratio {:.2}",
        ro.as_secs_f64() * 1e6,
        rt.as_secs_f64() * 1e6,
        ro.as_secs_f64() / rt.as_secs_f64()
    );
    println!(
        "  guest->host udp ({UDP_COUNT} x {UDP_SIZE} B): partition {uo:.1} Mbit/s, firecracker {ut:.1} Mbit/s, ratio {:.2}; datagrams lost: partition {lost_ours}, firecracker {lost_theirs}",
        uo / ut
    );
}

fn bench_ours(c: &mut Criterion, net: &Network) {
    let (mac, tap, ip) = &net.ours;
    let mut guest = Ours::start(*mac, tap, *ip);
    let mut pinger = Pinger::new();
    let _ = pinger.ping(*ip);
    let mut group = c.benchmark_group("net");
    group.sample_size(20);
    group.bench_function("icmp_round_trip", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| pinger.ping(*ip).expect("the guest answers"))
                .sum()
        })
    });
    group.throughput(criterion::Throughput::Bytes(UDP_COUNT * UDP_SIZE as u64));
    group.sample_size(10);
    group.bench_function(format!("udp_{UDP_COUNT}x{UDP_SIZE}"), |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let (rate, _) = udp_round(&mut guest, &net.socket);
                    Duration::from_secs_f64((UDP_COUNT * UDP_SIZE as u64 * 8) as f64 / (rate * 1e6))
                })
                .sum()
        })
    });
    group.finish();
}

fn main() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: /dev/kvm is not available on this host");
        return;
    }
    let net = network();
    if let Some(binary) = std::env::var_os("VMMS_FIRECRACKER") {
        paired_with_firecracker(&net, Path::new(&binary));
        return;
    }
    let mut criterion = Criterion::default().configure_from_args();
    bench_ours(&mut criterion, &net);
    criterion.final_summary();
}
