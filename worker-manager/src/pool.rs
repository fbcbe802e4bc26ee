//! A pool of pre-started workers: processes already exec'd, with their runtime up, KVM's facts
//! read, a KVM VM created (a `partition::VmShell`), their sockets bound and what no VM decides
//! confined (seccomp included), each waiting for the VM it will run.
//!
//! Starting a worker process (fork, exec, the runtime's own start) costs a few milliseconds that a
//! guest's start would otherwise wait for. The [`ProcessLauncher`](crate::ProcessLauncher) keeps
//! up to [`LauncherOptions::pool_size`](crate::LauncherOptions::pool_size) such workers idle and
//! hands a starting VM to one of them; the pool refills in the background a moment after.
//!
//! An idle worker is `program args… --pool --store <DIR> [--no-confinement]`, started like any
//! worker (its own session, nothing inherited but stdio and its end of a socket pair named in
//! [`POOL_FD_ENV`]). It holds no VM's data and has no guest; its Landlock rules, which are the
//! VM's, go on once it is assigned. Over the pair, in order:
//! 1. worker → parent: [`PoolMessage::Idle`] once it is warm (or `Failed`, then it exits);
//! 2. parent → worker: an [`Assignment`] frame (the VM, the saved state to restore), sent as
//!    soon as the VM's start takes the worker, before anything else;
//! 3. the worker starts on it as an exec'd one does (config, disks, network, Landlock on the
//!    ruleset it prepared, the partition built into its VM), writing nothing in the VM's runtime
//!    folder, which is not its yet; meanwhile the parent takes the VM's lock there and moves in
//!    the log the worker writes to and the control and console sockets it bound while idle
//!    ([`RuntimeDir::take_in`](crate::RuntimeDir::take_in));
//! 4. parent → worker: a copy of the VM's locked `worker.lock` (one byte with `SCM_RIGHTS`), which
//!    makes the runtime folder the worker's. A parent that cannot take the lock (the VM has a
//!    worker already) kills the worker instead;
//! 5. the worker starts the guest (its seccomp filter has been on since it was idle) and answers
//!    [`PoolMessage::Ready`] or `Failed`; once it is ready, the parent removes the folder the
//!    worker prepared its files in (with the previous worker's log, which the move put there);
//! 6. from then on the pair is a control connection like one made to `control.sock`, its
//!    handshake already done: the socket pair is private to the two processes, and the parent
//!    knows the worker's pid because it spawned it.
//!
//! An idle worker whose parent goes away (a daemon that exits, crashes or is killed) reads the
//! end of its socket pair and exits: idle workers never outlive the daemon that started them,
//! while assigned ones run on as every worker does.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_core::VmId;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::error::{Error, Result};
use crate::process::{PidFd, reap_child};
use crate::protocol::{ProtocolError, WorkerReport, decode_frame, encode_frame, read_frame};
use crate::runtime::StoreLayout;

/// Environment variable naming an idle worker's end of its socket pair.
pub(crate) const POOL_FD_ENV: &str = "VMMS_WORKER_POOL_FD";

/// Environment variable with the shape (`<memory MiB>x<vCPUs>`) an idle worker builds its VM out
/// to while it waits: that of the VM the launcher started last, the likeliest next one. A VM of
/// another shape starts on a fresh VM in the same worker (see `partition::VmShell`).
pub(crate) const POOL_SHAPE_ENV: &str = "VMMS_WORKER_POOL_SHAPE";

/// The value of [`POOL_SHAPE_ENV`] for `memory_mib` and `vcpus`.
pub(crate) fn shape_value(memory_mib: u64, vcpus: u8) -> String {
    format!("{memory_mib}x{vcpus}")
}

/// Reads a [`POOL_SHAPE_ENV`] value; `None` when it is not one.
pub(crate) fn parse_shape(value: &str) -> Option<(u64, u8)> {
    let (memory, vcpus) = value.split_once('x')?;
    Some((memory.parse().ok()?, vcpus.parse().ok()?))
}

