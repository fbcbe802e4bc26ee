//! One VM's console: the COM1 feed shared by its clients, and an RDP session per client.

use std::num::{NonZeroU16, NonZeroUsize};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use ironrdp_server::{
    BitmapUpdate, Credentials, DesktopSize, DisplayUpdate, KeyboardEvent, MouseEvent, PixelFormat,
    RdpServer, RdpServerDisplay, RdpServerDisplayUpdates, RdpServerInputHandler, ServerEvent,
    TransportTls,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::idle::{Activity, ActivityStream};
use super::keys::KeyTranslator;
use super::screen::{self, BYTES_PER_PIXEL, Screen};
use super::vmconnect::VmConnectShim;
use super::{ConsoleCredentials, ConsoleError, TlsIdentity};
use crate::registry::{ConsoleServer, Session, SessionFuture};
use crate::stream::PrefixedStream;

/// First byte of a TLS handshake record: a `/vmconnect` client starts TLS right after the PCB.
const TLS_HANDSHAKE: u8 = 0x16;
/// Frames are sent at most this often; output in between is coalesced.
const FRAME_INTERVAL: Duration = Duration::from_millis(40);
/// A client must send its first byte after the PCB within this long.
const FIRST_BYTE_DEADLINE: Duration = Duration::from_secs(10);
/// How long a session asked to end (listener shutting down, client idle) gets to leave through
/// ironrdp-server's own way out before it is cut.
const QUIT_GRACE: Duration = Duration::from_secs(1);

/// What every console session shares: credentials and the TLS identity.
pub struct ConsoleSettings {
    credentials: ConsoleCredentials,
    identity: TlsIdentity,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for ConsoleSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleSettings")
            .field("credentials", &self.credentials)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl ConsoleSettings {
    /// Settings for consoles that accept `credentials` and present `identity`.
    pub fn new(
        credentials: ConsoleCredentials,
        identity: TlsIdentity,
    ) -> Result<ConsoleSettings, ConsoleError> {
        let acceptor = identity.acceptor()?;
        Ok(ConsoleSettings {
            credentials,
            identity,
            acceptor,
        })
    }
}

/// The COM1 feed while clients are attached.
#[derive(Debug)]
struct Feed {
    input: mpsc::UnboundedSender<Vec<u8>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct State {
    screen: Screen,
    feed: Option<Feed>,
}

#[derive(Debug)]
struct Inner {
    vm: Uuid,
    serial: PathBuf,
    settings: Arc<ConsoleSettings>,
    state: Mutex<State>,
    /// Bumped on every change of the screen.
    frames: watch::Sender<u64>,
    /// `true` once COM1 closed under an attached client: the VM stopped.
    ended: watch::Sender<bool>,
    clients: AtomicUsize,
}

/// One VM's console server (cheap to clone; clones share the screen and the feed).
#[derive(Debug, Clone)]
pub struct VmConsole {
    inner: Arc<Inner>,
}

impl VmConsole {
    /// The console of `vm`, whose COM1 is the worker's console socket at `serial`.
    pub fn new(vm: Uuid, serial: PathBuf, settings: Arc<ConsoleSettings>) -> VmConsole {
        VmConsole {
            inner: Arc::new(Inner {
                vm,
                serial,
                settings,
                state: Mutex::new(State {
                    screen: Screen::default(),
                    feed: None,
                }),
                frames: watch::channel(0).0,
                ended: watch::channel(false).0,
                clients: AtomicUsize::new(0),
            }),
        }
    }

    /// RDP clients connected now.
    pub fn clients(&self) -> usize {
        self.inner.clients.load(Ordering::SeqCst)
    }

    /// Whether COM1 closed (the VM stopped): a new console is needed for its next run.
    pub fn is_ended(&self) -> bool {
        *self.inner.ended.borrow()
    }

    /// The text on the console screen now.
    pub fn text(&self) -> String {
        lock(&self.inner.state).screen.text()
    }

    /// Counts a client and makes sure COM1 is being read; returns the way to type into it.
    fn attach(&self, runtime: &Handle) -> Result<Attached, ConsoleError> {
        let mut state = lock(&self.inner.state);
        let running = state.feed.as_ref().is_some_and(|f| !f.task.is_finished());
        if !running {
            let serial = std::os::unix::net::UnixStream::connect(&self.inner.serial)
                .and_then(|s| s.set_nonblocking(true).map(|()| s))
                .map_err(|source| ConsoleError::Serial {
                    path: self.inner.serial.clone(),
                    source,
                })?;
            // The worker replays its recent output on attach: start from a blank screen.
            state.screen = Screen::default();
            let (input, input_rx) = mpsc::unbounded_channel();
            let inner = Arc::clone(&self.inner);
            let task = runtime.spawn(feed(inner, serial, input_rx));
            state.feed = Some(Feed { input, task });
        }
        let input = state
            .feed
            .as_ref()
            .map(|f| f.input.clone())
            .ok_or_else(|| ConsoleError::Serial {
                path: self.inner.serial.clone(),
                source: std::io::ErrorKind::NotConnected.into(),
            })?;
        self.inner.clients.fetch_add(1, Ordering::SeqCst);
        Ok(Attached {
            console: self.clone(),
            input,
        })
    }

    fn detach(&self) {
        let mut state = lock(&self.inner.state);
        if self.inner.clients.fetch_sub(1, Ordering::SeqCst) == 1
            && let Some(feed) = state.feed.take()
        {
            // No client left: stop reading COM1 (the worker keeps its ring).
            feed.task.abort();
        }
    }

    fn rdp_server(&self, input: mpsc::UnboundedSender<Vec<u8>>) -> RdpServer {
        let settings = &self.inner.settings;
        let mut server = RdpServer::builder()
            .with_addr(([127, 0, 0, 1], 0))
            .with_hybrid(
                settings.acceptor.clone(),
                settings.identity.public_key().to_vec(),
            )
            .with_input_handler(ConsoleInput {
                keys: KeyTranslator::default(),
                input,
                scratch: Vec::new(),
            })
            .with_display_handler(ConsoleDisplay {
                inner: Arc::clone(&self.inner),
            })
            .build();
        server.set_credentials(Some(Credentials {
            username: settings.credentials.username.clone(),
            password: settings.credentials.password.clone(),
            domain: settings.credentials.domain.clone(),
        }));
        server
    }

    /// One client, on its own thread (ironrdp-server's session future is not `Send`).
    async fn session(
        self,
        prefix: Vec<u8>,
        tcp: std::net::TcpStream,
        runtime: Handle,
        mut closing: watch::Receiver<bool>,
        idle_timeout: Duration,
    ) -> Result<(), ConsoleError> {
        let attached = self.attach(&runtime)?;
        let tcp = TcpStream::from_std(tcp).map_err(ConsoleError::Session)?;
        let activity = Activity::new();
        let tcp = ActivityStream::new(tcp, activity.clone());
        let mut ended = self.inner.ended.subscribe();
        let vm = self.inner.vm;
        let mut server = self.rdp_server(attached.input.clone());
        let events = server.event_sender().clone();
        let run = async {
            let (first, stream) = first_byte(prefix, tcp).await?;
            if first == TLS_HANDSHAKE {
                debug!(%vm, "console: vmconnect order (tls first)");
                let tls = self.inner.settings.acceptor.accept(stream).await?;
                server
                    .run_connection_with(VmConnectShim::new(tls), TransportTls::AlreadyDone)
                    .await
                    .map_err(|e| std::io::Error::other(format!("{e:#}")))
            } else {
                debug!(%vm, "console: standard order (x.224 first)");
                server
                    .run_connection(stream)
                    .await
                    .map_err(|e| std::io::Error::other(format!("{e:#}")))
            }
        };
        tokio::pin!(run);
        let reason = tokio::select! {
            result = &mut run => {
                match result {
                    Ok(()) => info!(%vm, "console: client left"),
                    Err(error) => info!(%vm, error = format!("{error:#}"), "console: session ended"),
                }
                None
            }
            _ = ended.wait_for(|ended| *ended) => Some("vm stopped"),
            _ = closing.wait_for(|closing| *closing) => Some("listener shutting down"),
            () = activity.idle_for(idle_timeout) => Some("client idle"),
        };
        if let Some(reason) = reason {
            // ironrdp-server's own way out: its loop ends and the connection is closed (FIN),
            // rather than dropped mid-frame.
            let _ = events.send(ServerEvent::Quit(reason.to_owned()));
            let quit = tokio::time::timeout(QUIT_GRACE, &mut run).await.is_ok();
            info!(%vm, reason, ?idle_timeout, clean = quit, "console: session closed");
        }
        drop(attached);
        Ok(())
    }
}

impl ConsoleServer for VmConsole {
    fn serve(&self, session: Session) -> SessionFuture {
        let console = self.clone();
        let runtime = Handle::current();
        Box::pin(async move {
            let Session {
                vm,
                peer,
                stream,
                closing,
                idle_timeout,
                ..
            } = session;
            let (prefix, tcp) = stream.into_parts();
            let tcp = match tcp.into_std() {
                Ok(tcp) => tcp,
                Err(error) => {
                    warn!(%vm, %peer, %error, "console: cannot take over the connection");
                    return;
                }
            };
            let (done, finished) = oneshot::channel();
            let spawned = std::thread::Builder::new()
                .name(format!("console-{}", &vm.to_string()[..8]))
                .spawn(move || {
                    let result = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(ConsoleError::Session)
                        .and_then(|local| {
                            local.block_on(console.session(
                                prefix,
                                tcp,
                                runtime,
                                closing,
                                idle_timeout,
                            ))
                        });
                    let _ = done.send(result);
                });
            if let Err(error) = spawned {
                warn!(%vm, %error, "console: cannot start a session thread");
                return;
            }
            match finished.await {
                Ok(Ok(())) | Err(_) => {}
                Ok(Err(error)) => {
                    warn!(%vm, %peer, error = %error_chain(&error), "console: refused")
                }
            }
        })
    }
}

/// A client's hold on the console; detaches on drop.
struct Attached {
    console: VmConsole,
    input: mpsc::UnboundedSender<Vec<u8>>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.console.detach();
    }
}

/// The first byte the client sent after the PCB (it decides the byte order), with the stream
/// still holding it.
async fn first_byte<S: AsyncRead + Unpin>(
    prefix: Vec<u8>,
    mut tcp: S,
) -> std::io::Result<(u8, PrefixedStream<S>)> {
    if let Some(&first) = prefix.first() {
        return Ok((first, PrefixedStream::new(prefix, tcp)));
    }
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(FIRST_BYTE_DEADLINE, tcp.read(&mut byte))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok((byte[0], PrefixedStream::new(byte.to_vec(), tcp)))
}

/// Reads COM1 into the screen and writes the clients' keys to it, until the last client leaves
/// (the task is aborted) or the worker closes it (the VM stopped).
async fn feed(
    inner: Arc<Inner>,
    serial: std::os::unix::net::UnixStream,
    mut input: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    let serial = match UnixStream::from_std(serial) {
        Ok(serial) => serial,
        Err(error) => {
            warn!(vm = %inner.vm, %error, "console: serial socket");
            inner.ended.send_replace(true);
            return;
        }
    };
    let (mut rx, mut tx) = serial.into_split();
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            read = rx.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    lock(&inner.state).screen.process(&buf[..n]);
                    inner.frames.send_modify(|frame| *frame += 1);
                }
            },
            keys = input.recv() => match keys {
                Some(keys) => {
                    if tx.write_all(&keys).await.is_err() {
                        break;
                    }
                }
                None => return,
            },
        }
    }
    info!(vm = %inner.vm, "console: COM1 closed");
    inner.ended.send_replace(true);
}

