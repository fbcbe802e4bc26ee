//! Hyper-V's WMI provider (`root\virtualization\v2`) rebuilt over vmm-core, served as DMTF
//! CIM-XML so that pywbem, pywbemcli and any WBEM client can manage VMs the way Hyper-V's
//! scripts do.
//!
//! The crate has four layers:
//! - the model: typed views of the Msvm_* classes ([`model`]) built from the live service, and
//!   their declarations ([`schema`]) for `GetClass`;
//! - [`wql`]: `SELECT`, `ASSOCIATORS OF` and `REFERENCES OF`;
//! - [`cimxml`]: reading requests and writing responses (DSP0200/DSP0201);
//! - [`Provider`]: the operations and methods over one
//!   [`VirtualSystemManagementService`](vmm_core::VirtualSystemManagementService), and
//!   [`server`]: the HTTP(S) endpoint (`POST /cimom`) with indication delivery.
//!
//! ```
//! use wmi_model::wql::{Query, parse};
//!
//! let query = parse("SELECT Name FROM Msvm_ComputerSystem WHERE EnabledState = 2")?;
//! assert!(matches!(query, Query::Select(_)));
//! # Ok::<(), wmi_model::wql::WqlError>(())
//! ```

pub mod cimxml;
mod error;
pub mod indication;
mod instance;
pub mod model;
mod path;
mod provider;
pub mod schema;
pub mod server;
mod value;
pub mod wql;

pub use error::{CimError, CimResult, CimStatus};
pub use instance::{Instance, Property};
pub use path::{KeyValue, ObjectPath, PathError};
pub use provider::{Args, Provider, TypedArg, local_host_name};
pub use value::{CimType, CimValue, Scalar, datetime, interval, iso8601};