/// The flag that makes a worker command line an idle pool worker's (instead of `--vm <GUID>`).
pub(crate) const POOL_FLAG: &str = "--pool";

/// How long a new pool worker may take to become idle.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after a worker was taken the pool starts its replacement: long enough that the
/// replacement's exec does not compete with the taken worker's start on a small host, short enough
/// that a second start soon after finds the pool full again.
const REFILL_DELAY: Duration = Duration::from_millis(30);
/// How often the refill thread looks for idle workers that died.
const IDLE_CHECK: Duration = Duration::from_secs(10);
/// Longest pause between attempts when pool workers fail to start.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// What a pool worker tells its parent over the socket pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum PoolMessage {
    /// Warm and waiting for an [`Assignment`].
    Idle,
    /// The assigned VM's guest runs; the pair is now a control connection. The worker's first
    /// report comes with it, which saves the parent asking for it.
    Ready {
        /// The worker's status as it reported ready.
        report: Box<WorkerReport>,
    },
    /// Warming up or starting the assigned VM failed; the worker exits.
    Failed {
        /// Why.
        reason: String,
    },
}

/// The VM an idle worker is to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Assignment {
    /// The virtual machine (its `config.json` is read from the store).
    pub(crate) vm: VmId,
    /// Restore the saved state in this folder instead of booting.
    pub(crate) restore: Option<PathBuf>,
}

/// In the parent: hands `assignment` to an idle worker, which starts on it at once; the VM's
/// lock follows ([`send_lock`]) once the parent holds it.
pub(crate) fn send_assignment(channel: &UnixStream, assignment: &Assignment) -> io::Result<()> {
    let frame = encode_frame(assignment).map_err(frame_io)?;
    (&*channel).write_all(&frame)
}

/// The byte that carries the lock's descriptor after an assignment.
const LOCK_MARKER: u8 = b'L';

/// In the parent: hands the worker a copy of the VM's locked `worker.lock`, which tells it that
/// the VM's runtime folder is its own.
pub(crate) fn send_lock(channel: &UnixStream, lock: RawFd) -> io::Result<()> {
    let sent = channel
        .send_with_fds(&[&[LOCK_MARKER][..]], &[lock])
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    if sent == 1 {
        Ok(())
    } else {
        Err(io::Error::new(io::ErrorKind::WriteZero, "lock not sent"))
    }
}

/// The most of an assignment read at once; a longer one is read on from the stream.
const ASSIGNMENT_READ: usize = 4096;

/// What the worker's first read brought: the assignment, and the VM's lock when the parent sent
/// it before the worker read.
pub(crate) type Received = (Assignment, Option<std::fs::File>);

/// In the idle worker: waits for the assignment. `Ok(None)` when the parent went away first.
///
/// One `recvmsg`, with room for a descriptor: a read of a stream socket may run on into the lock
/// message sent after the assignment, and a read without room for its descriptor would close it.
pub(crate) fn receive_assignment(channel: &UnixStream) -> io::Result<Option<Received>> {
    let mut buffer = vec![0u8; ASSIGNMENT_READ];
    let (n, lock) = receive_with_lock(channel, &mut buffer)?;
    if n == 0 {
        return Ok(None);
    }
    let received = &buffer[..n];
    let (assignment, rest) = match decode_frame::<Assignment>(received).map_err(frame_io)? {
        Some((assignment, used)) => (assignment, &received[used..]),
        None => {
            // Longer than one read: the rest of the frame is read from the stream, which then
            // ends before the lock message (read_frame reads no more than the frame).
            if lock.is_some() {
                return Err(invalid("a descriptor inside the assignment"));
            }
            let assignment = read_frame::<Assignment>(&mut received.chain(channel))
                .map_err(frame_io)?
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::UnexpectedEof, "assignment cut short")
                })?;
            return Ok(Some((assignment, None)));
        }
    };
    match (rest, lock) {
        ([], None) => Ok(Some((assignment, None))),
        ([LOCK_MARKER], Some(lock)) => Ok(Some((assignment, Some(lock)))),
        _ => Err(invalid("bytes after the assignment")),
    }
}

