//! Commit (merge) of one qcow2 layer into its backing file, as `qemu-img commit -d`: every range
//! the top layer stores (data or explicit zeros) is written into the backing image; ranges the top
//! leaves unallocated already read from the backing and are skipped.
//!
//! imago has no commit; this is built on its shallow mapping queries. A commit is idempotent:
//! while it runs (or after a crash part-way) the top layer still holds all its data, so the chain
//! read through the top is unchanged, and running it again finishes it.

use std::path::Path;

use crate::disk::{Allocation, Disk};
use crate::error::{Error, Result};
use crate::progress::Progress;
use vmm_core::fault::point as fault_point;

/// How much is copied per read/write.
const CHUNK: u64 = 1 << 20;

/// Writes the data of `top` (a qcow2 overlay) into its backing image. Returns the backing path.
///
/// The backing image is opened writable (its own chain read-only), so neither may be open
/// elsewhere. Progress counts the bytes of the top layer's allocated ranges.
pub fn commit_into_backing(top: &Path, progress: &mut dyn Progress) -> Result<std::path::PathBuf> {
    let layer = Disk::open_layer_only(top)?;
    let Some(base_path) = layer.backing_file().map(Path::to_path_buf) else {
        return Err(Error::Unsupported {
            path: top.to_path_buf(),
            feature: "commit of an image without a backing file".into(),
        });
    };
    let base = Disk::open(&base_path, false)?;
    if base.size() < layer.size() {
        return Err(Error::Unsupported {
            path: top.to_path_buf(),
            feature: "commit into a smaller backing image".into(),
        });
    }
    let map = layer.allocation_map()?;
    progress.add_total(
        map.iter()
            .filter(|e| e.allocation == Allocation::Data)
            .map(|e| e.length)
            .sum(),
    );
    let mut buf = vec![0u8; CHUNK as usize];
    let mut chunks = 0u32;
    for extent in map {
        match extent.allocation {
            Allocation::Unallocated => {}
            Allocation::Zero => base
                .write_zeroes(extent.offset, extent.length)
                .map_err(|e| Error::image(&base_path, e))?,
            Allocation::Data => {
                let mut offset = extent.offset;
                let end = extent.offset + extent.length;
                while offset < end {
                    let n = (end - offset).min(CHUNK) as usize;
                    layer
                        .read(offset, &mut buf[..n])
                        .map_err(|e| Error::image(top, e))?;
                    base.write(offset, &buf[..n])
                        .map_err(|e| Error::image(&base_path, e))?;
                    progress.advance(n as u64);
                    offset += n as u64;
                    chunks += 1;
                    fault_point(&format!("snapshot.commit-chunk-{chunks}"));
                }
            }
        }
    }
    base.flush().map_err(|e| Error::image(&base_path, e))?;
    Ok(base_path)
}
