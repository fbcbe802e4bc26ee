//! The control protocol between the parent (the daemon's worker manager) and a worker process,
//! spoken over the worker's `control.sock`.
//!
//! Every message is one frame: a `u32` little-endian length, then that many bytes of JSON. A
//! connection starts with a version handshake ([`ToWorker::Hello`] → [`FromWorker::Hello`] or
//! [`FromWorker::Refused`]); after it the parent sends [`ToWorker::Request`]s, each with an id the
//! worker echoes in its [`FromWorker::Reply`], and the worker sends [`FromWorker::Event`]s
//! whenever something happens on its own. Bulk data (memory images, console bytes) never goes
//! through frames: saved state is written to files, the console has its own socket.
//!
//! Frames are capped at [`MAX_FRAME_LEN`]; a longer length, a truncated frame or JSON of the
//! wrong shape is a [`ProtocolError`], never a panic or an unbounded allocation.

use std::io::{self, Read, Write};
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use vmm_core::integration::{GuestAgentInfo, GuestFreezeStatus, GuestHeartbeat};

use vmm_core::integration::{BackupCaptureReport, BackupCaptureRequest, BackupMergeRequest};
use vmm_core::{CheckpointReport, CheckpointRequest, StopReason, VmId};

/// Version of this protocol. A worker refuses a parent speaking another one (an upgraded daemon
/// finding an old worker sees the refusal and can say so, instead of misreading its frames).
pub const PROTOCOL_VERSION: u32 = 5;

/// Largest frame body accepted, in bytes. Control messages are small; this only bounds what a
/// confused or hostile peer can make the other side allocate.
pub const MAX_FRAME_LEN: u32 = 1 << 20;

/// Size of the length prefix.
const HEADER_LEN: usize = 4;

/// A message from the parent to the worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToWorker {
    /// First message on every connection.
    Hello {
        /// The parent's [`PROTOCOL_VERSION`].
        version: u32,
    },
    /// An operation; answered by a [`FromWorker::Reply`] with the same id.
    Request {
        /// Chosen by the parent, unique on this connection.
        id: u64,
        /// What to do.
        request: Request,
    },
}

/// What the parent can ask of a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// How the worker and its guest are (also the heartbeat). Answered at once, even while
    /// another request is being carried out.
    Status,
    /// Park every vCPU.
    Pause,
    /// Let the vCPUs run again.
    Resume,
    /// Pause, write `state.json` and `memory.bin` (fsynced) into `staging`, commit it by renaming
    /// it to `state_dir`, reply, exit. On failure before the commit the guest runs on.
    Save {
        /// An existing, empty folder.
        staging: PathBuf,
        /// Where the committed saved state goes; must not exist.
        state_dir: PathBuf,
    },
    /// Ask the guest to shut itself down: `guest-shutdown` through its integration agent on
    /// COM2. Replies as soon as the request is delivered; the guest's power-off arrives as a
    /// [`Notice::GuestStopped`]. Refused for a guest whose agent does not answer.
    Shutdown,
    /// Power off at once, reply, exit.
    TurnOff,
    /// Hard reset: the guest boots again from its boot source in the same worker.
    Reset,
    /// Take a checkpoint of the running (or paused) guest: pre-copy memory while it runs, switch
    /// its disks to new overlays and commit the state in one short pause, and leave it in the
    /// run state it was in ([`vmm_core::Worker::checkpoint`]); or, for a production checkpoint
    /// ([`vmm_core::CheckpointContent::FrozenDisks`], protocol 5), only switch the disks while
    /// the guest's agent holds it frozen. Answered by
    /// [`Reply::Checkpoint`]; refused with [`FailureKind::InvalidState`] unless the guest is
    /// running or paused.
    Checkpoint(CheckpointRequest),
    /// A call to the guest's integration agent on COM2 ([`GuestAgentRequest`]); answered by
    /// [`Reply::GuestAgent`] on the worker's agent thread, so it never waits behind (nor holds
    /// up) run-control requests. An agent that does not answer in time fails with
    /// [`FailureKind::TimedOut`].
    GuestAgent(GuestAgentRequest),
    /// A backup's point-in-time capture of the running (or paused) guest's disks
    /// ([`vmm_core::Worker::backup_capture`]). Answered by [`Reply::BackupCaptured`].
    BackupCapture(BackupCaptureRequest),
    /// Merges a capture's overlays back while the guest runs
    /// ([`vmm_core::Worker::backup_merge`]); a guest that stopped on its own since the capture
    /// has them committed offline by its worker. Answered by [`Reply::BackupMerged`].
    BackupMerge(BackupMergeRequest),
}

