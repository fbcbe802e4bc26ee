//! Builds the test-guest firmware (guest/firmware) and leaves its ELF in `OUT_DIR`.
//!
//! The firmware is a separate `no_std` package with its own linker script, so it is built by a
//! nested `cargo build --release`. That build gets its own target directory (the outer build holds
//! the lock on the workspace's) and a clean environment: cargo passes a build script settings meant
//! for *this* package (flags, target, features, jobserver, clippy's wrapper) that would break or
//! mis-configure the nested build.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// The firmware's binary name (guest/firmware/Cargo.toml).
const FIRMWARE_BIN: &str = "vmms-test-guest";
/// Where lib.rs includes the image from, inside `OUT_DIR`.
const IMAGE_NAME: &str = "vmms-test-guest.elf";

fn main() -> ExitCode {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_default());
    let firmware = manifest_dir.join("firmware");
    for input in ["src", "Cargo.toml", "Cargo.lock", "build.rs", "link.ld"] {
        println!("cargo:rerun-if-changed={}", firmware.join(input).display());
    }
    println!("cargo:rerun-if-changed=build.rs");

    match build_firmware(&firmware, &out_dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(reason) => {
            println!(
                "cargo::error=building the test guest firmware (guest/firmware) failed: {reason}"
            );
            ExitCode::FAILURE
        }
    }
}

fn build_firmware(firmware: &Path, out_dir: &Path) -> Result<(), String> {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let target_dir = out_dir.join("firmware-target");
    let mut command = Command::new(cargo);
    command
        .current_dir(firmware)
        .args(["build", "--release", "--locked", "--manifest-path"])
        .arg(firmware.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    for (key, _) in env::vars_os() {
        if inherited_setting_breaks_nested_build(&key.to_string_lossy()) {
            command.env_remove(&key);
        }
    }

    let output = command
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !output.status.success() {
        // Build scripts' stderr is shown when they fail: pass on the nested compiler's messages.
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        return Err(format!(
            "nested `cargo build` exited with {} (its output is above)",
            output.status
        ));
    }

    let built = target_dir.join("release").join(FIRMWARE_BIN);
    let image = out_dir.join(IMAGE_NAME);
    std::fs::copy(&built, &image).map_err(|e| format!("cannot copy {}: {e}", built.display()))?;
    Ok(())
}

/// Whether an environment variable the outer cargo set (for this build script or the whole build)
/// must not reach the nested build. `CARGO_HOME`, `RUSTUP_*` and `PATH` stay: they choose the
/// same toolchain and registry.
fn inherited_setting_breaks_nested_build(key: &str) -> bool {
    const REMOVED: [&str; 13] = [
        "RUSTFLAGS",
        "RUSTDOCFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "MAKEFLAGS",
        "MFLAGS",
        "TARGET",
        "HOST",
        "OUT_DIR",
        "OPT_LEVEL",
        "PROFILE",
        "DEBUG",
        "NUM_JOBS",
        "RUSTC_LINKER",
    ];
    (key.starts_with("CARGO_") && key != "CARGO_HOME")
        || key.starts_with("__CARGO")
        || REMOVED.contains(&key)
}
