//! One long-lived thread per service for work that runs beside an operation, such as making a
//! started VM's "was running" marker durable while its worker starts: handing work to a thread
//! that waits for it costs a wake-up, where starting a thread for it cost every start ~30 µs
//! before the launch could begin.

use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Mutex, PoisonError};

type Work = Box<dyn FnOnce() + Send>;

/// The thread, started on first use; it ends when the service (which owns this) is dropped.
#[derive(Debug, Default)]
pub(crate) struct Beside {
    queue: Mutex<Option<Sender<Work>>>,
}

impl Beside {
    /// Runs `work` on the thread: the returned receiver gets `()` once it has run. `None` when
    /// there is no thread to run it (it could not be started): the caller runs it itself.
    pub(crate) fn run(&self, work: impl FnOnce() + Send + 'static) -> Option<Receiver<()>> {
        let (done_tx, done) = mpsc::channel();
        let work: Work = Box::new(move || {
            work();
            let _ = done_tx.send(());
        });
        let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if queue.is_none() {
            *queue = start();
        }
        let sent = queue.as_ref()?.send(work);
        match sent {
            Ok(()) => Some(done),
            Err(_) => {
                // The thread is gone (a panic in earlier work): start over next time.
                *queue = None;
                None
            }
        }
    }
}

fn start() -> Option<Sender<Work>> {
    let (tx, rx) = mpsc::channel::<Work>();
    std::thread::Builder::new()
        .name("vmms-beside".into())
        .spawn(move || {
            while let Ok(work) = rx.recv() {
                work();
            }
        })
        .ok()?;
    Some(tx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn work_runs_on_the_thread_and_reports_done() {
        let beside = Beside::default();
        let count = Arc::new(AtomicUsize::new(0));

        let receivers: Vec<_> = (0..3)
            .map(|_| {
                let count = Arc::clone(&count);
                beside
                    .run(move || {
                        count.fetch_add(1, Ordering::SeqCst);
                    })
                    .unwrap()
            })
            .collect();
        for done in receivers {
            done.recv().unwrap();
        }

        assert_eq!(count.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn work_runs_off_the_calling_thread() {
        let beside = Beside::default();
        let caller = std::thread::current().id();
        let (tx, rx) = mpsc::channel();

        beside
            .run(move || tx.send(std::thread::current().id()).unwrap())
            .unwrap()
            .recv()
            .unwrap();

        assert_ne!(rx.recv().unwrap(), caller);
    }
}
