#!/usr/bin/env bash
# Installs what the tests need, then runs every check CI runs: formatting, clippy, and the whole test
# suite on real KVM (tests that need /dev/kvm skip with a printed reason where it is absent).
#
# Usage: scripts/test.sh            everything
#        VMMS_SKIP_LINUX=1 ...      skip building the tiny Linux guest image (its tests then skip)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "toolchain: $(cargo --version)"
if ! cargo nextest --version >/dev/null 2>&1; then
  step "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

# qemu-img / qemu-io: the snapshot crate's interop tests check our qcow2 images with QEMU's tools.
if ! command -v qemu-img >/dev/null 2>&1 || ! command -v qemu-io >/dev/null 2>&1; then
  step "installing qemu-utils"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-utils >/dev/null
fi

if [ -x scripts/guest-image.sh ] && [ "${VMMS_SKIP_LINUX:-0}" != 1 ]; then
  step "tiny Linux guest image (cached; rebuilt only when its inputs change)"
  scripts/guest-image.sh
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "cargo doc -D warnings"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

step "tests"
cargo nextest run --workspace --all-targets --no-fail-fast
cargo test --workspace --doc --quiet