/// In the worker: waits for the VM's lock after its assignment. `Ok(None)` when the parent went
/// away first (it could not take the lock, or died).
pub(crate) fn receive_lock(channel: &UnixStream) -> io::Result<Option<std::fs::File>> {
    let mut marker = [0u8; 1];
    match receive_with_lock(channel, &mut marker)? {
        (0, _) => Ok(None),
        (1, Some(lock)) if marker[0] == LOCK_MARKER => Ok(Some(lock)),
        _ => Err(invalid("something other than the VM's lock")),
    }
}

/// One `recvmsg` into `buffer`: the bytes read and the one descriptor that came with them.
/// More than one descriptor is an error (they are closed).
fn receive_with_lock(
    channel: &UnixStream,
    buffer: &mut [u8],
) -> io::Result<(usize, Option<std::fs::File>)> {
    // Room for one more than is sent: a second descriptor is refused, not left unread.
    let mut fds = [-1; 2];
    let mut iovecs = [libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.len(),
    }];
    // SAFETY: the one iovec covers `buffer`, which outlives the call and may take any bytes.
    let (n, count) = unsafe { channel.recv_with_fds(&mut iovecs, &mut fds) }
        .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
    let mut files = fds[..count].iter().map(|&fd| {
        // SAFETY: the first `count` descriptors were just received: open, and ours alone.
        std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) })
    });
    match (files.next(), files.next()) {
        (lock, None) => Ok((n, lock)),
        (Some(_), Some(_)) => Err(invalid("more descriptors than the VM's lock")),
        (None, Some(_)) => Err(invalid("descriptors out of order")),
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

/// Reaps a pool worker that ended (or was killed) before it ran its guest, and removes the
/// folder it prepared its sockets and log in while idle, which a killed worker could not remove
/// itself.
pub(crate) fn reap_pool_worker(store: &Path, pid: u32) -> Option<crate::process::ExitStatus> {
    let status = reap_child(pid);
    remove_idle_folder(store, pid);
    status
}

/// Removes the folder pool worker `pid` prepared its files in, whatever is left in it.
fn remove_idle_folder(store: &Path, pid: u32) {
    let _ = std::fs::remove_dir_all(StoreLayout::new(store).pool_dir(pid));
}

fn frame_io(error: ProtocolError) -> io::Error {
    match error {
        ProtocolError::Io(io) => io,
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

/// A started, warm worker waiting for its VM.
#[derive(Debug)]
pub(crate) struct IdleWorker {
    pub(crate) pidfd: PidFd,
    pub(crate) channel: UnixStream,
}

impl IdleWorker {
    /// Kills the worker (it died, or must not run what it was given), waits until it is gone
    /// (whatever it held, the VM's disks included, is free then), reaps it and removes its
    /// folder; how it ended.
    pub(crate) fn kill(self, store: &Path) -> Option<crate::process::ExitStatus> {
        let _ = self.pidfd.send_signal(libc::SIGKILL);
        let _ = self.pidfd.wait(None, Some(Duration::from_secs(5)));
        reap_pool_worker(store, self.pidfd.pid())
    }

    /// Ends a worker that is no longer wanted: closing its socket pair is what ends it; it is
    /// reaped once it has gone.
    fn dismiss(self, store: &Path) {
        let IdleWorker { pidfd, channel } = self;
        drop(channel);
        let _ = pidfd.wait(None, Some(Duration::from_secs(1)));
        reap_pool_worker(store, pidfd.pid());
    }
}

/// How pool workers are started.
#[derive(Debug, Clone)]
pub(crate) struct PoolSpawner {
    pub(crate) program: PathBuf,
    pub(crate) args: Vec<std::ffi::OsString>,
    pub(crate) store: PathBuf,
    pub(crate) confine: bool,
    /// The shape of the VM launched last (memory MiB, vCPUs), for the next idle workers.
    pub(crate) shape: Arc<Mutex<Option<(u64, u8)>>>,
}

impl PoolSpawner {
    /// Starts one pool worker and waits until it is idle.
    fn spawn(&self) -> Result<IdleWorker> {
        let (ours, theirs) = UnixStream::pair().map_err(|e| Error::io("socketpair", e))?;
        let fd = theirs.as_raw_fd();
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .arg(POOL_FLAG)
            .arg("--store")
            .arg(&self.store);
        if !self.confine {
            command.arg("--no-confinement");
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .env(POOL_FD_ENV, fd.to_string());
        let shape = *self.shape.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((memory_mib, vcpus)) = shape {
            command.env(POOL_SHAPE_ENV, shape_value(memory_mib, vcpus));
        }
        let spawned = crate::launcher::spawn_worker(&mut command, [fd], &self.program);
        drop(theirs);
        drop(command);
        let pid = spawned?;
        let pidfd = PidFd::open(pid).map_err(|e| Error::io(format!("/proc/{pid}"), e))?;
        let said = ours
            .set_read_timeout(Some(IDLE_TIMEOUT))
            .map_err(|e| Error::io("pool socket", e))
            .and_then(|()| read_frame::<PoolMessage>(&mut &ours).map_err(Error::Protocol));
        match said {
            Ok(Some(PoolMessage::Idle)) => {
                ours.set_read_timeout(None)
                    .map_err(|e| Error::io("pool socket", e))?;
                Ok(IdleWorker {
                    pidfd,
                    channel: ours,
                })
            }
            other => {
                IdleWorker {
                    pidfd,
                    channel: ours,
                }
                .kill(&self.store);
                let message = match other {
                    Ok(Some(PoolMessage::Failed { reason })) => reason,
                    Ok(_) => "pool worker ended before it was idle".to_owned(),
                    Err(error) => format!("pool worker: {}", vmm_core::error_chain(&error)),
                };
                Err(Error::StartFailed { message })
            }
        }
    }
}

/// The idle workers and the thread that keeps their number up.
#[derive(Debug)]
pub(crate) struct WorkerPool {
    inner: Arc<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    spawner: PoolSpawner,
    size: usize,
    state: Mutex<PoolState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct PoolState {
    idle: VecDeque<IdleWorker>,
    /// The refill thread runs.
    started: bool,
    /// The pool is being dropped: the refill thread ends.
    closed: bool,
    /// No refill before this instant (a worker was just taken, or starting one failed).
    not_before: Option<Instant>,
    /// Pool workers that failed to start in a row.
    failures: u32,
    /// Why the last pool worker failed to start.
    last_error: Option<String>,
    /// Workers that left the pool and ran their guest: the folders they prepared while idle are
    /// the refill thread's to remove (see [`WorkerPool::remove_folder_later`]).
    left: Vec<u32>,
}

impl WorkerPool {
    /// A pool of `size` workers started by `spawner`; nothing is started before [`fill`].
    ///
    /// [`fill`]: Self::fill
    pub(crate) fn new(spawner: PoolSpawner, size: usize) -> Self {
        WorkerPool {
            inner: Arc::new(PoolInner {
                spawner,
                size,
                state: Mutex::new(PoolState::default()),
                changed: Condvar::new(),
            }),
        }
    }

    /// Starts the refill thread (once): the pool fills up in the background.
    pub(crate) fn fill(&self) {
        if self.inner.size == 0 {
            return;
        }
        let mut state = self.inner.lock();
        if state.started || state.closed {
            return;
        }
        let inner = Arc::clone(&self.inner);
        let spawned = std::thread::Builder::new()
            .name("wm-pool".into())
            .spawn(move || inner.refill());
        // Without the thread there is no pool; launches spawn their workers themselves.
        state.started = spawned.is_ok();
    }

    /// An idle worker, if one is there and alive; the pool refills after [`REFILL_DELAY`].
    pub(crate) fn take(&self) -> Option<IdleWorker> {
        let mut state = self.inner.lock();
        while let Some(worker) = state.idle.pop_front() {
            if worker.pidfd.has_exited() {
                reap_pool_worker(&self.inner.spawner.store, worker.pidfd.pid());
                continue;
            }
            state.not_before = Some(Instant::now() + REFILL_DELAY);
            self.inner.changed.notify_all();
            return Some(worker);
        }
        None
    }

    /// Workers started from now on build their VM out to this shape while idle (see
    /// [`POOL_SHAPE_ENV`]).
    pub(crate) fn expect_shape(&self, memory_mib: u64, vcpus: u8) {
        *self
            .inner
            .spawner
            .shape
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((memory_mib, vcpus));
    }

    /// The pids of the idle workers.
    pub(crate) fn idle_pids(&self) -> Vec<u32> {
        self.inner
            .lock()
            .idle
            .iter()
            .map(|w| w.pidfd.pid())
            .collect()
    }

    /// Why the last pool worker failed to start, while none has started since.
    pub(crate) fn last_error(&self) -> Option<String> {
        self.inner.lock().last_error.clone()
    }

    /// Has the refill thread remove the folder worker `pid` prepared while idle, now that its
    /// files were moved out and it reported ready.
    ///
    /// The worker cannot remove it (Landlock gives it no rights in `run/`), and the launcher
    /// should not while a start waits: the folder holds the previous worker's log, and freeing a
    /// file's blocks costs ext4 ~0.2 ms. The refill thread does it when it next starts a
    /// replacement, [`REFILL_DELAY`] after the worker was taken.
    pub(crate) fn remove_folder_later(&self, pid: u32) {
        self.inner.lock().left.push(pid);
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        let (idle, left): (Vec<IdleWorker>, Vec<u32>) = {
            let mut state = self.inner.lock();
            state.closed = true;
            (
                state.idle.drain(..).collect(),
                std::mem::take(&mut state.left),
            )
        };
        self.inner.changed.notify_all();
        for worker in idle {
            worker.dismiss(&self.inner.spawner.store);
        }
        self.inner.remove_folders(left);
    }
}

impl PoolInner {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Removes the idle folders of workers `pids`, which left the pool.
    fn remove_folders(&self, pids: Vec<u32>) {
        for pid in pids {
            remove_idle_folder(&self.spawner.store, pid);
        }
    }

    /// The refill thread: keeps `size` workers idle, reaps the ones that die while idle, backs
    /// off while workers fail to start.
    fn refill(&self) {
        loop {
            let left = {
                let mut state = self.lock();
                loop {
                    if state.closed {
                        return;
                    }
                    state.idle.retain(|worker| {
                        if worker.pidfd.has_exited() {
                            reap_pool_worker(&self.spawner.store, worker.pidfd.pid());
                            return false;
                        }
                        true
                    });
                    let now = Instant::now();
                    let wait = match state.not_before {
                        Some(at) if at > now => at - now,
                        _ if state.idle.len() < self.size => break,
                        _ => IDLE_CHECK,
                    };
                    state = self
                        .changed
                        .wait_timeout(state, wait)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                std::mem::take(&mut state.left)
            };
            // Outside the lock: a start taking a worker must not wait for the file system.
            self.remove_folders(left);
            let spawned = self.spawner.spawn();
            let mut state = self.lock();
            match spawned {
                Ok(worker) if state.closed => {
                    drop(state);
                    worker.dismiss(&self.spawner.store);
                    return;
                }
                Ok(worker) => {
                    state.idle.push_back(worker);
                    state.failures = 0;
                    state.last_error = None;
                    state.not_before = None;
                }
                Err(error) => {
                    state.failures = state.failures.saturating_add(1);
                    let backoff = Duration::from_millis(100)
                        .saturating_mul(1 << state.failures.min(10))
                        .min(MAX_BACKOFF);
                    state.not_before = Some(Instant::now() + backoff);
                    state.last_error = Some(vmm_core::error_chain(&error));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn shape_value_reads_back() {
        assert_eq!(parse_shape(&shape_value(48, 2)), Some((48, 2)));
        assert_eq!(parse_shape("48"), None);
        assert_eq!(parse_shape("x2"), None);
        assert_eq!(parse_shape("48x999"), None);
    }

    proptest! {
        #[test]
        fn any_shape_value_parses_without_panicking(value in ".{0,40}") {
            let _ = parse_shape(&value);
        }
    }

    fn same_file(a: &std::fs::File, b: &std::fs::File) -> bool {
        use std::os::unix::fs::MetadataExt;
        let (a, b) = (a.metadata().unwrap(), b.metadata().unwrap());
        (a.dev(), a.ino()) == (b.dev(), b.ino())
    }

    fn assignment() -> Assignment {
        Assignment {
            vm: VmId::new_random(),
            restore: Some(PathBuf::from("/store/vm/state")),
        }
    }

    #[test]
    fn the_assignment_then_the_lock_arrive_in_two_reads() {
        let (parent, worker) = UnixStream::pair().unwrap();
        let lock = tempfile::tempfile().unwrap();
        let sent = assignment();

        send_assignment(&parent, &sent).unwrap();
        let (received, early) = receive_assignment(&worker).unwrap().unwrap();
        send_lock(&parent, lock.as_raw_fd()).unwrap();
        let got_lock = receive_lock(&worker).unwrap().unwrap();

        assert_eq!(received, sent);
        assert!(early.is_none());
        assert!(same_file(&got_lock, &lock));
    }

    #[test]
    fn a_lock_sent_before_the_worker_read_comes_with_the_assignment() {
        let (parent, worker) = UnixStream::pair().unwrap();
        let lock = tempfile::tempfile().unwrap();
        let sent = assignment();

        send_assignment(&parent, &sent).unwrap();
        send_lock(&parent, lock.as_raw_fd()).unwrap();
        let (received, early) = receive_assignment(&worker).unwrap().unwrap();

        assert_eq!(received, sent);
        assert!(same_file(&early.expect("the lock came along"), &lock));
    }

    #[test]
    fn a_parent_gone_before_the_assignment_is_no_assignment() {
        let (parent, worker) = UnixStream::pair().unwrap();
        drop(parent);

        assert!(receive_assignment(&worker).unwrap().is_none());
    }

    #[test]
    fn a_parent_gone_before_the_lock_is_no_lock() {
        let (parent, worker) = UnixStream::pair().unwrap();
        send_assignment(&parent, &assignment()).unwrap();
        receive_assignment(&worker).unwrap().unwrap();

        drop(parent);

        assert!(receive_lock(&worker).unwrap().is_none());
    }

    #[test]
    fn a_lock_message_without_its_descriptor_is_refused() {
        let (parent, worker) = UnixStream::pair().unwrap();

        (&parent).write_all(&[LOCK_MARKER]).unwrap();

        let error = receive_lock(&worker).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_lock_message_with_two_descriptors_is_refused() {
        let (parent, worker) = UnixStream::pair().unwrap();
        let (lock, other) = (tempfile::tempfile().unwrap(), tempfile::tempfile().unwrap());

        parent
            .send_with_fds(
                &[&[LOCK_MARKER][..]],
                &[lock.as_raw_fd(), other.as_raw_fd()],
            )
            .unwrap();

        let error = receive_lock(&worker).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn bytes_after_the_assignment_are_refused() {
        let (parent, worker) = UnixStream::pair().unwrap();
        let mut frame = encode_frame(&assignment()).unwrap();
        frame.extend_from_slice(b"xy");

        (&parent).write_all(&frame).unwrap();

        let error = receive_assignment(&worker).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn garbage_instead_of_an_assignment_is_an_error() {
        let (parent, worker) = UnixStream::pair().unwrap();
        (&parent)
            .write_all(&[9u8, 0, 0, 0, b'{', b'x', 1, 2, 3])
            .unwrap();
        drop(parent);

        assert!(receive_assignment(&worker).is_err());
    }
}
