//! The qcow2 disk as partition's block backend: guest memory in, guest memory out, dirty pages
//! marked, on images `qemu-img` made and checks.

mod common_qemu;

use common_qemu::{assert_check_clean, qemu_img, qemu_io};
use partition::block::BlockBackend;
use snapshot::open_disk;
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

type Memory = GuestMemoryMmap<AtomicBitmap>;

const MIB: usize = 1 << 20;

fn memory() -> Memory {
    Memory::from_ranges(&[(GuestAddress(0), MIB)]).expect("guest memory")
}

#[test]
fn guest_writes_through_the_backend_read_back_in_qemu_img_convert() {
    let dir = tempfile::tempdir().expect("tmp");
    let (base, top, raw) = (
        dir.path().join("base.qcow2"),
        dir.path().join("top.qcow2"),
        dir.path().join("out.raw"),
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        base.to_str().expect("utf8"),
        "2M",
    ]);
    qemu_io(&["-c", "write -P 0x11 0 1M", base.to_str().expect("utf8")]);
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
    let mem = memory();
    mem.write_slice(&[0xc3; 8192], GuestAddress(0x4000))
        .expect("fill guest buffer");
    let backend: Box<dyn BlockBackend> = Box::new(open_disk(&top, false).expect("open"));

    let slice = mem.get_slice(GuestAddress(0x4000), 8192).expect("slice");
    backend
        .write_at(512 * 1024 + 512, &slice)
        .expect("write_at");
    backend.flush().expect("flush");
    drop(backend);

    qemu_img(&[
        "convert",
        "-O",
        "raw",
        top.to_str().expect("utf8"),
        raw.to_str().expect("utf8"),
    ]);
    let bytes = std::fs::read(&raw).expect("raw");
    let mut expected = vec![0x11u8; MIB];
    expected[512 * 1024 + 512..512 * 1024 + 512 + 8192].fill(0xc3);
    expected.resize(2 * MIB, 0);
    assert!(bytes == expected, "converted image differs");
    assert_check_clean(&top);
}

#[test]
fn reads_fill_guest_memory_and_mark_its_pages_dirty() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("d.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        path.to_str().expect("utf8"),
        "1M",
    ]);
    qemu_io(&["-c", "write -P 0x7e 64k 4k", path.to_str().expect("utf8")]);
    let mem = memory();
    let backend = open_disk(&path, true).expect("open");

    let slice = mem.get_slice(GuestAddress(0x10000), 8192).expect("slice");
    backend.read_at(60 * 1024, &slice).expect("read_at");

    let mut got = vec![0u8; 8192];
    mem.read_slice(&mut got, GuestAddress(0x10000))
        .expect("read guest");
    assert!(
        got[..4096].iter().all(|&b| b == 0),
        "unallocated reads as zeros"
    );
    assert!(got[4096..].iter().all(|&b| b == 0x7e));
    let region = mem.find_region(GuestAddress(0x10000)).expect("region");
    assert!(region.bitmap().dirty_at(0x10000) && region.bitmap().dirty_at(0x11000));
    assert!(!region.bitmap().dirty_at(0x20000));
}

#[test]
fn writes_to_a_read_only_backend_are_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("d.qcow2");
    snapshot::create_qcow2(&path, 1 << 20).expect("create");
    let mem = memory();
    let backend = open_disk(&path, true).expect("open");

    let result = backend.write_at(0, &mem.get_slice(GuestAddress(0), 512).expect("slice"));

    assert_eq!(
        result.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::PermissionDenied)
    );
}

#[test]
fn a_request_past_the_end_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("d.qcow2");
    snapshot::create_qcow2(&path, 1 << 20).expect("create");
    let mem = memory();
    let backend = open_disk(&path, false).expect("open");

    let result = backend.read_at(
        (1 << 20) - 512,
        &mem.get_slice(GuestAddress(0), 1024).expect("slice"),
    );

    assert_eq!(
        result.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::InvalidInput)
    );
}
