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

# iasl (Debian acpica-tools) disassembles the partition's DSDT in a unit test.
if ! command -v iasl >/dev/null 2>&1; then
  step "installing acpica-tools (iasl)"
  apt-get install -y -q acpica-tools >/dev/null ||
    { apt-get update -q >/dev/null && apt-get install -y -q acpica-tools >/dev/null; }
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
