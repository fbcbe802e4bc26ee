//! The console server with the real client and no VM: FreeRDP (`/vmconnect` and `/pcb`) in a
//! virtual X server through the listener, onto a VmConsole whose "COM1" is a test socket that
//! answers each line like a shell. Skips (with the reason) where xfreerdp, Xvfb or xdotool are
//! missing; scripts/test.sh installs them.
#![cfg(feature = "console")]

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdp_listener::console::{ConsoleCredentials, ConsoleSettings, TlsIdentity, VmConsole};
use rdp_listener::{ConsoleRegistry, Listener, ListenerConfig, Refusal, Route, RouteRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(90);

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn xvfb() -> (Killed, String) {
    let mut server = Command::new("Xvfb")
        .args([
            "-displayfd",
            "1",
            "-screen",
            "0",
            "1280x800x24",
            "-nolisten",
            "tcp",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start Xvfb");
    let mut stdout = server.stdout.take().expect("stdout");
    let mut number = String::new();
    let mut byte = [0u8; 1];
    while stdout.read(&mut byte).is_ok_and(|n| n == 1) && byte[0] != b'\n' {
        number.push(char::from(byte[0]));
    }
    (Killed(server), format!(":{}", number.trim()))
}

/// A "COM1": prints a banner and a prompt, echoes what is typed, answers each line.
async fn fake_serial(path: &Path, typed: Arc<Mutex<Vec<u8>>>) {
    let socket = tokio::net::UnixListener::bind(path).expect("bind serial");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = socket.accept().await {
            let typed = Arc::clone(&typed);
            tokio::spawn(async move {
                let _ = stream.write_all(b"fake guest ready\r\n$ ").await;
                let mut line = Vec::new();
                let mut buf = [0u8; 256];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    typed
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .extend_from_slice(&buf[..n]);
                    for &b in &buf[..n] {
                        if b == b'\r' {
                            let text = String::from_utf8_lossy(&line).to_string();
                            let answer = format!("\r\nanswer: {}\r\n$ ", text.to_uppercase());
                            let _ = stream.write_all(answer.as_bytes()).await;
                            line.clear();
                        } else {
                            line.push(b);
                            let _ = stream.write_all(&[b]).await;
                        }
                    }
                }
            });
        }
    });
}

struct One(Uuid, VmConsole);

impl ConsoleRegistry for One {
    fn route(&self, request: &RouteRequest<'_>) -> Result<Route, Refusal> {
        if request.target.vm != self.0 {
            return Err(Refusal::UnknownVm(request.target.vm));
        }
        Ok(Route::Local(Arc::new(self.1.clone())))
    }
}

