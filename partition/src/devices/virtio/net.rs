//! virtio-net (virtio 1.x section 5.1) over a [`Tap`].
//!
//! Two queues: receive (0) and transmit (1). Every frame on either queue starts with the 12-byte
//! `virtio_net_hdr_v1`, which is also what the TAP reads and writes (`IFF_VNET_HDR`), so offload
//! metadata (partial checksums, GSO) passes through untouched. Receive is driven by the TAP: the
//! I/O thread watches its descriptor ([`VirtioDevice::backend`]) and moves frames into the
//! driver's receive buffers; transmit by the driver's notification.
//!
//! Frames move through two buffers the device allocates once, so the data path allocates
//! nothing. A frame that finds no receive buffer is held until the driver adds some (the I/O
//! thread stops watching the TAP meanwhile); one that cannot fit the buffers at all is dropped,
//! as a NIC drops what it cannot deliver.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{Ordering, fence};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::net_tap::{TUN_F_CSUM, TUN_F_TSO_ECN, TUN_F_TSO4, TUN_F_TSO6, Tap, VNET_HDR_LEN};
use super::{VirtioDevice, VirtioError};
use crate::memory::PartitionMemory;

/// Descriptors per queue.
const QUEUE_SIZE: u16 = 256;
/// The receive queue's index.
pub const RX_QUEUE: usize = 0;
/// The transmit queue's index.
pub const TX_QUEUE: usize = 1;
/// Largest frame moved, vnet header included: a 64 KiB GSO frame plus its Ethernet header.
const MAX_FRAME: usize = VNET_HDR_LEN + 65_550;
/// Most receive buffers one merged frame may take (a 64 KiB frame in 1.5 KiB buffers).
const MAX_MERGED_BUFFERS: usize = 64;
/// Where `num_buffers` sits in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Bytes of config space: mac (6), status (le16).
const CONFIG_LEN: usize = 8;

