//! OCF
