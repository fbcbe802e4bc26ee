//! The minimal way to embed `partition`: boot a kernel (by default the embedded test guest), wire
//! COM1 to this terminal, and exit with the guest's exit reason.
//!
//! ```text
//! cargo run --release --example partition -- [--kernel PATH] [--initrd PATH] [--cmdline S]
//!     [--mem-mib N] [--vcpus N] [--disk PATH]
//! ```
//!
//! Type at the guest's shell; `Ctrl-A x` stops the partition from the host side.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use partition::{DiskConfig, ExitReason, KernelImage, Partition, PartitionConfig};

/// Boot a kernel in a KVM partition with COM1 on this terminal.
#[derive(Debug, Parser)]
struct Args {
    /// Kernel image (bzImage, ELF vmlinux, or ELF with a PVH note); default: the embedded test guest.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs to load next to the kernel.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (default: `console=ttyS0` for a kernel, empty for the test guest).
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 64)]
    mem_mib: u64,
    /// Virtual processors.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Raw disk image, attached as virtio-blk (`vda`).
    #[arg(long)]
    disk: Option<PathBuf>,
}

/// Puts the terminal in raw mode while alive, so keys reach the guest as typed.
struct RawTerminal(Option<libc::termios>);

impl RawTerminal {
    fn enter() -> Self {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(0) } != 1 {
            return Self(None);
        }
        // SAFETY: termios is plain data; tcgetattr fills it for fd 0, which is a terminal.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `saved` is a valid, writable termios.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return Self(None);
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        raw.c_oflag |= libc::OPOST | libc::ONLCR;
        // SAFETY: `raw` is a valid termios derived from the terminal's own.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) };
        Self(Some(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // SAFETY: restores the settings read from the same terminal in `enter`.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, saved) };
        }
    }
}

fn config(args: &Args) -> PartitionConfig {
    let (kernel, default_cmdline) = match &args.kernel {
        Some(path) => (
            KernelImage::Path(path.clone()),
            "console=ttyS0 reboot=k panic=1",
        ),
        None => (KernelImage::Bytes(Arc::from(vmms::guest::ELF)), ""),
    };
    let mut config =
        PartitionConfig::new(kernel, args.cmdline.as_deref().unwrap_or(default_cmdline));
    config.boot.initrd = args.initrd.clone();
    config.memory_mib = args.mem_mib;
    config.vcpus = args.vcpus;
    config.disks = args.disk.iter().map(DiskConfig::new).collect();
    config
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut vm = match Partition::new(config(&args)) {
        Ok(vm) => vm,
        Err(e) => {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("partition: {msg}");
            return ExitCode::from(2);
        }
    };
    vm.com1().set_sink(Box::new(std::io::stdout()));
    let terminal = RawTerminal::enter();
    let com1 = vm.com1().clone();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut escape = false;
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 256];
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            for &byte in &buf[..n] {
                match (escape, byte) {
                    (true, b'x') => {
                        let _ = stop_tx.send(());
                        return;
                    }
                    (false, 0x01) => escape = true,
                    _ => {
                        escape = false;
                        let _ = com1.send_all(&[byte], Duration::from_secs(5));
                    }
                }
            }
        }
    });
    if let Err(e) = vm.resume() {
        drop(terminal);
        eprintln!("partition: {e}");
        return ExitCode::from(2);
    }
    let reason = loop {
        if let Some(reason) = vm.wait(Some(Duration::from_millis(50))) {
            break reason;
        }
        if stop_rx.try_recv().is_ok() {
            break vm.stop();
        }
    };
    drop(terminal);
    let _ = std::io::stdout().flush();
    eprintln!("\r\npartition: {reason}");
    match reason {
        ExitReason::PowerOff | ExitReason::Stopped => ExitCode::SUCCESS,
        ExitReason::Reset => ExitCode::from(3),
        _ => ExitCode::from(1),
    }
}