/// An Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// Whether it names one station: not multicast (nor broadcast), not all zeros.
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }

    /// Whether the locally-administered bit is set (not a vendor's burnt-in address).
    pub fn is_local(&self) -> bool {
        self.0[0] & 2 != 0
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A MAC address that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a mac address (six hex bytes separated by ':' or '-')")]
pub struct MacParseError(pub String);

impl FromStr for MacAddress {
    type Err = MacParseError;

    /// Parses `02:00:5e:10:00:01`, `02-00-5E-10-00-01` or Hyper-V's `02005E100001`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || MacParseError(text.to_owned());
        let mut bytes = [0u8; 6];
        let parts: Vec<&str> = if text.contains([':', '-']) {
            text.split([':', '-']).collect()
        } else if text.len() == 12 && text.is_ascii() {
            (0..6).map(|i| &text[2 * i..2 * i + 2]).collect()
        } else {
            return Err(bad());
        };
        if parts.len() != 6 {
            return Err(bad());
        }
        for (byte, part) in bytes.iter_mut().zip(parts) {
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        Ok(Self(bytes))
    }
}

impl Serialize for MacAddress {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddress {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A virtio-net device over a TAP.
///
/// Features offered: VERSION_1, MAC, STATUS, MRG_RXBUF, CSUM, HOST_TSO4/6 and HOST_ECN (the TAP
/// takes offloaded frames from the guest), GUEST_CSUM, GUEST_TSO4/6 and GUEST_ECN (enabled on the
/// TAP with `TUNSETOFFLOAD` as far as the driver accepts them).
pub struct Net {
    tap: Tap,
    mac: MacAddress,
    link_up: bool,
    mergeable: bool,
    /// The frame read from the TAP and not yet delivered (`rx_len` bytes of `rx_frame`).
    rx_frame: Box<[u8]>,
    rx_len: usize,
    tx_frame: Box<[u8]>,
    /// A frame waits for receive buffers.
    starved: bool,
}

impl fmt::Debug for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Net")
            .field("tap", &self.tap.name())
            .field("mac", &self.mac)
            .field("link_up", &self.link_up)
            .finish_non_exhaustive()
    }
}

impl Net {
    /// A device with address `mac` over `tap` (opened with the vnet header), link up.
    pub fn new(tap: Tap, mac: MacAddress) -> Self {
        Self {
            tap,
            mac,
            link_up: true,
            mergeable: false,
            rx_frame: vec![0; MAX_FRAME].into_boxed_slice(),
            rx_len: 0,
            tx_frame: vec![0; MAX_FRAME].into_boxed_slice(),
            starved: false,
        }
    }

    /// The device's MAC address.
    pub fn mac(&self) -> MacAddress {
        self.mac
    }

    /// The TAP's interface name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// Moves frames from the TAP into receive buffers until the TAP is empty, the buffers run
    /// out, or a ring's worth is done (the I/O thread comes back while the TAP stays readable).
    fn receive(
        &mut self,
        memory: &PartitionMemory,
        queue: &mut Queue,
    ) -> Result<bool, VirtioError> {
        let mut used = false;
        self.starved = false;
        for _ in 0..queue.size() {
            if self.rx_len == 0 {
                match self.tap.read_frame(&mut self.rx_frame) {
                    Ok(Some(n)) if n > VNET_HDR_LEN => self.rx_len = n,
                    // A runt without a frame behind its header: nothing to deliver.
                    Ok(Some(_)) => continue,
                    // Empty, or failed (the interface went down): nothing more now.
                    Ok(None) | Err(_) => break,
                }
            }
            match self.deliver(memory, queue)? {
                Delivery::Done => {
                    self.rx_len = 0;
                    used = true;
                }
                Delivery::Dropped => self.rx_len = 0,
                Delivery::NoBuffers => {
                    self.starved = true;
                    break;
                }
            }
        }
        Ok(used)
    }

    /// Puts the held frame into the next receive buffer(s): one chain, or as many as it needs
    /// with merged buffers, their count written into the header's `num_buffers`. Nothing is
    /// taken from the ring unless the whole frame fits.
    fn deliver(
        &mut self,
        memory: &PartitionMemory,
        queue: &mut Queue,
    ) -> Result<Delivery, VirtioError> {
        let broken = || VirtioError::BrokenQueue { index: RX_QUEUE };
        let start = queue.next_avail();
        let max_chains = if self.mergeable {
            MAX_MERGED_BUFFERS
        } else {
            1
        };
        // First pass: how many chains the frame needs.
        let mut room = 0usize;
        let mut chains = 0usize;
        while room < self.rx_len && chains < max_chains {
            let Some(chain) = queue.iter(memory).map_err(|_| broken())?.next() else {
                queue.set_next_avail(start);
                return Ok(Delivery::NoBuffers);
            };
            room += chain_capacity(&chain);
            chains += 1;
        }
        queue.set_next_avail(start);
        if room < self.rx_len {
            // Too big for what the driver posts (a GSO frame it did not ask for): drop it.
            return Ok(Delivery::Dropped);
        }
        // `chains` <= MAX_MERGED_BUFFERS.
        let count = chains as u16;
        self.rx_frame[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2]
            .copy_from_slice(&count.to_le_bytes());
        // Second pass: copy, and note each chain's head and length.
        let mut heads = [(0u16, 0u32); MAX_MERGED_BUFFERS];
        let mut offset = 0usize;
        for slot in heads.iter_mut().take(chains) {
            let chain = queue
                .iter(memory)
                .map_err(|_| broken())?
                .next()
                .ok_or_else(broken)?;
            let head = chain.head_index();
            if head >= queue.size() {
                return Err(broken());
            }
            let before = offset;
            for descriptor in chain.writable() {
                if offset >= self.rx_len {
                    break;
                }
                let n = (descriptor.len() as usize).min(self.rx_len - offset);
                memory
                    .write_slice(&self.rx_frame[offset..offset + n], descriptor.addr())
                    .map_err(|_| broken())?;
                offset += n;
            }
            // At most MAX_FRAME bytes.
            *slot = (head, (offset - before) as u32);
        }
        if offset < self.rx_len {
            // The driver changed its buffers between the passes.
            return Err(broken());
        }
        publish_used(memory, queue, &heads[..chains]).map_err(|_| broken())?;
        Ok(Delivery::Done)
    }

    /// Sends every frame the driver made available on the transmit queue.
    fn transmit(
        &mut self,
        memory: &PartitionMemory,
        queue: &mut Queue,
    ) -> Result<bool, VirtioError> {
        let broken = || VirtioError::BrokenQueue { index: TX_QUEUE };
        let mut used = false;
        for _ in 0..queue.size() {
            let Some(chain) = queue.iter(memory).map_err(|_| broken())?.next() else {
                break;
            };
            let head = chain.head_index();
            if head >= queue.size() {
                return Err(broken());
            }
            let mut len = 0usize;
            let mut fits = true;
            for descriptor in chain.readable() {
                let n = descriptor.len() as usize;
                let Some(dest) = self.tx_frame.get_mut(len..len + n) else {
                    fits = false;
                    break;
                };
                memory
                    .read_slice(dest, descriptor.addr())
                    .map_err(|_| broken())?;
                len += n;
            }
            // A frame too large, or without anything past its header, is dropped; a failed
            // write (the interface is down) loses the frame as a wire would.
            if fits && len > VNET_HDR_LEN {
                let _ = self.tap.write_frame(&self.tx_frame[..len]);
            }
            queue.add_used(memory, head, 0).map_err(|_| broken())?;
            used = true;
        }
        Ok(used)
    }

    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut config = [0; CONFIG_LEN];
        config[..6].copy_from_slice(&self.mac.0);
        let status = if self.link_up {
            VIRTIO_NET_S_LINK_UP as u16
        } else {
            0
        };
        config[6..].copy_from_slice(&status.to_le_bytes());
        config
    }
}

