//! The guest's tiny IPv4 stack over [`VirtioNet`]: it answers ARP and ICMP echo for its address,
//! resolves neighbours, pings, and sends numbered UDP datagrams. Enough for tests to measure both
//! directions of a network path without a Linux userspace.

use crate::io::rdtsc;
use crate::virtio_net::{SendError, VirtioNet};

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETH_LEN: usize = 14;
const IP_LEN: usize = 20;
const UDP_LEN: usize = 8;
const ICMP_LEN: usize = 8;
const ARP_LEN: usize = 28;
const PROTO_ICMP: u8 = 1;
const PROTO_UDP: u8 = 17;
const BROADCAST: [u8; 6] = [0xff; 6];
/// The UDP source port of `udp`.
const UDP_SOURCE_PORT: u16 = 40_000;
/// The ICMP identifier of the guest's echo requests.
const PING_ID: u16 = 0x766d;
/// TSC ticks to wait for an ARP or echo reply (about a second at the clock rates VMs see).
const REPLY_TIMEOUT_TICKS: u64 = 1 << 31;
const ARP_ENTRIES: usize = 8;

/// Why a command that sends failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetError {
    /// No ARP reply for the address.
    Unreachable,
    /// The device did not take a frame.
    Send(SendError),
    /// A datagram size the frame cannot hold.
    BadSize,
}

impl core::fmt::Display for NetError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Unreachable => f.write_str("no arp reply"),
            Self::Send(SendError::TooLong) => f.write_str("frame too long"),
            Self::Send(SendError::Timeout) => f.write_str("transmit timed out"),
            Self::BadSize => f.write_str("bad datagram size"),
        }
    }
}

/// The guest's network: the NIC, its IPv4 address, and what it learned.
#[derive(Debug)]
pub struct NetStack {
    nic: VirtioNet,
    state: State,
}

#[derive(Debug)]
struct State {
    ip: [u8; 4],
    mac: [u8; 6],
    arp: [([u8; 4], [u8; 6]); ARP_ENTRIES],
    arp_next: usize,
    /// Sequence numbers of echo replies received for our pings (bit per seq below 64).
    pongs: u64,
}

impl NetStack {
    /// The stack on `nic` with address `ip`.
    pub fn new(nic: VirtioNet, ip: [u8; 4]) -> Self {
        let mac = nic.mac();
        Self {
            nic,
            state: State {
                ip,
                mac,
                arp: [([0; 4], [0; 6]); ARP_ENTRIES],
                arp_next: 0,
                pongs: 0,
            },
        }
    }

