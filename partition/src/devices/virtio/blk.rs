//! virtio-blk (virtio 1.x section 5.2) over a [`BlockBackend`].
//!
//! A request is a descriptor chain: a 16-byte header the device reads (type, sector), the data
//! (device-readable for a write, device-writable for a read), and a final status byte the device
//! writes. Requests move bytes straight between the backend and guest memory; each write marks its
//! blocks in the disk's [`ChangedBlockMap`], whatever the backend.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::{ChangedBlockMap, VirtioDevice, VirtioError};
use crate::block::BlockBackend;
pub use crate::block::SECTOR_SIZE;
use crate::memory::PartitionMemory;

/// Descriptors per request queue.
const QUEUE_SIZE: u16 = 256;
/// Bytes of the request header: type (le32), reserved (le32), sector (le64).
const HEADER_LEN: u64 = 16;
const ID_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Bytes of config space defined here: capacity (le64), size_max (le32), seg_max (le32).
const CONFIG_LEN: usize = 16;

/// How a [`Block`] device presents its image.
#[derive(Clone, Debug, Default)]
pub struct BlockConfig {
    /// Offer the disk read-only (`VIRTIO_BLK_F_RO`); writes fail with an I/O error. A backend
    /// that is read-only itself makes the disk read-only whatever this says.
    pub read_only: bool,
    /// What `VIRTIO_BLK_T_GET_ID` returns (Linux shows it as the disk's serial); at most 20 bytes.
    pub serial: String,
}

/// A virtio-blk device over a [`BlockBackend`].
///
/// The capacity is the backend's size, which must be a whole number of 512-byte sectors. Features
/// offered: VERSION_1, FLUSH (answered with the backend's flush), SEG_MAX, and RO for a read-only
/// disk.
/// Requests that reach past the capacity or carry data that is not whole sectors fail with
/// `VIRTIO_BLK_S_IOERR` before any byte moves; unknown request types get `VIRTIO_BLK_S_UNSUPP`. A
/// chain with a descriptor outside guest memory, or a broken available ring, breaks the device
/// (`DEVICE_NEEDS_RESET`): nothing of that request is done.
#[derive(Debug)]
pub struct Block {
    backend: Arc<dyn BlockBackend>,
    capacity_bytes: u64,
    read_only: bool,
    /// The ID, NUL-padded to its full 20 bytes.
    serial: [u8; ID_LEN],
    config: [u8; CONFIG_LEN],
    changed_blocks: Arc<ChangedBlockMap>,
    /// Whether the driver accepted FLUSH; without it every write is made durable before it
    /// completes (virtio 1.x section 5.2.6.2).
    flush_negotiated: bool,
}

impl Block {
    /// A device over `backend` that records its writes in `changed_blocks`.
    ///
    /// The owner keeps a clone of `changed_blocks` to take it for backups; it must cover the whole
    /// disk.
    pub fn new(
        backend: Arc<dyn BlockBackend>,
        config: BlockConfig,
        changed_blocks: Arc<ChangedBlockMap>,
    ) -> Result<Self, VirtioError> {
        let capacity_bytes = backend.size();
        if !capacity_bytes.is_multiple_of(SECTOR_SIZE) {
            return Err(VirtioError::ImageNotSectorAligned {
                len: capacity_bytes,
            });
        }
        if changed_blocks.covered_bytes() < capacity_bytes {
            return Err(VirtioError::ChangedBlockMapTooSmall {
                map_bytes: changed_blocks.covered_bytes(),
                disk_bytes: capacity_bytes,
            });
        }
        let mut serial = [0; ID_LEN];
        serial
            .get_mut(..config.serial.len())
            .ok_or(VirtioError::SerialTooLong {
                len: config.serial.len(),
            })?
            .copy_from_slice(config.serial.as_bytes());

        let mut block_config = [0; CONFIG_LEN];
        block_config[..8].copy_from_slice(&(capacity_bytes / SECTOR_SIZE).to_le_bytes());
        // The header and the status take one descriptor each.
        block_config[12..].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());

