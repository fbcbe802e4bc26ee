//! The seam between the listener and whoever knows the VMs: resolve a PCB target to a console,
//! or refuse it with a reason the listener logs.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;
use uuid::Uuid;

use crate::pcb::ConsoleTarget;
use crate::stream::PrefixedStream;

/// One connection asking for a VM's console.
#[derive(Debug, Clone)]
pub struct RouteRequest<'a> {
    /// The VM and options the client named (or the default VM for a connection without PCB).
    pub target: &'a ConsoleTarget,
    /// Who is asking.
    pub peer: SocketAddr,
    /// The raw pre-connection PDU, `None` when the client sent none (default VM).
    pub pcb: Option<&'a [u8]>,
}

/// Where a connection goes.
#[derive(Clone)]
pub enum Route {
    /// Splice the connection to a TCP backend (a console server elsewhere); with `forward_pcb`
    /// the PDU is replayed first, for a backend that expects Hyper-V's byte order itself.
    Tcp {
        /// The backend.
        address: SocketAddr,
        /// Send the original PDU bytes before the client's.
        forward_pcb: bool,
    },
    /// Hand the connection to an in-process console server.
    Local(Arc<dyn ConsoleServer>),
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Tcp {
                address,
                forward_pcb,
            } => f
                .debug_struct("Tcp")
                .field("address", address)
                .field("forward_pcb", forward_pcb)
                .finish(),
            Route::Local(_) => f.write_str("Local"),
        }
    }
}

/// Why a connection is refused; the listener closes it and logs this.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No VM has this GUID.
    #[error("no vm {0}")]
    UnknownVm(Uuid),
    /// The VM exists but has no console now.
    #[error("vm {0} is not running")]
    NotRunning(Uuid),
    /// The peer may not see this VM's console.
    #[error("not authorized for vm {vm}: {reason}")]
    Unauthorized {
        /// The VM.
        vm: Uuid,
        /// Why not.
        reason: String,
    },
    /// Something the client asked for that this console does not offer (enhanced mode).
    #[error("unsupported request for vm {vm}: {reason}")]
    Unsupported {
        /// The VM.
        vm: Uuid,
        /// What.
        reason: String,
    },
}

/// Resolves and authorizes VM consoles: implemented by the daemon over vmm-core.
pub trait ConsoleRegistry: Send + Sync + 'static {
    /// The console `request` may reach, or why not.
    fn route(&self, request: &RouteRequest<'_>) -> Result<Route, Refusal>;
}

/// A connection handed to a console server: every byte after the PCB, untouched.
#[derive(Debug)]
pub struct Session {
    /// The VM.
    pub vm: Uuid,
    /// What the client asked for.
    pub target: ConsoleTarget,
    /// Who connected.
    pub peer: SocketAddr,
    /// The client: bytes read past the PCB first, then the socket.
    pub stream: PrefixedStream<TcpStream>,
    /// Turns `true` when the listener shuts down: the server ends its session cleanly within
    /// the listener's shutdown grace (after which the listener cuts it).
    pub closing: watch::Receiver<bool>,
    /// The listener's idle timeout: a server closes the session when the client sent nothing
    /// this long.
    pub idle_timeout: Duration,
}

/// A boxed session future.
pub type SessionFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A VM's console server as the listener sees it.
pub trait ConsoleServer: Send + Sync + 'static {
    /// Serves one client until it leaves or the console ends.
    fn serve(&self, session: Session) -> SessionFuture;
}