struct ConsoleInput {
    keys: KeyTranslator,
    input: mpsc::UnboundedSender<Vec<u8>>,
    scratch: Vec<u8>,
}

impl RdpServerInputHandler for ConsoleInput {
    fn keyboard(&mut self, event: KeyboardEvent) {
        self.scratch.clear();
        match event {
            KeyboardEvent::Pressed { code, extended } => {
                self.keys.pressed(code, extended, &mut self.scratch);
            }
            KeyboardEvent::Released { code, extended } => self.keys.released(code, extended),
            KeyboardEvent::UnicodePressed(unit) => KeyTranslator::unicode(unit, &mut self.scratch),
            KeyboardEvent::UnicodeReleased(_) | KeyboardEvent::Synchronize(_) => {}
        }
        if !self.scratch.is_empty() {
            let _ = self.input.send(self.scratch.clone());
        }
    }

    fn mouse(&mut self, _event: MouseEvent) {}
}

struct ConsoleDisplay {
    inner: Arc<Inner>,
}

#[async_trait::async_trait]
impl RdpServerDisplay for ConsoleDisplay {
    async fn size(&mut self) -> DesktopSize {
        DesktopSize {
            width: screen::width(),
            height: screen::height(),
        }
    }

    async fn updates(&mut self) -> anyhow::Result<Box<dyn RdpServerDisplayUpdates>> {
        Ok(Box::new(ConsoleUpdates {
            frames: self.inner.frames.subscribe(),
            inner: Arc::clone(&self.inner),
            previous: Vec::new(),
            frame: Vec::new(),
            handed_over: None,
        }))
    }
}