        let read_only = config.read_only || backend.read_only();
        Ok(Self {
            backend,
            capacity_bytes,
            read_only,
            serial,
            config: block_config,
            changed_blocks,
            flush_negotiated: false,
        })
    }

    /// The disk's size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_bytes / SECTOR_SIZE
    }

    /// The map this disk's writes are recorded in.
    pub fn changed_blocks(&self) -> &Arc<ChangedBlockMap> {
        &self.changed_blocks
    }

    /// Serves one request and returns the bytes written into its buffers, status included;
    /// `None` if a descriptor of the chain lies outside guest memory (the device is then broken:
    /// nothing of the request is done).
    fn execute(&self, memory: &PartitionMemory, chain: &Chain<'_>) -> Option<u32> {
        let layout = ChainLayout::inspect(memory, chain);
        if !layout.in_memory {
            return None;
        }
        // Without a status byte there is nothing to report: hand the buffers back unused.
        let Some(status) = layout.status else {
            return Some(0);
        };
        let result = if layout.well_formed {
            self.serve(memory, chain, &layout)
        } else {
            Err(RequestError::IoError)
        };
        let (status_byte, written) = match result {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(error) => (error.status(), 0),
        };
        match memory.write_obj(status_byte as u8, status) {
            Ok(()) => Some(written.saturating_add(1)),
            Err(_) => Some(0),
        }
    }

    fn serve(
        &self,
        memory: &PartitionMemory,
        chain: &Chain<'_>,
        layout: &ChainLayout,
    ) -> Result<u32, RequestError> {
        let header = RequestHeader::read(memory, chain)?;
        // Everything writable before the status byte is data for the driver.
        let writable_data = layout.writable - 1;
        match header.kind {
            VIRTIO_BLK_T_IN => self.read(memory, chain, header.sector, writable_data),
            VIRTIO_BLK_T_OUT => {
                self.write(memory, chain, header.sector, layout.readable - HEADER_LEN)
            }
            VIRTIO_BLK_T_FLUSH => self
                .backend
                .flush()
                .map(|()| 0)
                .map_err(|_| RequestError::IoError),
            VIRTIO_BLK_T_GET_ID => self.get_id(memory, chain, writable_data),
            _ => Err(RequestError::Unsupported),
        }
    }

    /// The image offset of `len` bytes at `sector`, if they are whole sectors inside the disk.
    fn image_offset(&self, sector: u64, len: u64) -> Result<u64, RequestError> {
        let start = sector
            .checked_mul(SECTOR_SIZE)
            .ok_or(RequestError::IoError)?;
        let end = start.checked_add(len).ok_or(RequestError::IoError)?;
        if !len.is_multiple_of(SECTOR_SIZE) || end > self.capacity_bytes {
            return Err(RequestError::IoError);
        }
        Ok(start)
    }

    fn read(
        &self,
        memory: &PartitionMemory,
        chain: &Chain<'_>,
        sector: u64,
        len: u64,
    ) -> Result<u32, RequestError> {
        let mut offset = self.image_offset(sector, len)?;
        let moved = for_each_range(chain, Direction::Writable, 0, len, |addr, n| {
            for slice in memory.get_slices(addr, n) {
                let slice = slice.map_err(|_| RequestError::IoError)?;
                self.backend
                    .read_at(offset, &slice)
                    .map_err(|_| RequestError::IoError)?;
                offset += slice.len() as u64;
            }
            Ok(())
        })?;
        if moved != len {
            return Err(RequestError::IoError);
        }
        u32::try_from(len).map_err(|_| RequestError::IoError)
    }

    fn write(
        &self,
        memory: &PartitionMemory,
        chain: &Chain<'_>,
        sector: u64,
        len: u64,
    ) -> Result<u32, RequestError> {
        if self.read_only {
            return Err(RequestError::IoError);
        }
        let mut offset = self.image_offset(sector, len)?;
        let moved = for_each_range(chain, Direction::Readable, HEADER_LEN, len, |addr, n| {
            for slice in memory.get_slices(addr, n) {
                let slice = slice.map_err(|_| RequestError::IoError)?;
                let written = self.backend.write_at(offset, &slice);
                // A failed write may have changed any part of its range. Marked after the write
                // so a backup that takes the map, then reads the disk, never misses it.
                self.changed_blocks.mark(offset, slice.len() as u64);
                written.map_err(|_| RequestError::IoError)?;
                offset += slice.len() as u64;
            }
            Ok(())
        })?;
        if moved != len {
            return Err(RequestError::IoError);
        }
        if !self.flush_negotiated {
            self.backend.flush().map_err(|_| RequestError::IoError)?;
        }
        Ok(0)
    }

    fn get_id(
        &self,
        memory: &PartitionMemory,
        chain: &Chain<'_>,
        room: u64,
    ) -> Result<u32, RequestError> {
        let len = room.min(ID_LEN as u64);
        let mut done = 0;
        for_each_range(chain, Direction::Writable, 0, len, |addr, n| {
            let bytes = self
                .serial
                .get(done..done + n)
                .ok_or(RequestError::IoError)?;
            memory
                .write_slice(bytes, addr)
                .map_err(|_| RequestError::IoError)?;
            done += n;
            Ok(())
        })?;
        u32::try_from(done).map_err(|_| RequestError::IoError)
    }
}

