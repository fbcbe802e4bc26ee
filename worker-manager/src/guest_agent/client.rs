//! The guest-agent protocol over a byte channel.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vmm_core::integration::{GuestAgentInfo, GuestFreezeStatus};

use super::codec::{Incoming, ReplyDecoder, SYNC_BYTE, encode_command};
use super::error::AgentError;

/// A byte channel to an agent (COM2 of a partition, a Unix socket, a pty).
pub trait AgentTransport {
    /// Sends all of `bytes`, waiting at most `timeout` for the channel to take them.
    fn send(&mut self, bytes: &[u8], timeout: Duration) -> io::Result<()>;
    /// Reads what has arrived into `buf`, waiting up to `timeout` for the first byte: `Ok(0)`
    /// when nothing came, `Err(UnexpectedEof)` when the channel is closed.
    fn receive(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize>;
}

impl AgentTransport for UnixStream {
    fn send(&mut self, bytes: &[u8], timeout: Duration) -> io::Result<()> {
        self.set_write_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        self.write_all(bytes)
    }

    fn receive(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
        self.set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        match self.read(buf) {
            Ok(0) => Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => Ok(n),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }
}

/// A qemu-guest-agent client. Every command first makes sure the stream is in step (after a
/// start, a timeout or a stray answer): `0xFF`, then `guest-sync-delimited` with a fresh random
/// id, discarding everything up to the answer carrying that id.
#[derive(Debug)]
pub struct AgentClient<T> {
    transport: T,
    decoder: ReplyDecoder,
    pending: VecDeque<Incoming>,
    synced: bool,
}

impl<T: AgentTransport> AgentClient<T> {
    /// A client on `transport`; the first command resynchronises.
    pub fn new(transport: T) -> Self {
        AgentClient {
            transport,
            decoder: ReplyDecoder::default(),
            pending: VecDeque::new(),
            synced: false,
        }
    }

    /// The channel.
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    /// Forces a resynchronisation before the next command (the other end may have restarted).
    pub fn invalidate(&mut self) {
        self.synced = false;
    }

    /// Brings the stream in step within `timeout`: `0xFF`, `guest-sync-delimited` with a random
    /// id, and everything up to its answer thrown away.
    pub fn sync(&mut self, timeout: Duration) -> Result<(), AgentError> {
        self.sync_until(Instant::now() + timeout, timeout)
    }

    fn sync_until(&mut self, deadline: Instant, budget: Duration) -> Result<(), AgentError> {
        const COMMAND: &str = "guest-sync-delimited";
        self.synced = false;
        self.decoder.reset();
        self.pending.clear();
        let id = random_id();
        let mut bytes = vec![SYNC_BYTE];
        bytes.extend(encode_command(COMMAND, Some(json!({ "id": id }))));
        self.send(&bytes, deadline, COMMAND, budget)?;
        loop {
            match self.next(deadline, COMMAND, budget)? {
                Incoming::Return(value) if value.as_i64() == Some(id) => {
                    self.synced = true;
                    return Ok(());
                }
                // Older answers, the sentinel, noise: all dropped.
                _ => {}
            }
        }
    }

    /// Runs `command` and returns its `return` value, within `timeout` in all (the
    /// resynchronisation included).
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        let deadline = Instant::now() + timeout;
        if !self.synced {
            self.sync_until(deadline, timeout)?;
        }
        self.send(
            &encode_command(command, arguments),
            deadline,
            command,
            timeout,
        )?;
        loop {
            match self.next(deadline, command, timeout)? {
                Incoming::Return(value) => return Ok(value),
                Incoming::Error { class, desc } => {
                    return Err(if class == "CommandNotFound" {
                        AgentError::CommandNotFound {
                            command: command.into(),
                            desc,
                        }
                    } else {
                        AgentError::CommandFailed {
                            command: command.into(),
                            class,
                            desc,
                        }
                    });
                }
                // A sentinel or noise here means the stream is not what we think: resync next.
                Incoming::Sentinel | Incoming::Malformed(_) | Incoming::Oversized => {
                    self.synced = false;
                }
            }
        }
    }

