//! The VM console server: a real RDP server (ironrdp-server) whose desktop is the VM's COM1
//! rendered as text, and whose keyboard types into COM1.
//!
//! It runs in the daemon, fed by the worker's console socket, so a worker pays nothing for it
//! while no client is connected: the feed connects on the first client and closes after the
//! last. Both client orders are served: `/pcb:<GUID>` (X.224 negotiation, then TLS and CredSSP)
//! and `/vmconnect:<GUID>` (TLS right after the PCB, CredSSP, then X.224 inside TLS, see
//! [`vmconnect`]).

mod idle;
pub mod keys;
pub mod screen;
mod server;
pub mod tls;
pub mod vmconnect;

use std::path::PathBuf;

pub use server::{ConsoleSettings, VmConsole};
pub use tls::TlsIdentity;

/// The user and password RDP clients must give (NLA), from the daemon's configuration.
#[derive(Clone, PartialEq, Eq)]
pub struct ConsoleCredentials {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
    /// Domain, if clients give one.
    pub domain: Option<String>,
}

impl std::fmt::Debug for ConsoleCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleCredentials")
            .field("username", &self.username)
            .field("domain", &self.domain)
            .finish_non_exhaustive()
    }
}

/// What goes wrong in the console server.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// Reading or writing the TLS identity in the store.
    #[error("console tls identity at {path}")]
    Store {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Making or loading the certificate.
    #[error("console certificate")]
    Certificate(#[source] rcgen::Error),
    /// Building the TLS configuration.
    #[error("console tls configuration")]
    Tls(#[source] tokio_rustls::rustls::Error),
    /// The VM's serial console cannot be reached.
    #[error("cannot reach the serial console {path}")]
    Serial {
        /// The worker's console socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The session's own thread could not start.
    #[error("cannot start a console session")]
    Session(#[source] std::io::Error),
}