impl VirtioDevice for Block {
    type State = BlockState;

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let read_only = if self.read_only {
            1 << VIRTIO_BLK_F_RO
        } else {
            0
        };
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | read_only
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let Some(source) = usize::try_from(offset)
            .ok()
            .and_then(|at| self.config.get(at..))
        else {
            return;
        };
        let len = source.len().min(data.len());
        data[..len].copy_from_slice(&source[..len]);
    }

    /// Nothing in the offered config space is writable (no CONFIG_WCE).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, features: u64) -> Result<(), VirtioError> {
        self.flush_negotiated = features & (1 << VIRTIO_BLK_F_FLUSH) != 0;
        Ok(())
    }

    fn reset(&mut self) {
        self.flush_negotiated = false;
    }

    fn process_queue(
        &mut self,
        memory: &PartitionMemory,
        index: usize,
        queue: &mut Queue,
    ) -> Result<bool, VirtioError> {
        let mut used = false;
        // At most one ring's worth per notification: chains the driver adds meanwhile come with
        // their own notification (the device never suppresses them), and a driver that keeps
        // refilling cannot hold the serving thread here forever.
        for _ in 0..queue.size() {
            // An available index more than a ring ahead of the device's is a broken ring.
            let Some(chain) = queue
                .iter(memory)
                .map_err(|_| VirtioError::BrokenQueue { index })?
                .next()
            else {
                break;
            };
            let head = chain.head_index();
            // A head outside the ring cannot be returned: the driver broke the queue.
            if head >= queue.size() {
                return Err(VirtioError::BrokenQueue { index });
            }
            let written = self
                .execute(memory, &chain)
                .ok_or(VirtioError::BrokenQueue { index })?;
            queue
                .add_used(memory, head, written)
                .map_err(|_| VirtioError::BrokenQueue { index })?;
            used = true;
        }
        Ok(used)
    }

    /// The request queue: a driver writing a file submits request after request.
    fn polls_queue(&self, _index: usize) -> bool {
        true
    }

    fn state(&self) -> BlockState {
        BlockState {
            capacity_sectors: self.capacity_sectors(),
            read_only: self.read_only,
        }
    }

    /// Checks that the image is the one the state was captured with: same size, same access.
    /// Negotiated features come back through [`VirtioDevice::activate`].
    fn restore(&mut self, state: &BlockState) -> Result<(), VirtioError> {
        if state.capacity_sectors != self.capacity_sectors() {
            return Err(VirtioError::StateMismatch {
                what: "disk capacity",
            });
        }
        if state.read_only != self.read_only {
            return Err(VirtioError::StateMismatch {
                what: "read-only flag",
            });
        }
        Ok(())
    }
}

/// The saved state of a [`Block`] device: what the guest has seen of it.
///
/// Fields added later get `#[serde(default)]` so older saved states still load.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BlockState {
    /// The capacity the guest knows; the image must still have it.
    pub capacity_sectors: u64,
    /// Whether the guest was told the disk is read-only.
    pub read_only: bool,
}

type Chain<'m> = DescriptorChain<&'m PartitionMemory>;

/// Why a request failed, as the driver will see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RequestError {
    IoError,
    Unsupported,
}

