//! The service's in-memory registry of virtual machines: one [`VmRecord`] per VM folder in the
//! store, loaded at start, and the [`ComputerSystem`] snapshots it hands out.
//!
//! A VM whose `config.json` cannot be read is still listed — degraded, with the error as its
//! status text — so that one bad file never hides or breaks the others.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::config::{VmConfig, VmId};
use crate::error::{Result, error_chain};
use crate::event::{EventBus, EventKind};
use crate::integration::GuestHeartbeat;
use crate::ownership::Ownership;
use crate::state::{EnabledState, HealthState, OperationalStatus, RequestedState};
use crate::store::Store;
use crate::worker::Worker;

/// A snapshot of one virtual machine as clients see it (`Msvm_ComputerSystem` plus the
/// configuration), serialisable for the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputerSystem {
    /// `Name`: the VM's GUID.
    pub id: VmId,
    /// `ElementName`; the GUID for a degraded VM whose configuration cannot be read.
    pub name: String,
    /// `EnabledState`.
    pub enabled_state: EnabledState,
    /// `RequestedState`: the request in progress, or `NotApplicable` (12).
    pub requested_state: RequestedState,
    /// `HealthState`.
    pub health_state: HealthState,
    /// `OperationalStatus[0]`.
    pub operational_status: OperationalStatus,
    /// `StatusDescriptions[0]`: why the VM is degraded or unhealthy, if it is.
    pub status_description: Option<String>,
    /// `ProcessID`: the worker's pid while a worker runs.
    pub process_id: Option<u32>,
    /// `OnTimeInMilliseconds`: time spent running since the last start (paused time excluded).
    pub on_time_ms: u64,
    /// `TimeOfLastStateChange`.
    pub time_of_last_state_change: SystemTime,
    /// The definition; `None` when degraded.
    pub config: Option<VmConfig>,
    /// Whether the guest's integration agent answers (`Msvm_HeartbeatComponent`), as its worker
    /// last found; `None` while no worker runs or the worker has no integration channel.
    #[serde(default)]
    pub heartbeat: Option<GuestHeartbeat>,
}

/// Running time of the current run (`OnTimeInMilliseconds`).
#[derive(Debug, Default)]
pub(crate) struct OnTime {
    accumulated: Duration,
    running_since: Option<Instant>,
}

impl OnTime {
    /// Follows a state change: counts while Running, holds while paused or in transit, and
    /// starts over when the guest is gone (Off, Saved).
    fn on_state(&mut self, state: EnabledState) {
        if let Some(since) = self.running_since.take() {
            self.accumulated += since.elapsed();
        }
        match state {
            EnabledState::Running => self.running_since = Some(Instant::now()),
            EnabledState::Off | EnabledState::Saved => self.accumulated = Duration::ZERO,
            _ => {}
        }
    }

    fn millis(&self) -> u64 {
        let running = self
            .running_since
            .map_or(Duration::ZERO, |since| since.elapsed());
        u64::try_from((self.accumulated + running).as_millis()).unwrap_or(u64::MAX)
    }
}

/// Everything the service knows about one virtual machine.
#[derive(Debug)]
pub(crate) struct VmRecord {
    pub(crate) id: VmId,
    /// `None` when the configuration cannot be read (degraded).
    pub(crate) config: Option<VmConfig>,
    pub(crate) state: EnabledState,
    pub(crate) requested: RequestedState,
    pub(crate) health: HealthState,
    pub(crate) status_description: Option<String>,
    pub(crate) last_state_change: SystemTime,
    /// The attached worker, if one runs.
    pub(crate) worker: Option<Arc<dyn Worker>>,
    /// Which operation may change this VM and which worker's events count.
    pub(crate) owner: Ownership,
    pub(crate) on_time: OnTime,
    /// When recovery restarts happened recently (restart-loop protection).
    pub(crate) recoveries: Vec<Instant>,
}

impl VmRecord {
    /// A record for a VM that is not running: Off, or Saved when it has saved state.
    pub(crate) fn new(id: VmId, config: Option<VmConfig>, saved: bool) -> Self {
        VmRecord {
            id,
            config,
            state: if saved {
                EnabledState::Saved
            } else {
                EnabledState::Off
            },
            requested: RequestedState::NotApplicable,
            health: HealthState::Ok,
            status_description: None,
            last_state_change: SystemTime::now(),
            worker: None,
            owner: Ownership::default(),
            on_time: OnTime::default(),
            recoveries: Vec::new(),
        }
    }

    /// Whether the configuration is unreadable.
    pub(crate) fn is_degraded(&self) -> bool {
        self.config.is_none()
    }

    /// Moves to `state`, keeping the running clock and announcing the change.
    pub(crate) fn set_state(&mut self, state: EnabledState, events: &EventBus) {
        if self.state == state {
            return;
        }
        let previous = std::mem::replace(&mut self.state, state);
        self.on_time.on_state(state);
        self.last_state_change = SystemTime::now();
        events.publish(
            self.id,
            EventKind::StateChanged {
                previous,
                current: state,
            },
        );
    }

    /// Sets the health, announcing a change.
    pub(crate) fn set_health(&mut self, health: HealthState, events: &EventBus) {
        if self.health == health {
            return;
        }
        let previous = std::mem::replace(&mut self.health, health);
        events.publish(
            self.id,
            EventKind::HealthChanged {
                previous,
                current: health,
            },
        );
    }