/// Frames for one client: the rows of text cells that changed since its last frame.
struct ConsoleUpdates {
    inner: Arc<Inner>,
    frames: watch::Receiver<u64>,
    previous: Vec<u8>,
    frame: Vec<u8>,
    /// When the last update went to ironrdp-server, which encodes and sends it before it asks
    /// for the next: the time until then is the frame's encode-and-send cost (logged at debug).
    handed_over: Option<(std::time::Instant, usize)>,
}

#[async_trait::async_trait]
impl RdpServerDisplayUpdates for ConsoleUpdates {
    async fn next_update(&mut self) -> anyhow::Result<Option<DisplayUpdate>> {
        if let Some((at, rows)) = self.handed_over.take() {
            debug!(
                rows,
                micros = u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX),
                "console: frame encoded and sent"
            );
        }
        loop {
            if !self.previous.is_empty() {
                if self.frames.changed().await.is_err() {
                    return Ok(None);
                }
                tokio::time::sleep(FRAME_INTERVAL).await;
                self.frames.mark_unchanged();
            }
            lock(&self.inner.state).screen.render(&mut self.frame);
            let band = changed_band(&self.previous, &self.frame);
            std::mem::swap(&mut self.previous, &mut self.frame);
            if let Some(update) = band.and_then(|(top, bottom)| bitmap(&self.previous, top, bottom))
            {
                self.handed_over = Some((std::time::Instant::now(), update.height.get().into()));
                return Ok(Some(DisplayUpdate::Bitmap(update)));
            }
        }
    }
}