/// A message from the worker to the parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromWorker {
    /// Handshake accepted.
    Hello {
        /// The worker's [`PROTOCOL_VERSION`].
        version: u32,
        /// The virtual machine this worker runs.
        vm: VmId,
        /// The worker's process id.
        pid: u32,
    },
    /// Handshake refused; the worker closes the connection.
    Refused {
        /// Why.
        reason: String,
    },
    /// The answer to the request with this id.
    Reply {
        /// The request's id.
        id: u64,
        /// The outcome: a reply, or a typed failure whose message is a sentence for people.
        result: Result<Reply, Failure>,
    },
    /// Something that happened without being asked.
    Event(Notice),
}

/// Why a request failed, typed so that the service answers with the right code (Hyper-V's
/// 32775 for [`FailureKind::InvalidState`]) instead of a generic failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// What kind of failure.
    pub kind: FailureKind,
    /// What happened, for people.
    pub message: String,
}

/// The kinds of [`Failure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    /// The guest's current state does not allow the request (stopped, not running, not paused);
    /// nothing changed.
    InvalidState,
    /// The worker or its guest cannot do this at all (a guest without shutdown integration).
    Refused,
    /// The request was tried and failed (I/O, the partition's own errors).
    Failed,
    /// Something the worker waited for did not answer in time (the guest's agent).
    TimedOut,
}

impl Failure {
    /// A [`FailureKind::InvalidState`] failure.
    pub fn invalid_state(message: impl Into<String>) -> Self {
        Failure {
            kind: FailureKind::InvalidState,
            message: message.into(),
        }
    }

    /// A [`FailureKind::Refused`] failure.
    pub fn refused(message: impl Into<String>) -> Self {
        Failure {
            kind: FailureKind::Refused,
            message: message.into(),
        }
    }

    /// A [`FailureKind::Failed`] failure.
    pub fn failed(message: impl Into<String>) -> Self {
        Failure {
            kind: FailureKind::Failed,
            message: message.into(),
        }
    }
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The answer to [`Request::Status`].
    Status(WorkerReport),
    /// The operation is done.
    Done,
    /// The answer to [`Request::Checkpoint`]: it is committed, and what it cost.
    Checkpoint(CheckpointReport),
    /// The answer to [`Request::GuestAgent`].
    GuestAgent(GuestAgentReply),
    /// The answer to [`Request::BackupCapture`].
    BackupCaptured(BackupCaptureReport),
    /// The answer to [`Request::BackupMerge`].
    BackupMerged(BackupMergeReport),
}

/// What a [`Request::BackupMerge`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupMergeReport {
    /// How long the guest was paused for the last copy and the switch back onto the images
    /// (zero when no disk was still on its overlay).
    pub final_quiesce: Duration,
    /// Bytes written into the images, every pass included.
    pub bytes_copied: u64,
    /// Disks moved back onto their images (the others already were).
    pub disks_merged: usize,
}

/// Where the worker's guest is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestState {
    /// vCPUs are running.
    Running,
    /// vCPUs are parked.
    Paused,
    /// vCPUs are parked and the guest's state is being written; the worker ends with
    /// [`GuestState::Stopped`] ([`StopReason::Saved`]) or runs on if the save fails.
    Saving,
    /// The guest stopped on its own; the worker waits to be turned off (or reset).
    Stopped {
        /// Why it stopped.
        reason: StopReason,
    },
}