    /// The NIC's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.state.mac
    }

    /// The stack's IPv4 address.
    pub fn ip(&self) -> [u8; 4] {
        self.state.ip
    }

    /// Handles every frame that arrived; returns how many.
    pub fn poll(&mut self) -> usize {
        let state = &mut self.state;
        self.nic.poll(|nic, frame| state.handle(nic, frame))
    }

    /// Sends `count` UDP datagrams of `size` payload bytes to `ip:port`, each starting with its
    /// sequence number (u64, big-endian), 0 first.
    pub fn send_udp(
        &mut self,
        ip: [u8; 4],
        port: u16,
        count: u64,
        size: usize,
    ) -> Result<(), NetError> {
        if !(8..=1400).contains(&size) {
            return Err(NetError::BadSize);
        }
        let mac = self.resolve(ip)?;
        for seq in 0..count {
            let len = ETH_LEN + IP_LEN + UDP_LEN + size;
            let (src_mac, src_ip) = (self.state.mac, self.state.ip);
            self.nic
                .send(len, |frame| {
                    ethernet(frame, mac, src_mac, ETHERTYPE_IPV4);
                    ipv4(&mut frame[ETH_LEN..], PROTO_UDP, src_ip, ip, UDP_LEN + size);
                    let udp = &mut frame[ETH_LEN + IP_LEN..];
                    udp[0..2].copy_from_slice(&UDP_SOURCE_PORT.to_be_bytes());
                    udp[2..4].copy_from_slice(&port.to_be_bytes());
                    udp[4..6].copy_from_slice(&((UDP_LEN + size) as u16).to_be_bytes());
                    // No checksum (allowed over IPv4).
                    udp[6..8].fill(0);
                    udp[8..16].copy_from_slice(&seq.to_be_bytes());
                    for (i, byte) in udp[16..UDP_LEN + size].iter_mut().enumerate() {
                        *byte = i as u8;
                    }
                })
                .map_err(NetError::Send)?;
            // Answer neighbours meanwhile: a long burst must not starve the receive ring.
            if seq % 16 == 15 {
                self.poll();
            }
        }
        Ok(())
    }

    /// Sends `count` echo requests to `ip`, one at a time, each waiting up to about a second for
    /// its reply; returns the replies received.
    pub fn ping(&mut self, ip: [u8; 4], count: u16) -> Result<u16, NetError> {
        let mac = self.resolve(ip)?;
        let mut replies = 0;
        for seq in 0..count {
            self.state.pongs = 0;
            let (src_mac, src_ip) = (self.state.mac, self.state.ip);
            self.nic
                .send(ETH_LEN + IP_LEN + ICMP_LEN + 8, |frame| {
                    ethernet(frame, mac, src_mac, ETHERTYPE_IPV4);
                    ipv4(&mut frame[ETH_LEN..], PROTO_ICMP, src_ip, ip, ICMP_LEN + 8);
                    let icmp = &mut frame[ETH_LEN + IP_LEN..];
                    icmp[0] = 8;
                    icmp[1] = 0;
                    icmp[2..4].fill(0);
                    icmp[4..6].copy_from_slice(&PING_ID.to_be_bytes());
                    icmp[6..8].copy_from_slice(&seq.to_be_bytes());
                    icmp[8..16].copy_from_slice(&rdtsc().to_be_bytes());
                    let sum = checksum(&icmp[..ICMP_LEN + 8]);
                    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
                })
                .map_err(NetError::Send)?;
            let bit = 1u64 << (seq % 64);
            if self.wait(|state| state.pongs & bit != 0) {
                replies += 1;
            }
        }
        Ok(replies)
    }

    /// The MAC of `ip`: from the cache, or asked for with up to three ARP requests.
    fn resolve(&mut self, ip: [u8; 4]) -> Result<[u8; 6], NetError> {
        for _ in 0..3 {
            if let Some(mac) = self.state.lookup(ip) {
                return Ok(mac);
            }
            let (src_mac, src_ip) = (self.state.mac, self.state.ip);
            self.nic
                .send(ETH_LEN + ARP_LEN, |frame| {
                    ethernet(frame, BROADCAST, src_mac, ETHERTYPE_ARP);
                    arp(&mut frame[ETH_LEN..], 1, src_mac, src_ip, [0; 6], ip);
                })
                .map_err(NetError::Send)?;
            self.wait(|state| state.lookup(ip).is_some());
        }
        self.state.lookup(ip).ok_or(NetError::Unreachable)
    }

    /// Polls until `done` or the reply timeout.
    fn wait(&mut self, done: impl Fn(&State) -> bool) -> bool {
        let started = rdtsc();
        while rdtsc().wrapping_sub(started) < REPLY_TIMEOUT_TICKS {
            self.poll();
            if done(&self.state) {
                return true;
            }
            core::hint::spin_loop();
        }
        false
    }
}

impl State {
    fn lookup(&self, ip: [u8; 4]) -> Option<[u8; 6]> {
        self.arp
            .iter()
            .find(|(known, _)| *known == ip && ip != [0; 4])
            .map(|(_, mac)| *mac)
    }

    fn learn(&mut self, ip: [u8; 4], mac: [u8; 6]) {
        if ip == [0; 4] || mac[0] & 1 != 0 {
            return;
        }
        if let Some(entry) = self.arp.iter_mut().find(|(known, _)| *known == ip) {
            entry.1 = mac;
            return;
        }
        self.arp[self.arp_next] = (ip, mac);
        self.arp_next = (self.arp_next + 1) % ARP_ENTRIES;
    }

    /// One received frame: ARP requests and echo requests for us are answered, replies noted.
    fn handle(&mut self, nic: &mut VirtioNet, frame: &[u8]) {
        if frame.len() < ETH_LEN {
            return;
        }
        let src_mac: [u8; 6] = frame[6..12].try_into().unwrap_or([0; 6]);
        match u16::from_be_bytes([frame[12], frame[13]]) {
            ETHERTYPE_ARP => self.handle_arp(nic, &frame[ETH_LEN..]),
            ETHERTYPE_IPV4 => self.handle_ipv4(nic, src_mac, &frame[ETH_LEN..]),
            _ => {}
        }
    }

