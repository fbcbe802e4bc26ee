//! The CMOS real-time clock at ports 0x70/0x71, reduced to a readable wall clock.
//!
//! Linux reads the time once at boot and spins while the "update in progress" bit is set, so an
//! unclaimed port reading 0xff would hang it; this device answers with the host's UTC time in BCD
//! and never reports an update in progress.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::BusDevice;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_STATUS_A: u8 = 0x0a;
const REG_STATUS_B: u8 = 0x0b;
const REG_STATUS_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;
/// Divider 32.768 kHz, rate 1024 Hz, update-in-progress clear.
const STATUS_A: u8 = 0x26;
/// 24-hour mode, BCD.
const STATUS_B: u8 = 0x02;
/// Valid RAM and time.
const STATUS_D: u8 = 0x80;

/// The RTC: an index register (port 0x70) and a data register (port 0x71).
#[derive(Debug, Default)]
pub struct Cmos {
    index: AtomicU8,
}

fn bcd(value: u64) -> u8 {
    (((value / 10) % 10) << 4 | (value % 10)) as u8
}

/// (year, month, day) of `days` since 1970-01-01, by Howard Hinnant's civil-from-days algorithm.
fn civil_from_days(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The value of clock register `index` at `unix_seconds`.
fn register(index: u8, unix_seconds: u64) -> u8 {
    let days = (unix_seconds / 86_400) as i64;
    let secs_of_day = unix_seconds % 86_400;
    let (year, month, day) = civil_from_days(days);
    match index {
        REG_SECONDS => bcd(secs_of_day % 60),
        REG_MINUTES => bcd(secs_of_day / 60 % 60),
        REG_HOURS => bcd(secs_of_day / 3600),
        // 1970-01-01 was a Thursday; the RTC counts Sunday as 1.
        REG_WEEKDAY => bcd(((days + 4).rem_euclid(7) + 1) as u64),
        REG_DAY => bcd(day),
        REG_MONTH => bcd(month),
        REG_YEAR => bcd(year.rem_euclid(100) as u64),
        REG_CENTURY => bcd((year / 100) as u64),
        REG_STATUS_A => STATUS_A,
        REG_STATUS_B => STATUS_B,
        REG_STATUS_D => STATUS_D,
        _ => 0,
    }
}

impl BusDevice for Cmos {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let value = if offset == 1 {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            register(self.index.load(Ordering::Relaxed), now)
        } else {
            self.index.load(Ordering::Relaxed)
        };
        data.fill(value);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if let (0, [value]) = (offset, data) {
            // Bit 7 is the NMI mask, not part of the index.
            self.index.store(value & 0x7f, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_registers_are_bcd_utc() {
        // 2026-11-24 13:45:56 UTC, a Tuesday.
        let t = 1_795_527_956;

        let fields: Vec<u8> = [
            REG_YEAR,
            REG_MONTH,
            REG_DAY,
            REG_HOURS,
            REG_MINUTES,
            REG_SECONDS,
            REG_WEEKDAY,
        ]
        .iter()
        .map(|&r| register(r, t))
        .collect();

        assert_eq!(fields, vec![0x26, 0x11, 0x24, 0x13, 0x45, 0x56, 0x03]);
    }

    #[test]
    fn update_in_progress_is_never_set() {
        assert_eq!(register(REG_STATUS_A, 0) & 0x80, 0);
    }

    #[test]
    fn index_write_masks_the_nmi_bit() {
        let cmos = Cmos::default();
        let mut data = [0];

        cmos.write(0, &[0x80 | REG_STATUS_B]);
        cmos.read(1, &mut data);

        assert_eq!(data[0], STATUS_B);
    }
}
