//! The daemon's log: one line per event on stdout, written by a thread of its own.
//!
//! Nothing that logs ever waits on stdout or panics over it. A line goes into a bounded queue and
//! the log thread writes it: when stdout's reader is gone the write fails and is ignored; when the
//! reader stalls (a full pipe) the log thread blocks alone, and lines past the queue are dropped and
//! counted. So a broken or stalled stdout can neither kill a thread (the event log, a client) nor
//! wedge the accept loop or the way out of the daemon.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::Duration;

/// Lines waiting for the log thread before new ones are dropped.
const QUEUE: usize = 4096;

enum Message {
    Line(String),
    Flush(SyncSender<()>),
}

/// A log writer: a queue in front of a thread writing to `out`.
#[derive(Debug)]
pub struct Log {
    queue: SyncSender<Message>,
    dropped: Arc<AtomicU64>,
}

impl Log {
    /// Starts the thread writing lines to `out`.
    pub fn start(out: impl Write + Send + 'static) -> io::Result<Self> {
        let (queue, lines) = mpsc::sync_channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&dropped);
        thread::Builder::new()
            .name("log".into())
            .spawn(move || write_lines(&lines, out, &counter))?;
        Ok(Log { queue, dropped })
    }

    /// Queues `text` as one line; drops it (counted) when the queue is full.
    pub fn line(&self, text: String) {
        if let Err(TrySendError::Full(_)) = self.queue.try_send(Message::Line(text)) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits up to `timeout` for every queued line to be written; whether they were.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (done, finished) = mpsc::sync_channel(1);
        self.queue.try_send(Message::Flush(done)).is_ok() && finished.recv_timeout(timeout).is_ok()
    }
}

fn write_lines(lines: &Receiver<Message>, mut out: impl Write, dropped: &AtomicU64) {
    for message in lines {
        match message {
            Message::Line(text) => {
                let lost = dropped.swap(0, Ordering::Relaxed);
                if lost > 0 {
                    let _ = writeln!(
                        out,
                        "vmms: {lost} log line(s) dropped: stdout is not keeping up"
                    );
                }
                let _ = writeln!(out, "{text}");
                let _ = out.flush();
            }
            Message::Flush(done) => {
                let _ = out.flush();
                let _ = done.send(());
            }
        }
    }
}

static DAEMON_LOG: OnceLock<Log> = OnceLock::new();

/// Starts the daemon's log on stdout (once; later calls keep the first).
pub fn install() -> io::Result<()> {
    if DAEMON_LOG.get().is_none() {
        let _ = DAEMON_LOG.set(Log::start(io::stdout())?);
    }
    Ok(())
}

/// One line of the daemon's log (use the `log!` macro). Before [`install`], written directly,
/// still without panicking.
pub fn line(text: String) {
    match DAEMON_LOG.get() {
        Some(log) => log.line(text),
        None => out!("{text}"),
    }
}

/// Waits up to `timeout` for the daemon's log to be written out (before the process exits).
pub fn flush(timeout: Duration) {
    if let Some(log) = DAEMON_LOG.get() {
        log.flush(timeout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::time::Instant;

    /// Collects what is written.
    #[derive(Clone, Default)]
    struct Collect(Arc<Mutex<Vec<u8>>>);

    impl Write for Collect {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("collector").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A stdout whose reader never reads: every write says it started, then blocks until the
    /// test ends.
    struct Stalled {
        writing: mpsc::Sender<()>,
        release: Mutex<Receiver<()>>,
    }

    impl Write for Stalled {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            let _ = self.writing.send(());
            let _ = self.release.lock().expect("stall").recv();
            Err(io::ErrorKind::BrokenPipe.into())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A stdout whose reader is gone.
    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }

        fn flush(&mut self) -> io::Result<()> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
    }

    #[test]
    fn lines_are_written_in_order() {
        let out = Collect::default();
        let log = Log::start(out.clone()).expect("log thread");

        log.line("vmms: one".into());
        log.line("vmms: two".into());
        let flushed = log.flush(Duration::from_secs(10));

        assert!(flushed);
        let text = String::from_utf8(out.0.lock().expect("collector").clone()).expect("utf-8");
        assert_eq!(text, "vmms: one\nvmms: two\n");
    }

    #[test]
    fn logging_never_waits_on_a_stalled_stdout() {
        let (_release, stall) = mpsc::channel();
        let (writing, stuck) = mpsc::channel();
        let log = Log::start(Stalled {
            writing,
            release: Mutex::new(stall),
        })
        .expect("log thread");
        log.line("vmms: the first line, which the log thread gets stuck writing".into());
        stuck
            .recv_timeout(Duration::from_secs(10))
            .expect("log thread writes");
        let started = Instant::now();

        for n in 0..(QUEUE * 3) {
            log.line(format!("vmms: line {n}"));
        }
        let flushed = log.flush(Duration::from_millis(100));

        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!flushed);
        assert_eq!(log.dropped.load(Ordering::Relaxed), 2 * QUEUE as u64);
    }

    #[test]
    fn logging_into_a_broken_stdout_carries_on() {
        let log = Log::start(Broken).expect("log thread");

        log.line("vmms: into the void".into());
        let flushed = log.flush(Duration::from_secs(10));
        log.line("vmms: and again".into());

        assert!(flushed, "the log thread is still alive");
        assert!(log.flush(Duration::from_secs(10)));
    }
}