    /// Sends `command`, which answers nothing on success (`guest-shutdown`), after a
    /// resynchronisation within `timeout` (so that a deaf agent is an error, not silence).
    pub fn execute_no_reply(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<(), AgentError> {
        let deadline = Instant::now() + timeout;
        self.sync_until(deadline, timeout)?;
        self.send(
            &encode_command(command, arguments),
            deadline,
            command,
            timeout,
        )?;
        // Whatever it says next (an error, or nothing at all) is not known in step.
        self.synced = false;
        Ok(())
    }

    /// `guest-ping`.
    pub fn ping(&mut self, timeout: Duration) -> Result<(), AgentError> {
        self.execute("guest-ping", None, timeout).map(drop)
    }

    /// `guest-info`: the version and the enabled commands.
    pub fn info(&mut self, timeout: Duration) -> Result<GuestAgentInfo, AgentError> {
        const COMMAND: &str = "guest-info";
        let value = self.execute(COMMAND, None, timeout)?;
        let version = value.get("version").and_then(Value::as_str);
        let commands = value.get("supported_commands").and_then(Value::as_array);
        let (Some(version), Some(commands)) = (version, commands) else {
            return Err(unexpected(COMMAND, &value));
        };
        let supported_commands = commands
            .iter()
            .filter(|c| c.get("enabled").and_then(Value::as_bool).unwrap_or(true))
            .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_owned))
            .collect();
        Ok(GuestAgentInfo {
            version: version.to_owned(),
            supported_commands,
        })
    }

    /// `guest-fsfreeze-freeze`: the number of file systems frozen.
    pub fn fsfreeze_freeze(&mut self, timeout: Duration) -> Result<u32, AgentError> {
        self.count("guest-fsfreeze-freeze", timeout)
    }

    /// `guest-fsfreeze-thaw`: the number of file systems thawed.
    pub fn fsfreeze_thaw(&mut self, timeout: Duration) -> Result<u32, AgentError> {
        self.count("guest-fsfreeze-thaw", timeout)
    }

    /// `guest-fsfreeze-status`.
    pub fn fsfreeze_status(&mut self, timeout: Duration) -> Result<GuestFreezeStatus, AgentError> {
        const COMMAND: &str = "guest-fsfreeze-status";
        let value = self.execute(COMMAND, None, timeout)?;
        match value.as_str() {
            Some("thawed") => Ok(GuestFreezeStatus::Thawed),
            Some("frozen") => Ok(GuestFreezeStatus::Frozen),
            _ => Err(unexpected(COMMAND, &value)),
        }
    }

    /// `guest-shutdown` (`powerdown`): no answer on success.
    pub fn shutdown(&mut self, timeout: Duration) -> Result<(), AgentError> {
        self.execute_no_reply(
            "guest-shutdown",
            Some(json!({ "mode": "powerdown" })),
            timeout,
        )
    }

    fn count(&mut self, command: &str, timeout: Duration) -> Result<u32, AgentError> {
        let value = self.execute(command, None, timeout)?;
        value
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| unexpected(command, &value))
    }

    fn send(
        &mut self,
        bytes: &[u8],
        deadline: Instant,
        command: &str,
        budget: Duration,
    ) -> Result<(), AgentError> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.transport.send(bytes, left).map_err(|e| {
            self.synced = false;
            match e.kind() {
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => AgentError::Timeout {
                    command: command.into(),
                    waited: budget,
                },
                io::ErrorKind::UnexpectedEof
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::NotConnected => AgentError::Closed,
                _ => AgentError::Io(e),
            }
        })
    }

    /// The next item from the agent, waiting until `deadline`.
    fn next(
        &mut self,
        deadline: Instant,
        command: &str,
        budget: Duration,
    ) -> Result<Incoming, AgentError> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Ok(item);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.synced = false;
                return Err(AgentError::Timeout {
                    command: command.into(),
                    waited: budget,
                });
            }
            let n = match self.transport.receive(&mut buf, left) {
                Ok(n) => n,
                Err(e) => {
                    self.synced = false;
                    return Err(match e.kind() {
                        io::ErrorKind::UnexpectedEof | io::ErrorKind::NotConnected => {
                            AgentError::Closed
                        }
                        _ => AgentError::Io(e),
                    });
                }
            };
            let mut items = Vec::new();
            self.decoder.feed(&buf[..n], &mut items);
            self.pending.extend(items);
        }
    }
}

