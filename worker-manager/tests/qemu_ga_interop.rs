//! The guest-agent client against the real thing: Debian's `qemu-ga`, run on the host over a Unix
//! socket, answers our resynchronisation, `guest-sync-delimited`, `guest-ping`, `guest-info` and
//! `guest-fsfreeze-status` as the Linux guests' agents will.
//!
//! The host's agent is never asked to freeze or shut down (that would be this machine's file
//! systems): those commands are blocked on its command line as well.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm_core::integration::GuestFreezeStatus;
use worker_manager::guest_agent::{AgentClient, AgentError};

const TIMEOUT: Duration = Duration::from_secs(10);
/// What the host's agent must never do, blocked on its command line.
const BLOCKED: &str = "guest-fsfreeze-freeze,guest-fsfreeze-freeze-list,guest-fsfreeze-thaw,\
guest-shutdown,guest-suspend-disk,guest-suspend-ram,guest-suspend-hybrid,guest-exec,\
guest-file-open,guest-set-time,guest-set-user-password,guest-set-vcpus,guest-set-memory-blocks,\
guest-network-get-interfaces";

fn qemu_ga() -> Option<&'static str> {
    ["/usr/sbin/qemu-ga", "/usr/bin/qemu-ga"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

/// A `qemu-ga` listening on a socket in a temporary folder; killed on drop.
struct HostAgent {
    child: Child,
    dir: tempfile::TempDir,
}

impl HostAgent {
    fn start(program: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(program)
            .args(["-m", "unix-listen", "-p"])
            .arg(dir.path().join("qga.sock"))
            .arg("-t")
            .arg(dir.path())
            .arg("-f")
            .arg(dir.path().join("qga.pid"))
            .args(["-b", BLOCKED])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start qemu-ga");
        HostAgent { child, dir }
    }

    fn connect(&self) -> UnixStream {
        let socket = self.dir.path().join("qga.sock");
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match UnixStream::connect(&socket) {
                Ok(stream) => return stream,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("qemu-ga did not listen on {}: {e}", socket.display()),
            }
        }
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

macro_rules! require_qemu_ga {
    () => {
        match qemu_ga() {
            Some(program) => program,
            None => {
                eprintln!(
                    "skipped: qemu-ga is not installed (Debian package qemu-guest-agent; scripts/test.sh installs it)"
                );
                return;
            }
        }
    };
}

#[test]
fn real_qemu_ga_syncs_pings_and_reports_info_and_freeze_status() {
    let program = require_qemu_ga!();
    let agent = HostAgent::start(program);
    let mut client = AgentClient::new(agent.connect());

    let synced = client.sync(TIMEOUT);
    let ping = client.ping(TIMEOUT);
    let info = client.info(TIMEOUT).unwrap();
    let status = client.fsfreeze_status(TIMEOUT).unwrap();

    assert!(synced.is_ok(), "{synced:?}");
    assert!(ping.is_ok(), "{ping:?}");
    assert!(!info.version.is_empty());
    for command in [
        "guest-sync-delimited",
        "guest-ping",
        "guest-fsfreeze-status",
    ] {
        assert!(
            info.supported_commands.iter().any(|c| c == command),
            "{command} in {:?}",
            info.supported_commands
        );
    }
    assert!(
        !info
            .supported_commands
            .iter()
            .any(|c| c == "guest-fsfreeze-freeze"),
        "blocked commands are reported disabled and left out"
    );
    assert_eq!(status, GuestFreezeStatus::Thawed);
}

#[test]
fn real_qemu_ga_errors_map_to_their_kinds_and_a_resync_recovers() {
    let program = require_qemu_ga!();
    let agent = HostAgent::start(program);
    let mut client = AgentClient::new(agent.connect());

    let unknown = client.execute("guest-no-such-command", None, TIMEOUT);
    // Read-only, and blocked on the command line: the agent refuses it (qemu-ga says
    // CommandNotFound, "has been disabled").
    let blocked = client.execute("guest-network-get-interfaces", None, TIMEOUT);
    // Half a command, as a client that timed out mid-write leaves it: the next sync's 0xFF
    // makes the agent drop it.
    std::io::Write::write_all(client.transport_mut(), b"{\"execute\":\"guest-fsfreeze-fr").unwrap();
    client.invalidate();
    let ping = client.ping(TIMEOUT);

    assert!(
        matches!(&unknown, Err(AgentError::CommandNotFound { command, .. }) if command == "guest-no-such-command"),
        "{unknown:?}"
    );
    assert!(
        matches!(&blocked, Err(AgentError::CommandNotFound { desc, .. }) if desc.contains("disabled")),
        "{blocked:?}"
    );
    assert!(ping.is_ok(), "{ping:?}");
}
