//! Issue 15's daemon-facing defects, each reproduced against a real `vmms serve` process driven
//! by the real CLI (or a raw client on its socket): GUID-like names (7), file modes (9), socket
//! access and planted links (10), oversized requests (11), silent connections (12) and a broken
//! stdout (13).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod vmms_common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vmms_common::{Daemon, Launch, eventually};

/// The unprivileged user (`nobody`) and its group (`nogroup`).
const NOBODY: u32 = 65534;

/// Returns early (skipping the test, with the reason printed) unless the test runs as root,
/// which it needs to run the CLI as another user.
macro_rules! require_root {
    () => {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: running the CLI as another user needs root");
            return;
        }
    };
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
}

fn socket(daemon: &Daemon) -> PathBuf {
    daemon.path().join("vmms.sock")
}

/// Every entry under the store that others could read or enter: folders must be 0700, files
/// 0600, sockets owner-only. `daemon.log` is the test fixture's own file, not the daemon's.
fn exposed_entries(root: &Path) -> Vec<String> {
    let mut exposed = Vec::new();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        if mode(&dir) != 0o700 {
            exposed.push(format!("{} {:o}", dir.display(), mode(&dir)));
        }
        for entry in fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            let kind = entry.file_type().unwrap();
            if dir == root && entry.file_name() == "daemon.log" {
                continue;
            }
            let ok = if kind.is_dir() {
                pending.push(path.clone());
                true
            } else if kind.is_socket() {
                mode(&path) & 0o077 == 0
            } else {
                kind.is_file() && mode(&path) == 0o600
            };
            if !ok {
                exposed.push(format!("{} {:o}", path.display(), mode(&path)));
            }
        }
    }
    exposed
}

fn store_stays_private_under_umask(umask: libc::mode_t) {
    let daemon = Daemon::start_launch(Launch {
        umask: Some(umask),
        ..Launch::default()
    });
    let id = daemon.new_vm("alpha", &[])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    daemon.ok(&["start-vm", "alpha"]);
    let while_running = exposed_entries(daemon.path());
    let run_dir = mode(&daemon.path().join("run").join(&id));
    daemon.ok(&["save-vm", "alpha"]);
    let while_saved = exposed_entries(daemon.path());

    assert_eq!(run_dir, 0o700);
    assert_eq!(
        mode(&daemon.path().join(format!("vms/{id}/config.json"))),
        0o600
    );
    assert!(
        daemon
            .path()
            .join(format!("vms/{id}/state/memory.bin"))
            .is_file()
    );
    assert_eq!(while_running, Vec::<String>::new(), "running");
    assert_eq!(while_saved, Vec::<String>::new(), "saved");
}

// ---- 7. A VM named like another VM's GUID -------------------------------------------------

#[test]
fn new_vm_named_like_another_vms_guid_is_refused_as_invalid_parameter() {
    let daemon = Daemon::start();
    let alpha = daemon.new_vm("alpha", &[]);
    let id = alpha["id"].as_str().unwrap().to_owned();

    let upper = daemon.fails(&["new-vm", &id, "--memory-mib", "16"]);
    let lower = daemon.fails(&["new-vm", &id.to_lowercase(), "--memory-mib", "16"]);
    let vms = daemon.vms();

    assert!(upper.ends_with("(32773)"), "{upper}");
    assert!(upper.contains("looks like a GUID"), "{upper}");
    assert!(lower.ends_with("(32773)"), "{lower}");
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0]["name"], "alpha");
}

// ---- 9. Store files readable by everyone --------------------------------------------------

#[test]
fn store_files_are_owner_only_under_umask_000() {
    require_kvm!();
    store_stays_private_under_umask(0o000);
}

#[test]
fn store_files_are_owner_only_under_umask_022() {
    require_kvm!();
    store_stays_private_under_umask(0o022);
}

// ---- 10. Socket access and planted links --------------------------------------------------

#[test]
fn store_root_and_socket_are_private_under_umask_000() {
    let daemon = Daemon::start_launch(Launch {
        umask: Some(0),
        store_mode: Some(0o777),
        ..Launch::default()
    });

    let root = mode(daemon.path());
    let socket = mode(&socket(&daemon));
    let lock = mode(&daemon.path().join("vmms.lock"));

    assert_eq!(root, 0o700);
    assert_eq!(socket & 0o077, 0, "socket mode {socket:o}");
    assert_eq!(lock, 0o600);
}

