//! The threads operations run on, kept a while for reuse: a start, pause or save (and work run
//! beside one, such as a start's durable marker) goes to a thread that finished earlier work and
//! waits for more, where starting a thread cost every operation ~30 µs before its first step. As
//! many run at once as are asked for; a thread left idle for [`KEEP_IDLE`] ends.

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// How long a thread waits for another operation before it ends.
pub(crate) const KEEP_IDLE: Duration = Duration::from_secs(30);

type Work = Box<dyn FnOnce() + Send>;

/// The threads waiting for work, each by its id and the sending end of its own queue.
type IdleList = Mutex<Vec<(u64, Sender<Work>)>>;

/// The operations' threads.
#[derive(Debug, Default)]
pub(crate) struct OperationThreads {
    idle: Arc<IdleList>,
    next_id: Mutex<u64>,
}

impl OperationThreads {
    /// Runs `work` on an idle thread, or on a new one when none waits.
    pub(crate) fn run(&self, work: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
        let mut work: Work = Box::new(work);
        while let Some((_, thread)) = lock(&self.idle).pop() {
            match thread.send(work) {
                Ok(()) => return Ok(()),
                // Gone after all (its work panicked): try the next.
                Err(mpsc::SendError(returned)) => work = returned,
            }
        }
        let id = {
            let mut next = lock(&self.next_id);
            *next += 1;
            *next
        };
        let idle = Arc::clone(&self.idle);
        std::thread::Builder::new()
            .name("vmms-op".into())
            .spawn(move || serve(id, work, &idle))
            .map(drop)
    }
}

/// Runs `first`, then whatever is handed to this thread while it is on the idle list.
fn serve(id: u64, first: Work, idle: &IdleList) {
    first();
    loop {
        let (tx, rx) = mpsc::channel();
        lock(idle).push((id, tx));
        let work = match rx.recv_timeout(KEEP_IDLE) {
            Ok(work) => work,
            Err(RecvTimeoutError::Timeout) => {
                let mut list = lock(idle);
                if let Some(at) = list.iter().position(|(listed, _)| *listed == id) {
                    // Nobody took this thread: it ends.
                    list.remove(at);
                    return;
                }
                drop(list);
                // Taken between the timeout and the lock: its work is on the way.
                match rx.recv() {
                    Ok(work) => work,
                    Err(_) => return,
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        work();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread::ThreadId;

    fn thread_of(threads: &OperationThreads) -> ThreadId {
        let (tx, rx) = mpsc::channel();
        threads
            .run(move || tx.send(std::thread::current().id()).unwrap())
            .unwrap();
        rx.recv().unwrap()
    }

    #[test]
    fn an_operation_after_another_reuses_its_thread() {
        let threads = OperationThreads::default();

        let first = thread_of(&threads);
        // The first thread puts itself on the idle list once its work is done.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while lock(&threads.idle).is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let second = thread_of(&threads);

        assert_eq!(first, second);
    }

    #[test]
    fn operations_at_once_get_threads_of_their_own() {
        let threads = OperationThreads::default();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (started_tx, started_rx) = mpsc::channel();
        let release_rx = Arc::new(Mutex::new(release_rx));

        for _ in 0..3 {
            let started = started_tx.clone();
            let release = Arc::clone(&release_rx);
            threads
                .run(move || {
                    started.send(std::thread::current().id()).unwrap();
                    let _ = lock(&release).recv();
                })
                .unwrap();
        }
        let mut ids: Vec<ThreadId> = (0..3).map(|_| started_rx.recv().unwrap()).collect();
        for _ in 0..3 {
            release_tx.send(()).unwrap();
        }
        ids.dedup();

        assert_eq!(ids.len(), 3);
    }
}
