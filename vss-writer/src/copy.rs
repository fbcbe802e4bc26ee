//! Moving disk data between a VM's images and a set's: which ranges a chain holds, and the copy
//! itself with a SHA-256 per extent so `verify` can prove the set later.

use std::path::Path;

use sha2::{Digest, Sha256};
use snapshot::{Allocation, Disk, Progress, backing_chain};

use crate::error::{Error, Result};
use crate::manifest::ExtentSum;

/// Bytes per read, write and checksummed extent.
pub(crate) const CHUNK: u64 = 1 << 20;

/// What a copy does with chunks that read as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Zeros {
    /// Leave them out: the target reads zeros there anyway (a standalone image).
    Skip,
    /// Write them as explicit zeros: the target must hide its backing file there (an
    /// incremental layer).
    Write,
}

/// The byte ranges any layer of the chain under `top` stores (data or explicit zeros), sorted
/// and joined: what a full copy must read. A raw layer stores everything.
pub(crate) fn allocated_ranges(top: &Path) -> Result<Vec<(u64, u64)>> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    for layer in backing_chain(top)? {
        let disk = Disk::open(&layer, true)?;
        for extent in disk.allocation_map()? {
            if extent.allocation != Allocation::Unallocated {
                ranges.push((extent.offset, extent.length));
            }
        }
    }
    Ok(join(ranges))
}

/// Sorts ranges and joins overlapping or adjacent ones.
pub(crate) fn join(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut joined: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (offset, length) in ranges {
        match joined.last_mut() {
            Some((start, len)) if offset <= *start + *len => {
                *len = (*len).max(offset + length - *start);
            }
            _ => joined.push((offset, length)),
        }
    }
    joined
}

/// Total bytes of `ranges`.
pub(crate) fn total(ranges: &[(u64, u64)]) -> u64 {
    ranges.iter().map(|(_, length)| length).sum()
}

/// Copies `ranges` of `source` into `target` chunk by chunk, flushes `target`, and returns the
/// extents written with their checksums.
pub(crate) fn copy_ranges(
    source: &Disk,
    target: &Disk,
    ranges: &[(u64, u64)],
    zeros: Zeros,
    progress: &mut dyn Progress,
) -> Result<Vec<ExtentSum>> {
    let mut sums = Vec::new();
    let mut buf = vec![0u8; CHUNK as usize];
    for &(offset, length) in ranges {
        let end = offset + length;
        let mut at = offset;
        while at < end {
            let len = (end - at).min(CHUNK);
            let chunk = &mut buf[..len as usize];
            source.read(at, chunk).map_err(|e| Error::DiskIo {
                op: "read",
                path: source.path().to_path_buf(),
                offset: at,
                source: e,
            })?;
            let is_zero = chunk.iter().all(|&b| b == 0);
            if !(is_zero && zeros == Zeros::Skip) {
                let written = if is_zero {
                    target.write_zeroes(at, len)
                } else {
                    target.write(at, chunk)
                };
                written.map_err(|e| Error::DiskIo {
                    op: "write",
                    path: target.path().to_path_buf(),
                    offset: at,
                    source: e,
                })?;
                sums.push(ExtentSum {
                    offset: at,
                    length: len,
                    sha256: sha256_hex(chunk),
                });
            }
            progress.advance(len);
            at += len;
        }
    }
    target.flush().map_err(|e| Error::DiskIo {
        op: "flush",
        path: target.path().to_path_buf(),
        offset: 0,
        source: e,
    })?;
    Ok(sums)
}

/// Reads every extent of `sums` from `disk` and checks its checksum; the first mismatch is the
/// error.
pub(crate) fn check_sums(
    disk: &Disk,
    sums: &[ExtentSum],
    progress: &mut dyn Progress,
) -> std::result::Result<(), String> {
    let mut buf = vec![0u8; CHUNK as usize];
    for sum in sums {
        let mut hasher = Sha256::new();
        let end = sum.offset + sum.length;
        let mut at = sum.offset;
        while at < end {
            let len = (end - at).min(CHUNK);
            let chunk = &mut buf[..len as usize];
            disk.read(at, chunk)
                .map_err(|e| format!("cannot read {} at {at}: {e}", disk.path().display()))?;
            hasher.update(&*chunk);
            progress.advance(len);
            at += len;
        }
        if hex(&hasher.finalize()) != sum.sha256 {
            return Err(format!(
                "{}: the {} bytes at offset {} do not match their checksum",
                disk.path().display(),
                sum.length,
                sum.offset
            ));
        }
    }
    Ok(())
}

/// SHA-256 of `bytes`, lower-case hex.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_merges_overlapping_and_adjacent_ranges() {
        let ranges = vec![(100, 50), (0, 10), (10, 5), (120, 100), (400, 1)];

        assert_eq!(join(ranges), vec![(0, 15), (100, 120), (400, 1)]);
    }

    #[test]
    fn sha256_of_nothing_is_the_known_digest() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
