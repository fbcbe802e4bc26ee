//! A vmm-core service whose launcher starts no guest: the provider and endpoint are under test.
#![allow(dead_code, missing_docs)]

use std::path::Path;
use std::sync::Arc;

use vmm_core::{
    EventSink, LaunchMode, VirtualSystemManagementService, VmConfig, VmId, Worker, WorkerError,
    WorkerLauncher, WorkerStatus,
};

/// A worker that runs no guest (the provider's parsing is what is under test).
#[derive(Debug)]
pub struct NoGuest;

impl Worker for NoGuest {
    fn pid(&self) -> u32 {
        std::process::id()
    }
    fn status(&self) -> WorkerStatus {
        WorkerStatus::Running
    }
    fn pause(&self) -> Result<(), WorkerError> {
        Ok(())
    }
    fn resume(&self) -> Result<(), WorkerError> {
        Ok(())
    }
    fn save(&self, _: &Path, _: &Path) -> Result<(), WorkerError> {
        Ok(())
    }
    fn reset(&self) -> Result<(), WorkerError> {
        Ok(())
    }
    fn turn_off(&self) -> Result<(), WorkerError> {
        Ok(())
    }
}

#[derive(Debug)]
pub struct Launcher;

impl WorkerLauncher for Launcher {
    fn launch(
        &self,
        _: &VmConfig,
        _: LaunchMode,
        _: EventSink,
    ) -> Result<Box<dyn Worker>, WorkerError> {
        Ok(Box::new(NoGuest))
    }
    fn reattach(&self, _: VmId, _: EventSink) -> Result<Option<Box<dyn Worker>>, WorkerError> {
        Ok(None)
    }
}

/// A service on a fresh store (kept alive by the returned folder).
pub fn service() -> (tempfile::TempDir, VirtualSystemManagementService) {
    let dir = tempfile::tempdir().expect("tempdir");
    let vmms = VirtualSystemManagementService::open(dir.path(), Arc::new(Launcher)).expect("open");
    (dir, vmms)
}

pub const NS: &str = r#"<LOCALNAMESPACEPATH><NAMESPACE NAME="root"/><NAMESPACE NAME="virtualization"/><NAMESPACE NAME="v2"/></LOCALNAMESPACEPATH>"#;

/// A CIM-XML request document around `body`.
pub fn wrap(body: &str) -> String {
    format!(
        r#"<?xml version="1.0" encoding="utf-8" ?><CIM CIMVERSION="2.0" DTDVERSION="2.0"><MESSAGE ID="7" PROTOCOLVERSION="1.0"><SIMPLEREQ>{body}</SIMPLEREQ></MESSAGE></CIM>"#
    )
}