fn wait(log: &Path, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}; xfreerdp said:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tools_present() -> bool {
    for tool in ["xfreerdp", "Xvfb", "xdotool"] {
        if !have(tool) {
            eprintln!("skipped: {tool} is not installed (scripts/test.sh installs it)");
            return false;
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    true
}

/// A listener in front of one VmConsole over a fake COM1, a virtual X server and xfreerdp
/// connected to the console.
struct Session {
    _runtime: tokio::runtime::Runtime,
    console: VmConsole,
    address: std::net::SocketAddr,
    typed: Arc<Mutex<Vec<u8>>>,
    /// Stops the listener; `stopped` reports when its `run` returned.
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    stopped: std::sync::mpsc::Receiver<()>,
    display: String,
    window: String,
    client: Killed,
    client_log: std::path::PathBuf,
    _x: Killed,
    _dir: tempfile::TempDir,
}

impl Session {
    /// Connects xfreerdp in `mode` (`vmconnect` or `pcb`), the password on its standard input
    /// as `vmms connect-vm --launch` gives it, and waits for the console's banner.
    fn connect(mode: &str, config: ListenerConfig) -> Session {
        let dir = tempfile::tempdir().expect("tempdir");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let vm = Uuid::new_v4();
        let typed = Arc::new(Mutex::new(Vec::new()));
        let serial = dir.path().join("console.sock");
        let password = format!("pw-{}", std::process::id());
        let identity = TlsIdentity::load_or_create(dir.path(), "localhost").expect("identity");
        let settings = ConsoleSettings::new(
            ConsoleCredentials {
                username: "tester".into(),
                password: password.clone(),
                domain: None,
            },
            identity,
        )
        .expect("settings");
        let console = VmConsole::new(vm, serial.clone(), Arc::new(settings));
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (stopped_tx, stopped) = std::sync::mpsc::channel();
        let address = runtime.block_on(async {
            fake_serial(&serial, Arc::clone(&typed)).await;
            let listener = Listener::bind(ListenerConfig {
                address: "127.0.0.1:0".parse().expect("address"),
                ..config
            })
            .await
            .expect("bind");
            let address = listener.local_address().expect("address");
            let registry = Arc::new(One(vm, console.clone()));
            tokio::spawn(async move {
                listener
                    .run(registry, async {
                        let _ = stop_rx.await;
                    })
                    .await;
                let _ = stopped_tx.send(());
            });
            address
        });
        let (x, display) = xvfb();
        let title = format!("console-{mode}");
        let target = match mode {
            "vmconnect" => format!("/vmconnect:{vm}"),
            _ => format!("/pcb:{vm}"),
        };
        let client_log = dir.path().join("xfreerdp.log");
        let mut child = Command::new("xfreerdp")
            .env("DISPLAY", &display)
            .args([
                // FreeRDP 2's /vmconnect forces port 2179 over /v:HOST:PORT; /port: wins.
                "/v:127.0.0.1",
                &format!("/port:{}", address.port()),
                &target,
                "/cert:ignore",
                "/u:tester",
                // The password on standard input, never in argv.
                "/from-stdin:force",
                &format!("/t:{title}"),
            ])
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&client_log).expect("client log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("xfreerdp");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("xfreerdp stdin");
            stdin
                .write_all(format!("{password}\n").as_bytes())
                .expect("password to xfreerdp");
        }
        let client = Killed(child);
        let mut window = String::new();
        wait(&client_log, "the xfreerdp window", || {
            let out = Command::new("xdotool")
                .env("DISPLAY", &display)
                .args(["search", "--name", &title])
                .output()
                .expect("xdotool");
            window = String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned();
            !window.is_empty() && console.clients() == 1
        });
        wait(&client_log, "the banner on the console", || {
            console.text().contains("fake guest ready")
        });
        Session {
            _runtime: runtime,
            console,
            address,
            typed,
            stop: Some(stop),
            stopped,
            display,
            window,
            client,
            client_log,
            _x: x,
            _dir: dir,
        }
    }

    fn type_hello(&self) {
        for args in [
            vec!["windowfocus", "--sync", self.window.as_str()],
            vec!["type", "--delay", "50", "hello rdp"],
            vec!["key", "Return"],
        ] {
            let status = Command::new("xdotool")
                .env("DISPLAY", &self.display)
                .args(&args)
                .status()
                .expect("xdotool");
            assert!(status.success(), "xdotool {args:?}");
        }
    }

    /// Waits until xfreerdp has exited (the server closed the session).
    fn client_exits(&mut self, within: Duration) -> Duration {
        let start = Instant::now();
        while self.client.0.try_wait().expect("poll xfreerdp").is_none() {
            assert!(
                start.elapsed() < within,
                "xfreerdp still connected after {within:?}; it said:\n{}",
                std::fs::read_to_string(&self.client_log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        start.elapsed()
    }
}

fn run(mode: &str) {
    if !tools_present() {
        return;
    }
    let session = Session::connect(mode, ListenerConfig::default());

    session.type_hello();

    wait(&session.client_log, "the keys on COM1", || {
        session
            .typed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .ends_with(b"hello rdp\r")
    });
    wait(
        &session.client_log,
        "the answer on the console screen",
        || session.console.text().contains("answer: HELLO RDP"),
    );
}

#[test]
fn idle_freerdp_client_is_disconnected_at_the_idle_timeout() {
    if !tools_present() {
        return;
    }
    let idle = Duration::from_secs(6);
    let mut session = Session::connect(
        "vmconnect",
        ListenerConfig {
            idle_timeout: idle,
            ..ListenerConfig::default()
        },
    );
    // Typing is activity: the session outlives a first idle period that has keys in it.
    std::thread::sleep(idle / 2);
    session.type_hello();
    wait(&session.client_log, "the keys on COM1", || {
        session
            .typed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .ends_with(b"hello rdp\r")
    });
    let typed_at = Instant::now();

    // Then silence: the server closes the session about `idle` after the last key.
    session.client_exits(idle * 4);

    let after = typed_at.elapsed();
    assert!(
        after >= idle - Duration::from_secs(1),
        "closed after {after:?}"
    );
    wait(
        &session.client_log,
        "the console to count no client",
        || session.console.clients() == 0,
    );
}

#[test]
fn listener_shutdown_ends_a_live_console_session_and_releases_the_port() {
    if !tools_present() {
        return;
    }
    let mut session = Session::connect("vmconnect", ListenerConfig::default());
    let grace = ListenerConfig::default().shutdown_grace;

    let _ = session.stop.take().expect("stop").send(());
    session
        .stopped
        .recv_timeout(grace + Duration::from_secs(10))
        .expect("the listener's run returned");

    // The port is free at once (the process still runs), the client saw the session end and
    // the console counts no client.
    std::net::TcpListener::bind(session.address).expect("the listener's port is released");
    session.client_exits(DEADLINE);
    assert_eq!(session.console.clients(), 0);
}

#[test]
fn freerdp_vmconnect_reaches_the_console_and_types_into_com1() {
    run("vmconnect");
}

#[test]
fn freerdp_pcb_with_standard_negotiation_reaches_the_console() {
    run("pcb");
}
