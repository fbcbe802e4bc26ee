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

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::api::{ApiError, Response};

/// Longest request line accepted, newline excluded.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// Connections kept before a new one closes the longest-idle.
pub const MAX_CONNECTIONS: usize = 64;

/// Connections kept when all of them are busy answering (nothing idle to close); past this a new
/// connection is told to retry. Only admitted users can be busy, so this is a safety net.
const MAX_BUSY_CONNECTIONS: usize = 256;

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

/// A connected client's credentials, as the kernel recorded them at `connect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Its process.
    pub pid: i32,
    /// Its effective user.
    pub uid: u32,
    /// Its effective group.
    pub gid: u32,
}

/// Who may use the daemon: root, the daemon's own user, and members of one optional group.
#[derive(Debug, Clone, Copy)]
pub struct AccessPolicy {
    owner: u32,
    group: Option<u32>,
}

impl AccessPolicy {
    /// The policy for a daemon running as the current user, opened to `group` too.
    pub fn new(group: Option<u32>) -> Self {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let owner = unsafe { libc::geteuid() };
        AccessPolicy { owner, group }
    }

    /// Whether `peer` may talk to the daemon; `groups` gives its supplementary groups and is
    /// asked only when they decide.
    pub fn admits(&self, peer: &Peer, groups: impl FnOnce() -> Vec<u32>) -> bool {
        if peer.uid == 0 || peer.uid == self.owner {
            return true;
        }
        match self.group {
            Some(group) => peer.gid == group || groups().contains(&group),
            None => false,
        }
    }
}

/// The credentials of the process at the other end of `stream` (`SO_PEERCRED`).
pub fn peer_of(stream: &UnixStream) -> io::Result<Peer> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a writable ucred and `len` says its size; the kernel writes at most that.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Peer {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// The supplementary groups of the process at the other end of `stream` (`SO_PEERGROUPS`);
/// empty where the kernel cannot tell.
fn peer_groups(stream: &UnixStream) -> Vec<u32> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    for _ in 0..2 {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `groups` is writable for `len` bytes; the kernel writes at most that and sets
        // `len` to what it wrote (or needs, with ERANGE).
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(count);
            return groups;
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) {
            break;
        }
        groups.resize(count, 0);
    }
    Vec::new()
}

/// The id of the group `name` (a group name or a number).
pub fn group_id(name: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse() {
        return Ok(gid);
    }
    let c_name = std::ffi::CString::new(name).map_err(|_| format!("bad group name '{name}'"))?;
    let mut buffer: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: an all-zero `group` is a valid value to be overwritten.
        let mut group: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call and `buffer.len()` is its real size.
        let rc = unsafe {
            libc::getgrnam_r(
                c_name.as_ptr(),
                &mut group,
                buffer.as_mut_ptr(),
                buffer.len(),
                &mut found,
            )
        };
        match rc {
            0 if found.is_null() => return Err(format!("no group named '{name}'")),
            0 => return Ok(group.gr_gid),
            libc::ERANGE if buffer.len() < 1 << 20 => buffer.resize(buffer.len() * 2, 0),
            errno => {
                return Err(format!(
                    "cannot look up group '{name}': {}",
                    io::Error::from_raw_os_error(errno)
                ));
            }
        }
    }
}

