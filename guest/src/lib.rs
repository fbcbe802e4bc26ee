//! The vmms test guest: placeholder until the firmware lands.
#[path = "../firmware/src/protocol.rs"]
pub mod protocol;
