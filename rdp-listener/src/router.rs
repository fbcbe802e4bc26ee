//! The single-port listener: accept on 2179, read the pre-connection PDU within a deadline,
//! resolve the VM through the [`ConsoleRegistry`], and hand the connection — every byte after the
//! PDU untouched — to that VM's console.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::timeout;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::limits::ConnectionCounts;
use crate::pcb::{ConsoleTarget, PcbError, PreconnectionPdu};
use crate::registry::{ConsoleRegistry, Route, RouteRequest, Session};
use crate::splice::splice;
use crate::stream::PrefixedStream;

/// Hyper-V's VMConnect port.
pub const DEFAULT_PORT: u16 = 2179;
/// The first byte of a TPKT header: a client that sent X.224 without a PCB.
const TPKT_VERSION: u8 = 3;

/// How the listener behaves.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Where to listen (default `127.0.0.1:2179`).
    pub address: SocketAddr,
    /// Allow an address other than loopback: the daemon must opt in explicitly.
    pub allow_remote: bool,
    /// A client must have sent its whole PCB this long after the TCP accept (MS-RDPEPS: ~10 s).
    pub pcb_deadline: Duration,
    /// A routed connection on which nothing moved this long is closed; a console session
    /// (in-process server) is closed when its client sent nothing this long.
    pub idle_timeout: Duration,
    /// Connections open at once, all VMs together (including ones still sending their PCB).
    pub max_connections: usize,
    /// Console sessions open at once on one VM.
    pub max_per_vm: usize,
    /// Where a connection that starts with TPKT (no PCB) goes; refused when `None`.
    pub default_vm: Option<Uuid>,
    /// On shutdown, how long sessions get to end before they are cut.
    pub shutdown_grace: Duration,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            address: SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)),
            allow_remote: false,
            pcb_deadline: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
            max_connections: 64,
            max_per_vm: 8,
            default_vm: None,
            shutdown_grace: Duration::from_secs(2),
        }
    }
}

