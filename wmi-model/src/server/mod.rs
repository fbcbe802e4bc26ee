//! The CIM-XML endpoint: `POST /cimom` over HTTP (loopback) or HTTPS with Basic authentication
//! (any other address), and the delivery of indications to listeners.
//!
//! Every request is bounded: headers must arrive within [`HEADER_TIMEOUT`], the body is at most
//! [`ServerConfig::max_request_bytes`] and must arrive within [`ServerConfig::request_timeout`];
//! parsing and the operation run on tokio's blocking pool, so a slow or hostile client holds
//! only its own connection.

mod auth;
mod deliver;
mod http;
mod peer;
mod tls;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::provider::Provider;

pub use auth::Credentials;
pub use deliver::spawn_indication_delivery;
pub use peer::{LocalAccess, TcpSocket, local_peer_uid, owner_in_table, parse_tcp_line};

/// The default address: loopback, the standard CIM-XML HTTP port.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 5988);
/// The standard CIM-XML HTTPS port.
pub const DEFAULT_TLS_PORT: u16 = 5989;
/// How long a client may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The most connections served at once; more wait in the accept queue.
pub const MAX_CONNECTIONS: usize = 256;

/// Where and how the endpoint listens.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The address to bind.
    pub listen: SocketAddr,
    /// PEM certificate chain and private key for HTTPS; required off loopback.
    pub tls: Option<TlsFiles>,
    /// The account clients must present (HTTP Basic); required off loopback.
    pub credentials: Option<Credentials>,
    /// Who among local users may connect without credentials on loopback (the daemon's socket
    /// policy); `None` serves every local user (tests and embedders that do their own checks).
    /// Ignored when credentials are configured: HTTP Basic then decides.
    pub local_access: Option<Arc<dyn LocalAccess>>,
    /// The largest request body accepted.
    pub max_request_bytes: usize,
    /// How long a request (body and operation) may take.
    pub request_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: DEFAULT_LISTEN,
            tls: None,
            credentials: None,
            local_access: None,
            max_request_bytes: 4 << 20,
            request_timeout: Duration::from_secs(60),
        }
    }
}

/// The PEM files of the HTTPS identity.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM, PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Why the endpoint cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A non-loopback address without TLS.
    #[error("{0} is not a loopback address: TLS (certificate and key) is required")]
    TlsRequired(SocketAddr),
    /// A non-loopback address without credentials.
    #[error(
        "{0} is not a loopback address: credentials for HTTP Basic authentication are required"
    )]
    CredentialsRequired(SocketAddr),
    /// The address cannot be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A certificate or key file cannot be read.
    #[error("cannot read {}", path.display())]
    ReadPem {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The key file holds no private key.
    #[error("{} holds no private key", .0.display())]
    NoPrivateKey(PathBuf),
    /// rustls refused the certificate or key.
    #[error("tls configuration")]
    Tls(#[source] rustls::Error),
}

/// Whether `addr` is the loopback address this endpoint may serve without TLS: exactly
/// 127.0.0.1 or ::1 (other 127/8 addresses are treated as remote, which also lets tests
/// exercise the TLS path without touching a real interface).
pub fn is_loopback(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(ip) => ip == Ipv4Addr::LOCALHOST,
        IpAddr::V6(ip) => ip == Ipv6Addr::LOCALHOST,
    }
}

/// A bound endpoint, ready to [`run`](Endpoint::run).
pub struct Endpoint {
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<http::State>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("listener", &self.listener)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Checks the configuration and binds. Must be called inside a tokio runtime.
    pub async fn bind(provider: Arc<Provider>, config: ServerConfig) -> Result<Self, ServerError> {
        if !is_loopback(&config.listen) {
            if config.tls.is_none() {
                return Err(ServerError::TlsRequired(config.listen));
            }
            if config.credentials.is_none() {
                return Err(ServerError::CredentialsRequired(config.listen));
            }
        }
        let tls = config.tls.as_ref().map(tls::acceptor).transpose()?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        Ok(Endpoint {
            listener,
            tls,
            state: Arc::new(http::State {
                provider,
                credentials: config.credentials,
                local_access: config.local_access,
                max_request_bytes: config.max_request_bytes,
                request_timeout: config.request_timeout,
            }),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves connections until the task is dropped.
    pub async fn run(self) {
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "cim: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let state = Arc::clone(&self.state);
            let tls = self.tls.clone();
            let server = stream.local_addr();
            tokio::spawn(async move {
                let caller = match server {
                    Ok(server) => caller_of(&state, peer, server),
                    Err(error) => http::Caller::Refused(format!("no local address: {error}")),
                };
                match tls {
                    Some(acceptor) => {
                        match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                            Ok(Ok(stream)) => http::serve_connection(stream, state, caller).await,
                            Ok(Err(error)) => tracing::debug!(%error, "cim: tls handshake failed"),
                            Err(_) => tracing::debug!("cim: tls handshake timed out"),
                        }
                    }
                    None => http::serve_connection(stream, state, caller).await,
                }
                drop(permit);
            });
        }
    }
}

/// Who is calling on a new connection: with credentials configured HTTP Basic decides later;
/// otherwise the local user owning the client socket must pass the local access policy.
fn caller_of(state: &http::State, peer: SocketAddr, server: SocketAddr) -> http::Caller {
    if state.credentials.is_some() {
        return http::Caller::Admitted;
    }
    let Some(access) = &state.local_access else {
        return http::Caller::Admitted;
    };
    let refusal = match peer::local_peer_uid(peer, server) {
        Some(uid) if access.admits_uid(uid) => return http::Caller::Admitted,
        Some(uid) => format!("user {uid} is not allowed to manage VMs"),
        None => "the connecting user cannot be determined".to_owned(),
    };
    access.refused(peer, &refusal);
    http::Caller::Refused(refusal)
}