#[test]
fn non_root_client_is_refused_even_when_the_socket_is_reachable() {
    require_root!();
    let daemon = Daemon::start_launch(Launch {
        umask: Some(0),
        ..Launch::default()
    });
    // What a non-root user could reach during a bind-then-chmod window, or in a store someone
    // opened up by hand: the peer check must still turn it away.
    fs::set_permissions(daemon.path(), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(socket(&daemon), fs::Permissions::from_mode(0o666)).unwrap();

    let out = daemon.vmms_as(NOBODY, &["get-vm"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The log is written by its own thread, maybe after the refusal reached the client.
    let logged = eventually(|| daemon.log().contains("refused a connection from uid 65534"));

    assert!(!out.status.success(), "nobody was served: {stderr}");
    assert!(stderr.contains("access denied"), "{stderr}");
    assert!(logged, "{}", daemon.log());
}

#[test]
fn socket_group_member_is_served() {
    require_root!();
    let daemon = Daemon::start_launch(Launch {
        args: vec!["--socket-group".into(), "nogroup".into()],
        ..Launch::default()
    });

    let out = daemon.vmms_as(NOBODY, &["get-vm"]);

    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode(daemon.path()), 0o710);
    assert_eq!(mode(&daemon.path().join("vms")), 0o700);
}

#[test]
fn planted_worker_log_symlink_does_not_clobber_its_target() {
    require_kvm!();
    let daemon = Daemon::start();
    let id = daemon.new_vm("alpha", &[])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let elsewhere = tempfile::tempdir().unwrap();
    let victim = elsewhere.path().join("victim");
    fs::write(&victim, "precious").unwrap();
    let run_dir = daemon.path().join("run").join(&id);
    fs::create_dir(&run_dir).unwrap();
    std::os::unix::fs::symlink(&victim, run_dir.join("worker.log")).unwrap();

    let refused = daemon.fails(&["start-vm", "alpha"]);

    assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
    assert!(refused.contains("symbolic link"), "{refused}");
    assert_eq!(daemon.vm("alpha")["enabled_state"], 3);
}

#[test]
fn runtime_folder_planted_as_symlink_is_refused() {
    require_kvm!();
    let daemon = Daemon::start();
    let id = daemon.new_vm("alpha", &[])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let elsewhere = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), daemon.path().join("run").join(&id)).unwrap();

    let refused = daemon.fails(&["start-vm", "alpha"]);

    let written: Vec<_> = fs::read_dir(elsewhere.path()).unwrap().collect();
    assert!(written.is_empty(), "files were written through the link");
    assert!(refused.contains("symbolic link"), "{refused}");
}

// ---- 11. Unbounded request lines ----------------------------------------------------------

