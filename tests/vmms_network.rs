//! Virtual switches and network adapters through the CLI: a real daemon, real workers with their
//! TAPs, real bridges, all inside a network namespace of the test's own (the test thread
//! unshares its network namespace before it starts the daemon, which its workers inherit).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod vmms_common;

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmms_common::Daemon;

fn enter_private_netns() {
    // SAFETY: unshare takes flags by value; only this thread's namespace changes, and the
    // processes it starts from now on inherit it.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "unshare: {}", std::io::Error::last_os_error());
}

fn adapters(daemon: &Daemon, vm: &str) -> Vec<Value> {
    serde_json::from_str(&daemon.ok(&["get-vmnetworkadapter", vm, "-o", "json"])).unwrap()
}

#[test]
fn guest_on_an_internal_switch_answers_the_host_across_a_daemon_restart() {
    require_kvm!();
    enter_private_netns();
    let mut daemon = Daemon::start();
    let switch: Vec<Value> = serde_json::from_str(&daemon.ok(&[
        "new-vmswitch",
        "inside",
        "--internal",
        "--subnet",
        "10.66.0.0/24",
        "-o",
        "json",
    ]))
    .unwrap();
    daemon.new_vm("web", &[]);
    daemon.ok(&["add-vmnetworkadapter", "web", "--switch", "inside"]);
    let adapter = adapters(&daemon, "web").pop().unwrap();
    daemon.ok(&["start-vm", "web"]);

    let answered = eventually_answers(Ipv4Addr::new(10, 66, 0, 2));
    let pid = daemon.vm("web")["process_id"].as_u64().unwrap();
    daemon.kill9();
    daemon.spawn();
    let after_restart = host_ping(Ipv4Addr::new(10, 66, 0, 2), 3, Duration::from_secs(5));

    assert_eq!(switch[0]["switch_type"], "Internal");
    assert_eq!(switch[0]["host_address"], "10.66.0.1");
    assert_eq!(adapter["switch_name"], "inside");
    assert_eq!(adapter["ip_addresses"][0], "10.66.0.2");
    let mac = adapter["mac_address"].as_str().unwrap();
    assert!(mac.starts_with("02:15:5d:"), "{mac}");
    assert!(answered, "the guest never answered the host's ping");
    assert_eq!(daemon.vm("web")["process_id"].as_u64(), Some(pid));
    assert_eq!(after_restart, 3);
    assert_eq!(adapters(&daemon, "web")[0]["mac_address"], mac);
}

#[test]
fn bad_network_requests_get_clear_errors_and_change_nothing() {
    enter_private_netns();
    let daemon = Daemon::start();
    daemon.ok(&["new-vmswitch", "lab", "--private"]);
    daemon.new_vm("a", &[]);
    daemon.new_vm("b", &[]);
    daemon.ok(&[
        "add-vmnetworkadapter",
        "a",
        "--switch",
        "lab",
        "--mac",
        "02:00:00:00:00:0a",
    ]);
    let before_switches = daemon.ok(&["get-vmswitch", "-o", "json"]);
    let before_adapters = daemon.ok(&["get-vmnetworkadapter", "-o", "json"]);

    let name_in_use = daemon.fails(&["new-vmswitch", "lab", "--internal"]);
    let no_interface = daemon.fails(&["new-vmswitch", "out", "--external", "nosuch0"]);
    let with_ports = daemon.fails(&["remove-vmswitch", "lab"]);
    let multicast = daemon.fails(&["add-vmnetworkadapter", "b", "--mac", "01:00:5e:00:00:01"]);
    let duplicate = daemon.fails(&["add-vmnetworkadapter", "b", "--mac", "02:00:00:00:00:0a"]);
    let garbage = daemon.fails(&["add-vmnetworkadapter", "b", "--mac", "not-a-mac"]);

    assert!(name_in_use.contains("already exists"), "{name_in_use}");
    assert!(
        no_interface.contains("\"nosuch0\" does not exist"),
        "{no_interface}"
    );
    assert!(with_ports.contains("1 connected adapter"), "{with_ports}");
    assert!(with_ports.contains("32775"), "{with_ports}");
    assert!(multicast.contains("not a unicast address"), "{multicast}");
    assert!(duplicate.contains("already used"), "{duplicate}");
    assert!(garbage.contains("not a mac address"), "{garbage}");
    assert_eq!(daemon.ok(&["get-vmswitch", "-o", "json"]), before_switches);
    assert_eq!(
        daemon.ok(&["get-vmnetworkadapter", "-o", "json"]),
        before_adapters
    );
    daemon.ok(&["disconnect-vmnetworkadapter", "a"]);
    daemon.ok(&["remove-vmswitch", "lab"]);
    let none: Vec<Value> =
        serde_json::from_str(&daemon.ok(&["get-vmswitch", "-o", "json"])).unwrap();
    assert!(none.is_empty());
    // A removed VM takes its adapter (and its TAP) with it.
    let tap = adapters(&daemon, "a")[0]["tap"]
        .as_str()
        .unwrap()
        .to_owned();
    daemon.ok(&["remove-vm", "a"]);
    let left: Vec<Value> =
        serde_json::from_str(&daemon.ok(&["get-vmnetworkadapter", "-o", "json"])).unwrap();
    assert!(left.is_empty(), "{left:?}");
    assert!(vswitch::netlink::link_index(&tap).is_none());
}

/// Pings `ip` until it answers (the guest is still booting) or the timeout passes.
fn eventually_answers(ip: Ipv4Addr) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if host_ping(ip, 1, Duration::from_millis(500)) == 1 {
            return true;
        }
    }
    false
}

/// ICMP echo requests from the test's namespace (a raw socket), one at a time; the number
/// answered within `timeout` each.
fn host_ping(target: Ipv4Addr, count: u16, timeout: Duration) -> u16 {
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
    let mut answered = 0;
    for seq in 0..count {
        let mut packet = [0u8; 16];
        packet[0] = 8;
        packet[4..6].copy_from_slice(&0x4243u16.to_be_bytes());
        packet[6..8].copy_from_slice(&seq.to_be_bytes());
        let mut sum: u32 = packet
            .chunks(2)
            .map(|p| u32::from(u16::from_be_bytes([p[0], p[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        packet[2..4].copy_from_slice(&(!(sum as u16)).to_be_bytes());
        // SAFETY: valid buffer and address of the sizes given.
        unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_in>() as u32,
            )
        };
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let mut pfd = libc::pollfd {
                fd: socket.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) } <= 0 {
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
                && icmp[4..6] == 0x4243u16.to_be_bytes()
                && icmp[6..8] == seq.to_be_bytes()
            {
                answered += 1;
                break;
            }
        }
    }
    answered
}
