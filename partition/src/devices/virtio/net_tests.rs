//! virtio-net over a real TAP, in a network namespace of the test's own: merged receive buffers,
//! held frames, pause.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::driver::{Buffer, Driver, guest_memory, used_elem, used_idx, write_register};
use super::{MacAddress, MmioTransport, Net, Tap, VNET_HDR_LEN};

const TAP: &str = "vmsnettest0";

/// A TAP, up, in a fresh network namespace with IPv6 off (so the kernel sends nothing of its own).
fn tap() -> Tap {
    // SAFETY: unshare takes flags by value; only this thread moves.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
    std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1").unwrap();
    let tap = Tap::open(TAP).unwrap();
    // SAFETY: a plain datagram socket for SIOCSIFFLAGS, checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    assert!(fd >= 0);
    // SAFETY: fresh descriptor.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut request = [0u8; 40];
    request[..TAP.len()].copy_from_slice(TAP.as_bytes());
    request[16..18].copy_from_slice(&(libc::IFF_UP as u16).to_ne_bytes());
    // SAFETY: SIOCSIFFLAGS reads a 40-byte ifreq from a valid buffer.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, request.as_mut_ptr()) };
    assert_eq!(rc, 0);
    tap
}

/// Sends `frame` out of the TAP interface from the host side (a packet socket), so that the
/// TAP's reader receives it.
fn host_sends(frame: &[u8]) {
    let name = std::ffi::CString::new(TAP).unwrap();
    // SAFETY: valid NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    // SAFETY: a packet socket, checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(fd >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: fresh descriptor.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = index as i32;
    addr.sll_halen = 6;
    // SAFETY: valid frame and address of the sizes given.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(
        sent,
        frame.len() as isize,
        "{}",
        std::io::Error::last_os_error()
    );
}

fn frame(len: usize) -> Vec<u8> {
    let mut frame = vec![0xffu8; 6];
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 9]);
    frame.extend_from_slice(&0x88b5u16.to_be_bytes());
    frame.extend((0..len - 14).map(|i| i as u8));
    frame
}

#[test]
fn merged_receive_buffers_carry_a_frame_longer_than_one_buffer() {
    let memory = guest_memory();
    let mac: MacAddress = "02:15:5d:00:00:01".parse().unwrap();
    let transport = MmioTransport::new(
        Net::new(tap(), mac),
        memory.clone(),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    )
    .unwrap();
    // Every offered feature, MRG_RXBUF and the offloads included (TUNSETOFFLOAD on the TAP).
    let mut driver = Driver::start(&transport);
    let sent = frame(200);
    host_sends(&sent);

    // No buffer yet: the frame is held, nothing is used.
    write_register(&transport, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    let before = used_idx(&memory);
    for i in 0..3u64 {
        driver.publish(&memory, &[Buffer::writable(0x10000 + i * 0x100, 100)]);
    }
    write_register(&transport, VIRTIO_MMIO_QUEUE_NOTIFY, 0);

    assert_eq!(before, 0);
    assert_eq!(used_idx(&memory), 3);
    let lens: Vec<u32> = (0..3).map(|n| used_elem(&memory, n).1).collect();
    assert_eq!(lens, [100, 100, (VNET_HDR_LEN + 200 - 200) as u32]);
    let num_buffers: u16 = memory.read_obj(GuestAddress(0x10000 + 10)).unwrap();
    assert_eq!(num_buffers, 3);
    let mut delivered = vec![0u8; 212];
    for (i, chunk) in delivered.chunks_mut(100).enumerate() {
        memory
            .read_slice(chunk, GuestAddress(0x10000 + i as u64 * 0x100))
            .unwrap();
    }
    assert_eq!(&delivered[VNET_HDR_LEN..], &sent[..]);
}

#[test]
fn paused_device_leaves_frames_in_the_tap_until_it_runs_again() {
    let memory = guest_memory();
    let mac: MacAddress = "02:15:5d:00:00:02".parse().unwrap();
    let transport = MmioTransport::new(
        Net::new(tap(), mac),
        memory.clone(),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    )
    .unwrap();
    let mut driver = Driver::start(&transport);
    driver.publish(&memory, &[Buffer::writable(0x10000, 2048)]);

    transport.set_paused(true);
    host_sends(&frame(64));
    write_register(&transport, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    let while_paused = used_idx(&memory);
    transport.set_paused(false);

    assert_eq!(while_paused, 0);
    assert_eq!(used_idx(&memory), 1);
    assert_eq!(used_elem(&memory, 0).1, (VNET_HDR_LEN + 64) as u32);
}
