//! Progress of long operations (copies, merges), for jobs' `PercentComplete` and progress bars:
//! vmm-core's seam types.

pub use vmm_core::checkpoint::{NoProgress, Progress, ProgressCounter};
