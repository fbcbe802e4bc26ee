//! The daemon's single-port RDP listener (Hyper-V's port 2179): rdp-listener's router with a
//! registry over the daemon's vmm-core service, and each running VM's COM1 as an RDP console.
//!
//! The listener writes `<store>/rdp-listener.json` (its address and the console user) so that
//! `vmms connect-vm` can build the client's command line; the password stays in
//! `<store>/rdp-credentials` (0600), which `--rdp-credentials` replaces with a file of the
//! operator's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::Duration;

use rdp_listener::console::{ConsoleCredentials, ConsoleSettings, TlsIdentity, VmConsole, screen};
use rdp_listener::{
    ConnectionCounts, ConsoleRegistry, Listener, ListenerConfig, Refusal, Route, RouteRequest,
};
use vmm_core::{EnabledState, VirtualSystemManagementService, VmId};
use worker_manager::StoreLayout;

/// Where the listener tells clients how to reach it.
pub const INFO_FILE: &str = "rdp-listener.json";
/// The console account made for a store without `--rdp-credentials`.
pub const CREDENTIALS_FILE: &str = "rdp-credentials";

/// `vmms serve`'s RDP flags.
#[derive(Debug, Clone, clap::Args)]
pub struct RdpArgs {
    /// Address of the VM console listener (VMConnect's port). Default 127.0.0.1:2179, where a
    /// busy port only disables the listener; an address given here must be free. Loopback only
    /// unless --rdp-allow-remote.
    #[arg(long)]
    pub rdp_listen: Option<SocketAddr>,
    /// Allow --rdp-listen on an address other than loopback.
    #[arg(long)]
    pub rdp_allow_remote: bool,
    /// File holding `user:password`, the account RDP clients must present (NLA). Default: an
    /// account made once in the store.
    #[arg(long)]
    pub rdp_credentials: Option<PathBuf>,
    /// Where a client without pre-connection PDU (plain RDP) goes: a VM's GUID.
    #[arg(long)]
    pub rdp_default_vm: Option<VmId>,
    /// Console sessions per VM.
    #[arg(long, default_value_t = 8)]
    pub rdp_max_per_vm: usize,
    /// Console connections in total.
    #[arg(long, default_value_t = 64)]
    pub rdp_max_connections: usize,
    /// Seconds a console client may send nothing (no key, no mouse, no protocol traffic)
    /// before its session is closed.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    pub rdp_idle_timeout: u64,
    /// Do not serve VM consoles over RDP.
    #[arg(long, conflicts_with_all = ["rdp_listen", "rdp_credentials", "rdp_default_vm"])]
    pub no_rdp: bool,
}

/// What `connect-vm` reads: where the listener is and whom it expects.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ListenerInfo {
    /// The bound address.
    pub address: SocketAddr,
    /// The console user.
    pub username: String,
    /// The file with the password.
    pub credentials: PathBuf,
}

/// Console sessions per VM, for `get-vm`, and the way to stop the listener (both empty when
/// the listener is off).
#[derive(Debug, Clone, Default)]
pub struct Consoles {
    counts: Option<ConnectionCounts>,
    stop: Option<Arc<Stop>>,
}

/// The listener's off switch and the sign that it finished.
#[derive(Debug)]
struct Stop {
    trigger: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    done: Mutex<std::sync::mpsc::Receiver<()>>,
}

/// How long the daemon's exit waits for the listener: its sessions' grace and a margin.
const STOP_WAIT: Duration = Duration::from_secs(5);

impl Consoles {
    /// Console clients connected to `vm` now.
    pub fn clients(&self, vm: VmId) -> usize {
        self.counts.as_ref().map_or(0, |c| c.for_vm(*vm.as_uuid()))
    }

