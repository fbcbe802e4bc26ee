//! The devices a partition emulates: legacy PC devices on the port bus and virtio-mmio devices.

pub mod cmos;
pub mod i8042;
pub mod idle;
pub mod power;
pub mod serial;
pub mod virtio;