/// The pixel rows `[top, bottom)` covering the text rows that differ (all when `old` is empty).
fn changed_band(old: &[u8], new: &[u8]) -> Option<(usize, usize)> {
    let stride = usize::from(screen::width()) * BYTES_PER_PIXEL;
    let band = stride * screen::cell_height();
    if old.len() != new.len() {
        return Some((0, usize::from(screen::height())));
    }
    let rows: Vec<usize> = new
        .chunks(band)
        .zip(old.chunks(band))
        .enumerate()
        .filter(|(_, (n, o))| n != o)
        .map(|(row, _)| row)
        .collect();
    let (first, last) = (rows.first()?, rows.last()?);
    Some((
        first * screen::cell_height(),
        (last + 1) * screen::cell_height(),
    ))
}

fn bitmap(frame: &[u8], top: usize, bottom: usize) -> Option<BitmapUpdate> {
    let stride = usize::from(screen::width()) * BYTES_PER_PIXEL;
    let data = frame.get(top * stride..bottom * stride)?;
    Some(BitmapUpdate {
        x: 0,
        y: u16::try_from(top).ok()?,
        width: NonZeroU16::new(screen::width())?,
        height: NonZeroU16::new(u16::try_from(bottom - top).ok()?)?,
        format: PixelFormat::BgrX32,
        data: bytes::Bytes::copy_from_slice(data),
        stride: NonZeroUsize::new(stride)?,
    })
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
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
