//! The host's end of the guest's integration channel: a qemu-guest-agent client (Hyper-V's
//! integration services — heartbeat, shutdown, the backup requestor — over the agent protocol
//! Linux guests already run).
//!
//! [`codec`] is the wire format, [`AgentClient`] the protocol on top of any byte channel
//! ([`AgentTransport`]): resynchronisation (`0xFF` + `guest-sync-delimited` with a random id,
//! everything up to the matching answer discarded), deadlines, and the agent's errors mapped to
//! [`AgentError`]. The worker runs it over COM2; the interop test runs it against Debian's
//! `qemu-ga` over a Unix socket.

mod client;
pub mod codec;
mod error;

pub use client::{AgentClient, AgentTransport};
pub use error::AgentError;
