//! VM consoles over RDP with the real client: the daemon's single-port listener, FreeRDP's
//! `/vmconnect:<GUID>` in a virtual X server, keys typed with xdotool, the window read back with
//! tesseract. Needs freerdp2-x11, xvfb, xdotool, imagemagick and tesseract-ocr (scripts/test.sh
//! installs them).

mod vmms_common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use vmms_common::{Daemon, Launch, TIMEOUT};

/// The programs this test drives.
const TOOLS: [&str; 6] = [
    "xfreerdp",
    "Xvfb",
    "xdotool",
    "import",
    "convert",
    "tesseract",
];

/// Connecting, CredSSP and the first frame on a loaded 2-core machine.
const SESSION_TIMEOUT: Duration = Duration::from_secs(90);

/// Waits up to [`SESSION_TIMEOUT`] for `done`.
fn wait_long(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + SESSION_TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        thread::sleep(Duration::from_millis(100));
    }
}

fn require_tools() {
    let missing: Vec<&str> = TOOLS
        .iter()
        .copied()
        .filter(|tool| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    assert!(
        missing.is_empty(),
        "missing {missing:?}: run scripts/test.sh's set-up (apt-get install freerdp2-x11 xvfb \
         xdotool imagemagick tesseract-ocr)"
    );
}

/// A free loopback port (bound, then released for the daemon).
fn free_port() -> u16 {
    let socket = std::net::TcpListener::bind("127.0.0.1:0").expect("bind :0");
    socket.local_addr().expect("address").port()
}

/// A child process killed (and reaped) on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A virtual X server on a display it picked itself.
struct Xvfb {
    _server: Killed,
    display: String,
}

impl Xvfb {
    fn start() -> Xvfb {
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
        let mut stdout = server.stdout.take().expect("Xvfb stdout");
        let mut number = String::new();
        let mut byte = [0u8; 1];
        while stdout.read(&mut byte).is_ok_and(|n| n == 1) && byte[0] != b'\n' {
            number.push(char::from(byte[0]));
        }
        assert!(!number.is_empty(), "Xvfb printed no display number");
        Xvfb {
            _server: Killed(server),
            display: format!(":{}", number.trim()),
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.env("DISPLAY", &self.display);
        command
    }

    /// The id of the window titled `title`, once it exists.
    fn window(&self, title: &str) -> String {
        let mut id = String::new();
        wait_long(&format!("the window '{title}'"), || {
            let out = self
                .command("xdotool")
                .args(["search", "--name", title])
                .output()
                .expect("xdotool search");
            id = String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned();
            !id.is_empty()
        });
        id
    }

    /// Types `text` and Return into `window`.
    fn type_line(&self, window: &str, text: &str) {
        let focus = self
            .command("xdotool")
            .args(["windowfocus", "--sync", window])
            .status()
            .expect("xdotool windowfocus");
        assert!(focus.success());
        let typed = self
            .command("xdotool")
            .args(["type", "--delay", "60", text])
            .status()
            .expect("xdotool type");
        assert!(typed.success());
        let enter = self
            .command("xdotool")
            .args(["key", "Return"])
            .status()
            .expect("xdotool key");
        assert!(enter.success());
    }

    /// The text tesseract reads in `window`; the screenshot is kept at `shot`.
    fn read_window(&self, window: &str, shot: &Path) -> String {
        let taken = self
            .command("import")
            .args(["-window", window])
            .arg(shot)
            .status()
            .expect("import");
        assert!(taken.success(), "screenshot of {window}");
        // Dark text on white, twice the size: what tesseract reads best.
        let prepared = shot.with_extension("ocr.png");
        let converted = Command::new("convert")
            .arg(shot)
            .args(["-negate", "-resize", "200%"])
            .arg(&prepared)
            .status()
            .expect("convert");
        assert!(converted.success());
        let out = Command::new("tesseract")
            .arg(&prepared)
            .args(["stdout", "--psm", "6"])
            .stderr(Stdio::null())
            .output()
            .expect("tesseract");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A daemon with the RDP listener on a free port and a console account of the test's.
fn daemon_with_rdp() -> (Daemon, u16, tempfile::TempDir) {
    let port = free_port();
    let secrets = tempfile::tempdir().expect("tempdir");
    let credentials = secrets.path().join("rdp-account");
    let password = format!("pw{}", std::process::id());
    std::fs::write(&credentials, format!("tester:{password}\n")).expect("credentials");
    let daemon = Daemon::start_launch(Launch {
        args: vec![
            "--rdp-listen".into(),
            format!("127.0.0.1:{port}"),
            "--rdp-credentials".into(),
            credentials.display().to_string(),
        ],
        ..Launch::default()
    });
    (daemon, port, secrets)
}

/// FreeRDP on `vm`'s console, as `connect-vm --launch` runs it (the password on its standard
/// input), titled `title`.
fn xfreerdp(x: &Xvfb, port: u16, guid: &str, title: &str) -> Killed {
    let password = format!("pw{}", std::process::id());
    let mut child = x
        .command("xfreerdp")
        .args([
            // FreeRDP 2's /vmconnect forces port 2179 over /v:HOST:PORT; /port: wins.
            "/v:127.0.0.1",
            &format!("/port:{port}"),
            &format!("/vmconnect:{guid}"),
            "/cert:ignore",
            "/u:tester",
            "/from-stdin:force",
            &format!("/t:{title}"),
            "-grab-keyboard",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start xfreerdp");
    let mut stdin = child.stdin.take().expect("xfreerdp stdin");
    std::io::Write::write_all(&mut stdin, format!("{password}\n").as_bytes())
        .expect("password to xfreerdp");
    Killed(child)
}

fn console_clients(daemon: &Daemon, vm: &str) -> u64 {
    daemon.vm(vm)["console_clients"].as_u64().unwrap_or(0)
}

/// Waits until OCR of `window` shows `needle` at least `times` times; returns the last reading.
fn wait_for_text(x: &Xvfb, window: &str, needle: &str, times: usize, shot: &Path) -> String {
    let deadline = Instant::now() + SESSION_TIMEOUT;
    loop {
        let text = x.read_window(window, shot);
        let found = text.matches(needle).count();
        if found >= times {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "'{needle}' seen {found} times, not {times}, in the window; OCR read:\n{text}"
        );
        thread::sleep(Duration::from_millis(500));
    }
}

fn artifacts() -> PathBuf {
    let dir = std::env::temp_dir().join("vmms-rdp-test");
    std::fs::create_dir_all(&dir).expect("artifact dir");
    dir
}

#[test]
fn freerdp_vmconnect_shows_the_guest_console_and_types_into_it() {
    require_kvm!();
    require_tools();
    let (daemon, port, _secrets) = daemon_with_rdp();
    let vm = daemon.new_vm("rdp1", &[]);
    let guid = vm["id"].as_str().expect("vm id").to_owned();
    daemon.ok(&["start-vm", "rdp1"]);
    daemon.counter_above("rdp1", 0);
    let x = Xvfb::start();

    let _client = xfreerdp(&x, port, &guid, "console-rdp1");
    let window = x.window("console-rdp1");
    wait_long("one console client on rdp1", || {
        console_clients(&daemon, "rdp1") == 1
    });
    let shot = artifacts().join("rdp1.png");
    wait_for_text(&x, &window, "ready", 1, &shot);
    x.type_line(&window, "echo PINEAPPLE 4711");

    // The typed line and the guest's answer: two lines saying it.
    let text = wait_for_text(&x, &window, "PINEAPPLE 4711", 2, &shot);
    eprintln!("OCR of {}:\n{text}", shot.display());
    assert!(daemon.vm("rdp1")["enabled_state"] == 2);
}

#[test]
fn two_clients_on_two_vms_and_a_killed_client_or_a_stopped_vm_end_only_their_session() {
    require_kvm!();
    require_tools();
    let (daemon, port, _secrets) = daemon_with_rdp();
    let a = daemon.new_vm("rdpa", &[])["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let b = daemon.new_vm("rdpb", &[])["id"]
        .as_str()
        .expect("id")
        .to_owned();
    daemon.ok(&["start-vm", "rdpa"]);
    daemon.ok(&["start-vm", "rdpb"]);
    daemon.counter_above("rdpa", 0);
    daemon.counter_above("rdpb", 0);
    let x = Xvfb::start();
    let mut client_a = xfreerdp(&x, port, &a, "console-rdpa");
    let mut client_b = xfreerdp(&x, port, &b, "console-rdpb");
    let window_a = x.window("console-rdpa");
    let window_b = x.window("console-rdpb");
    wait_long("a client on each VM", || {
        console_clients(&daemon, "rdpa") == 1 && console_clients(&daemon, "rdpb") == 1
    });

    // Killed mid-session: its VM, the listener and the other session carry on.
    let _ = client_a.0.kill();
    let _ = client_a.0.wait();
    wait_long("rdpa's session gone", || {
        console_clients(&daemon, "rdpa") == 0
    });
    assert_eq!(daemon.vm("rdpa")["enabled_state"], 2);
    let shot_b = artifacts().join("rdpb.png");
    x.type_line(&window_b, "echo MANGO 2024");
    wait_for_text(&x, &window_b, "MANGO 2024", 2, &shot_b);
    let _again = xfreerdp(&x, port, &a, "console-rdpa-again");
    let window_again = x.window("console-rdpa-again");
    wait_long("rdpa reachable again", || {
        console_clients(&daemon, "rdpa") == 1
    });
    let shot_a = artifacts().join("rdpa-again.png");
    x.type_line(&window_again, "echo PAPAYA 99");
    wait_for_text(&x, &window_again, "PAPAYA 99", 2, &shot_a);
    let _ = window_a;

    // The VM stopping closes its session: the client exits.
    daemon.ok(&["stop-vm", "rdpb", "--turn-off"]);
    let deadline = Instant::now() + TIMEOUT;
    while client_b.0.try_wait().expect("poll xfreerdp").is_none() {
        assert!(
            Instant::now() < deadline,
            "xfreerdp still connected to a stopped VM"
        );
        thread::sleep(Duration::from_millis(100));
    }
    wait_long("rdpb's session gone", || {
        console_clients(&daemon, "rdpb") == 0
    });
    assert_eq!(console_clients(&daemon, "rdpa"), 1);
}

#[test]
fn connect_vm_prints_the_freerdp_command_line() {
    require_kvm!();
    let (daemon, port, _secrets) = daemon_with_rdp();
    let guid = daemon.new_vm("cli1", &[])["id"]
        .as_str()
        .expect("id")
        .to_owned();
    daemon.ok(&["start-vm", "cli1"]);

    let line = daemon.ok(&["connect-vm", "cli1"]);

    assert!(
        line.contains(&format!("/v:127.0.0.1 /port:{port}")),
        "{line}"
    );
    assert!(line.contains(&format!("/vmconnect:{guid}")), "{line}");
    assert!(line.contains("/u:tester"), "{line}");
    assert!(line.contains("/from-stdin:force"), "{line}");
    let password = format!("pw{}", std::process::id());
    assert!(
        !line.contains(&password),
        "the password is on the line: {line}"
    );
    assert!(!line.contains("/p:"), "{line}");
}

#[test]
fn connect_vm_launch_gives_the_password_on_stdin_not_in_argv() {
    require_kvm!();
    let (daemon, _port, secrets) = daemon_with_rdp();
    daemon.new_vm("cli2", &[]);
    daemon.ok(&["start-vm", "cli2"]);
    // A stand-in xfreerdp that records what it was given.
    let bin = secrets.path().join("bin");
    std::fs::create_dir(&bin).expect("bin dir");
    let record = secrets.path().join("record");
    let fake = bin.join("xfreerdp");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" > {0}.argv\ncat > {0}.stdin\n",
            record.display()
        ),
    )
    .expect("fake xfreerdp");
    let mut permissions = std::fs::metadata(&fake).expect("fake").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&fake, permissions).expect("chmod fake");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let out = Command::new(vmms_common::vmms_binary())
        .args(["--store"])
        .arg(daemon.path())
        .args(["connect-vm", "cli2", "--launch"])
        .env("PATH", path)
        .output()
        .expect("connect-vm --launch");

    assert!(out.status.success(), "{out:?}");
    let password = format!("pw{}", std::process::id());
    let argv = std::fs::read_to_string(record.with_extension("argv")).expect("argv");
    let stdin = std::fs::read_to_string(record.with_extension("stdin")).expect("stdin");
    assert!(!argv.contains(&password), "password in argv: {argv}");
    assert!(argv.lines().any(|a| a == "/from-stdin:force"), "{argv}");
    assert_eq!(stdin, format!("{password}\n"));
}

#[test]
fn enhanced_mode_pcb_is_refused_and_the_reason_logged() {
    require_kvm!();
    let (daemon, port, _secrets) = daemon_with_rdp();
    let guid = daemon.new_vm("enh1", &[])["id"]
        .as_str()
        .expect("id")
        .to_owned();
    daemon.ok(&["start-vm", "enh1"]);
    let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    client
        .set_read_timeout(Some(TIMEOUT))
        .expect("read timeout");

    std::io::Write::write_all(
        &mut client,
        &rdp_listener::pcb::encode_v2(&format!("{{{guid}}};EnhancedMode=1")),
    )
    .expect("send pcb");

    let mut byte = [0u8; 1];
    let read = client.read(&mut byte);
    assert!(
        matches!(read, Ok(0))
            || read.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "the connection stayed open"
    );
    wait_long("the refusal in the daemon's log", || {
        daemon.log().contains("enhanced session")
    });
    assert_eq!(console_clients(&daemon, "enh1"), 0);
}

#[test]
fn sigterm_closes_open_console_sessions_and_releases_the_port() {
    require_kvm!();
    require_tools();
    let (mut daemon, port, _secrets) = daemon_with_rdp();
    let guid = daemon.new_vm("term1", &[])["id"]
        .as_str()
        .expect("id")
        .to_owned();
    daemon.ok(&["start-vm", "term1"]);
    daemon.counter_above("term1", 0);
    let x = Xvfb::start();
    let mut client = xfreerdp(&x, port, &guid, "console-term1");
    x.window("console-term1");
    wait_long("one console client on term1", || {
        console_clients(&daemon, "term1") == 1
    });

    daemon.send_sigterm();

    assert!(
        daemon.exited_within(TIMEOUT).is_some(),
        "the daemon did not exit"
    );
    let log = daemon.log();
    assert!(
        log.contains("listener shutting down") && log.contains("rdp listener: stopped"),
        "no clean close of the console session in the log:\n{log}"
    );
    assert!(log.contains("vmms: RDP listener stopped"), "{log}");
    let deadline = Instant::now() + TIMEOUT;
    while client.0.try_wait().expect("poll xfreerdp").is_none() {
        assert!(Instant::now() < deadline, "xfreerdp still connected");
        thread::sleep(Duration::from_millis(100));
    }
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("the console port is free");
}

#[test]
fn pywbem_reads_the_bios_boot_source_and_the_console_display() {
    require_kvm!();
    let venv = std::env::var_os("VMMS_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/vmms/venv")));
    let Some(bin) = venv
        .map(|v| v.join("bin"))
        .filter(|b| b.join("pywbemcli").exists())
    else {
        eprintln!("skipped: no pywbem venv (scripts/test.sh creates ~/.cache/vmms/venv)");
        return;
    };
    let (port, cim_port) = (free_port(), free_port());
    let listen = format!("127.0.0.1:{cim_port}");
    let daemon = Daemon::start_with(
        &[
            "--cim-listen",
            &listen,
            "--rdp-listen",
            &format!("127.0.0.1:{port}"),
        ],
        &[],
    );
    let kernel = daemon.path().join("bzImage-for-wmi");
    std::fs::write(&kernel, b"not booted by this test").expect("kernel file");
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py");
    let geometry = (
        rdp_listener::console::screen::width(),
        rdp_listener::console::screen::height(),
    );

    let output = Command::new(bin.join("python"))
        .arg(scripts.join("firmware_video.py"))
        .current_dir(&scripts)
        .env_remove("REQUESTS_CA_BUNDLE")
        .env_remove("CURL_CA_BUNDLE")
        .env("CIM_URL", format!("http://{listen}"))
        .env("VMMS_BIN", vmms_common::vmms_binary())
        .env("VMMS_STORE", daemon.path())
        .env("KERNEL_FILE", &kernel)
        .env("EXPECT_WIDTH", geometry.0.to_string())
        .env("EXPECT_HEIGHT", geometry.1.to_string())
        .output()
        .expect("run python");

    assert!(
        output.status.success(),
        "firmware_video.py failed:\n{}\n{}\n--- daemon log ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
        daemon.log()
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("firmware video ok"));
}
