//! The daemon's socket server: who may connect, how much a client may send, how long and how
//! many connections may sit there.
//!
//! - **Access.** The daemon sets its umask to 077 before anything, and the store root is 0700, so
//!   the socket is never reachable by others, not even between `bind` and `chmod`. Every accepted
//!   connection's peer credentials (`SO_PEERCRED`) are checked as well: root, the daemon's own
//!   user, or members of the `--socket-group`. Anyone else gets "access denied" and is closed.
//! - **Size.** A request line is at most [`MAX_REQUEST_BYTES`]; a longer one is answered with an
//!   error and the connection closed, so no client makes the daemon buffer without bound.
//! - **Time.** A connection idle between requests for `idle_timeout`, or taking longer than
//!   `request_timeout` to finish a line it began, is closed. A request being answered (a `WaitJob`
//!   with the client's timeout, a graceful shutdown) is never cut: the clocks run only while the
//!   daemon waits for bytes.
//! - **Number.** Past [`MAX_CONNECTIONS`], a new connection closes the one idle longest, so a pile
//!   of connections that never send cannot lock the operator out.

mod access;
mod connections;
mod request_line;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

pub use access::{AccessPolicy, group_id, peer_of};

use crate::api::{ApiError, Response};
use access::peer_groups;
use connections::Connections;
use request_line::{LineReader, Received};

/// Longest request line accepted, newline excluded.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// Connections kept before a new one closes the longest-idle.
pub const MAX_CONNECTIONS: usize = 256;

/// Connections kept when all of them are busy answering (nothing idle to close); past this a new
/// connection is told to retry. Only admitted users can be busy, so this is a safety net.
const MAX_BUSY_CONNECTIONS: usize = 512;

/// How long writing one answer may block on a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes read from a client at a time.
const CHUNK: usize = 16 * 1024;

/// Hyper-V's "access denied" return code.
const ACCESS_DENIED: u32 = 32769;

/// Hyper-V's "invalid parameter" return code.
const INVALID_PARAMETER: u32 = 32773;

/// Hyper-V's "system in use" return code.
const SYSTEM_IN_USE: u32 = 32774;

/// What the daemon does with the requests the listener receives.
pub trait Service: Send + Sync + 'static {
    /// The answer line (without its newline) to one request line, and whether the daemon stops
    /// once that answer was sent.
    fn answer(&self, request: &[u8]) -> (Vec<u8>, bool);

    /// Ends the daemon; called after the answer to a stop request went out.
    fn stop(&self) -> !;
}

/// How long a connection may wait before the daemon closes it.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Between requests (and from connecting to the first byte).
    pub idle: Duration,
    /// From the first byte of a request line to its newline.
    pub request: Duration,
}

/// The caller has set the umask to 077 and the store root is 0700, so the socket is private from
/// the instant it exists; the `chmod` only opens it to the group.
pub fn bind(socket: &Path, group: Option<u32>) -> Result<UnixListener, String> {
    // The store lock is ours, so a socket file left here belongs to a daemon that died.
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)
        .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
    let restrict = |path: &Path, mode: u32| {
        if let Some(gid) = group {
            std::os::unix::fs::chown(path, None, Some(gid))
                .map_err(|e| format!("cannot give {} to group {gid}: {e}", path.display()))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| format!("cannot restrict {}: {e}", path.display()))
    };
    match (group, socket.parent()) {
        (Some(_), Some(store)) => {
            // The group may pass through the store to the socket, but not list or read it.
            restrict(store, 0o710)?;
            restrict(socket, 0o660)?;
        }
        _ => restrict(socket, 0o600)?,
    }
    Ok(listener)
}