impl RequestError {
    fn status(self) -> u32 {
        match self {
            Self::IoError => VIRTIO_BLK_S_IOERR,
            Self::Unsupported => VIRTIO_BLK_S_UNSUPP,
        }
    }
}

/// The request header, decoded.
#[derive(Clone, Copy, Debug)]
struct RequestHeader {
    kind: u32,
    sector: u64,
}

impl RequestHeader {
    /// Reads the header from the chain's first readable bytes, however the driver split them.
    fn read(memory: &PartitionMemory, chain: &Chain<'_>) -> Result<Self, RequestError> {
        let mut raw = [0u8; HEADER_LEN as usize];
        let mut done = 0;
        let got = for_each_range(chain, Direction::Readable, 0, HEADER_LEN, |addr, n| {
            let dest = raw.get_mut(done..done + n).ok_or(RequestError::IoError)?;
            memory
                .read_slice(dest, addr)
                .map_err(|_| RequestError::IoError)?;
            done += n;
            Ok(())
        })?;
        if got != HEADER_LEN {
            return Err(RequestError::IoError);
        }
        let [k0, k1, k2, k3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = raw;
        Ok(Self {
            kind: u32::from_le_bytes([k0, k1, k2, k3]),
            sector: u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
        })
    }
}

/// The shape of a request's chain, found before any byte moves.
#[derive(Clone, Copy, Debug)]
struct ChainLayout {
    /// Bytes in device-readable descriptors.
    readable: u64,
    /// Bytes in device-writable descriptors, the status byte included.
    writable: u64,
    /// Where the status byte goes: the last byte of the last non-empty writable descriptor.
    status: Option<GuestAddress>,
    /// All readable descriptors come first and there is room for a header.
    well_formed: bool,
    /// Every descriptor lies in guest memory.
    in_memory: bool,
}

impl ChainLayout {
    fn inspect(memory: &PartitionMemory, chain: &Chain<'_>) -> Self {
        let (mut readable, mut writable) = (0u64, 0u64);
        let mut status = None;
        let mut seen_writable = false;
        let mut well_formed = true;
        let mut in_memory = true;
        // A chain yields at most 4 GiB in total, so the sums cannot overflow.
        for desc in chain.clone() {
            let len = u64::from(desc.len());
            if desc.is_write_only() {
                seen_writable = true;
                writable += len;
                if len > 0 {
                    status = desc.addr().checked_add(len - 1);
                }
            } else {
                well_formed &= !seen_writable;
                readable += len;
            }
            in_memory &= memory.check_range(desc.addr(), desc.len() as usize);
        }
        Self {
            readable,
            writable,
            status,
            well_formed: well_formed && readable >= HEADER_LEN,
            in_memory,
        }
    }
}

/// Which descriptors of a chain a transfer walks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    /// Device-readable: the header and the data of a write.
    Readable,
    /// Device-writable: the data of a read, then the status.
    Writable,
}

/// Calls `f` with each guest range holding bytes `skip..skip + len` of the chain's `direction`
/// descriptors, in order. Returns how many bytes it visited: fewer than `len` if the chain is
/// shorter (the guest may have rewritten it since [`ChainLayout::inspect`]), never more.
fn for_each_range<E>(
    chain: &Chain<'_>,
    direction: Direction,
    mut skip: u64,
    len: u64,
    mut f: impl FnMut(GuestAddress, usize) -> Result<(), E>,
) -> Result<u64, E> {
    let writable = direction == Direction::Writable;
    let mut visited = 0;
    for desc in chain.clone() {
        if visited == len {
            break;
        }
        if desc.is_write_only() != writable {
            continue;
        }
        let desc_len = u64::from(desc.len());
        if skip >= desc_len {
            skip -= desc_len;
            continue;
        }
        let Some(addr) = desc.addr().checked_add(skip) else {
            break;
        };
        let n = (desc_len - skip).min(len - visited);
        // `n` is at most a descriptor's u32 length.
        f(addr, n as usize)?;
        visited += n;
        skip = 0;
    }
    Ok(visited)
}

#[cfg(test)]
#[path = "blk_tests.rs"]
mod tests;
