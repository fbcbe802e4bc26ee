//! Crash-safe replacement of files: write to a temporary file in the same folder, fsync it, rename
//! it over the target, fsync the folder.
//!
//! After a crash at any instant the target holds either its old or its new contents, never a torn
//! mix: `rename(2)` within one file system is atomic, the first fsync makes the new data durable
//! before the name points at it, and the folder fsync makes the new name itself durable. What a
//! crash can leave behind is a temporary file; [`is_temporary`] recognises those so that loaders
//! skip them.
//!
//! Everything written here is private to the owner (files 0600, whatever the umask): a store's
//! files hold VM definitions with kernel command lines, pid files and saved guest state.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Mode of every file this module creates (before the umask, which can only narrow it).
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// Marker inside the names of temporary files and folders (`.<name>.tmp.<pid>.<n>`).
const TEMP_MARKER: &str = ".tmp.";

/// Replaces `path` with `contents` atomically and durably; the new file is owner-only (0600).
///
/// The temporary file is created next to `path` (so the rename stays within one file system) with
/// a name unique to this process and call, so concurrent writers never share one. On any error
/// the temporary file is removed and `path` is left as it was.
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    let tmp = temporary_sibling(path)?;
    let result = write_and_rename(&tmp, path, contents);
    if result.is_err() {
        // Best effort: the temp file may not exist if creating it is what failed.
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Renames `from` to `to` and makes the new name durable by fsyncing the folder(s) involved.
pub fn rename_durable(from: &Path, to: &Path) -> io::Result<()> {
    fs::rename(from, to)?;
    let to_dir = parent_dir(to);
    sync_dir(to_dir)?;
    let from_dir = parent_dir(from);
    if from_dir != to_dir {
        sync_dir(from_dir)?;
    }
    Ok(())
}

/// Creates `path` as an empty owner-only file whose existence is durable: a marker, whose
/// meaning is that it exists. It has no contents to tear, so one folder fsync (which commits the
/// new name with its inode) does what [`write_atomic`]'s file fsync, rename and folder fsync
/// would. An existing file is left as it is.
pub fn create_marker(path: &Path) -> io::Result<()> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .mode(PRIVATE_FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    sync_dir(parent_dir(path))
}

/// Flushes a folder's entries (new, renamed or removed names) to stable storage.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Commits a folder built under a temporary name: fsyncs every file and folder in `staging`,
/// then renames it to `target` and fsyncs the parent. `target` must not exist (or be an empty
/// folder): a folder is never replaced over existing contents.
///
/// Used for saved states: after a crash at any instant `target` is either absent or complete.
pub fn commit_dir(staging: &Path, target: &Path) -> io::Result<()> {
    sync_tree(staging)?;
    rename_durable(staging, target)
}

/// fsyncs every file and folder under `dir`, then `dir` itself.
fn sync_tree(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let file_type = entry.file_type()?;
        if file_type.is_dir() {
            sync_tree(&entry.path())?;
        } else if file_type.is_file() {
            File::open(entry.path())?.sync_all()?;
        }
    }
    sync_dir(dir)
}

/// Whether a file or folder name is a temporary left by [`write_atomic`] or
/// [`temporary_sibling`]; loaders skip such entries.
pub fn is_temporary(name: &OsStr) -> bool {
    name.to_str()
        .is_some_and(|n| n.starts_with('.') && n.contains(TEMP_MARKER))
}

/// A fresh, unused-by-this-process name next to `path` for building a replacement of it.
///
/// The name starts with a dot and contains [`is_temporary`]'s marker, so a crash that leaves it
/// behind leaves something loaders ignore.
pub fn temporary_sibling(path: &Path) -> io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "path has no file name to replace",
        )
    })?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!("{TEMP_MARKER}{}.{n}", std::process::id()));
    Ok(parent_dir(path).join(tmp_name))
}

fn write_and_rename(tmp: &Path, path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE_MODE)
        .open(tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    fs::rename(tmp, path)?;
    sync_dir(parent_dir(path))
}

