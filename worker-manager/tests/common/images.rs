//! Disk images through the real `qemu-img`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

/// Runs `qemu-img` with `args`; panics with its output when it fails.
pub fn qemu_img(args: &[&str]) -> String {
    let output = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (package qemu-utils) is installed");
    assert!(
        output.status.success(),
        "qemu-img {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `qemu-img check` passes on `image` (no errors, no leaks).
pub fn assert_clean(image: &Path) {
    qemu_img(&["check", "-q", image.to_str().unwrap()]);
}

/// The guest's disk converted to raw by `qemu-img convert`, checked to hold records `0..count`.
pub fn assert_records(image: &Path, count: u64) {
    let raw = image.with_extension("converted.raw");
    let _ = std::fs::remove_file(&raw);
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        image.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let file = std::fs::File::open(&raw).unwrap();
    vmms_guest::verify_records(std::io::BufReader::new(file), count)
        .unwrap_or_else(|e| panic!("{} does not hold {count} records: {e}", image.display()));
    let _ = std::fs::remove_file(&raw);
}

/// How many valid records `image` holds, read through `qemu-img convert`.
pub fn count_records(image: &Path) -> u64 {
    let raw = image.with_extension("counted.raw");
    let _ = std::fs::remove_file(&raw);
    qemu_img(&[
        "convert",
        "-O",
        "raw",
        image.to_str().unwrap(),
        raw.to_str().unwrap(),
    ]);
    let file = std::fs::File::open(&raw).unwrap();
    let count = vmms_guest::count_records(std::io::BufReader::new(file)).unwrap();
    let _ = std::fs::remove_file(&raw);
    count
}