fn unexpected(command: &str, value: &Value) -> AgentError {
    let mut answer = value.to_string();
    answer.truncate(200);
    AgentError::UnexpectedAnswer {
        command: command.into(),
        answer,
    }
}

/// A fresh id for `guest-sync-delimited`: positive and below 2^53, so every JSON reader keeps
/// it exact.
fn random_id() -> i64 {
    let (high, _) = uuid::Uuid::new_v4().as_u64_pair();
    i64::try_from(high >> 11).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent played by the test: what the client sent, and what to answer per command.
    #[derive(Default)]
    struct Scripted {
        sent: Vec<u8>,
        inbox: Vec<u8>,
        /// Answers `guest-sync-delimited` with this many stale replies first.
        stale: usize,
        deaf: bool,
    }

    impl AgentTransport for Scripted {
        fn send(&mut self, bytes: &[u8], _timeout: Duration) -> io::Result<()> {
            self.sent.extend_from_slice(bytes);
            if self.deaf {
                return Ok(());
            }
            let text = String::from_utf8_lossy(bytes)
                .trim_start_matches('\u{fffd}')
                .to_owned();
            let command: Value = serde_json::from_str(text.trim()).unwrap();
            match command["execute"].as_str().unwrap() {
                "guest-sync-delimited" => {
                    for _ in 0..self.stale {
                        self.inbox.extend_from_slice(b"{\"return\":1}\n");
                    }
                    self.inbox.push(SYNC_BYTE);
                    self.inbox
                        .extend(format!("{{\"return\":{}}}\n", command["arguments"]["id"]).bytes());
                }
                "guest-fsfreeze-status" => {
                    self.inbox.extend_from_slice(b"{\"return\":\"frozen\"}\n")
                }
                "guest-fsfreeze-freeze" => self.inbox.extend_from_slice(
                    b"{\"error\":{\"class\":\"GenericError\",\"desc\":\"busy\"}}\n",
                ),
                _ => self.inbox.extend_from_slice(
                    b"{\"error\":{\"class\":\"CommandNotFound\",\"desc\":\"nope\"}}\n",
                ),
            }
            Ok(())
        }

        fn receive(&mut self, buf: &mut [u8], _timeout: Duration) -> io::Result<usize> {
            let n = buf.len().min(self.inbox.len());
            buf[..n].copy_from_slice(&self.inbox[..n]);
            self.inbox.drain(..n);
            if n == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(n)
        }
    }

    #[test]
    fn first_command_resyncs_and_skips_stale_answers() {
        let mut client = AgentClient::new(Scripted {
            stale: 3,
            ..Scripted::default()
        });

        let status = client.fsfreeze_status(Duration::from_secs(1)).unwrap();

        assert_eq!(status, GuestFreezeStatus::Frozen);
        assert_eq!(client.transport_mut().sent[0], SYNC_BYTE);
    }

    #[test]
    fn agent_errors_map_to_their_kinds() {
        let mut client = AgentClient::new(Scripted::default());

        let freeze = client.fsfreeze_freeze(Duration::from_secs(1));
        let ping = client.ping(Duration::from_secs(1));

        assert!(
            matches!(freeze, Err(AgentError::CommandFailed { ref class, ref desc, .. }) if class == "GenericError" && desc == "busy")
        );
        assert!(matches!(ping, Err(AgentError::CommandNotFound { .. })));
    }

    #[test]
    fn deaf_agent_times_out_within_the_budget() {
        let mut client = AgentClient::new(Scripted {
            deaf: true,
            ..Scripted::default()
        });
        let started = Instant::now();

        let result = client.ping(Duration::from_millis(100));

        assert!(matches!(result, Err(AgentError::Timeout { .. })));
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn random_ids_are_positive_and_exact_in_json() {
        let id = random_id();

        assert!(id > 0 && id < (1 << 53));
    }
}
