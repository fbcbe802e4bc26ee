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

# Debian packages the tests drive for real, each named by a command it provides:
#   qemu-img, qemu-io  (qemu-utils)     the snapshot crate's interop tests check our qcow2 images
#   strace             (strace)         the confinement test traces a worker's system calls
#   iasl               (acpica-tools)   a partition unit test disassembles our DSDT
#   protoc             (protobuf-compiler)  etcd-client's build script compiles etcd's protobufs
#   etcd               (etcd-server)    the cluster tests run a real 3-member etcd
#   ocf-tester         (resource-agents)    checks the vmms-ocf agent (xmllint from libxml2-utils)
#   xmllint            (libxml2-utils)
#   crm_resource       (pacemaker-cli-utils)  runs the agent with --force-start/-check/-stop
#   qemu-ga            (qemu-guest-agent)  the guest-agent client is checked against the real agent
#                                          (run on the host over a socket; never asked to freeze)
#   xfreerdp, Xvfb, xdotool, import/convert, tesseract   the RDP console test runs FreeRDP's
#     /vmconnect in a virtual X server, types with xdotool and reads the window back with OCR
missing=()
for pair in qemu-img:qemu-utils qemu-io:qemu-utils strace:strace iasl:acpica-tools \
  protoc:protobuf-compiler etcd:etcd-server ocf-tester:resource-agents xmllint:libxml2-utils \
  crm_resource:pacemaker-cli-utils qemu-ga:qemu-guest-agent \
  xfreerdp:freerdp2-x11 Xvfb:xvfb xdotool:xdotool import:imagemagick convert:imagemagick \
  tesseract:tesseract-ocr; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  step "installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The network tests create TAPs (in network namespaces of their own): /dev/net/tun must exist.
if [ ! -e /dev/net/tun ]; then
  step "loading the tun module"
  modprobe tun 2>/dev/null || { mkdir -p /dev/net && mknod /dev/net/tun c 10 200; }
fi

# The CIM-XML tests drive the daemon with real WBEM clients from PyPI, in a venv outside the repo.
VMMS_VENV="${VMMS_VENV:-$HOME/.cache/vmms/venv}"
if ! "$VMMS_VENV/bin/python" -c 'import pywbem, pywbemtools' >/dev/null 2>&1; then
  step "python venv for the CIM-XML tests: $VMMS_VENV (pywbem 1.9, pywbemtools)"
  if ! python3 -m venv --help >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
  fi
  python3 -m venv "$VMMS_VENV"
  "$VMMS_VENV/bin/pip" install -q 'pywbem>=1.9,<1.10' pywbemtools
fi
if ! command -v openssl >/dev/null 2>&1; then
  step "installing openssl (the TLS test makes its certificate with it)"
  apt-get update -qq && apt-get install -y -qq openssl >/dev/null
fi
export VMMS_VENV

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
