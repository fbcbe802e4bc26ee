//! Asynchronous operations as Hyper-V shows them: `Msvm_ConcreteJob`.
//!
//! Every accepted state change returns 4096 and a [`JobId`]; the [`Job`] tells how it went. Jobs
//! are kept for [`JOB_RETENTION`] after they end (Hyper-V's `TimeBeforeRemoval` default), then
//! pruned.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

use crate::checkpoint::Progress;
use crate::config::VmId;
use crate::error::{Error, Result};
use crate::state::RequestedState;

/// How long a finished job stays visible (`TimeBeforeRemoval`, 5 minutes).
pub const JOB_RETENTION: Duration = Duration::from_secs(5 * 60);

/// A job's identity (`Msvm_ConcreteJob.InstanceID`), a GUID shown upper-case.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(Uuid);

impl JobId {
    fn new_random() -> Self {
        JobId(Uuid::new_v4())
    }

    /// The UUID inside.
    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = Uuid::encode_buffer();
        f.write_str(self.0.hyphenated().encode_upper(&mut buf))
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({self})")
    }
}

impl FromStr for JobId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Uuid::parse_str(s).map(JobId)
    }
}

impl Serialize for JobId {
    fn serialize<S: Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for JobId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// `Msvm_ConcreteJob.JobState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobState {
    /// 2: created, not started.
    New,
    /// 3: starting.
    Starting,
    /// 4: running.
    Running,
    /// 5: suspended.
    Suspended,
    /// 6: shutting down.
    ShuttingDown,
    /// 7: completed successfully.
    Completed,
    /// 8: terminated by request.
    Terminated,
    /// 9: killed.
    Killed,
    /// 10: ended with an error (see `error_code` / `error_description`).
    Exception,
    /// 11: service.
    Service,
    /// 32768: completed with warnings (Hyper-V's vendor value; counts as success).
    CompletedWithWarnings,
}

impl JobState {
    /// Hyper-V's numeric value.
    pub const fn code(self) -> u16 {
        match self {
            JobState::New => 2,
            JobState::Starting => 3,
            JobState::Running => 4,
            JobState::Suspended => 5,
            JobState::ShuttingDown => 6,
            JobState::Completed => 7,
            JobState::Terminated => 8,
            JobState::Killed => 9,
            JobState::Exception => 10,
            JobState::Service => 11,
            JobState::CompletedWithWarnings => 32768,
        }
    }

    /// Whether the job has ended (7, 8, 9, 10, 32768).
    pub const fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Completed
                | JobState::Terminated
                | JobState::Killed
                | JobState::Exception
                | JobState::CompletedWithWarnings
        )
    }

    /// Whether the job ended well (7, 32768).
    pub const fn is_success(self) -> bool {
        matches!(self, JobState::Completed | JobState::CompletedWithWarnings)
    }
}

/// Why a job exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobKind {
    /// A client's `RequestStateChange`.
    RequestStateChange {
        /// What was requested.
        requested: RequestedState,
    },
    /// The `AutomaticStartAction` applied when the service started.
    AutomaticStart,
    /// The `AutomaticRecoveryAction` (restart) after the worker was lost.
    RecoveryRestart,
    /// `Msvm_ShutdownComponent.InitiateShutdown`: the guest is asked to shut down, and turned
    /// off if it cannot be asked or does not comply in time (then the job completes with
    /// warnings that say so).
    Shutdown,
    /// `Msvm_VirtualSystemSnapshotService.CreateSnapshot`.
    CreateSnapshot,
    /// `ApplySnapshot`.
    ApplySnapshot,
    /// `DestroySnapshot`: delete one checkpoint, merging its disk layers.
    DestroySnapshot,
    /// `DestroySnapshotTree`.
    DestroySnapshotTree,
    /// `Msvm_VirtualSystemManagementService.ExportSystemDefinition`.
    ExportSystem,
    /// The `AutomaticRecoveryAction` revert-to-checkpoint after the worker was lost: the newest
    /// checkpoint is applied and the VM started.
    RecoveryRevert,
    /// A backup of the virtual machine (the VSS writer's session, Hyper-V's backup through
    /// `CreateSnapshot` with `SnapshotType` 32768 and `ExportSystemDefinition`).
    BackupSystem,
}

