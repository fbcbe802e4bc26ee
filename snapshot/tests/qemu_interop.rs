//! Interop with the real `qemu-img`: our images pass its checks and show our chains; its images
//! open, read and write through our backend.

mod common_qemu;

use common_qemu::{assert_check_clean, qemu_img, qemu_io};
use snapshot::{
    Allocation, DiskFormat, NoProgress, commit_into_backing, create_overlay, create_qcow2,
    open_disk,
};
use std::path::Path;

const MIB: u64 = 1 << 20;

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8))
        .collect()
}

fn read_back(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let disk = open_disk(path, true).expect("open");
    let mut buf = vec![0u8; len];
    disk.read(offset, &mut buf).expect("read");
    buf
}

#[test]
fn created_qcow2_passes_qemu_img_check_after_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("d.qcow2");
    create_qcow2(&path, 64 * MIB).expect("create");
    let disk = open_disk(&path, false).expect("open");
    disk.write(3 * MIB + 512, &pattern(7, 300_000))
        .expect("write");
    disk.flush().expect("flush");
    drop(disk);

    assert_check_clean(&path);
    let info: serde_json::Value = serde_json::from_str(&qemu_img(&[
        "info",
        "--output=json",
        path.to_str().expect("utf8"),
    ]))
    .expect("json");
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["virtual-size"], 64 * MIB);
    assert_eq!(info["format-specific"]["data"]["compat"], "1.1");
}

#[test]
fn overlay_chain_shows_in_qemu_img_info_backing_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, mid, top) = (
        dir.path().join("base.qcow2"),
        dir.path().join("mid.qcow2"),
        dir.path().join("top.qcow2"),
    );
    create_qcow2(&base, 16 * MIB).expect("base");
    create_overlay(&mid, &base).expect("mid");
    create_overlay(&top, &mid).expect("top");

    let out = qemu_img(&[
        "info",
        "--backing-chain",
        "--output=json",
        top.to_str().expect("utf8"),
    ]);

    let chain: Vec<serde_json::Value> = serde_json::from_str(&out).expect("json");
    let names: Vec<&str> = chain
        .iter()
        .map(|l| l["filename"].as_str().expect("filename"))
        .collect();
    assert_eq!(
        names,
        [
            top.to_str().expect("utf8"),
            mid.to_str().expect("utf8"),
            base.to_str().expect("utf8")
        ]
    );
    assert_eq!(chain[0]["backing-filename"], "mid.qcow2");
    assert_eq!(chain[0]["backing-filename-format"], "qcow2");
}

#[test]
fn data_written_through_a_chain_reads_back_in_qemu_img_convert() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, top, raw) = (
        dir.path().join("base.qcow2"),
        dir.path().join("top.qcow2"),
        dir.path().join("out.raw"),
    );
    create_qcow2(&base, 8 * MIB).expect("base");
    let disk = open_disk(&base, false).expect("open base");
    disk.write(0, &pattern(1, 2 * MIB as usize))
        .expect("write base");
    drop(disk);
    create_overlay(&top, &base).expect("overlay");
    let disk = open_disk(&top, false).expect("open top");
    disk.write(MIB, &pattern(9, 4096)).expect("write top");
    disk.flush().expect("flush");
    drop(disk);

    qemu_img(&[
        "convert",
        "-O",
        "raw",
        top.to_str().expect("utf8"),
        raw.to_str().expect("utf8"),
    ]);

    let bytes = std::fs::read(&raw).expect("raw");
    let mut expected = pattern(1, 2 * MIB as usize);
    expected[MIB as usize..MIB as usize + 4096].copy_from_slice(&pattern(9, 4096));
    expected.resize(8 * MIB as usize, 0);
    assert!(bytes == expected, "converted image differs");
    assert_check_clean(&top);
    assert_check_clean(&base);
}

