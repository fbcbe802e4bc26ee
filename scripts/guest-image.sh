#!/usr/bin/env bash
# Builds the tiny real-Linux guest image used as the slow conformance check of the vmms boot path
# and virtio-blk device (DESIGN.md section 8, reference/host-kvm.md "Recipes that worked here"):
# two tinyconfig Linux 6.1 kernels, each as bzImage + ELF vmlinux with the PVH entry note (an SMP +
# ACPI one for multi-vCPU partitions and a uniprocessor one, which is the one that boots all the way
# to init on a software KVM: see scripts/guest-image/smp.fragment), an uncompressed busybox
# initramfs and a small MBR-partitioned raw disk, plus manifest.env describing them.
#
# The result lives in a cache folder outside the repository so fresh CI clones on the same machine
# reuse it; it is rebuilt only when an input changes (this script, scripts/guest-image/*, the
# linux-source-6.1 or busybox-static package version).
set -euo pipefail

SCRIPT_PATH=$(readlink -f "${BASH_SOURCE[0]}")
SCRIPT_DIR=$(dirname "$SCRIPT_PATH")
readonly SCRIPT_PATH SCRIPT_DIR
readonly INPUT_DIR="$SCRIPT_DIR/guest-image"
readonly FRAGMENT="$INPUT_DIR/kernel.fragment"
readonly SMP_FRAGMENT="$INPUT_DIR/smp.fragment"
readonly INIT_SCRIPT="$INPUT_DIR/init"

readonly CACHE_ROOT="${VMMS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmms}"
readonly OUT_DIR="$CACHE_ROOT/guest-image"
# Sources and the kernel build tree, kept between runs so a rebuild after a small change is quick.
readonly WORK_DIR="$CACHE_ROOT/guest-image-work"
readonly LOG="$WORK_DIR/build.log"

readonly KERNEL_PKG=linux-source-6.1
readonly BUSYBOX_PKG=busybox-static
readonly BUILD_DEPS=(flex bison bc libelf-dev libssl-dev cpio lz4 make gcc libc6-dev binutils xz-utils fdisk)

readonly DISK_BYTES=$((8 * 1024 * 1024))
readonly SECTOR=512

# The command line that got the tiny kernel to "Run /init" on the software KVM (host-kvm.md).
readonly CMDLINE_ALWAYS_HEAD="console=ttyS0 reboot=k panic=1"
readonly CMDLINE_SOFT_KVM="noxsave nofsgsbase clearcpuid=popcnt,rdrand,rdseed,smap,smep,pcid,invpcid,rdpid,rdtscp,sse4_1,sse4_2,ssse3,pclmulqdq,aes,sha_ni,bmi1,bmi2,adx,movbe,f16c,fma,avx,avx2,gfni,vaes,vpclmulqdq,pku,clwb,clflushopt,erms,fsrm,abm"
readonly CMDLINE_ALWAYS_TAIL="rdinit=/init"

usage() {
    cat <<EOF
Usage: scripts/guest-image.sh [--print-dir | --help]

Builds the tiny Linux 6.1 guest image (bzImage, vmlinux: SMP + ACPI; bzImage-up, vmlinux-up:
uniprocessor; initramfs.cpio, disk.img, manifest.env)
into $OUT_DIR
(set VMMS_CACHE_DIR or XDG_CACHE_HOME to move it). Rebuilds only when its inputs changed.
Installs missing build tools with apt-get (needs root).

  --print-dir  print the output folder and exit
  --help       show this help
EOF
}

[[ $# -le 1 ]] || { usage >&2; exit 2; }
case "${1:-}" in
    "") ;;
    --print-dir) printf '%s\n' "$OUT_DIR"; exit 0 ;;
    -h | --help) usage; exit 0 ;;
    *) printf 'guest-image: unknown argument: %s\n' "$1" >&2; usage >&2; exit 2 ;;
esac

# fds 3 and 4 stay the caller's stderr and stdout while a step's output goes to the log.
exec 3>&2 4>&1
export DEBIAN_FRONTEND=noninteractive LC_ALL=C

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
say() { printf 'guest-image: %s\n' "$*"; }
die() { printf 'guest-image: error: %s\n' "$*" >&3; exit 1; }

