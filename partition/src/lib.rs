//! A Hyper-V style child partition: one KVM virtual machine.
//!
//! Work in progress: see the crate's issue.

pub mod bus;
pub mod error;
pub mod layout;
pub mod memory;

pub use error::{Error, Result};
