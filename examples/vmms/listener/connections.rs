//! The open connections: the limit, and which one makes room for a newcomer.

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use super::{MAX_BUSY_CONNECTIONS, MAX_CONNECTIONS};

#[derive(Debug, Default)]
pub(super) struct Connections {
    list: Mutex<Vec<Connection>>,
    next_id: AtomicU64,
    evicted: AtomicU64,
}

#[derive(Debug)]
struct Connection {
    id: u64,
    stream: Arc<UnixStream>,
    /// Answering a request: never evicted (its client is waiting for the answer).
    busy: bool,
    /// Since when it has been idle (connect, or its last answer).
    since: Instant,
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Connection>> {
        self.list.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes `stream` in, closing the longest-idle connection when full; `None` when full of
    /// busy connections.
    pub(super) fn admit(&self, stream: Arc<UnixStream>) -> Option<u64> {
        let mut list = self.lock();
        if list.len() >= MAX_CONNECTIONS
            && !self.evict_from(&mut list)
            && list.len() >= MAX_BUSY_CONNECTIONS
        {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        list.push(Connection {
            id,
            stream,
            busy: false,
            since: Instant::now(),
        });
        Some(id)
    }

    pub(super) fn evict_longest_idle(&self) -> bool {
        let mut list = self.lock();
        self.evict_from(&mut list)
    }

    fn evict_from(&self, list: &mut Vec<Connection>) -> bool {
        let Some(index) = list
            .iter()
            .enumerate()
            .filter(|(_, c)| !c.busy)
            .min_by_key(|(_, c)| c.since)
            .map(|(i, _)| i)
        else {
            return false;
        };
        let victim = list.swap_remove(index);
        // Its thread sees end-of-file and exits; the descriptor closes with the last Arc.
        let _ = victim.stream.shutdown(Shutdown::Both);
        let evicted = self.evicted.fetch_add(1, Ordering::Relaxed) + 1;
        if evicted == 1 || evicted.is_multiple_of(100) {
            log!(
                "vmms: {evicted} idle connection(s) closed so far to admit new ones (limit \
                 {MAX_CONNECTIONS})"
            );
        }
        true
    }

    pub(super) fn set_busy(&self, id: u64, busy: bool) {
        if let Some(connection) = self.lock().iter_mut().find(|c| c.id == id) {
            connection.busy = busy;
            connection.since = Instant::now();
        }
    }

    pub(super) fn remove(&self, id: u64) {
        self.lock().retain(|c| c.id != id);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn full_table_closes_the_longest_idle_connection_not_a_busy_one() {
        let connections = Connections::default();
        let mut peers = Vec::new();
        let mut ids = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let (ours, theirs) = UnixStream::pair().expect("pair");
            ids.push(connections.admit(Arc::new(ours)).expect("room"));
            peers.push(theirs);
        }
        connections.set_busy(ids[0], true);
        let (newcomer, _theirs) = UnixStream::pair().expect("pair");

        let admitted = connections.admit(Arc::new(newcomer));

        assert!(admitted.is_some());
        assert_eq!(connections.len(), MAX_CONNECTIONS);
        let mut byte = [0u8; 1];
        peers[1].set_nonblocking(true).expect("nonblocking");
        assert_eq!((&peers[1]).read(&mut byte).expect("eof"), 0, "evicted");
        peers[0].set_nonblocking(true).expect("nonblocking");
        assert!((&peers[0]).read(&mut byte).is_err(), "busy one kept open");
    }
}
