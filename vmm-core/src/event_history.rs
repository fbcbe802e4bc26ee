//! A bounded history of recent [`Event`]s that survives the service's restart.
//!
//! The daemon keeps the last N events for `get-vm-event`; Hyper-V keeps its event channel on
//! disk too. The history is one JSON file replaced atomically (temp + fsync + rename + fsync
//! folder), so a crash leaves either the old or the new history, never a torn one.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use crate::atomic_file;
use crate::error::{Error, Result};
use crate::event::Event;

/// The most recent events, at most `capacity`, persisted at `path`.
#[derive(Debug)]
pub struct EventHistory {
    path: PathBuf,
    capacity: usize,
    events: VecDeque<Event>,
}

impl EventHistory {
    /// An empty history that will be saved at `path`.
    pub fn new(path: impl Into<PathBuf>, capacity: usize) -> Self {
        EventHistory {
            path: path.into(),
            capacity: capacity.max(1),
            events: VecDeque::new(),
        }
    }

    /// Loads the history saved at `path` (empty when there is none yet), keeping the newest
    /// `capacity` events. A file that cannot be read or parsed is an error; the caller decides
    /// whether to start over with [`new`](Self::new).
    pub fn open(path: impl Into<PathBuf>, capacity: usize) -> Result<Self> {
        let mut history = Self::new(path, capacity);
        let text = match std::fs::read(&history.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(history),
            Err(e) => return Err(Error::io(&history.path, e)),
        };
        let events: Vec<Event> =
            serde_json::from_slice(&text).map_err(|source| Error::ParseEvents {
                path: history.path.clone(),
                source,
            })?;
        for event in events {
            history.record(event);
        }
        Ok(history)
    }

    /// Where the history is saved.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `event`, dropping the oldest beyond the capacity (in memory; see
    /// [`save`](Self::save)).
    pub fn record(&mut self, event: Event) {
        if self.events.len() == self.capacity {
            self.events.pop_front();
        }
        self.events.push_back(event);
    }

    /// Writes the history to disk atomically.
    pub fn save(&self) -> Result<()> {
        let json = serde_json::to_vec(&self.events).map_err(|source| Error::ParseEvents {
            path: self.path.clone(),
            source,
        })?;
        atomic_file::write_atomic(&self.path, &json).map_err(|e| Error::io(&self.path, e))
    }

    /// The events, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Event> {
        self.events.iter()
    }

    /// How many events are kept.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether no event is kept.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::config::VmId;
    use crate::event::EventKind;

    fn event(kind: EventKind) -> Event {
        Event {
            vm: VmId::new_random(),
            time: SystemTime::now(),
            kind,
        }
    }

    #[test]
    fn saved_history_is_loaded_again_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.json");
        let mut history = EventHistory::new(&path, 10);
        history.record(event(EventKind::Defined));
        history.record(event(EventKind::Destroyed));
        history.save().expect("save");

        let loaded = EventHistory::open(&path, 10).expect("open");

        let kinds: Vec<&EventKind> = loaded.iter().map(|e| &e.kind).collect();
        assert_eq!(kinds, [&EventKind::Defined, &EventKind::Destroyed]);
    }

    #[test]
    fn history_keeps_only_the_newest_events() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut history = EventHistory::new(dir.path().join("events.json"), 2);

        for _ in 0..5 {
            history.record(event(EventKind::Modified));
        }
        history.record(event(EventKind::Destroyed));

        assert_eq!(history.len(), 2);
        assert_eq!(
            history.iter().last().map(|e| &e.kind),
            Some(&EventKind::Destroyed)
        );
    }

    #[test]
    fn missing_file_is_an_empty_history() {
        let dir = tempfile::tempdir().expect("tempdir");

        let history = EventHistory::open(dir.path().join("events.json"), 5).expect("open");

        assert!(history.is_empty());
    }

    #[test]
    fn corrupt_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("events.json");
        std::fs::write(&path, b"[{ torn").expect("write");

        assert!(matches!(
            EventHistory::open(&path, 5),
            Err(Error::ParseEvents { .. })
        ));
    }
}
