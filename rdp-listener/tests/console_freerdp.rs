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

fn run(mode: &str) {
    for tool in ["xfreerdp", "Xvfb", "xdotool"] {
        if !have(tool) {
            eprintln!("skipped: {tool} is not installed (scripts/test.sh installs it)");
            return;
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
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
    let address = runtime.block_on(async {
        fake_serial(&serial, Arc::clone(&typed)).await;
        let listener = Listener::bind(ListenerConfig {
            address: "127.0.0.1:0".parse().expect("address"),
            ..ListenerConfig::default()
        })
        .await
        .expect("bind");
        let address = listener.local_address().expect("address");
        tokio::spawn(listener.run(Arc::new(One(vm, console.clone())), std::future::pending()));
        address
    });
    let (_x, display) = xvfb();
    let title = format!("console-{mode}");
    let target = match mode {
        "vmconnect" => format!("/vmconnect:{vm}"),
        _ => format!("/pcb:{vm}"),
    };
    let client_log = dir.path().join("xfreerdp.log");
    let _client = Killed(
        Command::new("xfreerdp")
            .env("DISPLAY", &display)
            .args([
                // FreeRDP 2's /vmconnect forces port 2179 over /v:HOST:PORT; /port: wins.
                "/v:127.0.0.1",
                &format!("/port:{}", address.port()),
                &target,
                "/cert:ignore",
                "/u:tester",
                &format!("/p:{password}"),
                &format!("/t:{title}"),
            ])
            .stdout(std::fs::File::create(&client_log).expect("client log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("xfreerdp"),
    );
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

    for args in [
        vec!["windowfocus", "--sync", window.as_str()],
        vec!["type", "--delay", "50", "hello rdp"],
        vec!["key", "Return"],
    ] {
        let status = Command::new("xdotool")
            .env("DISPLAY", &display)
            .args(&args)
            .status()
            .expect("xdotool");
        assert!(status.success(), "xdotool {args:?}");
    }

    wait(&client_log, "the keys on COM1", || {
        typed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .ends_with(b"hello rdp\r")
    });
    wait(&client_log, "the answer on the console screen", || {
        console.text().contains("answer: HELLO RDP")
    });
}

#[test]
fn freerdp_vmconnect_reaches_the_console_and_types_into_com1() {
    run("vmconnect");
}

#[test]
fn freerdp_pcb_with_standard_negotiation_reaches_the_console() {
    run("pcb");
}
