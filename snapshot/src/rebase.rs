//! Rebase of a qcow2 layer onto its grandparent, as `qemu-img rebase` in safe mode: the data the
//! old backing layer holds and the layer does not is first copied up (streamed) into the layer,
//! then the header's backing file name is rewritten. Used to delete a checkpoint whose layer
//! several branches grow from.
//!
//! imago has no API to change a header's backing file, so [`set_backing_file`] rewrites it by hand
//! within the first cluster, as QEMU's `qcow2_update_header` does (one write, then fsync). Both
//! steps keep what the layer shows unchanged, so a crash anywhere is finished by running again.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use imago::ShallowMapping;

use crate::disk::{Allocation, Disk};
use crate::error::{Error, Result};
use crate::lock::{LockMode, lock_image};
use crate::progress::Progress;
use vmm_core::fault::point as fault_point;

/// The header extension naming the backing file's format.
const BACKING_FORMAT_EXT: u32 = 0xe279_2aca;
const CHUNK: u64 = 1 << 20;

/// Copies up into `layer` what its backing file stores and `layer` does not, then makes the
/// backing file's own backing (or nothing) `layer`'s backing file.
pub fn rebase_onto_grandparent(layer: &Path, progress: &mut dyn Progress) -> Result<()> {
    let top = Disk::open(layer, false)?;
    let Some(parent_path) = top.backing_file().map(Path::to_path_buf) else {
        return Ok(());
    };
    let parent = Disk::open_layer_only(&parent_path)?;
    let grandparent = parent.backing_file().map(Path::to_path_buf);
    stream(&top, &parent, progress)?;
    top.flush().map_err(|e| Error::image(layer, e))?;
    drop(top);
    fault_point("snapshot.rebase-streamed");
    let backing = match &grandparent {
        Some(path) => {
            let format = Disk::open_layer_only(path)?.format();
            Some((crate::disk::backing_name(layer, path), format.name()))
        }
        None => None,
    };
    set_backing_file(layer, backing.as_ref().map(|(n, f)| (n.as_str(), *f)))
}

/// Writes into `top` every range `parent` stores where `top` falls through to it.
fn stream(top: &Disk, parent: &Disk, progress: &mut dyn Progress) -> Result<()> {
    let map = parent.allocation_map()?;
    let mut buf = vec![0u8; CHUNK as usize];
    for extent in map
        .iter()
        .filter(|e| e.allocation != Allocation::Unallocated)
    {
        let end = extent.offset + extent.length;
        let mut offset = extent.offset;
        while offset < end {
            let (mapping, len) = top
                .access
                .get_shallow_mapping(offset, (end - offset).min(CHUNK))
                .map_err(|e| Error::image(top.path(), e))?;
            let len = len.max(1).min(end - offset);
            if matches!(mapping, ShallowMapping::Indirect { .. }) {
                match extent.allocation {
                    Allocation::Zero => top.write_zeroes(offset, len),
                    _ => parent
                        .read(offset, &mut buf[..len as usize])
                        .and_then(|()| top.write(offset, &buf[..len as usize])),
                }
                .map_err(|e| Error::image(top.path(), e))?;
                progress.advance(len);
            }
            offset += len;
        }
    }
    Ok(())
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn corrupt(path: &Path, what: &str) -> Error {
    Error::image(
        path,
        io::Error::new(io::ErrorKind::InvalidData, what.to_string()),
    )
}

/// Rewrites the backing file name and format of the qcow2 image at `path` (`None`: no backing
/// file), keeping every other header extension. The image must not be open elsewhere.
pub fn set_backing_file(path: &Path, backing: Option<(&str, &str)>) -> Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::io("open", path, e))?;
    lock_image(&file, path, LockMode::Write)?;
    let mut head = vec![0u8; 4096];
    let n = file
        .read_at(&mut head, 0)
        .map_err(|e| Error::io("read", path, e))?;
    if n < 104 || &head[..4] != b"QFI\xfb" || be32(&head, 4) != 3 {
        return Err(corrupt(path, "not a qcow2 version 3 header"));
    }
    let cluster_bits = be32(&head, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(corrupt(path, "bad cluster size"));
    }
    let cluster = 1usize << cluster_bits;
    head.resize(cluster, 0);
    let n = file
        .read_at(&mut head, 0)
        .map_err(|e| Error::io("read", path, e))?;
    let header_len = be32(&head, 100) as usize;
    if header_len < 104 || header_len > n.min(cluster) {
        return Err(corrupt(path, "bad header length"));
    }
    let old_end = {
        let off = u64::from_be_bytes(head[8..16].try_into().unwrap_or([0; 8])) as usize;
        off.saturating_add(be32(&head, 16) as usize).min(cluster)
    };

    // Keep every extension except the backing format; stop at the end marker.
    let mut out = head[..header_len].to_vec();
    let mut at = header_len;
    loop {
        if at + 8 > n.min(cluster) {
            return Err(corrupt(
                path,
                "header extensions run past the first cluster",
            ));
        }
        let (kind, len) = (be32(&head, at), be32(&head, at + 4) as usize);
        if kind == 0 {
            break;
        }
        let padded = len.div_ceil(8) * 8;
        if at + 8 + padded > cluster {
            return Err(corrupt(
                path,
                "header extension runs past the first cluster",
            ));
        }
        if kind != BACKING_FORMAT_EXT {
            out.extend_from_slice(&head[at..at + 8 + padded]);
        }
        at += 8 + padded;
    }
    let (name_off, name_len) = match backing {
        Some((name, format)) => {
            out.extend_from_slice(&BACKING_FORMAT_EXT.to_be_bytes());
            out.extend_from_slice(&(format.len() as u32).to_be_bytes());
            out.extend_from_slice(format.as_bytes());
            out.resize(out.len().div_ceil(8) * 8, 0);
            out.extend_from_slice(&[0; 8]);
            let off = out.len();
            out.extend_from_slice(name.as_bytes());
            (off as u64, name.len() as u32)
        }
        None => {
            out.extend_from_slice(&[0; 8]);
            (0, 0)
        }
    };
    if out.len() > cluster {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            feature: "backing file name too long for the header cluster".into(),
        });
    }
    out[8..16].copy_from_slice(&name_off.to_be_bytes());
    out[16..20].copy_from_slice(&name_len.to_be_bytes());
    // Clear what the old header used beyond the new one, so no stale name bytes remain.
    let clear_to = old_end.max(at + 8).min(cluster);
    if out.len() < clear_to {
        out.resize(clear_to, 0);
    }
    file.write_all_at(&out, 0)
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io("write header of", path, e))
}