    /// The framebuffer every console draws, for the WMI provider's video classes (`None` when
    /// the listener is off: no VM has a display then).
    pub fn geometry(&self) -> Option<wmi_model::model::ConsoleGeometry> {
        self.counts.as_ref()?;
        let bits = u32::try_from(screen::BYTES_PER_PIXEL * 8).unwrap_or(u32::MAX);
        Some(wmi_model::model::ConsoleGeometry {
            width: screen::width().into(),
            height: screen::height().into(),
            bits_per_pixel: bits,
            columns: screen::COLUMNS.into(),
            rows: screen::ROWS.into(),
        })
    }

    /// Stops the listener as the daemon exits: no new connection, every console session asked
    /// to end (cut after the grace), the port released; returns once it has (or after
    /// [`STOP_WAIT`]). Only the first call does anything.
    pub fn shutdown(&self) {
        let Some(stop) = &self.stop else {
            return;
        };
        let trigger = stop
            .trigger
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(trigger) = trigger else {
            return;
        };
        let _ = trigger.send(());
        let done = stop.done.lock().unwrap_or_else(PoisonError::into_inner);
        match done.recv_timeout(STOP_WAIT) {
            Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                log!("vmms: RDP listener stopped");
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                log!("vmms: RDP listener did not stop within {STOP_WAIT:?}");
            }
        }
    }
}

/// The registry: running VMs of the service, each with its console.
struct VmRegistry {
    vmms: VirtualSystemManagementService,
    layout: StoreLayout,
    settings: Arc<ConsoleSettings>,
    consoles: Mutex<HashMap<VmId, VmConsole>>,
}

impl ConsoleRegistry for VmRegistry {
    fn route(&self, request: &RouteRequest<'_>) -> Result<Route, Refusal> {
        let uuid = request.target.vm;
        let vm = VmId::from_uuid(uuid);
        let system = self.vmms.get_vm(vm).map_err(|_| Refusal::UnknownVm(uuid))?;
        let live = matches!(
            system.enabled_state,
            EnabledState::Running | EnabledState::Paused
        );
        if !live || system.process_id.is_none() {
            return Err(Refusal::NotRunning(uuid));
        }
        if request.target.enhanced_mode() == Some(true) {
            return Err(Refusal::Unsupported {
                vm: uuid,
                reason:
                    "enhanced session (RDP into the guest) is not offered; connect in basic mode"
                        .into(),
            });
        }
        let mut consoles = self.consoles.lock().unwrap_or_else(PoisonError::into_inner);
        consoles.retain(|_, console| !console.is_ended() || console.clients() > 0);
        let console = consoles.entry(vm).or_insert_with(|| {
            VmConsole::new(
                uuid,
                self.layout.runtime(vm).console_socket(),
                Arc::clone(&self.settings),
            )
        });
        Ok(Route::Local(Arc::new(console.clone())))
    }
}

