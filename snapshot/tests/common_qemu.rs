//! Shared helpers for the tests that run the real `qemu-img`.

#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// Runs `qemu-img` with `args`; returns stdout, panicking with its stderr on failure.
pub fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs (apt-get install qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `qemu-io` with `args` (also from qemu-utils), panicking on failure.
pub fn qemu_io(args: &[&str]) {
    let out = Command::new("qemu-io")
        .args(args)
        .output()
        .expect("qemu-io runs");
    assert!(
        out.status.success(),
        "qemu-io {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// [`assert_check_clean`] on every image in `files` (a VM's disks and their chains).
pub fn assert_images_clean(files: impl IntoIterator<Item = impl AsRef<Path>>) {
    for file in files {
        assert_check_clean(file.as_ref());
    }
}

/// `qemu-img check` as JSON; asserts no corruptions and no leaks.
pub fn assert_check_clean(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(path)
        .output()
        .expect("qemu-img check runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|_| {
        panic!(
            "check output of {path:?}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let errors =
        report["corruptions"].as_u64().unwrap_or(0) + report["check-errors"].as_u64().unwrap_or(0);
    let leaks = report["leaks"].as_u64().unwrap_or(0);
    assert!(
        out.status.success() && errors == 0 && leaks == 0,
        "qemu-img check {path:?}: {text}"
    );
}

/// Whether `qemu-img` is installed (CI installs qemu-utils through scripts/test.sh).
pub fn has_qemu_img() -> bool {
    Command::new("qemu-img").arg("--version").output().is_ok()
}