/// What became of the held frame.
enum Delivery {
    Done,
    Dropped,
    NoBuffers,
}

type Chain<'m> = DescriptorChain<&'m PartitionMemory>;

/// Bytes the device may write into `chain`.
fn chain_capacity(chain: &Chain<'_>) -> usize {
    chain
        .clone()
        .writable()
        .map(|d| d.len() as usize)
        .fold(0, usize::saturating_add)
}

/// Writes the used elements of one merged frame, then moves the used index past all of them at
/// once: a driver never sees the first buffer of a frame without the rest (virtio 1.x 2.7.8).
fn publish_used(
    memory: &PartitionMemory,
    queue: &mut Queue,
    heads: &[(u16, u32)],
) -> Result<(), vm_memory::GuestMemoryError> {
    let used_ring = queue.used_ring();
    let size = queue.size();
    let next = queue.next_used();
    for (i, &(head, len)) in heads.iter().enumerate() {
        // `heads` holds at most MAX_MERGED_BUFFERS entries.
        let slot = next.wrapping_add(i as u16) % size;
        let at = used_ring + 4 + 8 * u64::from(slot);
        memory.write_obj(u32::from(head).to_le(), GuestAddress(at))?;
        memory.write_obj(len.to_le(), GuestAddress(at + 4))?;
    }
    let new_next = next.wrapping_add(heads.len() as u16);
    fence(Ordering::Release);
    memory.store(
        new_next.to_le(),
        GuestAddress(used_ring + 2),
        Ordering::Release,
    )?;
    queue.set_next_used(new_next);
    Ok(())
}

impl VirtioDevice for Net {
    type State = NetState;

    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        [
            VIRTIO_F_VERSION_1,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
        ]
        .iter()
        .fold(0, |features, bit| features | (1 << bit))
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config();
        let Some(source) = usize::try_from(offset).ok().and_then(|at| config.get(at..)) else {
            return;
        };
        let len = source.len().min(data.len());
        data[..len].copy_from_slice(&source[..len]);
    }

    /// The MAC is writable only with CTRL_MAC_ADDR or legacy drivers, neither offered.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, features: u64) -> Result<(), VirtioError> {
        self.mergeable = features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        let offload = [
            (VIRTIO_NET_F_GUEST_CSUM, TUN_F_CSUM),
            (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
            (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
            (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN),
        ]
        .iter()
        .filter(|(feature, _)| features & (1 << feature) != 0)
        .fold(0, |flags, (_, flag)| flags | flag);
        // TSO needs checksum offload; without CSUM the TAP must hand over finished frames.
        let offload = if offload & TUN_F_CSUM == 0 {
            0
        } else {
            offload
        };
        self.tap
            .set_offload(offload)
            .map_err(|source| VirtioError::Tap {
                name: self.tap.name().to_owned(),
                source,
            })
    }

    fn reset(&mut self) {
        self.mergeable = false;
        self.rx_len = 0;
        self.starved = false;
        // The next driver negotiates again; until then the TAP sends plain frames.
        let _ = self.tap.set_offload(0);
    }

    fn process_queue(
        &mut self,
        memory: &PartitionMemory,
        index: usize,
        queue: &mut Queue,
    ) -> Result<bool, VirtioError> {
        match index {
            RX_QUEUE => self.receive(memory, queue),
            TX_QUEUE => self.transmit(memory, queue),
            _ => Ok(false),
        }
    }

    fn state(&self) -> NetState {
        NetState {
            mac: self.mac,
            link_up: self.link_up,
        }
    }

    /// The guest knows its MAC: the device must have the same one. The link comes back as it was.
    fn restore(&mut self, state: &NetState) -> Result<(), VirtioError> {
        if state.mac != self.mac {
            return Err(VirtioError::StateMismatch {
                what: "mac address",
            });
        }
        self.link_up = state.link_up;
        Ok(())
    }

    fn backend(&self) -> Option<(std::os::fd::RawFd, usize)> {
        use std::os::fd::AsRawFd;
        Some((self.tap.as_raw_fd(), RX_QUEUE))
    }

    fn backend_starved(&self) -> bool {
        self.starved
    }
}

/// The saved state of a [`Net`] device (the queues and negotiated features are the transport's).
///
/// Fields added later get `#[serde(default)]` so older saved states still load.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetState {
    /// The address the guest was given.
    pub mac: MacAddress,
    /// Whether the guest saw the link up.
    pub link_up: bool,
}