/// An unsolicited message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Notice {
    /// The guest moved between running, paused and saving.
    StateChanged {
        /// The new state.
        state: GuestState,
    },
    /// The guest stopped on its own (powered off, reset itself, crashed).
    GuestStopped {
        /// Why.
        reason: StopReason,
    },
    /// The guest's integration agent started or stopped answering the worker's periodic ping
    /// (Hyper-V's heartbeat integration service).
    GuestHeartbeat {
        /// What the last ping found.
        heartbeat: GuestHeartbeat,
    },
}

/// A worker's answer to [`Request::Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerReport {
    /// The virtual machine.
    pub vm: VmId,
    /// The worker's process id.
    pub pid: u32,
    /// The guest's state.
    pub state: GuestState,
    /// Time since the worker process started, in milliseconds.
    pub uptime_ms: u64,
    /// Whether the guest was restored from saved state (rather than booted) by this worker.
    pub restored: bool,
    /// Resident memory of the worker process in KiB (`VmRSS`), guest memory it touched included.
    pub rss_kib: u64,
    /// The test guest's live counters, when the VM runs the embedded test guest and it is up.
    pub test_guest: Option<TestGuestCounters>,
    /// What the worker runs under.
    pub confinement: Confinement,
    /// Whether the guest's integration agent answers the worker's periodic ping; `None` while
    /// no guest runs.
    #[serde(default)]
    pub guest_heartbeat: Option<GuestHeartbeat>,
}

/// The confinement a worker runs under (Hyper-V runs each `vmwp.exe` under its own virtual
/// account; ours is a seccomp allowlist and a Landlock domain).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Confinement {
    /// Confinement was asked for (the daemon runs without `--no-confinement`).
    pub enabled: bool,
    /// `PR_SET_NO_NEW_PRIVS` is set.
    pub no_new_privs: bool,
    /// The seccomp allowlist is installed on every thread.
    pub seccomp: bool,
    /// How Landlock is enforced: "fully enforced (ABI 6)", "partially enforced (ABI 3)", "not
    /// enforced (not in this kernel)", or "off".
    pub landlock: String,
}

/// A call to the guest's integration agent ([`Request::GuestAgent`]), the
/// [`vmm_core::Worker`] methods of the same names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestAgentRequest {
    /// `guest-sync-delimited` + `guest-ping` within `timeout`: [`GuestAgentReply::Pong`].
    Ping {
        /// How long the agent has.
        timeout: std::time::Duration,
    },
    /// `guest-info`: [`GuestAgentReply::Info`].
    Info {
        /// How long the agent has.
        timeout: std::time::Duration,
    },
    /// `guest-fsfreeze-freeze`: [`GuestAgentReply::Count`]. The worker thaws the guest itself
    /// once `hold_limit` has passed since the request unless a [`GuestAgentRequest::Thaw`]
    /// succeeded first, and at once when the answer does not come within `reply_timeout`.
    Freeze {
        /// How long the agent has to answer.
        reply_timeout: std::time::Duration,
        /// Longest the guest stays frozen, counted from the request.
        hold_limit: std::time::Duration,
    },
    /// `guest-fsfreeze-thaw`: [`GuestAgentReply::Count`].
    Thaw {
        /// How long the agent has.
        timeout: std::time::Duration,
    },
    /// `guest-fsfreeze-status`: [`GuestAgentReply::FreezeStatus`].
    FreezeStatus {
        /// How long the agent has.
        timeout: std::time::Duration,
    },
}

impl GuestAgentRequest {
    /// The longest the worker may take over the request (the agent's own timeouts, plus one
    /// heartbeat ping it may have to wait behind).
    pub fn agent_time(&self) -> std::time::Duration {
        /// A heartbeat ping the request may queue behind, with room to spare.
        const QUEUE_MARGIN: std::time::Duration = std::time::Duration::from_secs(3);
        QUEUE_MARGIN
            + match self {
                GuestAgentRequest::Ping { timeout }
                | GuestAgentRequest::Info { timeout }
                | GuestAgentRequest::Thaw { timeout }
                | GuestAgentRequest::FreezeStatus { timeout } => *timeout,
                // A freeze that times out is followed by a thaw of the same length.
                GuestAgentRequest::Freeze { reply_timeout, .. } => *reply_timeout * 2,
            }
    }
}