/// Accepts connections for ever, each served on a thread of its own.
pub fn serve(
    listener: &UnixListener,
    policy: AccessPolicy,
    timeouts: Timeouts,
    service: Arc<dyn Service>,
) {
    let connections = Arc::new(Connections::default());
    let mut last_accept_error = None::<Instant>;
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) => {
                if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                    // Out of descriptors: the longest-idle connection gives its back.
                    connections.evict_longest_idle();
                }
                if last_accept_error.is_none_or(|t: Instant| t.elapsed() > Duration::from_secs(10))
                {
                    log!("vmms: cannot accept a connection: {e}");
                    last_accept_error = Some(Instant::now());
                }
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let peer = match peer_of(&stream) {
            Ok(peer) => peer,
            Err(e) => {
                log!("vmms: refused a connection: cannot read its credentials: {e}");
                continue;
            }
        };
        if !policy.admits(&peer, || peer_groups(&stream)) {
            log!(
                "vmms: refused a connection from uid {} gid {} (pid {}): not root, the daemon's \
                 user or its socket group",
                peer.uid,
                peer.gid,
                peer.pid
            );
            refuse(
                &stream,
                ACCESS_DENIED,
                format!("access denied: uid {} may not use this daemon", peer.uid),
            );
            continue;
        }
        let stream = Arc::new(stream);
        let Some(id) = connections.admit(Arc::clone(&stream)) else {
            refuse(
                &stream,
                SYSTEM_IN_USE,
                "too many connections are being answered; retry".into(),
            );
            continue;
        };
        let worker_connections = Arc::clone(&connections);
        let service = Arc::clone(&service);
        let spawned = thread::Builder::new().name("client".into()).spawn(move || {
            serve_connection(&stream, id, &worker_connections, timeouts, &*service);
            worker_connections.remove(id);
        });
        if let Err(e) = spawned {
            connections.remove(id);
            log!("vmms: cannot serve a client: {e}");
        }
    }
}

/// Answers `error` without waiting on the client, then closes.
fn refuse(stream: &UnixStream, code: u32, message: String) {
    let _ = stream.set_nonblocking(true);
    let _ = (&*stream).write_all(&error_line(ApiError::with_code(code, message)));
}

fn error_line(error: ApiError) -> Vec<u8> {
    let response: Response = Err(error);
    let mut line = serde_json::to_vec(&response)
        .unwrap_or_else(|_| br#"{"Err":{"code":32768,"message":"failed"}}"#.to_vec());
    line.push(b'\n');
    line
}

/// One connection: request lines in, answer lines out, until the client leaves, breaks a limit,
/// or the connection is closed to make room.
fn serve_connection(
    stream: &UnixStream,
    id: u64,
    connections: &Connections,
    timeouts: Timeouts,
    service: &dyn Service,
) {
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let mut reader = LineReader::new(timeouts);
    loop {
        let line = match reader.next_line(stream) {
            Received::Line(line) => line,
            Received::TooLong => {
                let _ = (&*stream).write_all(&error_line(ApiError::with_code(
                    INVALID_PARAMETER,
                    format!(
                        "request longer than {MAX_REQUEST_BYTES} bytes; closing the connection"
                    ),
                )));
                return;
            }
            Received::Closed | Received::TimedOut => return,
        };
        connections.set_busy(id, true);
        let (mut answer, stop) = service.answer(&line);
        answer.push(b'\n');
        let sent = (&*stream).write_all(&answer);
        if stop {
            service.stop();
        }
        connections.set_busy(id, false);
        reader.answered();
        if sent.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};

    /// Answers every request after `delay`, echoing it.
    struct Slow {
        delay: Duration,
    }

    impl Service for Slow {
        fn answer(&self, request: &[u8]) -> (Vec<u8>, bool) {
            thread::sleep(self.delay);
            (request.to_vec(), false)
        }

        fn stop(&self) -> ! {
            panic!("no stop request is sent in these tests")
        }
    }

    #[test]
    fn long_answer_is_not_cut_by_the_idle_timeout() {
        let (client, server) = UnixStream::pair().expect("pair");
        let timeouts = Timeouts {
            idle: Duration::from_millis(200),
            request: Duration::from_millis(200),
        };
        let connections = Connections::default();
        let server = Arc::new(server);
        let id = connections.admit(Arc::clone(&server)).expect("room");
        let serving = thread::spawn(move || {
            let service = Slow {
                delay: Duration::from_millis(800),
            };
            serve_connection(&server, id, &connections, timeouts, &service);
        });

        (&client).write_all(b"wait-job\nsecond\n").expect("send");
        let mut lines = BufReader::new(&client).lines();
        let first = lines.next().expect("first answer").expect("read");
        let second = lines.next().expect("second answer").expect("read");
        let end = lines.next();
        serving.join().expect("connection thread");

        assert_eq!(first, "wait-job");
        assert_eq!(second, "second");
        assert!(end.is_none(), "closed once idle");
    }
}