    fn handle_arp(&mut self, nic: &mut VirtioNet, packet: &[u8]) {
        if packet.len() < ARP_LEN || packet[0..6] != [0, 1, 8, 0, 6, 4] {
            return;
        }
        let op = u16::from_be_bytes([packet[6], packet[7]]);
        let sender_mac: [u8; 6] = packet[8..14].try_into().unwrap_or([0; 6]);
        let sender_ip: [u8; 4] = packet[14..18].try_into().unwrap_or([0; 4]);
        let target_ip: [u8; 4] = packet[24..28].try_into().unwrap_or([0; 4]);
        if target_ip != self.ip && op != 2 {
            return;
        }
        self.learn(sender_ip, sender_mac);
        if op == 1 {
            let (mac, ip) = (self.mac, self.ip);
            // A reply that finds the transmit ring full is lost, as on a wire.
            let _ = nic.send(ETH_LEN + ARP_LEN, |frame| {
                ethernet(frame, sender_mac, mac, ETHERTYPE_ARP);
                arp(&mut frame[ETH_LEN..], 2, mac, ip, sender_mac, sender_ip);
            });
        }
    }

    fn handle_ipv4(&mut self, nic: &mut VirtioNet, src_mac: [u8; 6], packet: &[u8]) {
        if packet.len() < IP_LEN || packet[0] >> 4 != 4 {
            return;
        }
        let header_len = usize::from(packet[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
        if header_len < IP_LEN || total < header_len || total > packet.len() {
            return;
        }
        let src_ip: [u8; 4] = packet[12..16].try_into().unwrap_or([0; 4]);
        let dst_ip: [u8; 4] = packet[16..20].try_into().unwrap_or([0; 4]);
        if dst_ip != self.ip || packet[9] != PROTO_ICMP {
            return;
        }
        self.learn(src_ip, src_mac);
        let icmp = &packet[header_len..total];
        if icmp.len() < ICMP_LEN {
            return;
        }
        match icmp[0] {
            // Echo request: the same message back as a reply.
            8 => {
                let (mac, ip) = (self.mac, self.ip);
                let len = icmp.len();
                let _ = nic.send(ETH_LEN + IP_LEN + len, |frame| {
                    ethernet(frame, src_mac, mac, ETHERTYPE_IPV4);
                    ipv4(&mut frame[ETH_LEN..], PROTO_ICMP, ip, src_ip, len);
                    let reply = &mut frame[ETH_LEN + IP_LEN..];
                    reply[..len].copy_from_slice(icmp);
                    reply[0] = 0;
                    reply[2..4].fill(0);
                    let sum = checksum(&reply[..len]);
                    reply[2..4].copy_from_slice(&sum.to_be_bytes());
                });
            }
            // Echo reply to one of our pings.
            0 if u16::from_be_bytes([icmp[4], icmp[5]]) == PING_ID => {
                let seq = u16::from_be_bytes([icmp[6], icmp[7]]);
                self.pongs |= 1 << (seq % 64);
            }
            _ => {}
        }
    }
}

fn ethernet(frame: &mut [u8], dst: [u8; 6], src: [u8; 6], ethertype: u16) {
    frame[0..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
    frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
}

fn ipv4(packet: &mut [u8], protocol: u8, src: [u8; 4], dst: [u8; 4], payload: usize) {
    packet[0] = 0x45;
    packet[1] = 0;
    packet[2..4].copy_from_slice(&((IP_LEN + payload) as u16).to_be_bytes());
    packet[4..8].fill(0);
    packet[8] = 64;
    packet[9] = protocol;
    packet[10..12].fill(0);
    packet[12..16].copy_from_slice(&src);
    packet[16..20].copy_from_slice(&dst);
    let sum = checksum(&packet[..IP_LEN]);
    packet[10..12].copy_from_slice(&sum.to_be_bytes());
}

fn arp(
    packet: &mut [u8],
    op: u16,
    sender_mac: [u8; 6],
    sender_ip: [u8; 4],
    target_mac: [u8; 6],
    target_ip: [u8; 4],
) {
    packet[0..6].copy_from_slice(&[0, 1, 8, 0, 6, 4]);
    packet[6..8].copy_from_slice(&op.to_be_bytes());
    packet[8..14].copy_from_slice(&sender_mac);
    packet[14..18].copy_from_slice(&sender_ip);
    packet[18..24].copy_from_slice(&target_mac);
    packet[24..28].copy_from_slice(&target_ip);
}

/// The Internet checksum (RFC 1071) of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in data.chunks(2) {
        let word = match pair {
            [a, b] => u16::from_be_bytes([*a, *b]),
            [a] => u16::from_be_bytes([*a, 0]),
            _ => 0,
        };
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
