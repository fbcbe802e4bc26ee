//! The record log on the disk: sequence-numbered, checksummed 4 KiB records, record `n` in block `n`.
//!
//! On boot the guest finds where the log ends (the first block that is not the right record), so a
//! rebooted guest, or one restored from a checkpoint or backup, continues the sequence. The format
//! is `protocol::encode_record`; the host checks disks with `vmms_guest::verify_records`.

use core::fmt;

use crate::protocol::{RECORD_SIZE, encode_record, verify_record};
use crate::status;
use crate::virtio_blk::{MAX_TRANSFER, RequestError, SECTOR_SIZE, VirtioBlk};

/// Records moved per request.
const RECORDS_PER_REQUEST: usize = MAX_TRANSFER / RECORD_SIZE;
const SECTORS_PER_RECORD: u64 = (RECORD_SIZE / SECTOR_SIZE) as u64;

/// Why an append failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendError {
    /// The records would not all fit on the disk (nothing was written).
    DiskFull,
    /// The device refuses writes.
    ReadOnly,
    /// A request failed; the records before it are on the disk.
    Device(RequestError),
}

impl fmt::Display for AppendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DiskFull => f.write_str("disk full"),
            Self::ReadOnly => f.write_str("disk is read-only"),
            Self::Device(RequestError::Device(status)) => {
                write!(f, "device error (status {status})")
            }
            Self::Device(RequestError::Timeout) => f.write_str("device error (timeout)"),
            Self::Device(RequestError::BadCompletion) => {
                f.write_str("device error (bad completion)")
            }
        }
    }
}

/// The disk, seen as a log of records.
#[derive(Debug)]
pub struct RecordLog {
    disk: VirtioBlk,
    /// Records on the disk: the sequence number of the next one.
    next: u64,
    /// Records the disk can hold.
    capacity: u64,
}

impl RecordLog {
    /// Opens the log on `disk`, scanning from record 0 for its end, and publishes the record count
    /// in the status block.
    pub fn open(disk: VirtioBlk) -> Result<Self, RequestError> {
        let capacity = disk.capacity() / SECTORS_PER_RECORD;
        let mut log = Self {
            disk,
            next: 0,
            capacity,
        };
        log.next = log.scan()?;
        status::set_records_written(log.next);
        Ok(log)
    }

    /// Records on the disk (the next record's sequence number).
    pub fn len(&self) -> u64 {
        self.next
    }

    /// The disk's size in sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.disk.capacity()
    }

    /// Appends `count` records, at most `per_request` to a request (and never more than one
    /// request carries), then flushes; returns the new record count. The status block follows
    /// each completed request, so the host never sees more records than the disk holds.
    pub fn append(&mut self, count: u64, per_request: u64) -> Result<u64, AppendError> {
        if self.disk.read_only() {
            return Err(AppendError::ReadOnly);
        }
        let end = self
            .next
            .checked_add(count)
            .filter(|&end| end <= self.capacity)
            .ok_or(AppendError::DiskFull)?;
        while self.next < end {
            let batch = (end - self.next)
                .min(RECORDS_PER_REQUEST as u64)
                .min(per_request.max(1));
            let first = self.next;
            // `batch` is at most RECORDS_PER_REQUEST, so the length fits the DMA buffer.
            self.disk
                .write(
                    first * SECTORS_PER_RECORD,
                    batch as usize * RECORD_SIZE,
                    |data| {
                        for (seq, block) in (first..).zip(data.chunks_exact_mut(RECORD_SIZE)) {
                            if let Ok(block) = block.try_into() {
                                encode_record(seq, block);
                            }
                        }
                    },
                )
                .map_err(AppendError::Device)?;
            self.next += batch;
            status::set_records_written(self.next);
        }
        self.disk.flush().map_err(AppendError::Device)?;
        Ok(self.next)
    }

    /// Makes every completed write durable (the freeze's "finish in-flight writes": appends
    /// complete before they return, so only the device's cache is left).
    pub fn flush(&mut self) -> Result<(), RequestError> {
        self.disk.flush()
    }

    /// Counts the valid records from record 0 on.
    fn scan(&mut self) -> Result<u64, RequestError> {
        let mut seq = 0;
        while seq < self.capacity {
            let batch = (self.capacity - seq).min(RECORDS_PER_REQUEST as u64);
            let data = self
                .disk
                .read(seq * SECTORS_PER_RECORD, batch as usize * RECORD_SIZE)?;
            for block in data.chunks_exact(RECORD_SIZE) {
                let valid = block
                    .try_into()
                    .is_ok_and(|block| verify_record(seq, block).is_ok());
                if !valid {
                    return Ok(seq);
                }
                seq += 1;
            }
        }
        Ok(seq)
    }
}
