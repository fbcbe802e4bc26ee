//! WQL, the query language of WMI: `SELECT`, `ASSOCIATORS OF` and `REFERENCES OF`.
//!
//! [`parse`] turns a query into a [`Query`] or a [`WqlError`] that says where it went wrong (the
//! CIM-XML endpoint answers `CIM_ERR_INVALID_QUERY` with that position); [`Expr::matches`]
//! evaluates a `WHERE` clause against an instance with WMI's rules (string comparison ignores
//! case, NULL compares false).

mod eval;
mod lexer;
mod parser;

pub use parser::{AssocQuery, Expr, Literal, Op, Operand, Query, Select, parse};

/// A query that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} at position {position}")]
pub struct WqlError {
    /// Character offset (0-based) where the problem starts.
    pub position: usize,
    /// What was expected or found.
    pub message: String,
}
