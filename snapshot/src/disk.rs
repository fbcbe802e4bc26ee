//! Disk images: raw files and qcow2 v3 images with backing chains, opened through `imago`.
//!
//! [`Disk`] is one opened chain: the top layer (writable or not) and every backing layer below it
//! (always read-only). Every file of the chain is locked the way QEMU locks it ([`crate::lock`]),
//! so vmms and a QEMU process never write one image at once. Backing files are resolved by this
//! module, not by imago, so that each is opened with our lock and a missing one is a clear error.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use imago::file::File as ImagoFile;
use imago::qcow2::Qcow2;
use imago::raw::Raw;
use imago::{
    DenyImplicitOpenGate, FormatAccess, FormatCreateBuilder, FormatDriverBuilder, ShallowMapping,
    StorageOpenOptions,
};

use crate::error::{Error, Result};
use crate::lock::{LockMode, lock_image};

/// The deepest backing chain we open; a deeper one is refused (it is most likely a loop).
pub const MAX_CHAIN_DEPTH: usize = 64;

/// qcow2's magic, the first four bytes of every qcow2 file.
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// The image format of one layer, found from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// A flat file of sectors.
    Raw,
    /// qcow2 (version 2 or 3; we create version 3).
    Qcow2,
}

impl DiskFormat {
    /// The name qemu-img and qcow2 headers use for the format.
    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// What one stretch of a layer holds, as in `qemu-img map`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    /// Data stored in this layer.
    Data,
    /// Marked as zeros in this layer (reads zero, hides the backing file).
    Zero,
    /// Not stored in this layer: reads fall through to the backing file (or zeros without one).
    Unallocated,
}

/// One stretch of a layer's allocation map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// What the layer holds there.
    pub allocation: Allocation,
}

/// An opened disk: the top layer and its backing chain.
pub struct Disk {
    path: PathBuf,
    format: DiskFormat,
    read_only: bool,
    size: u64,
    backing: Option<PathBuf>,
    pub(crate) access: FormatAccess<ImagoFile>,
}

impl fmt::Debug for Disk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Disk")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("read_only", &self.read_only)
            .field("size", &self.size)
            .field("backing", &self.backing)
            .finish()
    }
}

/// Opens a raw or qcow2 image (format from its magic) with its whole backing chain.
///
/// The top layer is locked for writing unless `read_only`; backing layers are locked shared.
pub fn open_disk(path: &Path, read_only: bool) -> Result<Disk> {
    Disk::open(path, read_only)
}

impl Disk {
    /// See [`open_disk`].
    pub fn open(path: &Path, read_only: bool) -> Result<Disk> {
        let layer = open_layer(path, !read_only, 0, path)?;
        let size = layer.access.size();
        Ok(Disk {
            path: path.to_path_buf(),
            format: layer.format,
            read_only,
            size,
            backing: layer.backing,
            access: layer.access,
        })
    }

    /// Opens `path` writable (its chain read-only) **without** taking the write lock on `path`
    /// itself: for merging a running disk's overlay into the image below it, which this very
    /// process holds open (read-only, as the overlay's backing file) and so locks against
    /// writers. The caller writes only ranges the layers above hide, so the open chain keeps
    /// reading what it read; it must not be used for anything else.
    pub fn open_below_running_overlay(path: &Path) -> Result<Disk> {
        let layer = open_layer_locked(path, true, 0, path, false)?;
        let size = layer.access.size();
        Ok(Disk {
            path: path.to_path_buf(),
            format: layer.format,
            read_only: false,
            size,
            backing: layer.backing,
            access: layer.access,
        })
    }