/// The folder holding `path`; `.` for a bare file name.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .expect("read test dir")
            .map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        names
    }

    #[test]
    fn write_atomic_creates_file_with_contents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.json");

        write_atomic(&path, b"{\"a\":1}").expect("write");

        assert_eq!(fs::read(&path).expect("read back"), b"{\"a\":1}");
    }

    #[test]
    fn write_atomic_replaces_old_contents_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.json");
        fs::write(&path, b"old contents that are longer").expect("seed");

        write_atomic(&path, b"new").expect("write");

        assert_eq!(fs::read(&path).expect("read back"), b"new");
        assert_eq!(names_in(dir.path()), ["config.json"]);
    }

    #[test]
    fn failed_write_keeps_old_contents_and_removes_temporary() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A folder at the target makes the rename fail after the temp file was written.
        let path = dir.path().join("target");
        fs::create_dir(&path).expect("seed folder");

        let result = write_atomic(&path, b"new");

        assert!(result.is_err());
        assert!(path.is_dir());
        assert_eq!(names_in(dir.path()), ["target"]);
    }

    #[test]
    fn leftover_temporary_does_not_block_later_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.json");
        let leftover = temporary_sibling(&path).expect("temp name");
        fs::write(&leftover, b"torn").expect("seed leftover");

        write_atomic(&path, b"whole").expect("write");

        assert_eq!(fs::read(&path).expect("read back"), b"whole");
    }

    #[test]
    fn temporaries_are_recognised_and_real_names_are_not() {
        let tmp = temporary_sibling(Path::new("/x/config.json")).expect("temp name");

        assert!(is_temporary(tmp.file_name().expect("has name")));
        assert!(!is_temporary(OsStr::new("config.json")));
        assert!(!is_temporary(OsStr::new(
            "4E8B6A4D-2C1F-4F8A-9D3E-0B1C2D3E4F50"
        )));
    }

    #[test]
    fn temporary_sibling_stays_in_the_same_folder() {
        let tmp = temporary_sibling(Path::new("/store/vms/x/config.json")).expect("temp name");

        assert_eq!(tmp.parent(), Some(Path::new("/store/vms/x")));
    }

    #[test]
    fn written_file_is_owner_only_whatever_the_umask() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.json");
        fs::write(&path, b"old").expect("seed");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("loosen");
        // SAFETY: umask only swaps the process's file mode creation mask and touches no memory.
        // (Tests running in parallel may create a file with the open mask for this instant;
        // none of them checks modes it did not set explicitly.)
        let old = unsafe { libc::umask(0) };

        let written = write_atomic(&path, b"new");
        // SAFETY: as above; restores the mask read a moment ago.
        unsafe { libc::umask(old) };

        written.expect("write");
        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn rename_durable_moves_folder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let from = dir.path().join("state.new");
        let to = dir.path().join("state");
        fs::create_dir(&from).expect("seed");
        fs::write(from.join("state.json"), b"{}").expect("seed file");

        rename_durable(&from, &to).expect("rename");

        assert_eq!(names_in(dir.path()), ["state"]);
        assert!(to.join("state.json").is_file());
    }

    #[test]
    fn marker_is_an_empty_owner_only_file() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("running");

        create_marker(&marker).unwrap();

        let meta = fs::metadata(&marker).unwrap();
        assert_eq!((meta.len(), meta.permissions().mode() & 0o777), (0, 0o600));
    }

    #[test]
    fn marker_over_an_existing_file_leaves_it_alone() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("running");
        fs::write(&marker, b"kept").unwrap();

        create_marker(&marker).unwrap();

        assert_eq!(fs::read(&marker).unwrap(), b"kept");
    }

    #[test]
    fn marker_is_not_created_through_a_planted_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        let marker = dir.path().join("running");
        std::os::unix::fs::symlink(&target, &marker).unwrap();

        assert!(create_marker(&marker).is_err());
        assert!(!target.exists());
    }
}