/// How a job ended, as its owner reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum JobOutcome {
    /// `Completed` (7).
    Completed,
    /// `CompletedWithWarnings` (32768): done, but not quite as asked; the text says how.
    CompletedWithWarnings(String),
    /// `Exception` (10) with Hyper-V's error code and a description.
    Failed(u32, String),
}

impl JobKind {
    /// A one-line description (`Msvm_ConcreteJob.Description`).
    pub fn description(self) -> String {
        match self {
            JobKind::RequestStateChange { requested } => format!("Changing state to {requested}"),
            JobKind::AutomaticStart => "Automatic start".to_owned(),
            JobKind::RecoveryRestart => "Automatic recovery: restart".to_owned(),
            JobKind::Shutdown => "Shutting down the guest".to_owned(),
            JobKind::CreateSnapshot => "Creating checkpoint".to_owned(),
            JobKind::ApplySnapshot => "Applying checkpoint".to_owned(),
            JobKind::DestroySnapshot => "Deleting checkpoint".to_owned(),
            JobKind::DestroySnapshotTree => "Deleting checkpoint subtree".to_owned(),
            JobKind::ExportSystem => "Exporting virtual machine".to_owned(),
            JobKind::RecoveryRevert => "Automatic recovery: revert to checkpoint".to_owned(),
            JobKind::BackupSystem => "Backing up virtual machine".to_owned(),
        }
    }
}

/// A snapshot of one job (`Msvm_ConcreteJob`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Its identity.
    pub id: JobId,
    /// Why it exists.
    pub kind: JobKind,
    /// The virtual machine it acts on (`Msvm_AffectedJobElement`).
    pub affected_vm: VmId,
    /// Where it is.
    pub state: JobState,
    /// 0..=100.
    pub percent_complete: u8,
    /// Bytes moved so far, for jobs that move data (copies, backups); 0 otherwise.
    #[serde(default)]
    pub bytes_processed: u64,
    /// Bytes the job expects to move in all (grows while it discovers more); 0 when unknown.
    #[serde(default)]
    pub bytes_total: u64,
    /// 0 on success, else a [`ReturnCode`](crate::ReturnCode) value saying what kind of failure.
    pub error_code: u32,
    /// What went wrong, for people; for `CompletedWithWarnings`, what the warning is.
    pub error_description: Option<String>,
    /// When it was created.
    pub time_submitted: SystemTime,
    /// When its work began.
    pub start_time: Option<SystemTime>,
    /// When its state last changed.
    pub time_of_last_state_change: SystemTime,
    /// Time from start to end (or to now while it runs).
    pub elapsed: Duration,
}

/// The service's job table: create, update, wait, prune.
#[derive(Debug, Default)]
pub(crate) struct JobTable {
    jobs: Mutex<HashMap<JobId, JobRecord>>,
    changed: Condvar,
}

#[derive(Debug)]
struct JobRecord {
    job: Job,
    started: Option<Instant>,
    ended: Option<Instant>,
}

impl JobRecord {
    fn snapshot(&self) -> Job {
        let elapsed = match (self.started, self.ended) {
            (Some(start), Some(end)) => end.saturating_duration_since(start),
            (Some(start), None) => start.elapsed(),
            _ => Duration::ZERO,
        };
        Job {
            elapsed,
            ..self.job.clone()
        }
    }
}

