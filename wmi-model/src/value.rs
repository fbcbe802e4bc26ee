//! CIM types and values (DSP0004), and the datetime encodings Hyper-V uses.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::instance::Instance;
use crate::path::ObjectPath;

/// A CIM data type as declared in a class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CimType {
    /// `boolean`.
    Boolean,
    /// `string`.
    String,
    /// `uint8`.
    Uint8,
    /// `uint16`.
    Uint16,
    /// `uint32`.
    Uint32,
    /// `uint64`.
    Uint64,
    /// `sint32`.
    Sint32,
    /// `sint64`.
    Sint64,
    /// `datetime` (timestamp or interval).
    Datetime,
    /// `reference` (an object path).
    Reference,
}

impl CimType {
    /// The DSP0201 `TYPE` / `PARAMTYPE` spelling.
    pub const fn name(self) -> &'static str {
        match self {
            CimType::Boolean => "boolean",
            CimType::String => "string",
            CimType::Uint8 => "uint8",
            CimType::Uint16 => "uint16",
            CimType::Uint32 => "uint32",
            CimType::Uint64 => "uint64",
            CimType::Sint32 => "sint32",
            CimType::Sint64 => "sint64",
            CimType::Datetime => "datetime",
            CimType::Reference => "reference",
        }
    }

    /// Decodes a `TYPE` / `PARAMTYPE` attribute (any case; `real*`/`char16`/`sint8|16` are not
    /// used by this model and come back as `None`).
    pub fn from_name(name: &str) -> Option<Self> {
        const ALL: [CimType; 10] = [
            CimType::Boolean,
            CimType::String,
            CimType::Uint8,
            CimType::Uint16,
            CimType::Uint32,
            CimType::Uint64,
            CimType::Sint32,
            CimType::Sint64,
            CimType::Datetime,
            CimType::Reference,
        ];
        ALL.into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// Whether values of this type are integers.
    pub const fn is_integer(self) -> bool {
        matches!(
            self,
            CimType::Uint8
                | CimType::Uint16
                | CimType::Uint32
                | CimType::Uint64
                | CimType::Sint32
                | CimType::Sint64
        )
    }

    /// The integer range of this type (`None` for non-integers).
    pub const fn range(self) -> Option<(i128, i128)> {
        match self {
            CimType::Uint8 => Some((0, u8::MAX as i128)),
            CimType::Uint16 => Some((0, u16::MAX as i128)),
            CimType::Uint32 => Some((0, u32::MAX as i128)),
            CimType::Uint64 => Some((0, u64::MAX as i128)),
            CimType::Sint32 => Some((i32::MIN as i128, i32::MAX as i128)),
            CimType::Sint64 => Some((i64::MIN as i128, i64::MAX as i128)),
            _ => None,
        }
    }
}

impl fmt::Display for CimType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One scalar CIM value.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    /// A boolean.
    Boolean(bool),
    /// A string (also the carrier of datetimes on the wire).
    String(String),
    /// Any integer type; the declaration says which.
    Integer(i128),
    /// A CIM datetime string (25 characters, timestamp or interval).
    Datetime(String),
    /// An object path.
    Reference(ObjectPath),
    /// An embedded instance (`EmbeddedObject="instance"`).
    Instance(Box<Instance>),
}

impl Scalar {
    /// The value as text, as WQL compares it and as `VALUE` carries it.
    pub fn to_text(&self) -> String {
        match self {
            Scalar::Boolean(true) => "TRUE".into(),
            Scalar::Boolean(false) => "FALSE".into(),
            Scalar::String(s) | Scalar::Datetime(s) => s.clone(),
            Scalar::Integer(i) => i.to_string(),
            Scalar::Reference(path) => path.to_string(),
            Scalar::Instance(instance) => instance.class.clone(),
        }
    }
}

/// A property or parameter value: one scalar or an array.
#[derive(Debug, Clone, PartialEq)]
pub enum CimValue {
    /// A single value.
    Scalar(Scalar),
    /// An array (possibly empty).
    Array(Vec<Scalar>),
}

impl CimValue {
    /// A string value.
    pub fn string(text: impl Into<String>) -> Self {
        CimValue::Scalar(Scalar::String(text.into()))
    }

    /// An integer value.
    pub fn int(value: impl Into<i128>) -> Self {
        CimValue::Scalar(Scalar::Integer(value.into()))
    }

    /// A boolean value.
    pub fn boolean(value: bool) -> Self {
        CimValue::Scalar(Scalar::Boolean(value))
    }

    /// A reference value.
    pub fn reference(path: ObjectPath) -> Self {
        CimValue::Scalar(Scalar::Reference(path))
    }

    /// The scalar, if this is one.
    pub fn as_scalar(&self) -> Option<&Scalar> {
        match self {
            CimValue::Scalar(s) => Some(s),
            CimValue::Array(_) => None,
        }
    }

    /// The string inside a string scalar.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            CimValue::Scalar(Scalar::String(s)) => Some(s),
            _ => None,
        }
    }

    /// The integer inside an integer scalar.
    pub fn as_int(&self) -> Option<i128> {
        match self {
            CimValue::Scalar(Scalar::Integer(i)) => Some(*i),
            _ => None,
        }
    }
}

/// A CIM timestamp (`yyyymmddhhmmss.mmmmmm+000`, UTC) for `time`.
pub fn datetime(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let rem = secs % 86_400;
    format!(
        "{year:04}{month:02}{day:02}{:02}{:02}{:02}.{:06}+000",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_micros()
    )
}

/// `time` as ISO 8601 in UTC (`2026-11-29T01:09:10.498661Z`), for people and JSON output.
pub fn iso8601(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_micros()
    )
}

/// A CIM interval (`ddddddddhhmmss.mmmmmm:000`).
pub fn interval(duration: Duration) -> String {
    let secs = duration.as_secs();
    format!(
        "{:08}{:02}{:02}{:02}.{:06}:000",
        (secs / 86_400).min(99_999_999),
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60,
        duration.subsec_micros()
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
pub(crate) fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetime_has_dsp0004_layout() {
        let time = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);

        assert_eq!(datetime(time), "20231114221320.123456+000");
    }

    #[test]
    fn iso8601_has_utc_layout() {
        let time = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);

        assert_eq!(iso8601(time), "2023-11-14T22:13:20.123456Z");
    }

    #[test]
    fn interval_has_dsp0004_layout() {
        assert_eq!(
            interval(Duration::from_secs(5 * 60)),
            "00000000000500.000000:000"
        );
    }

    #[test]
    fn leap_day_is_a_valid_date() {
        // 2024-02-29 is day 19782 after the epoch.
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }
}
