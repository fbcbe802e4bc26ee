//! Crash-safe file steps: atomic replacement (temp + fsync + rename + fsync folder), durable
//! copies with progress, durable removal.
//!
//! The same rules as `vmm_core::atomic_file` (this crate does not depend on vmm-core); a crash
//! leaves the old or the new file, and at worst a temporary whose name starts with `.` and
//! contains `.tmp.`.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::progress::Progress;

/// Replaces `path` with `contents` atomically and durably.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let tmp = temporary_sibling(path);
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(Error::io("write", path, e));
    }
    sync_parent(path)
}

/// A name next to `path` for building its replacement.
pub fn temporary_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parent = path.parent().unwrap_or(Path::new("."));
    parent.join(format!(".{name}.tmp.{}", std::process::id()))
}

/// Flushes the folder holding `path` (its new, renamed or removed names).
pub fn sync_parent(path: &Path) -> Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    sync_dir(parent)
}

/// Flushes a folder's entries.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io("sync", dir, e))
}

/// Renames and makes the new name durable.
pub fn rename(from: &Path, to: &Path) -> Result<()> {
    fs::rename(from, to).map_err(|e| Error::io("rename", from, e))?;
    sync_parent(to)?;
    if from.parent() != to.parent() {
        sync_parent(from)?;
    }
    Ok(())
}

/// Removes a file if it exists, durably.
pub fn remove_file(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => sync_parent(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}

/// Removes a folder and everything in it if it exists, durably.
pub fn remove_dir_all(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => sync_parent(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}

/// Creates a folder (and parents) durably.
pub fn create_dir_all(path: &Path) -> Result<()> {
    fs::create_dir_all(path).map_err(|e| Error::io("create", path, e))?;
    sync_parent(path)
}

const COPY_CHUNK: usize = 1 << 20;

/// Copies `from` to a new file `to` (which must not exist) and fsyncs it, reporting bytes.
pub fn copy_file(from: &Path, to: &Path, progress: &mut dyn Progress) -> Result<()> {
    let mut src = File::open(from).map_err(|e| Error::io("open", from, e))?;
    let mut dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(|e| Error::io("create", to, e))?;
    let mut buf = vec![0u8; COPY_CHUNK];
    loop {
        let n = src.read(&mut buf).map_err(|e| Error::io("read", from, e))?;
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n])
            .map_err(|e| Error::io("write", to, e))?;
        progress.advance(n as u64);
    }
    dst.sync_all().map_err(|e| Error::io("sync", to, e))?;
    sync_parent(to)
}

/// Copies the files of folder `from` (recursively) into a new folder `to`, everything fsynced.
pub fn copy_dir(from: &Path, to: &Path, progress: &mut dyn Progress) -> Result<()> {
    place_tree(from, to, progress, &copy_file)
}

/// Like [`copy_dir`], but hard-links each file where the filesystem allows (falling back to a
/// copy). For saved states, whose files are never changed once committed: a checkpoint and the
/// VM it is applied to then share one memory image, so apply and create cost the same for any
/// memory size, and deleting either leaves the other whole.
pub fn link_dir(from: &Path, to: &Path, progress: &mut dyn Progress) -> Result<()> {
    place_tree(
        from,
        to,
        progress,
        &|from, to, progress| match fs::hard_link(from, to) {
            Ok(()) => {
                progress.advance(size_of(to));
                sync_parent(to)
            }
            Err(_) => copy_file(from, to, progress),
        },
    )
}

/// Recreates folder `from` as the new folder `to`, each regular file put in place by `place`.
fn place_tree(
    from: &Path,
    to: &Path,
    progress: &mut dyn Progress,
    place: &dyn Fn(&Path, &Path, &mut dyn Progress) -> Result<()>,
) -> Result<()> {
    fs::create_dir(to).map_err(|e| Error::io("create", to, e))?;
    let entries = fs::read_dir(from).map_err(|e| Error::io("list", from, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list", from, e))?;
        let kind = entry
            .file_type()
            .map_err(|e| Error::io("stat", entry.path(), e))?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            place_tree(&entry.path(), &target, progress, place)?;
        } else if kind.is_file() {
            place(&entry.path(), &target, progress)?;
        }
    }
    sync_dir(to)?;
    sync_parent(to)
}

/// Total bytes of the regular files under `path` (a file or a folder), for progress totals.
pub fn size_of(path: &Path) -> u64 {
    let Ok(meta) = fs::metadata(path) else {
        return 0;
    };
    if meta.is_file() {
        return meta.len();
    }
    fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| size_of(&e.path()))
                .sum()
        })
        .unwrap_or(0)
}
