//! CIM status codes (DSP0200 / DSP0201 `ERROR CODE`) and the crate's error type.

use std::fmt;

/// A CIM status code as carried by a CIM-XML `ERROR` element.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CimStatus {
    /// 1: a general error not covered by a more specific code.
    Failed,
    /// 2: the caller may not do this.
    AccessDenied,
    /// 3: the namespace does not exist.
    InvalidNamespace,
    /// 4: a parameter is missing, unknown or of the wrong type.
    InvalidParameter,
    /// 5: the class does not exist.
    InvalidClass,
    /// 6: the object (instance, job) does not exist.
    NotFound,
    /// 7: the operation is not supported.
    NotSupported,
    /// 11: the instance already exists.
    AlreadyExists,
    /// 12: the property does not exist.
    NoSuchProperty,
    /// 13: a value does not have the declared type.
    TypeMismatch,
    /// 14: the query language is not WQL.
    QueryLanguageNotSupported,
    /// 15: the query is not valid WQL.
    InvalidQuery,
    /// 16: the method exists but cannot run now.
    MethodNotAvailable,
    /// 17: the class has no such method.
    MethodNotFound,
    /// 27: a server limit was exceeded.
    ServerLimitsExceeded,
}

impl CimStatus {
    /// The DSP0201 numeric code.
    pub const fn code(self) -> u32 {
        match self {
            CimStatus::Failed => 1,
            CimStatus::AccessDenied => 2,
            CimStatus::InvalidNamespace => 3,
            CimStatus::InvalidParameter => 4,
            CimStatus::InvalidClass => 5,
            CimStatus::NotFound => 6,
            CimStatus::NotSupported => 7,
            CimStatus::AlreadyExists => 11,
            CimStatus::NoSuchProperty => 12,
            CimStatus::TypeMismatch => 13,
            CimStatus::QueryLanguageNotSupported => 14,
            CimStatus::InvalidQuery => 15,
            CimStatus::MethodNotAvailable => 16,
            CimStatus::MethodNotFound => 17,
            CimStatus::ServerLimitsExceeded => 27,
        }
    }

    /// The symbolic name (`CIM_ERR_NOT_FOUND`).
    pub const fn name(self) -> &'static str {
        match self {
            CimStatus::Failed => "CIM_ERR_FAILED",
            CimStatus::AccessDenied => "CIM_ERR_ACCESS_DENIED",
            CimStatus::InvalidNamespace => "CIM_ERR_INVALID_NAMESPACE",
            CimStatus::InvalidParameter => "CIM_ERR_INVALID_PARAMETER",
            CimStatus::InvalidClass => "CIM_ERR_INVALID_CLASS",
            CimStatus::NotFound => "CIM_ERR_NOT_FOUND",
            CimStatus::NotSupported => "CIM_ERR_NOT_SUPPORTED",
            CimStatus::AlreadyExists => "CIM_ERR_ALREADY_EXISTS",
            CimStatus::NoSuchProperty => "CIM_ERR_NO_SUCH_PROPERTY",
            CimStatus::TypeMismatch => "CIM_ERR_TYPE_MISMATCH",
            CimStatus::QueryLanguageNotSupported => "CIM_ERR_QUERY_LANGUAGE_NOT_SUPPORTED",
            CimStatus::InvalidQuery => "CIM_ERR_INVALID_QUERY",
            CimStatus::MethodNotAvailable => "CIM_ERR_METHOD_NOT_AVAILABLE",
            CimStatus::MethodNotFound => "CIM_ERR_METHOD_NOT_FOUND",
            CimStatus::ServerLimitsExceeded => "CIM_ERR_SERVER_LIMITS_EXCEEDED",
        }
    }
}

/// A failed CIM operation: the status and a sentence for people (`ERROR DESCRIPTION`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct CimError {
    /// The status code.
    pub status: CimStatus,
    /// What went wrong.
    pub description: String,
}

impl CimError {
    /// An error with `status` and `description`.
    pub fn new(status: CimStatus, description: impl Into<String>) -> Self {
        CimError {
            status,
            description: description.into(),
        }
    }
}

impl fmt::Display for CimError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.status.name(), self.description)
    }
}

/// Result of a CIM operation.
pub type CimResult<T> = std::result::Result<T, CimError>;