    /// Opens only the top layer of a qcow2 image, ignoring its backing file: unallocated ranges
    /// read as zeros and show as [`Allocation::Unallocated`]. Used to read one layer's own data.
    pub(crate) fn open_layer_only(path: &Path) -> Result<Disk> {
        let file = open_file(path, false)?;
        lock_image(&file, path, LockMode::Read)?;
        let format = probe(&file, path)?;
        let storage = imago_storage(file, path, false)?;
        let (access, backing) = match format {
            DiskFormat::Raw => (open_raw(storage, path, false)?, None),
            DiskFormat::Qcow2 => {
                let mut qcow2 = Qcow2::<ImagoFile>::open_image(storage, false)
                    .map_err(|e| Error::image(path, e))?;
                check_no_data_file(&qcow2, path)?;
                let backing = qcow2
                    .implicit_backing_file()
                    .map(|name| resolve_backing(path, name));
                qcow2.set_data_file(None);
                qcow2.set_backing(None);
                (FormatAccess::new(qcow2), backing)
            }
        };
        Ok(Disk {
            path: path.to_path_buf(),
            format,
            read_only: true,
            size: access.size(),
            backing,
            access,
        })
    }

    /// The top layer's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The top layer's format.
    pub fn format(&self) -> DiskFormat {
        self.format
    }

    /// The top layer's backing file (resolved), if it has one.
    pub fn backing_file(&self) -> Option<&Path> {
        self.backing.as_deref()
    }

    /// The virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Reads `buf.len()` bytes at `offset`; unallocated ranges read as zeros.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.check_bounds(offset, buf.len())?;
        self.access.read(buf, offset)
    }

    /// Writes `buf` at `offset` into the top layer.
    pub fn write(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.check_writable()?;
        self.check_bounds(offset, buf.len())?;
        self.access.write(buf, offset)
    }

    /// Marks `length` bytes at `offset` as zeros in the top layer (hiding the backing file).
    pub fn write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        self.check_writable()?;
        self.check_bounds(offset, usize::try_from(length).unwrap_or(usize::MAX))?;
        self.access.write_zeroes(offset, length)
    }

    /// Writes cached metadata out and makes everything written so far durable (fsync).
    pub fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.access.flush()?;
        self.access.sync()
    }

    /// Writes cached metadata out to the file, without waiting for it to be durable: enough for
    /// another open of the same file to read what was written ([`flush`](Self::flush) also
    /// syncs).
    pub fn write_back(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.access.flush()
    }

    /// The top layer's allocation map, adjacent stretches of one kind merged.
    pub fn allocation_map(&self) -> Result<Vec<Extent>> {
        self.allocation_in(0, self.size)
    }

    /// The top layer's allocation map of `[offset, offset + length)` (clipped to the disk),
    /// adjacent stretches of one kind merged.
    pub fn allocation_in(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let mut extents: Vec<Extent> = Vec::new();
        let end = offset.saturating_add(length).min(self.size);
        let mut offset = offset;
        while offset < end {
            let (mapping, length) = self
                .access
                .get_shallow_mapping(offset, end - offset)
                .map_err(|e| Error::image(&self.path, e))?;
            let allocation = match mapping {
                ShallowMapping::Raw { .. } | ShallowMapping::Special { .. } => Allocation::Data,
                ShallowMapping::Zero { explicit: true, .. } => Allocation::Zero,
                ShallowMapping::Zero {
                    explicit: false, ..
                }
                | ShallowMapping::Indirect { .. } => Allocation::Unallocated,
                ShallowMapping::Eof { .. } => break,
                // `ShallowMapping` is non-exhaustive: treat anything new as data (safe for a
                // copy, which then reads it through the format driver).
                _ => Allocation::Data,
            };
            let length = length.min(end - offset);
            if length == 0 {
                break;
            }
            match extents.last_mut() {
                Some(last) if last.allocation == allocation => last.length += length,
                _ => extents.push(Extent {
                    offset,
                    length,
                    allocation,
                }),
            }
            offset += length;
        }
        Ok(extents)
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "disk is read-only",
            ));
        }
        Ok(())
    }

    fn check_bounds(&self, offset: u64, len: usize) -> io::Result<()> {
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|end| end > self.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "access of {len} bytes at {offset} beyond the disk size {}",
                    self.size
                ),
            ));
        }
        Ok(())
    }
}