CURRENT_STEP=""
TMP_OUT=""
on_exit() {
    local rc=$?
    if [[ $rc -ne 0 && -n "$CURRENT_STEP" ]]; then
        printf ' FAILED\n' >&4
        printf 'guest-image: step "%s" failed (exit %d); last lines of %s:\n' "$CURRENT_STEP" "$rc" "$LOG" >&3
        tail -n 30 "$LOG" >&3 2>/dev/null || true
    fi
    [[ -z "$TMP_OUT" ]] || rm -rf "$TMP_OUT"
}
trap on_exit EXIT
# Make sure an interrupted run still goes through on_exit and removes its temporary output.
trap 'exit 130' INT
trap 'exit 143' TERM HUP

# Runs one step with its output in the log, printing one line: its name and how long it took.
# Called plainly (never under `if`/`||`) so `set -e` stays in force inside the step.
step() {
    local name=$1 t0
    shift
    t0=$(now)
    printf 'guest-image: %-44s' "$name..."
    CURRENT_STEP=$name
    printf '\n=== %s\n' "$name" >>"$LOG"
    "$@" >>"$LOG" 2>&1 </dev/null
    CURRENT_STEP=""
    printf ' %6ss\n' "$(elapsed "$t0")"
}

# --- package helpers ---------------------------------------------------------------------------

APT_UPDATED=0
apt_update_once() {
    if [[ $APT_UPDATED -eq 0 ]]; then
        apt-get update -q
        APT_UPDATED=1
    fi
}

candidate_version() {
    apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2 }'
}

# Prints the version apt would download, running `apt-get update` once if apt knows none.
package_version() {
    local v
    v=$(candidate_version "$1")
    if [[ -z "$v" || "$v" == "(none)" ]]; then
        apt_update_once >>"$LOG" 2>&1
        v=$(candidate_version "$1")
    fi
    [[ -n "$v" && "$v" != "(none)" ]] || die "apt knows no version of $1 (check /etc/apt/sources.list)"
    printf '%s\n' "$v"
}