#[test]
fn qemu_img_created_overlay_opens_and_writes_through_our_backend() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, top) = (dir.path().join("base.qcow2"), dir.path().join("top.qcow2"));
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        base.to_str().expect("utf8"),
        "4M",
    ]);
    qemu_io(&["-c", "write -P 0x5a 0 64k", base.to_str().expect("utf8")]);
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-F",
        "qcow2",
        "-b",
        "base.qcow2",
        top.to_str().expect("utf8"),
    ]);
    let disk = open_disk(&top, false).expect("open qemu's overlay");
    disk.write(32 * 1024, &[0xa5; 512]).expect("write");
    disk.flush().expect("flush");
    drop(disk);

    let head = read_back(&top, 0, 64 * 1024);
    let base_copy = dir.path().join("expected.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        base_copy.to_str().expect("utf8"),
        "4M",
    ]);
    qemu_io(&[
        "-c",
        "write -P 0x5a 0 64k",
        "-c",
        "write -P 0xa5 32k 512",
        base_copy.to_str().expect("utf8"),
    ]);

    assert!(head[..32 * 1024].iter().all(|&b| b == 0x5a));
    assert!(head[32 * 1024..32 * 1024 + 512].iter().all(|&b| b == 0xa5));
    qemu_img(&[
        "compare",
        top.to_str().expect("utf8"),
        base_copy.to_str().expect("utf8"),
    ]);
    assert_check_clean(&top);
}

#[test]
fn qemu_img_created_plain_image_reads_its_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("plain.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        path.to_str().expect("utf8"),
        "2M",
    ]);
    qemu_io(&["-c", "write -P 0x33 1M 8k", path.to_str().expect("utf8")]);

    let data = read_back(&path, MIB - 512, 9 * 1024);

    assert!(data[..512].iter().all(|&b| b == 0));
    assert!(data[512..512 + 8192].iter().all(|&b| b == 0x33));
    assert!(data[512 + 8192..].iter().all(|&b| b == 0));
}

#[test]
fn raw_image_opens_by_magic_and_round_trips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("d.raw");
    std::fs::write(&path, vec![0u8; MIB as usize]).expect("raw");
    let disk = open_disk(&path, false).expect("open");
    disk.write(4096, b"raw bytes").expect("write");
    drop(disk);

    let back = read_back(&path, 4096, 9);

    assert_eq!(
        open_disk(&path, true).expect("open").format(),
        DiskFormat::Raw
    );
    assert_eq!(back, b"raw bytes");
}

#[test]
fn commit_merges_a_layer_into_its_backing_like_qemu_img_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, top, expected) = (
        dir.path().join("base.qcow2"),
        dir.path().join("top.qcow2"),
        dir.path().join("expected.qcow2"),
    );
    create_qcow2(&base, 4 * MIB).expect("base");
    open_disk(&base, false)
        .expect("base")
        .write(0, &pattern(3, MIB as usize))
        .expect("w");
    create_overlay(&top, &base).expect("top");
    let disk = open_disk(&top, false).expect("top");
    disk.write(512 * 1024, &pattern(4, 256 * 1024)).expect("w");
    disk.write_zeroes(0, 64 * 1024).expect("zero");
    disk.write(3 * MIB, &pattern(5, 4096)).expect("w");
    drop(disk);
    qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        top.to_str().expect("utf8"),
        expected.to_str().expect("utf8"),
    ]);

    commit_into_backing(&top, &mut NoProgress).expect("commit");

    qemu_img(&[
        "compare",
        base.to_str().expect("utf8"),
        expected.to_str().expect("utf8"),
    ]);
    qemu_img(&[
        "compare",
        top.to_str().expect("utf8"),
        expected.to_str().expect("utf8"),
    ]);
    assert_check_clean(&base);
    assert_check_clean(&top);
}

