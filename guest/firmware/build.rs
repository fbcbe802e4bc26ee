//! Links the guest as a static, non-relocatable ELF at the addresses `link.ld` gives.
//!
//! The image is built for the host target (x86_64-unknown-linux-gnu) but without its C runtime:
//! `-nostartfiles` drops crt1/crti, `-static -no-pie` makes every address final at link time, and the
//! script places the image at 1 MiB with the status page first.

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let script = dir.join("link.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-link-arg-bins=-nostartfiles");
    println!("cargo:rustc-link-arg-bins=-static");
    println!("cargo:rustc-link-arg-bins=-no-pie");
    println!("cargo:rustc-link-arg-bins=-Wl,--build-id=none");
    println!("cargo:rustc-link-arg-bins=-T{}", script.display());
}