#[test]
fn hundred_mib_request_without_newline_is_cut_off_early_without_growing_the_daemon() {
    let daemon = Daemon::start();
    let before = daemon.rss_kib();
    let mut stream = UnixStream::connect(socket(&daemon)).unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let chunk = vec![b'x'; 64 * 1024];

    let mut sent = 0usize;
    while sent < 100 << 20 {
        match stream.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break,
        }
    }
    let mut answer = Vec::new();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stream.read_to_end(&mut answer);
    drop(stream);
    let still_answers = daemon.vmms(&["get-vm"]).status.success();
    let after = daemon.rss_kib();

    assert!(sent < 16 << 20, "the daemon took {sent} bytes of one line");
    assert!(
        String::from_utf8_lossy(&answer).contains("request longer than"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert!(
        after.saturating_sub(before) <= 4096,
        "daemon grew from {before} KiB to {after} KiB"
    );
    assert!(still_answers);
}

#[test]
fn client_that_stops_mid_line_is_disconnected() {
    let daemon = Daemon::start_launch(Launch {
        args: vec!["--request-timeout".into(), "1".into()],
        ..Launch::default()
    });
    let mut stream = UnixStream::connect(socket(&daemon)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let started = Instant::now();

    stream.write_all(br#"{"op":"get-vm""#).unwrap();
    let read = stream.read(&mut [0u8; 64]);

    assert_eq!(read.unwrap(), 0, "the connection was closed");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn idle_client_is_disconnected() {
    let daemon = Daemon::start_launch(Launch {
        args: vec!["--idle-timeout".into(), "1".into()],
        ..Launch::default()
    });
    let mut stream = UnixStream::connect(socket(&daemon)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let started = Instant::now();

    let read = stream.read(&mut [0u8; 64]);

    assert_eq!(read.unwrap(), 0, "the connection was closed");
    assert!(started.elapsed() < Duration::from_secs(10));
}

// ---- 12. Connections that never send ------------------------------------------------------

#[test]
fn thousand_silent_connections_do_not_lock_out_the_operator() {
    let daemon = Daemon::start_launch(Launch {
        nofile: Some(1024),
        ..Launch::default()
    });
    let silent = Arc::new(Mutex::new(Vec::new()));
    let opener = {
        let silent = Arc::clone(&silent);
        let path = socket(&daemon);
        // On a daemon that stops accepting, connect blocks once the backlog is full: open them
        // on a thread of their own and give up waiting rather than hang the test.
        thread::spawn(move || {
            for _ in 0..1000 {
                let Ok(stream) = UnixStream::connect(&path) else {
                    break;
                };
                silent.lock().unwrap().push(stream);
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !opener.is_finished() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }

    let started = Instant::now();
    let answered = daemon.vmms_within(&["get-vm"], Duration::from_secs(10));
    let took = started.elapsed();

    assert_eq!(silent.lock().unwrap().len(), 1000);
    let out = answered.expect("get-vm hung");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(took < Duration::from_secs(5), "get-vm took {took:?}");
}

// ---- 13. Broken stdout --------------------------------------------------------------------

/// A daemon whose stdout is a pipe that was read for a while and then closed, like
/// `vmms serve | head -3` after `head` is done; it has logged an event into the closed pipe.
fn daemon_with_closed_stdout() -> Daemon {
    let (reader, writer) = std::io::pipe().unwrap();
    let daemon = Daemon::start_launch(Launch {
        stdout: Some(writer),
        ..Launch::default()
    });
    drop(reader);
    daemon.new_vm("alpha", &[]);
    daemon
}

#[test]
fn daemon_with_closed_stdout_stops_on_stop_daemon_and_frees_the_store() {
    let mut daemon = daemon_with_closed_stdout();

    let stopped = daemon.vmms(&["stop-daemon"]);
    let exited = daemon.exited_within(Duration::from_secs(10));
    let lock_free = daemon.store_lock_is_free();

    assert!(
        stopped.status.success(),
        "{}",
        String::from_utf8_lossy(&stopped.stderr)
    );
    assert!(exited.is_some_and(|s| s.success()), "{exited:?}");
    assert!(lock_free, "the store lock is still held");
    assert!(!daemon.log().contains("panicked"), "{}", daemon.log());
    daemon.spawn();
    assert_eq!(daemon.vms().len(), 1, "a new daemon serves the store");
}

#[test]
fn daemon_with_closed_stdout_exits_on_sigterm_and_frees_the_store() {
    let mut daemon = daemon_with_closed_stdout();

    daemon.send_sigterm();
    let exited = daemon.exited_within(Duration::from_secs(10));
    let lock_free = daemon.store_lock_is_free();

    assert!(exited.is_some_and(|s| s.success()), "{exited:?}");
    assert!(lock_free, "the store lock is still held");
    assert!(!socket(&daemon).exists(), "the socket is left behind");
    assert!(!daemon.log().contains("panicked"), "{}", daemon.log());
    daemon.spawn();
    assert_eq!(daemon.vms().len(), 1, "a new daemon serves the store");
}

#[test]
fn stop_daemon_returns_only_once_the_daemon_has_exited() {
    let mut daemon = Daemon::start();

    let stopped = daemon.vmms(&["stop-daemon"]);
    let exited = daemon.exited_within(Duration::ZERO);

    assert!(stopped.status.success());
    assert!(
        exited.is_some(),
        "stop-daemon returned before the daemon exited"
    );
}
