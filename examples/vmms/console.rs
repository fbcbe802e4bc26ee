//! `vmms console NAME`: COM1 of a running VM on this terminal, straight from the worker's
//! `console.sock` (console bytes never pass through the daemon).
//!
//! On a terminal: raw mode, `Ctrl-]` detaches (the VM keeps running). With stdin from a pipe:
//! the input is sent, and the command ends once the guest has been quiet for a moment.

use std::io::{IsTerminal, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use vmm_core::VmId;
use worker_manager::StoreLayout;

/// The byte `Ctrl-]` sends.
const DETACH: u8 = 0x1d;
/// With piped input: how long the guest must be quiet before the command ends.
const QUIET: Duration = Duration::from_millis(500);

/// The terminal's settings while raw mode is on, restored on drop (or by the output thread when
/// the VM goes away under us).
pub struct RawTerminal(Mutex<Option<libc::termios>>);

impl RawTerminal {
    /// Raw mode on stdin if it is a terminal (keys reach the guest as typed, `Ctrl-C` included).
    pub fn enter() -> Self {
        if !std::io::stdin().is_terminal() {
            return RawTerminal(Mutex::new(None));
        }
        // SAFETY: termios is plain data; tcgetattr fills it for fd 0, which is a terminal.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid, writable termios.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return RawTerminal(Mutex::new(None));
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        raw.c_oflag |= libc::OPOST | libc::ONLCR;
        // SAFETY: `raw` is a valid termios derived from the terminal's own.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &raw) };
        RawTerminal(Mutex::new(Some(saved)))
    }

    /// Puts the terminal back as it was (idempotent).
    pub fn restore(&self) {
        let saved = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(saved) = saved {
            // SAFETY: restores the settings read from the same terminal in `enter`.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &saved) };
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        self.restore();
    }
}

/// Attaches this terminal to `vm`'s COM1 until detached, or until the VM's console goes away.
pub fn attach(store: &Path, vm: VmId, name: &str) -> Result<(), String> {
    let socket = StoreLayout::new(store).runtime(vm).console_socket();
    let stream = UnixStream::connect(&socket)
        .map_err(|e| format!("cannot attach to {}: {e}", socket.display()))?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("Connected to '{name}' (COM1). Press Ctrl-] to detach.");
    }
    let terminal = Arc::new(RawTerminal::enter());
    let started = Instant::now();
    let last_output = Arc::new(AtomicU64::new(0));
    let closed = Arc::new(AtomicBool::new(false));
    let detaching = Arc::new(AtomicBool::new(false));
    let mut reader = stream
        .try_clone()
        .map_err(|e| format!("console socket: {e}"))?;
    {
        let terminal = Arc::clone(&terminal);
        let last_output = Arc::clone(&last_output);
        let closed = Arc::clone(&closed);
        let detaching = Arc::clone(&detaching);
        let name = name.to_owned();
        thread::spawn(move || {
            let mut stdout = std::io::stdout();
            let mut buf = [0u8; 4096];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let _ = stdout.write_all(&buf[..n]);
                        let _ = stdout.flush();
                        last_output.store(elapsed_ms(started), Ordering::SeqCst);
                    }
                }
            }
            closed.store(true, Ordering::SeqCst);
            // The socket also ends when we detach; only a console that went away on its own
            // means the VM stopped.
            if interactive && !detaching.load(Ordering::SeqCst) {
                terminal.restore();
                eprintln!("\r\n[console of '{name}' closed: the VM stopped]");
                std::process::exit(0);
            }
        });
    }
    let mut writer = stream;
    let mut stdin = std::io::stdin().lock();
    let mut buf = [0u8; 1024];
    loop {
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let input = &buf[..n];
        let (input, detach) = match input.iter().position(|&b| interactive && b == DETACH) {
            Some(at) => (&input[..at], true),
            None => (input, false),
        };
        if writer.write_all(input).is_err() || detach {
            break;
        }
    }
    if !interactive {
        // Piped input is all sent: give the guest time to answer, until it is quiet.
        let sent_at = elapsed_ms(started);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !closed.load(Ordering::SeqCst) && Instant::now() < deadline {
            let last = last_output.load(Ordering::SeqCst).max(sent_at);
            let quiet_for = elapsed_ms(started).saturating_sub(last);
            if quiet_for >= QUIET.as_millis() as u64 {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
    detaching.store(true, Ordering::SeqCst);
    terminal.restore();
    let _ = writer.shutdown(std::net::Shutdown::Both);
    if interactive {
        eprintln!("\r\n[detached from '{name}'; it keeps running]");
    } else {
        // The guest's prompt has no line end; whatever prints next starts on its own line.
        out!("");
    }
    Ok(())
}

fn elapsed_ms(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
}