missing_packages() {
    local p
    for p in "${BUILD_DEPS[@]}"; do
        [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" == "install ok installed" ]] || printf '%s ' "$p"
    done
}

install_build_deps() {
    local missing
    missing=$(missing_packages)
    [[ -n "$missing" ]] || return 0
    [[ $EUID -eq 0 ]] || die "missing packages ($missing) and not root; install them first"
    # shellcheck disable=SC2086 # word splitting of the package list is wanted
    if ! apt-get install -y --no-install-recommends $missing; then
        apt_update_once
        # shellcheck disable=SC2086
        apt-get install -y --no-install-recommends $missing
    fi
}

# --- build steps -------------------------------------------------------------------------------

fetch_packages() {
    local dir="$WORK_DIR/debs"
    rm -rf "$dir" "$WORK_DIR/pkg"
    mkdir -p "$dir" "$WORK_DIR/pkg"
    (cd "$dir" && apt-get download "$KERNEL_PKG=$KERNEL_VER" "$BUSYBOX_PKG=$BUSYBOX_VER") ||
        { apt_update_once; (cd "$dir" && apt-get download "$KERNEL_PKG=$KERNEL_VER" "$BUSYBOX_PKG=$BUSYBOX_VER"); }
    dpkg -x "$dir"/"${KERNEL_PKG}"_*.deb "$WORK_DIR/pkg"
    dpkg -x "$dir"/"${BUSYBOX_PKG}"_*.deb "$WORK_DIR/pkg"
    rm -rf "$dir"
}

extract_kernel_source() {
    local tmp="$WORK_DIR/src.tmp.$$"
    rm -rf "$tmp" "$WORK_DIR"/linux-src-* "$WORK_DIR"/linux-build-*
    mkdir -p "$tmp"
    tar -C "$tmp" -xf "$WORK_DIR/pkg/usr/src/$KERNEL_PKG.tar.xz"
    mv "$tmp/$KERNEL_PKG" "$SRC"
    rm -rf "$tmp" "$WORK_DIR/pkg/usr/src"
}

# The kernel being built: its build tree, its fragments and the suffix of its output files
# ("" for the SMP + ACPI kernel, "-up" for the uniprocessor one). Set by use_kernel.
BUILD=""
FRAGMENTS=()
SUFFIX=""
use_kernel() {
    SUFFIX=$1
    if [[ -z "$SUFFIX" ]]; then
        BUILD="$WORK_DIR/linux-build-$KERNEL_VER"
        FRAGMENTS=("$FRAGMENT" "$SMP_FRAGMENT")
    else
        BUILD="$WORK_DIR/linux-build$SUFFIX-$KERNEL_VER"
        FRAGMENTS=("$FRAGMENT")
    fi
}

# Nice: the kernel build is the longest step and should not starve whatever else runs (CI tests).
kmake() { nice -n 10 make -C "$SRC" O="$BUILD" ARCH=x86_64 "$@"; }

# Reads the fragments: prints "y NAME" for each CONFIG_NAME=y and "n NAME" for each "not set" line.
fragment_options() {
    sed -n -e 's/^CONFIG_\([A-Za-z0-9_]*\)=y$/y \1/p' \
        -e 's/^# CONFIG_\([A-Za-z0-9_]*\) is not set$/n \1/p' "${FRAGMENTS[@]}"
}

configure_kernel() {
    local want name args=()
    mkdir -p "$BUILD"
    kmake tinyconfig
    while read -r want name; do
        if [[ $want == y ]]; then args+=(--enable "$name"); else args+=(--disable "$name"); fi
    done < <(fragment_options)
    "$SRC/scripts/config" --file "$BUILD/.config" "${args[@]}"
    kmake olddefconfig
}

verify_config() {
    local want name bad=()
    while read -r want name; do
        if [[ $want == y ]]; then
            grep -qx "CONFIG_$name=y" "$BUILD/.config" || bad+=("CONFIG_$name is not =y")
        else
            ! grep -q "^CONFIG_$name=" "$BUILD/.config" || bad+=("CONFIG_$name is still set")
        fi
    done < <(fragment_options)
    if [[ ${#bad[@]} -ne 0 ]]; then
        printf 'guest-image: kernel config does not match %s:\n' "${FRAGMENTS[*]}" >&3
        printf '  %s\n' "${bad[@]}" >&3
        printf '%s\n' "${bad[@]}"
        return 1
    fi
}

build_kernel() {
    kmake -j"$(nproc)" bzImage vmlinux
    cp "$BUILD/arch/x86/boot/bzImage" "$TMP_OUT/bzImage$SUFFIX"
    cp "$BUILD/vmlinux" "$TMP_OUT/vmlinux$SUFFIX"
    strip -o "$TMP_OUT/vmlinux$SUFFIX.stripped" "$BUILD/vmlinux"
    cp "$BUILD/.config" "$TMP_OUT/config$SUFFIX"
    kmake -s kernelrelease >"$TMP_OUT/kernelrelease"
}

# XEN_ELFNOTE_PHYS32_ENTRY is note type 18 (0x12) with owner "Xen".
has_pvh_note() {
    readelf -n "$1" | awk '$1 == "Xen" && /0x00000012/ { found = 1 } END { exit !found }'
}

build_initramfs() {
    local list="$WORK_DIR/initramfs.list" gen="$WORK_DIR/gen_init_cpio"
    # The kernel's own cpio writer: makes device nodes from a list, with fixed owners and times.
    gcc -O2 -o "$gen" "$SRC/usr/gen_init_cpio.c"
    cat >"$list" <<EOF
dir /dev 0755 0 0
nod /dev/console 0600 0 0 c 5 1
nod /dev/null 0666 0 0 c 1 3
dir /bin 0755 0 0
file /bin/busybox $WORK_DIR/pkg/bin/busybox 0755 0 0
slink /bin/sh busybox 0777 0 0
file /init $INIT_SCRIPT 0755 0 0
dir /proc 0755 0 0
dir /sys 0755 0 0
dir /tmp 1777 0 0
dir /root 0700 0 0
EOF
    "$gen" -t 0 "$list" >"$TMP_OUT/initramfs.cpio"
}

build_disk() {
    local img="$TMP_OUT/disk.img" sectors=$((DISK_BYTES / SECTOR))
    truncate -s "$DISK_BYTES" "$img"
    # Two Linux partitions, so the guest prints "vda: vda1 vda2"; fixed disk id for reproducibility.
    sfdisk --no-reread --no-tell-kernel "$img" <<EOF
label: dos
label-id: 0x766d6d73
start=2048, size=6144, type=83
start=8192, size=$((sectors - 8192)), type=83
EOF
    # A recognisable first sector in each partition, for anyone checking reads through virtio-blk.
    printf 'VMMS-DISK-PART1\n' | dd of="$img" bs=$SECTOR seek=2048 conv=notrunc status=none
    printf 'VMMS-DISK-PART2\n' | dd of="$img" bs=$SECTOR seek=8192 conv=notrunc status=none
    sfdisk --dump "$img"
}

write_manifest() {
    local pvh=0 sectors
    has_pvh_note "$TMP_OUT/vmlinux" && has_pvh_note "$TMP_OUT/vmlinux-up" && pvh=1
    sectors=$(($(stat -c %s "$TMP_OUT/disk.img") / SECTOR))
    cat >"$TMP_OUT/manifest.env" <<EOF
# vmms guest image, written by scripts/guest-image.sh. KEY="value" lines; values hold no quotes,
# backslashes or dollar signs, so a shell can source this and a simple parser can read it.
KERNEL_VERSION="$(cat "$TMP_OUT/kernelrelease")"
KERNEL_PACKAGE="$KERNEL_PKG=$KERNEL_VER"
BUSYBOX_PACKAGE="$BUSYBOX_PKG=$BUSYBOX_VER"
BZIMAGE="$OUT_DIR/bzImage"
# Unstripped ELF vmlinux; VMLINUX_STRIPPED is the same kernel without symbols (smaller to load).
VMLINUX="$OUT_DIR/vmlinux"
VMLINUX_STRIPPED="$OUT_DIR/vmlinux.stripped"
KERNEL_CONFIG="$OUT_DIR/config"
# The same kernel without SMP and ACPI (scripts/guest-image/smp.fragment says why there are two): the
# one that reaches virtio-blk and init in about a minute on a software KVM. Takes its one CPU and
# its interrupt routing from the boot protocol alone (no ACPI tables, no MP table).
BZIMAGE_UP="$OUT_DIR/bzImage-up"
VMLINUX_UP="$OUT_DIR/vmlinux-up"
VMLINUX_UP_STRIPPED="$OUT_DIR/vmlinux-up.stripped"
KERNEL_UP_CONFIG="$OUT_DIR/config-up"
# Uncompressed: boots fastest on the software KVM (43 s to "Run /init" vs 82 s for gzip).
INITRAMFS="$OUT_DIR/initramfs.cpio"
# Raw disk with an MBR: vda1 = sectors 2048..8191, vda2 = sectors 8192..end.
DISK="$OUT_DIR/disk.img"
DISK_SECTORS="$sectors"
# 1 when vmlinux and vmlinux-up carry the XEN_ELFNOTE_PHYS32_ENTRY note (PVH direct boot).
HAS_PVH_NOTE="$pvh"
# Kernel command line. Always needed: console=ttyS0 (the tests read COM1), reboot=k (reset through
# the keyboard controller, port 0x64), panic=1 (reboot rather than hang), rdinit=/init.
# Only needed on a software KVM such as kvm_pvm, harmless on VT-x/SVM: noxsave, nofsgsbase and
# clearcpuid=... (host CPUID bits leak into the guest and the CPL0 emulator lacks those instructions).
# Add virtio_mmio.device=<size>@<addr>:<irq> for the disk.
CMDLINE_ALWAYS="$CMDLINE_ALWAYS_HEAD $CMDLINE_ALWAYS_TAIL"
CMDLINE_SOFT_KVM="$CMDLINE_SOFT_KVM"
CMDLINE="$CMDLINE_ALWAYS_HEAD $CMDLINE_SOFT_KVM $CMDLINE_ALWAYS_TAIL"
EOF
    rm "$TMP_OUT/kernelrelease"
}

# Replaces the output folder with the finished one; the old one stays whole until the last moment.
publish() {
    rm -rf "$OUT_DIR.old"
    [[ ! -e "$OUT_DIR" ]] || mv "$OUT_DIR" "$OUT_DIR.old"
    mv "$TMP_OUT" "$OUT_DIR"
    TMP_OUT=""
    rm -rf "$OUT_DIR.old"
}

# --- main ----------------------------------------------------------------------------------------

inputs_hash() {
    {
        sha256sum "$SCRIPT_PATH"
        (cd "$INPUT_DIR" && find . -type f -print0 | sort -z | xargs -0 sha256sum)
        printf '%s=%s\n' "$KERNEL_PKG" "$KERNEL_VER" "$BUSYBOX_PKG" "$BUSYBOX_VER"
    } | sed "s#$SCRIPT_PATH#guest-image.sh#" | sha256sum | cut -d' ' -f1
}

up_to_date() {
    local f
    [[ -f "$OUT_DIR/stamp" && "$(cat "$OUT_DIR/stamp")" == "$HASH" ]] || return 1
    for f in bzImage vmlinux vmlinux.stripped config bzImage-up vmlinux-up vmlinux-up.stripped \
        config-up initramfs.cpio disk.img manifest.env; do
        [[ -s "$OUT_DIR/$f" ]] || return 1
    done
}

main() {
    local t_start
    t_start=$(now)
    [[ -f "$FRAGMENT" && -f "$SMP_FRAGMENT" && -f "$INIT_SCRIPT" ]] || die "missing inputs in $INPUT_DIR"
    mkdir -p "$WORK_DIR"
    # Two builds at once (parallel CI jobs) would fight over the work tree: take turns.
    exec 9>"$CACHE_ROOT/guest-image.lock"
    if ! flock -n 9; then
        say "waiting for another guest-image build to finish"
        flock 9
    fi
    : >"$LOG"
    # Leftovers of runs that were killed outright (we hold the lock, so nobody else is using them).
    rm -rf "$CACHE_ROOT"/guest-image.tmp.* "$OUT_DIR.old" "$WORK_DIR"/src.tmp.*

    KERNEL_VER=$(package_version "$KERNEL_PKG")
    BUSYBOX_VER=$(package_version "$BUSYBOX_PKG")
    HASH=$(inputs_hash)
    if up_to_date; then
        say "up to date in $OUT_DIR ($KERNEL_PKG $KERNEL_VER, $(elapsed "$t_start")s)"
        return 0
    fi
    say "building into $OUT_DIR ($KERNEL_PKG $KERNEL_VER, $BUSYBOX_PKG $BUSYBOX_VER); log: $LOG"

    # Directory names carry the package version, so a new version starts from a fresh tree.
    SRC="$WORK_DIR/linux-src-$KERNEL_VER"
    TMP_OUT="$CACHE_ROOT/guest-image.tmp.$$"
    rm -rf "$TMP_OUT"
    mkdir -p "$TMP_OUT"

    step "install build tools" install_build_deps
    local have
    have=$(cat "$WORK_DIR/packages" 2>/dev/null || true)
    if [[ "$have" != "$KERNEL_VER $BUSYBOX_VER" || ! -x "$WORK_DIR/pkg/bin/busybox" || ! -d "$SRC" ]]; then
        rm -f "$WORK_DIR/packages"
        step "download $KERNEL_PKG and $BUSYBOX_PKG" fetch_packages
        step "extract kernel source" extract_kernel_source
        printf '%s %s\n' "$KERNEL_VER" "$BUSYBOX_VER" >"$WORK_DIR/packages"
    else
        say "sources already unpacked in $WORK_DIR"
    fi
    # The uniprocessor kernel first: the 1-vCPU conformance boots need it.
    local kernel name
    for kernel in -up ""; do
        use_kernel "$kernel"
        name=${kernel:+uniprocessor}
        name=${name:-SMP + ACPI}
        step "configure $name kernel" configure_kernel
        step "verify $name kernel config" verify_config
        step "build $name kernel" build_kernel
    done
    step "build initramfs.cpio" build_initramfs
    step "build disk.img" build_disk
    step "write manifest.env" write_manifest
    printf '%s\n' "$HASH" >"$TMP_OUT/stamp"
    step "publish $OUT_DIR" publish
    grep -q '^HAS_PVH_NOTE="1"' "$OUT_DIR/manifest.env" ||
        printf 'guest-image: warning: vmlinux has no XEN_ELFNOTE_PHYS32_ENTRY note (no PVH boot)\n' >&3
    say "done in $(elapsed "$t_start")s"
}

main