impl JobTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<JobId, JobRecord>> {
        // A panic elsewhere must not take the job table down with it; its data stays consistent
        // because every update is a single assignment.
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates a job in state Running (the operation thread starts at once) and prunes expired ones.
    pub(crate) fn create(&self, kind: JobKind, vm: VmId) -> JobId {
        let now = SystemTime::now();
        let id = JobId::new_random();
        let job = Job {
            id,
            kind,
            affected_vm: vm,
            state: JobState::Running,
            percent_complete: 0,
            bytes_processed: 0,
            bytes_total: 0,
            error_code: 0,
            error_description: None,
            time_submitted: now,
            start_time: Some(now),
            time_of_last_state_change: now,
            elapsed: Duration::ZERO,
        };
        let mut jobs = self.lock();
        jobs.retain(|_, r| r.ended.is_none_or(|end| end.elapsed() < JOB_RETENTION));
        jobs.insert(
            id,
            JobRecord {
                job,
                started: Some(Instant::now()),
                ended: None,
            },
        );
        id
    }

    /// Ends a job: success when `error` is `None`, else Exception with the code and text.
    ///
    /// `announce` runs with the finished job before anyone waiting for it can see it finished, so a
    /// waiter that returns has its completion event already published. Lock order: jobs, then
    /// whatever `announce` takes (the event bus).
    pub(crate) fn finish(
        &self,
        id: JobId,
        outcome: JobOutcome,
        announce: impl FnOnce(&Job),
    ) -> Option<Job> {
        let mut jobs = self.lock();
        let record = jobs.get_mut(&id)?;
        record.ended = Some(Instant::now());
        let job = &mut record.job;
        job.time_of_last_state_change = SystemTime::now();
        match outcome {
            JobOutcome::Completed => {
                job.state = JobState::Completed;
                job.percent_complete = 100;
            }
            JobOutcome::CompletedWithWarnings(description) => {
                job.state = JobState::CompletedWithWarnings;
                job.percent_complete = 100;
                job.error_description = Some(description);
            }
            JobOutcome::Failed(code, description) => {
                job.state = JobState::Exception;
                job.error_code = code;
                job.error_description = Some(description);
            }
        }
        let snapshot = record.snapshot();
        announce(&snapshot);
        drop(jobs);
        self.changed.notify_all();
        Some(snapshot)
    }

    /// Records a data-moving job's byte counts and the `PercentComplete` they make (below 100:
    /// only finishing completes a job).
    pub(crate) fn set_bytes(&self, id: JobId, processed: u64, total: u64) {
        let mut jobs = self.lock();
        if let Some(record) = jobs.get_mut(&id)
            && record.ended.is_none()
        {
            record.job.bytes_processed = processed;
            record.job.bytes_total = total;
            if let Some(percent) = processed.saturating_mul(100).checked_div(total) {
                record.job.percent_complete = u8::try_from(percent.min(99)).unwrap_or(99);
            }
        }
    }

    /// One job.
    pub(crate) fn get(&self, id: JobId) -> Option<Job> {
        self.lock().get(&id).map(JobRecord::snapshot)
    }

    /// Every job still kept, oldest first.
    pub(crate) fn list(&self) -> Vec<Job> {
        let mut jobs: Vec<Job> = self.lock().values().map(JobRecord::snapshot).collect();
        jobs.sort_by_key(|j| (j.time_submitted, j.id));
        jobs
    }