/// Starts the listener (unless `--no-rdp`); returns once it listens, or with why it cannot.
pub fn start(
    vmms: &VirtualSystemManagementService,
    store: &Path,
    args: &RdpArgs,
) -> Result<Consoles, String> {
    if args.no_rdp {
        return Ok(Consoles::default());
    }
    // The listener and console log through `tracing`: why a connection was refused or ended
    // goes to the daemon's stderr (`VMMS_RDP_LOG` filters, default info).
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMMS_RDP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("rdp_listener=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    let credentials = credentials(store, args.rdp_credentials.as_deref())?;
    let host = wmi_model::local_host_name();
    let identity = TlsIdentity::load_or_create(store, &host)
        .map_err(|e| format!("rdp console certificate: {}", vmm_core::error_chain(&e)))?;
    let username = credentials.username.clone();
    let settings = Arc::new(
        ConsoleSettings::new(credentials, identity)
            .map_err(|e| format!("rdp console tls: {}", vmm_core::error_chain(&e)))?,
    );
    let registry = Arc::new(VmRegistry {
        vmms: vmms.clone(),
        layout: StoreLayout::new(store),
        settings,
        consoles: Mutex::new(HashMap::new()),
    });
    let config = ListenerConfig {
        address: args.rdp_listen.unwrap_or(ListenerConfig::default().address),
        allow_remote: args.rdp_allow_remote,
        default_vm: args.rdp_default_vm.map(|vm| *vm.as_uuid()),
        max_per_vm: args.rdp_max_per_vm,
        max_connections: args.rdp_max_connections,
        idle_timeout: Duration::from_secs(args.rdp_idle_timeout),
        ..ListenerConfig::default()
    };
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (trigger, stopped) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done) = std::sync::mpsc::channel();
    thread::Builder::new()
        .name("rdp".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("rdp-io")
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("cannot start the RDP runtime: {e}")));
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match Listener::bind(config).await {
                    Ok(listener) => listener,
                    Err(e) => {
                        let _ = ready_tx.send(Err(vmm_core::error_chain(&e)));
                        return;
                    }
                };
                let ready = listener
                    .local_address()
                    .map(|a| (a, listener.counts()))
                    .map_err(|e| e.to_string());
                let _ = ready_tx.send(ready);
                // Until the daemon exits (Consoles::shutdown); a dropped trigger (the daemon
                // failed to start) stops it too.
                listener
                    .run(registry, async {
                        let _ = stopped.await;
                    })
                    .await;
            });
            let _ = done_tx.send(());
        })
        .map_err(|e| format!("cannot start the RDP thread: {e}"))?;
    let (address, counts) = match ready_rx.recv() {
        Ok(Ok(ready)) => ready,
        Ok(Err(reason)) if args.rdp_listen.is_none() => {
            drop(trigger);
            log!("vmms: RDP listener disabled: {reason}");
            let _ = std::fs::remove_file(store.join(INFO_FILE));
            return Ok(Consoles::default());
        }
        Ok(Err(reason)) => return Err(format!("RDP listener: {reason}")),
        Err(_) => return Err("the RDP thread ended before listening".into()),
    };
    let info = ListenerInfo {
        address,
        username,
        credentials: args
            .rdp_credentials
            .clone()
            .unwrap_or_else(|| store.join(CREDENTIALS_FILE)),
    };
    let text = serde_json::to_vec_pretty(&info).map_err(|e| e.to_string())?;
    vmm_core::atomic_file::write_atomic(&store.join(INFO_FILE), &text)
        .map_err(|e| format!("cannot write {INFO_FILE}: {e}"))?;
    log!(
        "vmms: VM consoles over RDP on {address} (user '{}')",
        info.username
    );
    Ok(Consoles {
        counts: Some(counts),
        stop: Some(Arc::new(Stop {
            trigger: Mutex::new(Some(trigger)),
            done: Mutex::new(done),
        })),
    })
}

/// The console account: `--rdp-credentials`, or the store's own, made once with a random
/// password.
fn credentials(store: &Path, file: Option<&Path>) -> Result<ConsoleCredentials, String> {
    let path = file.map_or_else(|| store.join(CREDENTIALS_FILE), Path::to_owned);
    if file.is_none() && !path.exists() {
        let mut random = [0u8; 12];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut random))
            .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
        let password: String = random.iter().map(|b| format!("{b:02x}")).collect();
        vmm_core::atomic_file::write_atomic(&path, format!("vmms:{password}\n").as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_credentials(&text)
        .ok_or_else(|| format!("{} does not hold a user:password line", path.display()))
}

/// `user:password` (first line), with an optional `DOMAIN\` before the user.
pub fn parse_credentials(text: &str) -> Option<ConsoleCredentials> {
    let line = text.lines().next()?.trim_end();
    let (user, password) = line.split_once(':')?;
    if user.is_empty() || password.is_empty() {
        return None;
    }
    let (domain, username) = match user.split_once('\\') {
        Some((domain, user)) => (Some(domain.to_owned()), user.to_owned()),
        None => (None, user.to_owned()),
    };
    Some(ConsoleCredentials {
        username,
        password: password.to_owned(),
        domain,
    })
}