/// What stops the listener from starting.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// A non-loopback address without `allow_remote`.
    #[error("refusing to listen on non-loopback {0} without explicit opt-in")]
    RemoteNotAllowed(SocketAddr),
    /// The bind failed.
    #[error("cannot listen on {address}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Why one connection was not routed (logged, then the connection is closed).
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("no complete pre-connection pdu within the deadline")]
    PcbDeadline,
    #[error("client closed before its pre-connection pdu was complete")]
    PcbEof,
    #[error("reading the pre-connection pdu")]
    Read(#[source] std::io::Error),
    #[error("bad pre-connection pdu")]
    Pcb(#[source] PcbError),
    #[error("pre-connection pdu names no vm")]
    NoTarget,
    #[error(transparent)]
    Target(#[from] crate::pcb::BadTarget),
    #[error("plain rdp without pre-connection pdu and no default vm")]
    NoDefaultVm,
    #[error("refused")]
    Refused(#[source] crate::registry::Refusal),
    #[error("vm {0} already has its maximum of console sessions")]
    VmLimit(Uuid),
    #[error("cannot reach the console backend {address}")]
    Backend {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A bound, not yet running, listener.
#[derive(Debug)]
pub struct Listener {
    socket: TcpListener,
    config: ListenerConfig,
    counts: ConnectionCounts,
}

impl Listener {
    /// Binds `config.address`, refusing a non-loopback address unless `allow_remote`.
    pub async fn bind(config: ListenerConfig) -> Result<Listener, ListenerError> {
        if !config.address.ip().is_loopback() && !config.allow_remote {
            return Err(ListenerError::RemoteNotAllowed(config.address));
        }
        let socket =
            TcpListener::bind(config.address)
                .await
                .map_err(|source| ListenerError::Bind {
                    address: config.address,
                    source,
                })?;
        Ok(Listener {
            socket,
            config,
            counts: ConnectionCounts::default(),
        })
    }

    /// The address actually bound (port 0 resolved).
    pub fn local_address(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Live connection counts (shared: keep a clone to report them while the listener runs).
    pub fn counts(&self) -> ConnectionCounts {
        self.counts.clone()
    }

    /// Accepts and routes until `shutdown` completes; then stops accepting, asks every session
    /// to end, waits up to the grace period and cuts what is left.
    pub async fn run<R, F>(self, registry: Arc<R>, shutdown: F)
    where
        R: ConsoleRegistry + ?Sized,
        F: Future<Output = ()>,
    {
        let Listener {
            socket,
            config,
            counts,
        } = self;
        let config = Arc::new(config);
        let (closing_tx, closing) = watch::channel(false);
        let mut sessions = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = socket.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            warn!(%error, "rdp listener: accept failed");
                            // EMFILE and friends: back off instead of spinning.
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let Some(slot) = counts.admit(config.max_connections) else {
                        warn!(%peer, "rdp listener: connection refused: total limit reached");
                        drop(stream);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let registry = Arc::clone(&registry);
                    let config = Arc::clone(&config);
                    let counts = counts.clone();
                    let closing = closing.clone();
                    sessions.spawn(async move {
                        let _slot = slot;
                        if let Err(error) =
                            connection(stream, peer, &*registry, &config, &counts, closing).await
                        {
                            info!(%peer, error = %error_chain(&error), "rdp listener: connection closed");
                        }
                    });
                }
                Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            }
        }
        drop(socket);
        let open_at_shutdown = sessions.len();
        let _ = closing_tx.send(true);
        let drained = timeout(config.shutdown_grace, async {
            while sessions.join_next().await.is_some() {}
        })
        .await;
        let cut = sessions.len();
        if drained.is_err() {
            debug!(left = cut, "rdp listener: cutting sessions after grace");
            sessions.shutdown().await;
        }
        info!(
            sessions = open_at_shutdown,
            cut, "rdp listener: stopped; port released, sessions closed"
        );
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// One client: PCB, route, hand-off.
async fn connection<R: ConsoleRegistry + ?Sized>(
    mut stream: TcpStream,
    peer: SocketAddr,
    registry: &R,
    config: &ListenerConfig,
    counts: &ConnectionCounts,
    closing: watch::Receiver<bool>,
) -> Result<(), ConnectionError> {
    let (pcb, target, rest) = match timeout(config.pcb_deadline, read_pcb(&mut stream)).await {
        Err(_) => return Err(ConnectionError::PcbDeadline),
        Ok(Err(error)) => return Err(error),
        Ok(Ok(Preamble::Pcb { raw, target, rest })) => (Some(raw), target, rest),
        Ok(Ok(Preamble::Tpkt(first))) => {
            let vm = config.default_vm.ok_or(ConnectionError::NoDefaultVm)?;
            let target = ConsoleTarget {
                vm,
                options: Vec::new(),
            };
            (None, target, first)
        }
    };
    let request = RouteRequest {
        target: &target,
        peer,
        pcb: pcb.as_deref(),
    };
    let route = registry.route(&request).map_err(ConnectionError::Refused)?;
    let _vm_slot = counts
        .admit_vm(target.vm, config.max_per_vm)
        .ok_or(ConnectionError::VmLimit(target.vm))?;
    info!(%peer, vm = %target.vm, ?route, "rdp listener: console connection routed");
    match route {
        Route::Tcp {
            address,
            forward_pcb,
        } => {
            let mut backend = TcpStream::connect(address)
                .await
                .map_err(|source| ConnectionError::Backend { address, source })?;
            let _ = backend.set_nodelay(true);
            let mut head = Vec::new();
            if forward_pcb && let Some(raw) = &pcb {
                head.extend_from_slice(raw);
            }
            head.extend_from_slice(&rest);
            if !head.is_empty() {
                backend
                    .write_all(&head)
                    .await
                    .map_err(|source| ConnectionError::Backend { address, source })?;
            }
            let (end, totals) = splice(stream, backend, config.idle_timeout, closing).await;
            debug!(%peer, ?end, ?totals, "rdp listener: splice ended");
        }
        Route::Local(server) => {
            // The server watches `closing` and ends the session itself (the listener cuts it
            // after its shutdown grace), and closes it when the client is idle too long.
            let session = Session {
                vm: target.vm,
                target,
                peer,
                stream: PrefixedStream::new(rest, stream),
                closing,
                idle_timeout: config.idle_timeout,
            };
            server.serve(session).await;
        }
    }
    Ok(())
}

/// What a client opened with.
enum Preamble {
    /// A pre-connection PDU: its raw bytes, its target, and whatever followed it in the reads.
    Pcb {
        raw: Vec<u8>,
        target: ConsoleTarget,
        rest: Vec<u8>,
    },
    /// Plain RDP: the bytes read so far (starting with the TPKT header).
    Tpkt(Vec<u8>),
}

/// Reads until the PCB is complete (or the connection shows it has none).
async fn read_pcb(stream: &mut TcpStream) -> Result<Preamble, ConnectionError> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(ConnectionError::Read)?;
        if n == 0 {
            return Err(ConnectionError::PcbEof);
        }
        buf.extend_from_slice(&chunk[..n]);
        // TPKT is `03 00 len_hi len_lo`; a PCB whose cbSize starts `03 00` would be 3 or over
        // 64 KiB, neither valid, so two bytes tell them apart.
        match buf.as_slice() {
            [TPKT_VERSION] => continue,
            [TPKT_VERSION, 0, ..] => return Ok(Preamble::Tpkt(buf)),
            _ => {}
        }
        match PreconnectionPdu::decode(&buf) {
            Err(PcbError::Incomplete { .. }) => continue,
            Err(error) => return Err(ConnectionError::Pcb(error)),
            Ok((pdu, rest)) => {
                let rest = rest.to_vec();
                buf.truncate(pdu.size);
                let blob = pdu.blob.ok_or(ConnectionError::NoTarget)?;
                let target = ConsoleTarget::parse(&blob)?;
                return Ok(Preamble::Pcb {
                    raw: buf,
                    target,
                    rest,
                });
            }
        }
    }
}
