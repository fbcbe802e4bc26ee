//! The daemon's CIM-XML endpoint: wmi-model's provider over the daemon's service, on its own
//! tokio runtime beside the local socket. Both front ends map onto the same vmm-core service.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread;

use vmm_core::VirtualSystemManagementService;
use wmi_model::Provider;
use wmi_model::server::{self, Credentials, Endpoint, LocalAccess, ServerConfig, TlsFiles};

use crate::listener::AccessPolicy;

/// The Unix socket's policy, applied to loopback TCP clients by the user owning their socket.
#[derive(Debug)]
struct SocketPolicy(AccessPolicy);

impl LocalAccess for SocketPolicy {
    fn admits_uid(&self, uid: u32) -> bool {
        self.0.admits_user(uid)
    }

    fn refused(&self, peer: SocketAddr, reason: &str) {
        log!("vmms: CIM-XML connection from {peer} refused: {reason}");
    }
}

/// `vmms serve`'s CIM-XML flags.
#[derive(Debug, Clone, clap::Args)]
pub struct CimArgs {
    /// Address of the CIM-XML endpoint (`POST /cimom`). Default 127.0.0.1:5988, where a busy
    /// port only disables the endpoint; an address given here must be free. Any address other
    /// than 127.0.0.1 or ::1 needs --cim-cert, --cim-key and --cim-credentials.
    #[arg(long)]
    pub cim_listen: Option<SocketAddr>,
    /// PEM certificate chain for HTTPS.
    #[arg(long, requires = "cim_key")]
    pub cim_cert: Option<PathBuf>,
    /// PEM private key for HTTPS.
    #[arg(long, requires = "cim_cert")]
    pub cim_key: Option<PathBuf>,
    /// File holding `user:password`, the account CIM clients must present (HTTP Basic).
    #[arg(long)]
    pub cim_credentials: Option<PathBuf>,
    /// Do not serve CIM-XML at all.
    #[arg(long, conflicts_with_all = ["cim_listen", "cim_cert", "cim_key", "cim_credentials"])]
    pub no_cim: bool,
}

/// Starts the endpoint (unless `--no-cim`) and the indication delivery; returns once it
/// listens, or with why it cannot. Without `--cim-credentials`, a loopback client must be a
/// user `policy` admits (the daemon socket's rule), found by the owner of its TCP socket.
pub fn start(
    vmms: &VirtualSystemManagementService,
    args: &CimArgs,
    policy: AccessPolicy,
    console: Option<wmi_model::model::ConsoleGeometry>,
) -> Result<(), String> {
    if args.no_cim {
        return Ok(());
    }
    let credentials =
        match &args.cim_credentials {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                Some(Credentials::parse(&text).ok_or_else(|| {
                    format!("{} does not hold a user:password line", path.display())
                })?)
            }
            None => None,
        };
    let config = ServerConfig {
        listen: args.cim_listen.unwrap_or(server::DEFAULT_LISTEN),
        tls: args
            .cim_cert
            .clone()
            .zip(args.cim_key.clone())
            .map(|(cert, key)| TlsFiles { cert, key }),
        credentials,
        local_access: Some(Arc::new(SocketPolicy(policy))),
        ..ServerConfig::default()
    };
    let explicit = args.cim_listen.is_some();
    let scheme = if config.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let mut provider = Provider::new(vmms.clone(), wmi_model::local_host_name());
    if let Some(switches) = crate::switch::shared() {
        provider = provider.with_network(switches);
    }
    if let Some(geometry) = console {
        provider = provider.with_console(geometry);
    }
    let provider = Arc::new(provider);
    let (ready_tx, ready_rx) = mpsc::channel();
    thread::Builder::new()
        .name("cim".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("cim-io")
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("cannot start the CIM runtime: {e}")));
                    return;
                }
            };
            runtime.block_on(async move {
                let endpoint = match Endpoint::bind(Arc::clone(&provider), config).await {
                    Ok(endpoint) => endpoint,
                    Err(e) => {
                        let _ = ready_tx.send(Err(vmm_core::error_chain(&e)));
                        return;
                    }
                };
                let address = endpoint.local_addr().map_err(|e| e.to_string());
                let delivery =
                    server::spawn_indication_delivery(provider, tokio::runtime::Handle::current())
                        .map_err(|e| format!("cannot start indication delivery: {e}"));
                let _ = ready_tx.send(address.and_then(|a| delivery.map(|()| a)));
                endpoint.run().await;
            });
        })
        .map_err(|e| format!("cannot start the CIM thread: {e}"))?;
    match ready_rx.recv() {
        Ok(Ok(address)) => {
            log!("vmms: CIM-XML on {scheme}://{address}/cimom");
            Ok(())
        }
        Ok(Err(reason)) if !explicit => {
            log!("vmms: CIM-XML endpoint disabled: {reason}");
            Ok(())
        }
        Ok(Err(reason)) => Err(format!("CIM-XML endpoint: {reason}")),
        Err(_) => Err("the CIM thread ended before listening".into()),
    }
}
