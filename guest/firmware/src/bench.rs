//! Benchmark loops: one device access per pass and nothing else, forever.
//!
//! The host measures the exit round trip of its PIO and MMIO dispatch by counting how many passes
//! a guest in one of these loops completes. Selected with `bench=<mode>` on the command line.

use crate::io;
use crate::protocol::{
    BENCH_MMIO_ADDR, BENCH_MMIO_READ, BENCH_MMIO_WRITE, BENCH_PIO_IN, BENCH_PIO_OUT, BENCH_PIO_PORT,
};

/// What each pass of the loop does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchMode {
    /// `out` one byte to the benchmark port.
    PioOut,
    /// `in` one byte from the benchmark port.
    PioIn,
    /// Store 4 bytes at the benchmark MMIO address.
    MmioWrite,
    /// Load 4 bytes from the benchmark MMIO address.
    MmioRead,
}

impl BenchMode {
    /// Parses a `bench=` value.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            BENCH_PIO_OUT => Some(Self::PioOut),
            BENCH_PIO_IN => Some(Self::PioIn),
            BENCH_MMIO_WRITE => Some(Self::MmioWrite),
            BENCH_MMIO_READ => Some(Self::MmioRead),
            _ => None,
        }
    }

    /// Whether the loop touches [`BENCH_MMIO_ADDR`].
    pub fn uses_mmio(self) -> bool {
        matches!(self, Self::MmioWrite | Self::MmioRead)
    }
}

/// Runs the loop for `mode` forever.
///
/// # Safety
///
/// For the MMIO modes, [`BENCH_MMIO_ADDR`] must be device memory (not RAM) inside the identity map.
pub unsafe fn run(mode: BenchMode) -> ! {
    match mode {
        BenchMode::PioOut => loop {
            io::outb(BENCH_PIO_PORT, 0);
        },
        BenchMode::PioIn => loop {
            io::inb(BENCH_PIO_PORT);
        },
        BenchMode::MmioWrite => loop {
            // SAFETY: guaranteed by the caller.
            unsafe { io::mmio_write32(BENCH_MMIO_ADDR, 0) }
        },
        BenchMode::MmioRead => loop {
            // SAFETY: guaranteed by the caller.
            unsafe { io::mmio_read32(BENCH_MMIO_ADDR) };
        },
    }
}
