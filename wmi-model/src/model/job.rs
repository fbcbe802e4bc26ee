//! `Msvm_ConcreteJob`: vmm-core's jobs.

use vmm_core::{JOB_RETENTION, Job, JobId};

use super::CimObject;
use crate::instance::Instance;
use crate::path::ObjectPath;
use crate::value::CimType::Uint16;

const CLASS: &str = "Msvm_ConcreteJob";

/// A job as `Msvm_ConcreteJob`.
#[derive(Debug, Clone, PartialEq)]
pub struct ConcreteJob(pub Job);

impl ConcreteJob {
    /// The path of job `id`.
    pub fn path_of(id: JobId) -> ObjectPath {
        ObjectPath::new(CLASS, &[("InstanceID", &id.to_string())])
    }
}

impl CimObject for ConcreteJob {
    const CLASS: &'static str = CLASS;

    fn to_instance(&self) -> Instance {
        let job = &self.0;
        let description = job.kind.description();
        let status = if job.state.is_terminal() {
            if job.state.is_success() {
                "Job completed successfully".to_owned()
            } else {
                job.error_description
                    .clone()
                    .unwrap_or_else(|| "Job failed".to_owned())
            }
        } else {
            "Job is running".to_owned()
        };
        // Hyper-V's OperationalStatus for jobs: OK while fine, Error (6) after an exception.
        let operational = if job.state.is_terminal() && !job.state.is_success() {
            6
        } else {
            2
        };
        Instance::new(CLASS)
            .string("InstanceID", Some(job.id.to_string()))
            .string("Caption", Some(description.clone()))
            .string("Description", Some(description.clone()))
            .string("ElementName", Some(description))
            .integer("JobState", Uint16, Some(job.state.code()))
            .integer("PercentComplete", Uint16, Some(job.percent_complete))
            .integer("ErrorCode", Uint16, Some(job.error_code))
            .string("ErrorDescription", job.error_description.clone())
            .string("ErrorSummaryDescription", job.error_description.clone())
            .string("JobStatus", Some(status))
            .integer("JobType", Uint16, Some(1u16))
            .boolean("Cancellable", Some(false))
            .timestamp("TimeSubmitted", Some(job.time_submitted))
            .timestamp("StartTime", job.start_time)
            .interval("ElapsedTime", job.elapsed)
            .timestamp("TimeOfLastStateChange", Some(job.time_of_last_state_change))
            .boolean("DeleteOnCompletion", Some(true))
            .interval("TimeBeforeRemoval", JOB_RETENTION)
            .integers("OperationalStatus", Uint16, &[operational])
    }

    fn path(&self) -> ObjectPath {
        Self::path_of(self.0.id)
    }
}