/// Creates a new, empty qcow2 v3 image of `size` bytes (64 KiB clusters, 16-bit refcounts, as
/// `qemu-img create -f qcow2`). Fails if `path` exists.
pub fn create_qcow2(path: &Path, size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(512) {
        return Err(Error::BadSize { size });
    }
    create(path, size, None)
}

/// Creates a qcow2 v3 overlay at `path` on `backing`: same size, no data of its own, so it reads
/// exactly as `backing` until written. The backing name is stored relative to `path`'s folder
/// when both share it (so a moved folder keeps working), with the backing's format.
pub fn create_overlay(path: &Path, backing: &Path) -> Result<()> {
    let (size, format) = {
        let disk = Disk::open(backing, true)?;
        (disk.size(), disk.format())
    };
    create_overlay_sized(path, backing, size, format)
}

/// [`create_overlay`] without opening `backing`, whose virtual `size` and `format` the caller
/// knows: for an image a running VM holds locked for writing (a running checkpoint creates the
/// overlay while the guest still writes the image, and switches to it in its pause).
pub fn create_overlay_sized(
    path: &Path,
    backing: &Path,
    size: u64,
    format: DiskFormat,
) -> Result<()> {
    let name = backing_name(path, backing);
    create(path, size, Some((name, format.name().to_string())))
}

/// [`create_overlay_sized`] with the backing name stored exactly as given (for instance
/// `../<set>/disk0.qcow2`), resolved against `path`'s folder when relative: for layers whose
/// folders move together, such as a chain of backup sets.
pub fn create_overlay_named(
    path: &Path,
    backing_name: &str,
    size: u64,
    format: DiskFormat,
) -> Result<()> {
    create(
        path,
        size,
        Some((backing_name.to_string(), format.name().to_string())),
    )
}

fn create(path: &Path, size: u64, backing: Option<(String, String)>) -> Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io("create", path, e))?;
    lock_image(&file, path, LockMode::Write)?;
    let storage = imago_storage(file, path, true)?;
    let mut builder = Qcow2::<ImagoFile>::create_builder(storage).size(size);
    if let Some((name, format)) = backing {
        builder = builder.backing(name, format);
    }
    builder.create().map_err(|e| Error::image(path, e))?;
    // `create` flushed through imago; make the new file and its name durable.
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io("sync", path, e))?;
    crate::durable::sync_parent(path)
}

/// The name to store in an overlay's header for `backing`: relative when in the same folder.
pub(crate) fn backing_name(overlay: &Path, backing: &Path) -> String {
    let same_dir = overlay
        .parent()
        .zip(backing.parent())
        .is_some_and(|(a, b)| a == b);
    match (same_dir, backing.file_name()) {
        (true, Some(name)) => name.to_string_lossy().into_owned(),
        _ => backing.to_string_lossy().into_owned(),
    }
}

/// Resolves a backing file name from a header against the image's folder.
pub(crate) fn resolve_backing(image: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        return name.to_path_buf();
    }
    image.parent().unwrap_or(Path::new(".")).join(name)
}

/// The files of a chain, top first, read from headers only (no data opened beyond headers).
pub fn backing_chain(path: &Path) -> Result<Vec<PathBuf>> {
    let mut chain = vec![path.to_path_buf()];
    let mut current = path.to_path_buf();
    while let Some(next) = Disk::open_layer_only(&current)?.backing {
        if chain.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::ChainTooDeep {
                path: path.to_path_buf(),
                limit: MAX_CHAIN_DEPTH,
            });
        }
        if !next.exists() {
            return Err(Error::MissingBacking {
                image: current,
                backing: next,
            });
        }
        chain.push(next.clone());
        current = next;
    }
    Ok(chain)
}

struct Layer {
    access: FormatAccess<ImagoFile>,
    format: DiskFormat,
    backing: Option<PathBuf>,
}