/// What the guest's agent answered ([`Reply::GuestAgent`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestAgentReply {
    /// It answers (`guest-ping`).
    Pong,
    /// `guest-info`.
    Info(GuestAgentInfo),
    /// File systems frozen or thawed.
    Count(u32),
    /// `guest-fsfreeze-status`.
    FreezeStatus(GuestFreezeStatus),
}

/// The test guest's status block (`vmms_guest::protocol::StatusBlock`), read from guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestGuestCounters {
    /// Advances while the guest's main loop runs; frozen while paused.
    pub counter: u64,
    /// Records the guest appended to its disk.
    pub records: u64,
    /// Its integration agent holds a freeze: the record workload is stopped.
    #[serde(default)]
    pub frozen: bool,
    /// Its `writeloop` workload runs (pausing while frozen).
    #[serde(default)]
    pub writeloop: bool,
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The connection failed.
    #[error("control connection i/o")]
    Io(#[from] io::Error),
    /// The peer announced a frame longer than [`MAX_FRAME_LEN`].
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// Announced length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The connection ended in the middle of a frame.
    #[error("connection closed inside a frame")]
    Truncated,
    /// The frame is not JSON of the expected message shape.
    #[error("malformed frame")]
    Malformed(#[source] serde_json::Error),
    /// The peer speaks another protocol version.
    #[error("peer speaks protocol version {theirs}, this side {ours}")]
    VersionMismatch {
        /// Ours.
        ours: u32,
        /// Theirs.
        theirs: u32,
    },
    /// The peer sent a valid message where another was required (e.g. no handshake first).
    #[error("unexpected message: {0}")]
    Unexpected(String),
}

/// Encodes `message` as one frame (length prefix included).
pub fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, ProtocolError> {
    let mut frame = vec![0; HEADER_LEN];
    serde_json::to_writer(&mut frame, message).map_err(ProtocolError::Malformed)?;
    let len = u32::try_from(frame.len() - HEADER_LEN).unwrap_or(u32::MAX);
    if len > MAX_FRAME_LEN {
        return Err(ProtocolError::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    frame[..HEADER_LEN].copy_from_slice(&len.to_le_bytes());
    Ok(frame)
}

/// Writes `message` as one frame with a single `write_all`, so that frames from threads sharing a
/// locked writer never interleave.
pub fn write_frame<T: Serialize>(out: &mut impl Write, message: &T) -> Result<(), ProtocolError> {
    out.write_all(&encode_frame(message)?)?;
    Ok(())
}

/// Reads one frame. `Ok(None)` when the connection ended cleanly between frames.
pub fn read_frame<T: DeserializeOwned>(input: &mut impl Read) -> Result<Option<T>, ProtocolError> {
    let mut header = [0u8; HEADER_LEN];
    if !read_exact_or_eof(input, &mut header)? {
        return Ok(None);
    }
    let len = u32::from_le_bytes(header);
    if len > MAX_FRAME_LEN {
        return Err(ProtocolError::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    let mut body = vec![0; len as usize];
    if !read_exact_or_eof(input, &mut body)? && len > 0 {
        return Err(ProtocolError::Truncated);
    }
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(ProtocolError::Malformed)
}

/// Decodes the first frame of `bytes`: the message and the bytes it used, or `Ok(None)` when
/// `bytes` does not yet hold a whole frame.
pub fn decode_frame<T: DeserializeOwned>(
    bytes: &[u8],
) -> Result<Option<(T, usize)>, ProtocolError> {
    let Some(header) = bytes.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let mut len = [0u8; HEADER_LEN];
    len.copy_from_slice(header);
    let len = u32::from_le_bytes(len);
    if len > MAX_FRAME_LEN {
        return Err(ProtocolError::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    let end = HEADER_LEN + len as usize;
    let Some(body) = bytes.get(HEADER_LEN..end) else {
        return Ok(None);
    };
    serde_json::from_slice(body)
        .map(|message| Some((message, end)))
        .map_err(ProtocolError::Malformed)
}

/// Fills `buf`; `Ok(false)` if the stream ended before the first byte, [`ProtocolError::Truncated`]
/// if it ended after it.
fn read_exact_or_eof(input: &mut impl Read, buf: &mut [u8]) -> Result<bool, ProtocolError> {
    let mut filled = 0;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(ProtocolError::Truncated),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProtocolError::Io(e)),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn status_reply() -> FromWorker {
        FromWorker::Reply {
            id: 7,
            result: Ok(Reply::Status(WorkerReport {
                vm: VmId::new_random(),
                pid: 42,
                state: GuestState::Stopped {
                    reason: StopReason::GuestCrash {
                        detail: "triple \"fault\"".into(),
                    },
                },
                uptime_ms: 1234,
                restored: true,
                rss_kib: 2048,
                test_guest: Some(TestGuestCounters {
                    counter: 99,
                    records: 3,
                    frozen: true,
                    writeloop: false,
                }),
                confinement: Confinement {
                    enabled: true,
                    no_new_privs: true,
                    seccomp: true,
                    landlock: "fully enforced (ABI 6)".into(),
                },
                guest_heartbeat: Some(GuestHeartbeat::Ok),
            })),
        }
    }

    #[test]
    fn frame_round_trips_through_a_stream() {
        let message = status_reply();
        let mut wire = Vec::new();
        write_frame(&mut wire, &message).unwrap();
        write_frame(&mut wire, &ToWorker::Hello { version: 1 }).unwrap();
        let mut input = wire.as_slice();

        let first: Option<FromWorker> = read_frame(&mut input).unwrap();
        let second: Option<ToWorker> = read_frame(&mut input).unwrap();
        let end: Option<ToWorker> = read_frame(&mut input).unwrap();

        assert_eq!(first, Some(message));
        assert_eq!(second, Some(ToWorker::Hello { version: 1 }));
        assert_eq!(end, None);
    }

    #[test]
    fn length_prefix_is_little_endian_body_length() {
        let frame = encode_frame(&ToWorker::Hello { version: 1 }).unwrap();

        let len = u32::from_le_bytes(frame[..4].try_into().unwrap());

        assert_eq!(len as usize, frame.len() - 4);
        assert_eq!(&frame[4..], br#"{"Hello":{"version":1}}"#);
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut wire = (MAX_FRAME_LEN + 1).to_le_bytes().to_vec();
        wire.extend_from_slice(b"{}");

        let result = read_frame::<ToWorker>(&mut wire.as_slice());

        assert!(matches!(
            result,
            Err(ProtocolError::FrameTooLarge { len, .. }) if len == MAX_FRAME_LEN + 1
        ));
    }

    #[test]
    fn stream_ending_inside_a_frame_is_truncated() {
        let frame = encode_frame(&ToWorker::Hello { version: 1 }).unwrap();
        let cut = &frame[..frame.len() - 3];

        let result = read_frame::<ToWorker>(&mut &cut[..]);

        assert!(matches!(result, Err(ProtocolError::Truncated)));
    }

    #[test]
    fn stream_ending_inside_the_header_is_truncated() {
        let result = read_frame::<ToWorker>(&mut &[5u8, 0][..]);

        assert!(matches!(result, Err(ProtocolError::Truncated)));
    }

    #[test]
    fn json_of_the_wrong_shape_is_malformed() {
        let body = br#"{"Launch":{"missiles":true}}"#;
        let mut wire = (body.len() as u32).to_le_bytes().to_vec();
        wire.extend_from_slice(body);

        let result = read_frame::<ToWorker>(&mut wire.as_slice());

        assert!(matches!(result, Err(ProtocolError::Malformed(_))));
    }

    #[test]
    fn decode_waits_for_a_whole_frame() {
        let frame = encode_frame(&ToWorker::Request {
            id: 1,
            request: Request::Pause,
        })
        .unwrap();

        let partial = decode_frame::<ToWorker>(&frame[..frame.len() - 1]).unwrap();
        let whole = decode_frame::<ToWorker>(&frame).unwrap();

        assert!(partial.is_none());
        assert_eq!(
            whole,
            Some((
                ToWorker::Request {
                    id: 1,
                    request: Request::Pause
                },
                frame.len()
            ))
        );
    }

    fn any_request() -> impl Strategy<Value = Request> {
        prop_oneof![
            Just(Request::Status),
            Just(Request::Pause),
            Just(Request::Resume),
            Just(Request::TurnOff),
            Just(Request::Reset),
            Just(Request::Shutdown),
            (0u64..10_000, 0u64..10_000).prop_map(|(a, b)| {
                Request::GuestAgent(GuestAgentRequest::Freeze {
                    reply_timeout: std::time::Duration::from_millis(a),
                    hold_limit: std::time::Duration::from_millis(b),
                })
            }),
            Just(Request::GuestAgent(GuestAgentRequest::FreezeStatus {
                timeout: std::time::Duration::from_secs(1),
            })),
            ("[^\0]{0,40}", "[^\0]{0,40}").prop_map(|(a, b)| Request::Save {
                staging: a.into(),
                state_dir: b.into(),
            }),
            (
                "[^\0]{0,40}",
                "[^\0]{0,40}",
                proptest::option::of("[^\0]{0,40}"),
                proptest::collection::vec((0usize..8, "[^\0]{0,40}"), 0..3),
                any::<bool>(),
            )
                .prop_map(|(a, b, parent, overlays, frozen)| {
                    Request::Checkpoint(CheckpointRequest {
                        staging: a.into(),
                        state_dir: b.into(),
                        parent_state_dir: parent.map(Into::into),
                        overlays: overlays
                            .into_iter()
                            .map(|(disk, path)| vmm_core::DiskOverlay {
                                disk,
                                path: path.into(),
                            })
                            .collect(),
                        content: if frozen {
                            vmm_core::CheckpointContent::FrozenDisks
                        } else {
                            vmm_core::CheckpointContent::SavedState
                        },
                    })
                }),
        ]
    }

    fn any_failure() -> impl Strategy<Value = Failure> {
        (
            prop_oneof![
                Just(FailureKind::InvalidState),
                Just(FailureKind::Refused),
                Just(FailureKind::Failed),
                Just(FailureKind::TimedOut),
            ],
            "[^\0]{0,40}",
        )
            .prop_map(|(kind, message)| Failure { kind, message })
    }

    proptest! {
        #[test]
        fn any_failure_reply_round_trips(id in any::<u64>(), failure in any_failure()) {
            let message = FromWorker::Reply { id, result: Err(failure) };
            let frame = encode_frame(&message).unwrap();

            let decoded = decode_frame::<FromWorker>(&frame).unwrap();

            prop_assert_eq!(decoded, Some((message, frame.len())));
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_frame::<ToWorker>(&bytes);
            let _ = read_frame::<FromWorker>(&mut bytes.as_slice());
        }

        #[test]
        fn corrupted_frames_are_errors_or_other_messages(
            id in any::<u64>(),
            request in any_request(),
            flip in any::<proptest::sample::Index>(),
            bit in 0u8..8,
        ) {
            let message = ToWorker::Request { id, request };
            let mut frame = encode_frame(&message).unwrap();
            let at = flip.index(frame.len());
            frame[at] ^= 1 << bit;

            // Whatever comes out, it is a clean result: never a panic, never more bytes
            // consumed than were given.
            if let Ok(Some((_, used))) = decode_frame::<ToWorker>(&frame) {
                prop_assert!(used <= frame.len());
            }
        }

        #[test]
        fn any_request_round_trips(id in any::<u64>(), request in any_request()) {
            let message = ToWorker::Request { id, request };
            let frame = encode_frame(&message).unwrap();

            let decoded = decode_frame::<ToWorker>(&frame).unwrap();

            prop_assert_eq!(decoded, Some((message, frame.len())));
        }
    }
}
