//! Builds VM folders as the daemon lays them out, for the checkpoint tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use snapshot::{VmFolder, create_qcow2, open_disk};

/// Size of each test disk.
pub const DISK_SIZE: u64 = 4 << 20;

/// A VM folder `<root>/vms/<id>` with `disks` qcow2 disks (`disk0.qcow2`, ...), Off.
pub fn make_vm(root: &Path, disks: usize) -> VmFolder {
    // Named as vmm-core names VM folders (upper-case GUIDs).
    let id = vmm_core::VmId::new_random();
    let dir = root.join("vms").join(id.to_string());
    std::fs::create_dir_all(dir.join("disks")).expect("vm folder");
    let mut entries = Vec::new();
    for i in 0..disks {
        let name = format!("disk{i}.qcow2");
        create_qcow2(&dir.join("disks").join(&name), DISK_SIZE).expect("disk");
        entries.push(serde_json::json!({"path": name, "read_only": false}));
    }
    let config = serde_json::json!({
        "version": 1, "id": id.to_string(), "name": "test-vm", "vcpus": 1, "memory_mib": 64,
        "disks": entries, "automatic_start_action": "Nothing",
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config).expect("json"),
    )
    .expect("config");
    VmFolder::new(dir)
}

/// The live path of disk `i` from the VM's config.
pub fn live_disk(folder: &VmFolder, i: usize) -> PathBuf {
    let config = folder.config().expect("config");
    folder.disks(&config, &folder.config_path()).expect("disks")[i]
        .path
        .clone()
}

/// Writes `record` (a recognisable 4 KiB block) at block `n` of the VM's live disk `i`.
pub fn write_record(folder: &VmFolder, i: usize, n: u64, tag: u8) {
    let disk = open_disk(&live_disk(folder, i), false).expect("open live disk");
    disk.write(n * 4096, &[tag; 4096]).expect("write record");
    disk.flush().expect("flush");
}

/// Reads the tag at block `n` of disk `i` (0 when never written).
pub fn read_record(folder: &VmFolder, i: usize, n: u64) -> u8 {
    let disk = open_disk(&live_disk(folder, i), true).expect("open live disk");
    let mut buf = [0u8; 4096];
    disk.read(n * 4096, &mut buf).expect("read record");
    assert!(buf.iter().all(|&b| b == buf[0]), "torn record at block {n}");
    buf[0]
}

/// Puts the VM in the Saved state with a recognisable state and memory file.
pub fn save_vm(folder: &VmFolder, tag: u8) {
    let state = folder.state_dir();
    std::fs::create_dir_all(&state).expect("state dir");
    std::fs::write(state.join("state.json"), format!("{{\"tag\":{tag}}}")).expect("state");
    std::fs::write(state.join("memory.bin"), vec![tag; 1 << 16]).expect("memory");
}

/// The tag of the VM's saved memory, if Saved.
pub fn saved_tag(folder: &VmFolder) -> Option<u8> {
    std::fs::read(folder.state_dir().join("memory.bin"))
        .ok()
        .map(|m| m[0])
}

/// Every qcow2 file under the VM's `disks/`.
pub fn disk_files(folder: &VmFolder) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder.disks_dir())
        .expect("disks")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "qcow2"))
        .collect();
    files.sort();
    files
}

/// Every file under `dir` with its bytes, for "nothing was touched" checks.
pub fn snapshot_of(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("list").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push((path.clone(), std::fs::read(&path).expect("read")));
            }
        }
    }
    out.sort();
    out
}