/// Binds the daemon's socket: owner-only, or owner and `group` (read-write) when one is given.
///
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
                    out!("vmms: cannot accept a connection: {e}");
                    last_accept_error = Some(Instant::now());
                }
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let peer = match peer_of(&stream) {
            Ok(peer) => peer,
            Err(e) => {
                out!("vmms: refused a connection: cannot read its credentials: {e}");
                continue;
            }
        };
        if !policy.admits(&peer, || peer_groups(&stream)) {
            out!(
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
            out!("vmms: cannot serve a client: {e}");
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

/// What [`LineReader::next_line`] got.
#[derive(Debug, PartialEq, Eq)]
enum Received {
    /// A whole request line, newline removed.
    Line(Vec<u8>),
    /// The client closed (or the connection was closed to make room).
    Closed,
    /// A line longer than [`MAX_REQUEST_BYTES`].
    TooLong,
    /// Idle too long, or too slow to finish a line.
    TimedOut,
}

/// Splits a connection's bytes into lines, holding at most one line's worth plus one chunk.
#[derive(Debug)]
struct LineReader {
    buffer: Vec<u8>,
    /// How much of `buffer` is known to hold no newline.
    scanned: usize,
    timeouts: Timeouts,
    idle_since: Instant,
    line_since: Option<Instant>,
}

impl LineReader {
    fn new(timeouts: Timeouts) -> Self {
        LineReader {
            buffer: Vec::new(),
            scanned: 0,
            timeouts,
            idle_since: Instant::now(),
            line_since: None,
        }
    }

    /// The answer went out: the idle clock starts again, and a large request's memory goes back.
    fn answered(&mut self) {
        self.idle_since = Instant::now();
        self.buffer.shrink_to(CHUNK);
    }

    fn next_line(&mut self, mut source: impl ReadWithTimeout) -> Received {
        loop {
            if let Some(at) = self.buffer[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + at;
                if end > MAX_REQUEST_BYTES {
                    return Received::TooLong;
                }
                let mut line: Vec<u8> = self.buffer.drain(..=end).collect();
                line.pop();
                self.scanned = 0;
                // Pipelined bytes already begun the next line.
                self.line_since = (!self.buffer.is_empty()).then(Instant::now);
                return Received::Line(line);
            }
            self.scanned = self.buffer.len();
            if self.buffer.len() > MAX_REQUEST_BYTES {
                return Received::TooLong;
            }
            let deadline = match self.line_since {
                Some(started) => started + self.timeouts.request,
                None => self.idle_since + self.timeouts.idle,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Received::TimedOut;
            }
            let mut chunk = [0u8; CHUNK];
            match source.read_within(&mut chunk, left) {
                Ok(0) => return Received::Closed,
                Ok(n) => {
                    self.line_since.get_or_insert_with(Instant::now);
                    self.buffer.extend_from_slice(&chunk[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Received::TimedOut;
                }
                Err(_) => return Received::Closed,
            }
        }
    }
}

/// A byte source whose reads give up after a while (a socket; a script of reads in tests).
trait ReadWithTimeout {
    fn read_within(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize>;
}

impl ReadWithTimeout for &UnixStream {
    fn read_within(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
        self.set_read_timeout(Some(timeout))?;
        self.read(buf)
    }
}

/// The open connections, for the limit and eviction.
#[derive(Debug, Default)]
struct Connections {
    list: Mutex<Vec<Connection>>,
    next_id: AtomicU64,
    evicted: AtomicU64,
}

#[derive(Debug)]
struct Connection {
    id: u64,
    stream: Arc<UnixStream>,
    /// Answering a request: never evicted (its client is waiting for the answer).
    busy: bool,
    /// Since when it has been idle (connect, or its last answer).
    since: Instant,
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Connection>> {
        self.list.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes `stream` in, closing the longest-idle connection when full; `None` when full of
    /// busy connections.
    fn admit(&self, stream: Arc<UnixStream>) -> Option<u64> {
        let mut list = self.lock();
        if list.len() >= MAX_CONNECTIONS
            && !self.evict_from(&mut list)
            && list.len() >= MAX_BUSY_CONNECTIONS
        {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        list.push(Connection {
            id,
            stream,
            busy: false,
            since: Instant::now(),
        });
        Some(id)
    }

    fn evict_longest_idle(&self) -> bool {
        let mut list = self.lock();
        self.evict_from(&mut list)
    }

    fn evict_from(&self, list: &mut Vec<Connection>) -> bool {
        let Some(index) = list
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.busy)
            .min_by_key(|(_, c)| c.since)
            .map(|(i, _)| i)
        else {
            return false;
        };
        let victim = list.swap_remove(index);
        // Its thread sees end-of-file and exits; the descriptor closes with the last Arc.
        let _ = victim.stream.shutdown(Shutdown::Both);
        let evicted = self.evicted.fetch_add(1, Ordering::Relaxed) + 1;
        if evicted == 1 || evicted % 100 == 0 {
            out!(
                "vmms: {evicted} idle connection(s) closed so far to admit new ones (limit \
                 {MAX_CONNECTIONS})"
            );
        }
        true
    }

    fn set_busy(&self, id: u64, busy: bool) {
        if let Some(connection) = self.lock().iter_mut().find(|c| c.id == id) {
            connection.busy = busy;
            connection.since = Instant::now();
        }
    }

    fn remove(&self, id: u64) {
        self.lock().retain(|c| c.id != id);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// Reads from a script: each entry is one read's result.
    struct Script(VecDeque<io::Result<Vec<u8>>>);

    impl ReadWithTimeout for &mut Script {
        fn read_within(&mut self, buf: &mut [u8], _: Duration) -> io::Result<usize> {
            match self.0.pop_front() {
                Some(Ok(bytes)) => {
                    buf[..bytes.len()].copy_from_slice(&bytes);
                    Ok(bytes.len())
                }
                Some(Err(e)) => Err(e),
                None => Ok(0),
            }
        }
    }

    const TIMEOUTS: Timeouts = Timeouts {
        idle: Duration::from_secs(60),
        request: Duration::from_secs(10),
    };

    fn script(reads: Vec<io::Result<Vec<u8>>>) -> Script {
        Script(reads.into())
    }

    #[test]
    fn pipelined_lines_come_out_one_at_a_time() {
        let mut source = script(vec![Ok(b"a\nb".to_vec()), Ok(b"c\n".to_vec())]);
        let mut reader = LineReader::new(TIMEOUTS);

        let first = reader.next_line(&mut source);
        let second = reader.next_line(&mut source);
        let end = reader.next_line(&mut source);

        assert_eq!(first, Received::Line(b"a".to_vec()));
        assert_eq!(second, Received::Line(b"bc".to_vec()));
        assert_eq!(end, Received::Closed);
    }

    #[test]
    fn line_without_newline_past_the_cap_is_too_long_and_buffer_stays_bounded() {
        let reads = (0..100).map(|_| Ok(vec![b'x'; CHUNK])).collect();
        let mut source = script(reads);
        let mut reader = LineReader::new(TIMEOUTS);

        let result = reader.next_line(&mut source);

        assert_eq!(result, Received::TooLong);
        assert!(reader.buffer.len() <= MAX_REQUEST_BYTES + CHUNK);
        assert!(source.0.len() >= 100 - (MAX_REQUEST_BYTES / CHUNK) - 2);
    }

    #[test]
    fn line_of_exactly_the_cap_is_accepted() {
        let mut bytes = vec![b'x'; MAX_REQUEST_BYTES];
        bytes.push(b'\n');
        let reads = bytes.chunks(CHUNK).map(|c| Ok(c.to_vec())).collect();
        let mut source = script(reads);
        let mut reader = LineReader::new(TIMEOUTS);

        let result = reader.next_line(&mut source);

        assert_eq!(result, Received::Line(vec![b'x'; MAX_REQUEST_BYTES]));
    }

    #[test]
    fn read_timeout_ends_the_connection() {
        let mut source = script(vec![
            Ok(b"{\"op\":".to_vec()),
            Err(io::ErrorKind::WouldBlock.into()),
        ]);
        let mut reader = LineReader::new(TIMEOUTS);

        assert_eq!(reader.next_line(&mut source), Received::TimedOut);
    }

    #[test]
    fn slow_client_is_cut_when_its_line_takes_longer_than_the_request_timeout() {
        let (client, server) = UnixStream::pair().expect("pair");
        let timeouts = Timeouts {
            idle: Duration::from_secs(60),
            request: Duration::from_millis(300),
        };
        let mut reader = LineReader::new(timeouts);
        let started = Instant::now();
        let trickle = thread::spawn(move || {
            for _ in 0..20 {
                if (&client).write_all(b"x").is_err() {
                    break;
                }
                thread::sleep(Duration::from_millis(100));
            }
        });

        let result = reader.next_line(&server);
        drop(server);
        let _ = trickle.join();

        assert_eq!(result, Received::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn owner_and_root_are_admitted_and_others_are_not() {
        let policy = AccessPolicy {
            owner: 1000,
            group: None,
        };
        let peer = |uid| Peer {
            pid: 1,
            uid,
            gid: uid,
        };

        assert!(policy.admits(&peer(0), Vec::new));
        assert!(policy.admits(&peer(1000), Vec::new));
        assert!(!policy.admits(&peer(1001), || vec![1000]));
    }

    #[test]
    fn socket_group_members_are_admitted_by_primary_or_supplementary_group() {
        let policy = AccessPolicy {
            owner: 0,
            group: Some(50),
        };
        let primary = Peer {
            pid: 1,
            uid: 1001,
            gid: 50,
        };
        let other = Peer {
            pid: 1,
            uid: 1002,
            gid: 1002,
        };

        assert!(policy.admits(&primary, Vec::new));
        assert!(policy.admits(&other, || vec![7, 50]));
        assert!(!policy.admits(&other, || vec![7]));
    }

    #[test]
    fn peer_credentials_name_this_process() {
        let (a, _b) = UnixStream::pair().expect("pair");

        let peer = peer_of(&a).expect("SO_PEERCRED");

        assert_eq!(peer.pid, std::process::id() as i32);
        // SAFETY: geteuid has no preconditions.
        assert_eq!(peer.uid, unsafe { libc::geteuid() });
    }

    #[test]
    fn full_table_closes_the_longest_idle_connection_not_a_busy_one() {
        let connections = Connections::default();
        let mut peers = Vec::new();
        let mut ids = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let (ours, theirs) = UnixStream::pair().expect("pair");
            ids.push(connections.admit(Arc::new(ours)).expect("room"));
            peers.push(theirs);
        }
        connections.set_busy(ids[0], true);
        let (newcomer, _theirs) = UnixStream::pair().expect("pair");

        let admitted = connections.admit(Arc::new(newcomer));

        assert!(admitted.is_some());
        assert_eq!(connections.len(), MAX_CONNECTIONS);
        let mut byte = [0u8; 1];
        peers[1].set_nonblocking(true).expect("nonblocking");
        assert_eq!((&peers[1]).read(&mut byte).expect("eof"), 0, "evicted");
        peers[0].set_nonblocking(true).expect("nonblocking");
        assert!((&peers[0]).read(&mut byte).is_err(), "busy one kept open");
    }

    #[test]
    fn group_id_accepts_numbers_and_names() {
        assert_eq!(group_id("4242"), Ok(4242));
        assert_eq!(group_id("root"), Ok(0));
        assert!(group_id("no-such-group-here").is_err());
    }
}