    /// Blocks until the job is terminal or `timeout` passes.
    pub(crate) fn wait(&self, id: JobId, timeout: Duration) -> Result<Job> {
        let deadline = Instant::now() + timeout;
        let mut jobs = self.lock();
        loop {
            let record = jobs.get(&id).ok_or(Error::JobNotFound(id))?;
            if record.job.state.is_terminal() {
                return Ok(record.snapshot());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::JobTimeout {
                    job: id,
                    waited: timeout,
                });
            }
            jobs = self
                .changed
                .wait_timeout(jobs, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// A job's progress as a service reports it ([`Progress`]): its byte counts, and the
/// `PercentComplete` they make, kept in the job table for `get-job` and WMI.
pub(crate) struct JobProgress<'a> {
    jobs: &'a JobTable,
    job: JobId,
    processed: u64,
    total: u64,
}

impl<'a> JobProgress<'a> {
    /// Progress of `job`, nothing announced yet.
    pub(crate) fn new(jobs: &'a JobTable, job: JobId) -> Self {
        Self {
            jobs,
            job,
            processed: 0,
            total: 0,
        }
    }
}

impl Progress for JobProgress<'_> {
    fn add_total(&mut self, bytes: u64) {
        self.total = self.total.saturating_add(bytes);
        self.jobs.set_bytes(self.job, self.processed, self.total);
    }
    fn advance(&mut self, bytes: u64) {
        self.processed = self.processed.saturating_add(bytes);
        self.jobs.set_bytes(self.job, self.processed, self.total);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start_kind() -> JobKind {
        JobKind::RequestStateChange {
            requested: RequestedState::Start,
        }
    }

    #[test]
    fn new_job_is_running_for_its_vm() {
        let table = JobTable::default();
        let vm = VmId::new_random();

        let id = table.create(start_kind(), vm);

        let job = table.get(id).expect("job exists");
        assert_eq!(
            (job.state, job.affected_vm, job.error_code),
            (JobState::Running, vm, 0)
        );
    }

    #[test]
    fn finished_job_is_completed_at_100_percent() {
        let table = JobTable::default();
        let id = table.create(start_kind(), VmId::new_random());

        table.finish(id, JobOutcome::Completed, |_| {});

        let job = table.get(id).expect("job exists");
        assert_eq!(
            (job.state, job.percent_complete),
            (JobState::Completed, 100)
        );
    }

    #[test]
    fn failed_job_carries_code_and_description() {
        let table = JobTable::default();
        let id = table.create(start_kind(), VmId::new_random());

        table.finish(
            id,
            JobOutcome::Failed(32768, "worker failed: no kvm".into()),
            |_| {},
        );

        let job = table.get(id).expect("job exists");
        assert_eq!(job.state, JobState::Exception);
        assert_eq!(job.error_code, 32768);
        assert_eq!(
            job.error_description.as_deref(),
            Some("worker failed: no kvm")
        );
    }

    #[test]
    fn wait_returns_when_another_thread_finishes_the_job() {
        let table = std::sync::Arc::new(JobTable::default());
        let id = table.create(start_kind(), VmId::new_random());
        let finisher = {
            let table = table.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                table.finish(id, JobOutcome::Completed, |_| {});
            })
        };

        let job = table
            .wait(id, Duration::from_secs(10))
            .expect("finished in time");

        finisher.join().expect("finisher thread");
        assert_eq!(job.state, JobState::Completed);
    }

    #[test]
    fn wait_times_out_on_a_running_job() {
        let table = JobTable::default();
        let id = table.create(start_kind(), VmId::new_random());

        let result = table.wait(id, Duration::from_millis(10));

        assert!(matches!(result, Err(Error::JobTimeout { job, .. }) if job == id));
    }

    #[test]
    fn wait_on_unknown_job_is_not_found() {
        let table = JobTable::default();
        let stranger = JobId::new_random();

        let result = table.wait(stranger, Duration::from_millis(10));

        assert!(matches!(result, Err(Error::JobNotFound(id)) if id == stranger));
    }

    #[test]
    fn job_state_codes_and_terminal_set_follow_msvm_concrete_job() {
        let all = [
            JobState::New,
            JobState::Starting,
            JobState::Running,
            JobState::Suspended,
            JobState::ShuttingDown,
            JobState::Completed,
            JobState::Terminated,
            JobState::Killed,
            JobState::Exception,
            JobState::Service,
            JobState::CompletedWithWarnings,
        ];

        let terminal: Vec<u16> = all
            .iter()
            .filter(|s| s.is_terminal())
            .map(|s| s.code())
            .collect();
        let success: Vec<u16> = all
            .iter()
            .filter(|s| s.is_success())
            .map(|s| s.code())
            .collect();

        assert_eq!(
            all.map(JobState::code),
            [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 32768]
        );
        assert_eq!(terminal, [7, 8, 9, 10, 32768]);
        assert_eq!(success, [7, 32768]);
    }

    #[test]
    fn job_id_serialises_as_guid_string() {
        let table = JobTable::default();
        let id = table.create(start_kind(), VmId::new_random());

        let json = serde_json::to_string(&id).expect("encode");

        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<JobId>(&json).expect("decode"), id);
    }
}