fn open_layer(path: &Path, writable: bool, depth: usize, top: &Path) -> Result<Layer> {
    open_layer_locked(path, writable, depth, top, true)
}

/// [`open_layer`], taking `path`'s own lock only when `lock` (its backing files are always
/// locked for reading).
fn open_layer_locked(
    path: &Path,
    writable: bool,
    depth: usize,
    top: &Path,
    lock: bool,
) -> Result<Layer> {
    if depth >= MAX_CHAIN_DEPTH {
        return Err(Error::ChainTooDeep {
            path: top.to_path_buf(),
            limit: MAX_CHAIN_DEPTH,
        });
    }
    let file = open_file(path, writable)?;
    let mode = if writable {
        LockMode::Write
    } else {
        LockMode::Read
    };
    if lock {
        lock_image(&file, path, mode)?;
    }
    let format = probe(&file, path)?;
    let storage = imago_storage(file, path, writable)?;
    match format {
        DiskFormat::Raw => Ok(Layer {
            access: open_raw(storage, path, writable)?,
            format,
            backing: None,
        }),
        DiskFormat::Qcow2 => {
            let mut qcow2 = Qcow2::<ImagoFile>::open_image(storage, writable)
                .map_err(|e| Error::image(path, e))?;
            check_no_data_file(&qcow2, path)?;
            qcow2.set_data_file(None);
            let backing = match qcow2.implicit_backing_file() {
                None => None,
                Some(name) => {
                    let backing = resolve_backing(path, name);
                    if !backing.exists() {
                        return Err(Error::MissingBacking {
                            image: path.to_path_buf(),
                            backing,
                        });
                    }
                    let expected = qcow2.implicit_backing_format().cloned();
                    let layer = open_layer(&backing, false, depth + 1, top)?;
                    if let Some(expected) = expected
                        && expected != layer.format.name()
                        && expected != "file"
                    {
                        return Err(Error::Unsupported {
                            path: path.to_path_buf(),
                            feature: format!(
                                "backing format {expected} (file is {})",
                                layer.format.name()
                            ),
                        });
                    }
                    qcow2.set_backing(Some(layer.access));
                    Some(backing)
                }
            };
            if backing.is_none() {
                qcow2.set_backing(None);
            }
            Ok(Layer {
                access: FormatAccess::new(qcow2),
                format,
                backing,
            })
        }
    }
}

fn open_file(path: &Path, writable: bool) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(|e| Error::io("open", path, e))
}

fn imago_storage(file: File, path: &Path, writable: bool) -> Result<ImagoFile> {
    let opts = StorageOpenOptions::new().write(writable).filename(path);
    ImagoFile::from_open_file(file, opts).map_err(|e| Error::image(path, e))
}

fn open_raw(storage: ImagoFile, path: &Path, writable: bool) -> Result<FormatAccess<ImagoFile>> {
    let raw = Raw::builder(storage)
        .write(writable)
        .open(DenyImplicitOpenGate::default())
        .map_err(|e| Error::image(path, e))?;
    Ok(FormatAccess::new(raw))
}

fn check_no_data_file(qcow2: &Qcow2<ImagoFile>, path: &Path) -> Result<()> {
    if qcow2.requires_external_data_file() {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            feature: "external data file".into(),
        });
    }
    Ok(())
}

/// Most L1 entries a qcow2 image may need: QEMU's limit (`QCOW_MAX_L1_SIZE`, 32 MiB of 8-byte
/// entries).
const MAX_L1_ENTRIES: u64 = 4 << 20;

