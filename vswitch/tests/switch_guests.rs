//! Virtual switches with real bridges, real TAPs and test guests, inside a network namespace of
//! the test's own: guests ping each other across a restore, the host pings a guest, a guest's
//! UDP burst arrives in order, and bad requests leave nothing behind.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs::File;
use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;

use common::{Guest, enter_private_netns, guest_config, host_ping};
use partition::{MacAddress, Partition};
use vswitch::netlink::link_index;
use vswitch::{SwitchError, SwitchRequest, VirtualSwitches};

#[test]
fn two_guests_on_a_private_switch_ping_each_other_across_a_restore() {
    require_kvm!();
    enter_private_netns();
    let store = tempfile::tempdir().unwrap();
    let mut switches = VirtualSwitches::load(store.path()).unwrap();
    switches
        .new_switch("lab", SwitchRequest::Private, None)
        .unwrap();
    let a = switches.add_adapter("vm-a", Some("lab"), None).unwrap();
    let b = switches.add_adapter("vm-b", Some("lab"), None).unwrap();
    let (ip_a, ip_b) = (Ipv4Addr::new(10, 77, 0, 2), Ipv4Addr::new(10, 77, 0, 3));
    let (mut guest_a, net_a) = Guest::start(guest_config(a.mac, &a.tap, ip_a));
    let config_b = guest_config(b.mac, &b.tap, ip_b);
    let (mut guest_b, net_b) = Guest::start(config_b.clone());
    assert_eq!(net_a, format!("{} {ip_a}", a.mac));
    assert_eq!(net_b, format!("{} {ip_b}", b.mac));

    let before = guest_a.run(&format!("ping {ip_b} 3"));

    guest_b.vm.pause().unwrap();
    let state = guest_b.vm.capture_state().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut memory = File::create(dir.path().join("memory")).unwrap();
    guest_b.vm.save_memory(&mut memory).unwrap();
    drop(guest_b);
    let memory = File::open(dir.path().join("memory")).unwrap();
    let restored = Partition::builder(config_b)
        .restore(&state, &memory)
        .unwrap();
    let mut guest_b = Guest::resume_restored(restored);
    let after = guest_a.run(&format!("ping {ip_b} 3"));
    let back = guest_b.run(&format!("ping {ip_a} 2"));

    assert_eq!(before, "ping: 3/3 replies");
    assert_eq!(after, "ping: 3/3 replies");
    assert_eq!(back, "ping: 2/2 replies");
}

#[test]
fn host_pings_a_guest_on_an_internal_switch_and_receives_its_udp_burst_in_order() {
    require_kvm!();
    enter_private_netns();
    let store = tempfile::tempdir().unwrap();
    let mut switches = VirtualSwitches::load(store.path()).unwrap();
    let switch = switches
        .new_switch(
            "inside",
            SwitchRequest::Internal,
            Some("10.88.1.0/24".parse().unwrap()),
        )
        .unwrap();
    let adapter = switches.add_adapter("vm", Some("inside"), None).unwrap();
    let ip = adapter
        .ipv4
        .expect("an internal switch gives the guest an address");
    let host = Ipv4Addr::new(10, 88, 1, 1);
    assert_eq!(ip, Ipv4Addr::new(10, 88, 1, 2));
    assert_eq!(switch.kind.name(), "Internal");
    let socket = UdpSocket::bind((host, 5555)).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (mut guest, _) = Guest::start(guest_config(adapter.mac, &adapter.tap, ip));

    let answered = host_ping(ip, 3, Duration::from_secs(5));
    let sent = guest.run(&format!("udp {host} 5555 200"));
    let mut sequence = Vec::new();
    let mut buf = [0u8; 2048];
    while sequence.len() < 200 {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            break;
        };
        assert_eq!(from.ip(), ip);
        assert_eq!(n, 64);
        sequence.push(u64::from_be_bytes(buf[..8].try_into().unwrap()));
    }

    assert_eq!(answered, 3);
    assert_eq!(sent, format!("sent 200 datagrams to {host}:5555"));
    assert_eq!(sequence, (0..200).collect::<Vec<u64>>());
}

#[test]
fn bad_switch_and_adapter_requests_are_refused_and_leave_nothing_behind() {
    enter_private_netns();
    let store = tempfile::tempdir().unwrap();
    let mut switches = VirtualSwitches::load(store.path()).unwrap();
    switches
        .new_switch("lab", SwitchRequest::Private, None)
        .unwrap();
    let first = switches.add_adapter("vm-a", Some("lab"), None).unwrap();
    let state = switches.state().clone();
    let multicast: MacAddress = "03:15:5d:00:00:09".parse().unwrap();

    let name_in_use = switches.new_switch("lab", SwitchRequest::Internal, None);
    let missing_interface =
        switches.new_switch("out", SwitchRequest::External("nosuch0".into()), None);
    let bad_name = switches.new_switch("", SwitchRequest::Private, None);
    let multicast_mac = switches.add_adapter("vm-b", Some("lab"), Some(multicast));
    let duplicate_mac = switches.add_adapter("vm-b", Some("lab"), Some(first.mac));
    let no_switch = switches.add_adapter("vm-b", Some("nowhere"), None);
    let in_use = switches.remove_switch("lab");

    assert!(matches!(name_in_use, Err(SwitchError::SwitchExists(_))));
    assert!(
        matches!(&missing_interface, Err(SwitchError::NoSuchInterface(i)) if i == "nosuch0"),
        "{missing_interface:?}"
    );
    assert!(matches!(bad_name, Err(SwitchError::InvalidName(_))));
    assert!(matches!(multicast_mac, Err(SwitchError::MulticastMac(m)) if m == multicast));
    let duplicate = duplicate_mac.unwrap_err();
    assert!(matches!(duplicate, SwitchError::DuplicateMac { ref vm, .. } if vm == "vm-a"));
    assert!(duplicate.to_string().contains("already used"));
    assert!(matches!(no_switch, Err(SwitchError::NoSuchSwitch(_))));
    assert!(matches!(
        in_use,
        Err(SwitchError::SwitchInUse { ports: 1, .. })
    ));
    // Nothing half-created: the file, the bridges and the TAPs are as before.
    assert_eq!(switches.state(), &state);
    assert_eq!(VirtualSwitches::load(store.path()).unwrap().state(), &state);
    assert!(link_index("vmsbr1").is_none());
    assert!(link_index("vmstap1").is_none());
    assert!(link_index("vmsbr0").is_some());
}

#[test]
fn switches_and_adapters_come_back_from_the_store() {
    enter_private_netns();
    let store = tempfile::tempdir().unwrap();
    let mut switches = VirtualSwitches::load(store.path()).unwrap();
    switches
        .new_switch("inside", SwitchRequest::Internal, None)
        .unwrap();
    let adapter = switches.add_adapter("vm", Some("inside"), None).unwrap();
    let bridge = switches.switch("inside").unwrap().bridge.clone();
    // The host loses every link (a reboot of the namespace's links).
    let mut netlink = vswitch::netlink::Netlink::open().unwrap();
    netlink
        .delete_link(link_index(&adapter.tap).unwrap())
        .unwrap();
    netlink.delete_link(link_index(&bridge).unwrap()).unwrap();

    let reloaded = VirtualSwitches::load(store.path()).unwrap();
    reloaded.recreate().unwrap();

    assert_eq!(reloaded.state(), switches.state());
    assert!(link_index(&bridge).is_some());
    assert!(link_index(&adapter.tap).is_some());
}
