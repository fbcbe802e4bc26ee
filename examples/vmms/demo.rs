//! `vmms demo`: the whole stack in one command, on a fresh clone, with nothing to download.
//!
//! Starts a daemon for the store (unless one runs), defines a VM `demo` on the embedded test
//! guest, starts it, shows `get-vm`, then the guest's console. On a terminal the console is
//! attached (Ctrl-] detaches) and the daemon and VM stay up for more commands; otherwise the
//! guest's banner and a `status` reply are printed and everything is stopped and removed again.

use std::fs::OpenOptions;
use std::io::{IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use vmm_core::{EnabledState, RequestedState};
use vmms_guest::protocol::{BANNER, PROMPT};
use worker_manager::StoreLayout;

use crate::api::{Client, Request, VmSpec, VmView};
use crate::cli::{Cli, Output};
use crate::console;

const NAME: &str = "demo";

pub fn demo(store: &Path) -> Result<(), String> {
    let interactive = std::io::stdin().is_terminal();
    let daemon = ensure_daemon(store)?;
    let cli = |verb| Cli {
        store,
        output: Output::Table,
        verb,
        target: Some(NAME.to_owned()),
    };
    let mut client = Client::connect(store).map_err(|e| format!("daemon: {e}"))?;
    let vm = match client.call::<Vec<VmView>>(&Request::GetVm {
        target: Some(NAME.into()),
    }) {
        Ok(mut vms) => vms.pop().ok_or("daemon returned no VM")?,
        Err(_) => {
            out!("==> new-vm {NAME} (embedded test guest, 1 vCPU, 64 MiB)");
            client
                .call::<VmView>(&Request::NewVm { spec: spec() })
                .map_err(|e| format!("new-vm: {e}"))?
        }
    };
    let id = vm.id;
    let start = match vm.state {
        EnabledState::Off | EnabledState::Saved => Some(RequestedState::Start),
        EnabledState::Paused => Some(RequestedState::Start),
        _ => None,
    };
    if let Some(request) = start {
        out!("==> start-vm {NAME}");
        cli("start-vm")
            .change_state(request)
            .map_err(|e| e.to_string())?;
    }
    out!("\n==> get-vm");
    let mut all = cli("get-vm");
    all.target = None;
    all.get_vm().map_err(|e| e.to_string())?;

    if interactive {
        out!("\n==> console {NAME}   (try `help`, `status`, `write 3`; Ctrl-] detaches)");
        console::attach(store, id, NAME)?;
        let exe =
            std::env::current_exe().map_or_else(|_| "vmms".into(), |p| p.display().to_string());
        out!(
            "\nThe daemon and '{NAME}' keep running. Try (with `alias vmms={exe}`):\n  \
             vmms --store {s} get-vm\n  vmms --store {s} suspend-vm {NAME}\n  \
             vmms --store {s} save-vm {NAME}\n  vmms --store {s} console {NAME}\n  \
             vmms --store {s} stop-vm {NAME}\n  vmms --store {s} stop-daemon",
            s = store.display()
        );
        return Ok(());
    }

    out!("\n==> console {NAME} (non-interactive: banner, then `status` twice)");
    show_console(store, id)?;
    out!("\n==> stop-vm {NAME} --turn-off; remove-vm {NAME}");
    cli("stop-vm")
        .change_state(RequestedState::TurnOff)
        .map_err(|e| e.to_string())?;
    cli("remove-vm").remove_vm().map_err(|e| e.to_string())?;
    if let Some(mut child) = daemon {
        // A fresh connection (the first may have sat idle past the daemon's idle timeout);
        // `stop-daemon` returns once the daemon is gone.
        if cli("stop-daemon").stop_daemon().is_err() {
            let _ = child.kill();
        }
        let _ = child.wait();
        out!("==> daemon stopped");
    }
    Ok(())
}

fn spec() -> VmSpec {
    VmSpec {
        name: NAME.into(),
        vcpus: 1,
        memory_mib: 64,
        kernel: None,
        initrd: None,
        cmdline: None,
        disks: Vec::new(),
        new_disk: None,
        recovery: "restart".into(),
    }
}

/// The daemon's child process if this call started one; `None` if one was already serving.
fn ensure_daemon(store: &Path) -> Result<Option<Child>, String> {
    if Client::connect(store).is_ok() {
        out!("==> using the daemon already serving {}", store.display());
        return Ok(None);
    }
    std::fs::create_dir_all(store)
        .map_err(|e| format!("cannot create {}: {e}", store.display()))?;
    let log_path = store.join("vmms.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .map_err(|e| format!("{}: {e}", log_path.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    out!(
        "==> vmms serve --store {}   (log: {})",
        store.display(),
        log_path.display()
    );
    let mut child = Command::new(exe)
        .arg("serve")
        .arg("--store")
        .arg(store)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        // Its own process group: Ctrl-C at this terminal does not reach it.
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start the daemon: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Client::connect(store).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the daemon exited ({status}); see {}",
                log_path.display()
            ));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err("the daemon did not come up within 10 s".into());
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(Some(child))
}

/// Prints the guest's console output up to its prompt, then two `status` replies a second apart.
fn show_console(store: &Path, id: vmm_core::VmId) -> Result<(), String> {
    let socket = StoreLayout::new(store).runtime(id).console_socket();
    let mut stream =
        UnixStream::connect(&socket).map_err(|e| format!("cannot attach to the console: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| e.to_string())?;
    let mut seen = String::new();
    read_until(&mut stream, &mut seen, &format!("{BANNER}\r\n{PROMPT}"))?;
    for _ in 0..2 {
        stream
            .write_all(b"status\r")
            .map_err(|e| format!("console write: {e}"))?;
        read_until(&mut stream, &mut seen, &format!("\r\n{PROMPT}"))?;
        thread::sleep(Duration::from_secs(1));
    }
    out!("");
    Ok(())
}

/// Echoes console output until `needle` has been printed.
fn read_until(stream: &mut UnixStream, seen: &mut String, needle: &str) -> Result<(), String> {
    let start = seen.len();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 1024];
    while !seen[start..].contains(needle) {
        if Instant::now() > deadline {
            return Err(format!("the guest did not print {needle:?} within 10 s"));
        }
        match stream.read(&mut buf) {
            Ok(0) => return Err("the console closed".into()),
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                print!("{text}");
                let _ = std::io::stdout().flush();
                seen.push_str(&text);
            }
            Err(_) => {}
        }
    }
    Ok(())
}
