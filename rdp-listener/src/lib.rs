//! Hyper-V's single-port RDP listener and VM console.
//!
//! VMConnect reaches every VM's console through one host port, TCP 2179: the client opens with
//! an MS-RDPEPS pre-connection PDU whose string names the VM (`"<GUID>"` or
//! `"<GUID>;EnhancedMode=1"`), and the listener hands the rest of the connection to that VM's
//! console. This crate has the pieces:
//!
//! - [`pcb`]: the pre-connection PDU and its string, parsed zero-copy and bounds-checked;
//! - [`Listener`]: accept, PCB within a deadline, resolve through a [`ConsoleRegistry`], limits,
//!   then splice to a TCP backend or hand to an in-process [`ConsoleServer`], graceful shutdown;
//! - `console` (feature `console`, on by default): the VM console server itself, an RDP server
//!   (ironrdp-server) that shows COM1 as text and types keys into it.

#[cfg(feature = "console")]
pub mod console;
pub mod limits;
pub mod pcb;
pub mod registry;
pub mod router;
pub mod splice;
pub mod stream;

pub use limits::ConnectionCounts;
pub use pcb::{ConsoleTarget, PcbError, PreconnectionPdu};
pub use registry::{ConsoleRegistry, ConsoleServer, Refusal, Route, RouteRequest, Session};
pub use router::{DEFAULT_PORT, Listener, ListenerConfig, ListenerError};
pub use stream::PrefixedStream;