    /// The client's view of this VM.
    pub(crate) fn snapshot(&self) -> ComputerSystem {
        let operational_status = if self.is_degraded() {
            OperationalStatus::Degraded
        } else if self.owner.is_claimed() {
            OperationalStatus::InService
        } else {
            OperationalStatus::Ok
        };
        ComputerSystem {
            id: self.id,
            name: self
                .config
                .as_ref()
                .map_or_else(|| self.id.to_string(), |c| c.name.clone()),
            enabled_state: self.state,
            requested_state: self.requested,
            health_state: self.health,
            operational_status,
            status_description: self.status_description.clone(),
            process_id: self.worker.as_ref().map(|w| w.pid()),
            on_time_ms: self.on_time.millis(),
            time_of_last_state_change: self.last_state_change,
            config: self.config.clone(),
            heartbeat: self.worker.as_ref().and_then(|w| w.guest_heartbeat()),
        }
    }
}

/// All records, by id.
#[derive(Debug, Default)]
pub(crate) struct Catalog {
    pub(crate) vms: HashMap<VmId, VmRecord>,
}

impl Catalog {
    /// Loads every VM folder of the store. Only listing `vms/` itself can fail; a VM whose
    /// configuration is unreadable becomes a degraded record.
    pub(crate) fn load(store: &Store) -> Result<Self> {
        let mut vms = HashMap::new();
        for id in store.vm_ids()? {
            let saved = store.has_saved_state(id);
            let record = match store.read_config(id) {
                Ok(config) => VmRecord::new(id, Some(config), saved),
                Err(error) => {
                    let mut record = VmRecord::new(id, None, saved);
                    record.status_description = Some(error_chain(&error));
                    record
                }
            };
            vms.insert(id, record);
        }
        Ok(Catalog { vms })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_time_excludes_paused_time_and_resets_when_off() {
        let mut clock = OnTime::default();
        clock.on_state(EnabledState::Running);
        std::thread::sleep(Duration::from_millis(30));
        clock.on_state(EnabledState::Paused);
        let paused_at = clock.millis();
        std::thread::sleep(Duration::from_millis(30));

        let while_paused = clock.millis();
        clock.on_state(EnabledState::Off);

        assert!(paused_at >= 30);
        assert_eq!(while_paused, paused_at);
        assert_eq!(clock.millis(), 0);
    }

    #[test]
    fn degraded_record_shows_degraded_and_guid_name() {
        let id = VmId::new_random();
        let record = VmRecord::new(id, None, false);

        let snapshot = record.snapshot();

        assert_eq!(snapshot.operational_status, OperationalStatus::Degraded);
        assert_eq!(snapshot.name, id.to_string());
        assert_eq!(snapshot.health_state, HealthState::Ok);
    }

    /// A worker whose guest's agent answers, as its worker last found.
    #[derive(Debug)]
    struct Beating;

    impl Worker for Beating {
        fn pid(&self) -> u32 {
            7
        }
        fn status(&self) -> crate::worker::WorkerStatus {
            crate::worker::WorkerStatus::Running
        }
        fn pause(&self) -> std::result::Result<(), crate::worker::WorkerError> {
            Ok(())
        }
        fn resume(&self) -> std::result::Result<(), crate::worker::WorkerError> {
            Ok(())
        }
        fn save(
            &self,
            _staging: &std::path::Path,
            _state_dir: &std::path::Path,
        ) -> std::result::Result<(), crate::worker::WorkerError> {
            Ok(())
        }
        fn reset(&self) -> std::result::Result<(), crate::worker::WorkerError> {
            Ok(())
        }
        fn turn_off(&self) -> std::result::Result<(), crate::worker::WorkerError> {
            Ok(())
        }
        fn guest_heartbeat(&self) -> Option<GuestHeartbeat> {
            Some(GuestHeartbeat::Ok)
        }
    }

    #[test]
    fn heartbeat_comes_from_the_worker_and_is_absent_without_one() {
        let mut record = VmRecord::new(VmId::new_random(), Some(VmConfig::new("hb")), false);
        let off = record.snapshot();
        record.worker = Some(Arc::new(Beating));

        let running = record.snapshot();

        assert_eq!(off.heartbeat, None);
        assert_eq!(running.heartbeat, Some(GuestHeartbeat::Ok));
    }

    #[test]
    fn snapshot_round_trips_through_json() {
        let record = VmRecord::new(VmId::new_random(), Some(VmConfig::new("wire")), true);
        let snapshot = record.snapshot();

        let json = serde_json::to_string(&snapshot).expect("encode");

        assert_eq!(
            serde_json::from_str::<ComputerSystem>(&json).expect("decode"),
            snapshot
        );
        assert_eq!(snapshot.enabled_state, EnabledState::Saved);
    }

    #[test]
    fn set_state_publishes_previous_and_current() {
        let events = EventBus::default();
        let rx = events.subscribe();
        let mut record = VmRecord::new(VmId::new_random(), Some(VmConfig::new("a")), false);

        record.set_state(EnabledState::Starting, &events);

        let kind = rx.try_recv().expect("event published").kind;
        assert_eq!(
            kind,
            EventKind::StateChanged {
                previous: EnabledState::Off,
                current: EnabledState::Starting
            }
        );
    }

    #[test]
    fn load_marks_only_the_corrupt_vm_degraded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let good = VmConfig::new("good");
        let bad = VmConfig::new("bad");
        store.create_vm(&good).expect("create good");
        store.create_vm(&bad).expect("create bad");
        std::fs::write(store.config_path(bad.id), b"{ not json").expect("corrupt");

        let catalog = Catalog::load(&store).expect("load");

        assert!(!catalog.vms[&good.id].is_degraded());
        assert!(catalog.vms[&bad.id].is_degraded());
        assert!(
            catalog.vms[&bad.id]
                .status_description
                .as_deref()
                .is_some_and(|t| t.contains("cannot parse"))
        );
    }
}