#[test]
fn allocation_map_reports_data_zero_and_unallocated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, top) = (dir.path().join("base.qcow2"), dir.path().join("top.qcow2"));
    create_qcow2(&base, 4 * MIB).expect("base");
    create_overlay(&top, &base).expect("top");
    let disk = open_disk(&top, false).expect("top");
    disk.write(0, &[1; 65536]).expect("w");
    disk.write_zeroes(MIB, 65536).expect("z");

    let map = disk.allocation_map().expect("map");

    let kinds: Vec<(u64, u64, Allocation)> = map
        .iter()
        .map(|e| (e.offset, e.length, e.allocation))
        .collect();
    assert_eq!(
        kinds,
        [
            (0, 65536, Allocation::Data),
            (65536, MIB - 65536, Allocation::Unallocated),
            (MIB, 65536, Allocation::Zero),
            (MIB + 65536, 3 * MIB - 65536, Allocation::Unallocated),
        ]
    );
}

#[test]
fn qemu_img_refuses_an_image_we_hold_open_for_writing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("d.qcow2");
    create_qcow2(&path, MIB).expect("create");
    let disk = open_disk(&path, false).expect("open");

    let held = std::process::Command::new("qemu-img")
        .args(["info", path.to_str().expect("utf8")])
        .output()
        .expect("qemu-img");
    drop(disk);
    let released = std::process::Command::new("qemu-img")
        .args(["info", path.to_str().expect("utf8")])
        .output()
        .expect("qemu-img");

    assert!(!held.status.success());
    assert!(
        String::from_utf8_lossy(&held.stderr).contains("lock"),
        "{}",
        String::from_utf8_lossy(&held.stderr)
    );
    assert!(released.status.success());
}

#[test]
fn an_image_qemu_holds_open_for_writing_is_refused_with_a_lock_error() {
    use std::io::{BufRead, Write};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("d.qcow2");
    create_qcow2(&path, MIB).expect("create");
    let mut qemu = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", path.to_str().expect("utf8")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("qemu-io");
    let mut stdin = qemu.stdin.take().expect("stdin");
    let mut stdout = std::io::BufReader::new(qemu.stdout.take().expect("stdout"));
    // Once qemu-io answers a command, it has opened (and locked) the image.
    writeln!(stdin, "read 0 512").expect("command");
    let mut line = String::new();
    stdout.read_line(&mut line).expect("qemu-io answers");

    let ours = open_disk(&path, false);
    let reader = open_disk(&path, true);
    writeln!(stdin, "quit").expect("quit");
    drop(stdin);
    qemu.wait().expect("qemu-io exits");

    assert!(
        matches!(ours, Err(snapshot::Error::ImageLocked { .. })),
        "{ours:?}"
    );
    assert!(
        matches!(reader, Err(snapshot::Error::ImageLocked { .. })),
        "{reader:?}"
    );
}

#[test]
fn rebase_onto_the_grandparent_keeps_contents_and_qemu_img_sees_the_new_backing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (base, mid, top, expected) = (
        dir.path().join("base.qcow2"),
        dir.path().join("mid.qcow2"),
        dir.path().join("top.qcow2"),
        dir.path().join("expected.qcow2"),
    );
    create_qcow2(&base, 4 * MIB).expect("base");
    open_disk(&base, false)
        .expect("base")
        .write(0, &pattern(1, MIB as usize))
        .expect("w");
    create_overlay(&mid, &base).expect("mid");
    let disk = open_disk(&mid, false).expect("mid");
    disk.write(512 * 1024, &pattern(2, MIB as usize))
        .expect("w");
    disk.write_zeroes(3 * MIB, 64 * 1024).expect("z");
    drop(disk);
    create_overlay(&top, &mid).expect("top");
    open_disk(&top, false)
        .expect("top")
        .write(MIB, &pattern(3, 4096))
        .expect("w");
    qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        top.to_str().expect("utf8"),
        expected.to_str().expect("utf8"),
    ]);

    snapshot::rebase_onto_grandparent(&top, &mut NoProgress).expect("rebase");

    let info: serde_json::Value = serde_json::from_str(&qemu_img(&[
        "info",
        "--output=json",
        top.to_str().expect("utf8"),
    ]))
    .expect("json");
    assert_eq!(info["backing-filename"], "base.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    qemu_img(&[
        "compare",
        top.to_str().expect("utf8"),
        expected.to_str().expect("utf8"),
    ]);
    assert_check_clean(&top);
}