/// Refuses a qcow2 header whose virtual size needs more L1 entries than QEMU allows for its
/// cluster size. Without this, a damaged or hostile size (say 2^61 bytes) makes every walk of
/// the image — the allocation map of an export, a commit, a rebase — take one step per L2 table
/// for ever. (Extended L2 entries are 16 bytes: counted so, to stay on the safe side.)
fn check_qcow2_geometry(file: &File, path: &Path) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let mut header = [0u8; 32];
    file.read_exact_at(&mut header, 0)
        .map_err(|e| Error::io("read", path, e))?;
    let cluster_bits = u32::from_be_bytes([header[20], header[21], header[22], header[23]]);
    let size = u64::from_be_bytes([
        header[24], header[25], header[26], header[27], header[28], header[29], header[30],
        header[31],
    ]);
    let unsupported = |feature: String| Error::Unsupported {
        path: path.to_path_buf(),
        feature,
    };
    if !(9..=21).contains(&cluster_bits) {
        return Err(unsupported(format!("cluster size 2^{cluster_bits}")));
    }
    let per_l2_table = (1u64 << cluster_bits) * ((1u64 << cluster_bits) / 16);
    if size.div_ceil(per_l2_table) > MAX_L1_ENTRIES {
        return Err(unsupported(format!(
            "virtual size {size} with {}-byte clusters (more L1 entries than QEMU allows)",
            1u64 << cluster_bits
        )));
    }
    Ok(())
}

/// The format of an opened file, from its magic. A raw image must be a positive multiple of 512
/// bytes long (a truncated qcow2 file with a damaged magic is then usually refused too).
fn probe(file: &File, path: &Path) -> Result<DiskFormat> {
    let mut magic = [0u8; 4];
    let mut reader = file;
    let len = file
        .metadata()
        .map_err(|e| Error::io("stat", path, e))?
        .len();
    let n = reader
        .read(&mut magic)
        .map_err(|e| Error::io("read", path, e))?;
    if n == 4 && &magic == QCOW2_MAGIC {
        check_qcow2_geometry(file, path)?;
        return Ok(DiskFormat::Qcow2);
    }
    if len == 0 || !len.is_multiple_of(512) {
        return Err(Error::UnknownFormat {
            path: path.to_path_buf(),
            reason: "no qcow2 magic and not a whole number of 512-byte sectors",
        });
    }
    Ok(DiskFormat::Raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLUSTER: u64 = 64 * 1024;

    #[test]
    fn allocation_in_sees_only_the_range_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("top.qcow2");
        create_qcow2(&path, 16 * CLUSTER).unwrap();
        let disk = open_disk(&path, false).unwrap();
        disk.write(3 * CLUSTER, &[7u8; 4096]).unwrap();
        disk.write(9 * CLUSTER, &[7u8; 4096]).unwrap();

        let extents = disk.allocation_in(2 * CLUSTER, 4 * CLUSTER).unwrap();

        let data: Vec<_> = extents
            .iter()
            .filter(|e| e.allocation == Allocation::Data)
            .map(|e| (e.offset, e.length))
            .collect();
        assert_eq!(data, vec![(3 * CLUSTER, CLUSTER)]);
        let end = extents.last().map(|e| e.offset + e.length);
        assert_eq!(end, Some(6 * CLUSTER));
    }

    #[test]
    fn image_below_a_running_overlay_opens_writable_and_the_overlay_still_hides_it() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let top = dir.path().join("top.qcow2");
        create_qcow2(&base, 4 * CLUSTER).unwrap();
        create_overlay(&top, &base).unwrap();
        let running = open_disk(&top, false).unwrap();
        running.write(0, &[1u8; 512]).unwrap();
        let locked_open = Disk::open(&base, false);

        let below = Disk::open_below_running_overlay(&base).unwrap();
        below.write(0, &[2u8; 512]).unwrap();
        below.write_back().unwrap();

        let mut seen = [0u8; 512];
        running.read(0, &mut seen).unwrap();
        assert!(matches!(locked_open, Err(Error::ImageLocked { .. })));
        assert_eq!(seen, [1u8; 512], "the overlay hides what the merge wrote");
        drop(running);
        drop(below);
        let mut merged = [0u8; 512];
        open_disk(&base, true)
            .unwrap()
            .read(0, &mut merged)
            .unwrap();
        assert_eq!(merged, [2u8; 512]);
    }
}
