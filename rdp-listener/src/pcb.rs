//! The MS-RDPEPS pre-connection PDU (PCB): what VMConnect and FreeRDP's `/vmconnect` send on
//! TCP 2179 before anything else, naming the VM whose console they want.
//!
//! All integers are little-endian. V1 is 16 bytes (`cbSize`, `Flags`, `Version`, `Id`); V2 adds
//! `cchPCB` (UTF-16 code units including the terminating NUL) and the UTF-16LE string. The server
//! decodes by `cbSize`, not by `Version`: 16 means V1, 18 or more means V2, anything else is
//! refused. Exactly `cbSize` bytes belong to the PDU; whatever follows in the same buffer (the
//! TLS ClientHello of `/vmconnect`, the X.224 request of `/pcb`) is the client's and is returned
//! untouched.

use std::fmt;

use uuid::Uuid;
use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

/// Size of the V1 PDU (and of the header every version starts with).
pub const PCB_V1_SIZE: usize = 16;
/// Smallest V2 PDU: the header and `cchPCB`.
pub const PCB_V2_MIN_SIZE: usize = 18;
/// Largest `cbSize` accepted. The largest legal PDU is 18 + 2 × 65535 bytes, but a VM GUID with
/// options is ~120: anything past this is a client that would make us buffer for nothing.
pub const PCB_MAX_SIZE: usize = 64 * 1024;

/// The fixed header shared by both versions.
#[derive(Debug, FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct Header {
    cb_size: U32,
    flags: U32,
    version: U32,
    id: U32,
}

/// What is wrong with a pre-connection PDU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PcbError {
    /// More bytes are needed before the PDU can be decoded (not an error yet).
    #[error("pre-connection pdu incomplete: {needed} bytes needed, {have} read")]
    Incomplete {
        /// Bytes the PDU needs in total (4 while `cbSize` itself is unknown).
        needed: usize,
        /// Bytes read so far.
        have: usize,
    },
    /// `cbSize` is 17 or below 16: no version has that size.
    #[error("pre-connection pdu size {0} is not 16 or at least 18")]
    BadSize(u32),
    /// `cbSize` is larger than [`PCB_MAX_SIZE`].
    #[error("pre-connection pdu size {0} exceeds the limit")]
    TooLarge(u32),
    /// `cchPCB` says the string is longer than `cbSize` leaves room for.
    #[error("pre-connection string of {cch} code units does not fit in {cb_size} bytes")]
    StringOverrun {
        /// `cchPCB`.
        cch: u16,
        /// `cbSize`.
        cb_size: u32,
    },
    /// The string is not valid UTF-16.
    #[error("pre-connection string is not utf-16")]
    NotUtf16,
}

/// A decoded pre-connection PDU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreconnectionPdu {
    /// `cbSize`: how many bytes the PDU took.
    pub size: usize,
    /// `Flags` (reserved, kept for the log).
    pub flags: u32,
    /// `Version` as sent (1 or 2; servers must not rely on it).
    pub version: u32,
    /// `Id`: the RDP source id (0 when unused, as Hyper-V's clients send).
    pub id: u32,
    /// `wszPCB` up to its terminating NUL; `None` for V1 or `cchPCB == 0`.
    pub blob: Option<String>,
}

impl PreconnectionPdu {
    /// Decodes the PDU at the start of `buf`; returns it and the bytes after it, untouched.
    ///
    /// [`PcbError::Incomplete`] means: read more and call again. Every other error is final.
    pub fn decode(buf: &[u8]) -> Result<(PreconnectionPdu, &[u8]), PcbError> {
        let Ok((header, _)) = Header::ref_from_prefix(buf) else {
            // Decide on cbSize as soon as it is known, so a bad size fails without waiting.
            if let Some(cb) = buf.get(..4) {
                let cb_size = u32::from_le_bytes([cb[0], cb[1], cb[2], cb[3]]);
                check_size(cb_size)?;
                return Err(PcbError::Incomplete {
                    needed: cb_size as usize,
                    have: buf.len(),
                });
            }
            return Err(PcbError::Incomplete {
                needed: 4,
                have: buf.len(),
            });
        };
        let cb_size = header.cb_size.get();
        let size = check_size(cb_size)?;
        let Some((pdu, rest)) = buf.split_at_checked(size) else {
            return Err(PcbError::Incomplete {
                needed: size,
                have: buf.len(),
            });
        };
        let blob = if size == PCB_V1_SIZE {
            None
        } else {
            decode_blob(&pdu[PCB_V1_SIZE..], cb_size)?
        };
        let decoded = PreconnectionPdu {
            size,
            flags: header.flags.get(),
            version: header.version.get(),
            id: header.id.get(),
            blob,
        };
        Ok((decoded, rest))
    }
}

/// `cbSize` as a length, if some version has it and it is within bounds.
fn check_size(cb_size: u32) -> Result<usize, PcbError> {
    let size = usize::try_from(cb_size).map_err(|_| PcbError::TooLarge(cb_size))?;
    if size > PCB_MAX_SIZE {
        return Err(PcbError::TooLarge(cb_size));
    }
    if size != PCB_V1_SIZE && size < PCB_V2_MIN_SIZE {
        return Err(PcbError::BadSize(cb_size));
    }
    Ok(size)
}

/// The V2 tail (`cchPCB` and the string), `body` being exactly `cbSize - 16` bytes.
fn decode_blob(body: &[u8], cb_size: u32) -> Result<Option<String>, PcbError> {
    let (cch, units) = U16::read_from_prefix(body).map_err(|_| PcbError::BadSize(cb_size))?;
    let cch_units = cch.get();
    if cch_units == 0 {
        return Ok(None);
    }
    let bytes = units
        .get(..usize::from(cch_units) * 2)
        .ok_or(PcbError::StringOverrun {
            cch: cch_units,
            cb_size,
        })?;
    let wide = <[U16]>::ref_from_bytes(bytes).map_err(|_| PcbError::NotUtf16)?;
    let text: Vec<u16> = wide
        .iter()
        .map(|unit| unit.get())
        .take_while(|&unit| unit != 0)
        .collect();
    String::from_utf16(&text)
        .map(Some)
        .map_err(|_| PcbError::NotUtf16)
}

/// Encodes a V2 PDU for `blob` the way FreeRDP does (`cchPCB` = UTF-16 length + 1, Id 0). For
/// tests, benchmarks and clients of our own.
pub fn encode_v2(blob: &str) -> Vec<u8> {
    let wide: Vec<u16> = blob.encode_utf16().chain(std::iter::once(0)).collect();
    let size = PCB_V2_MIN_SIZE + wide.len() * 2;
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(size as u32).to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&2u32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(wide.len() as u16).to_le_bytes());
    for unit in wide {
        out.extend_from_slice(&unit.to_le_bytes());
    }
    out
}

/// What a PCB string asks for: `"<VM GUID>[;Key=Value]..."`, e.g. `"{6D2C…};EnhancedMode=1"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleTarget {
    /// The VM.
    pub vm: Uuid,
    /// The options after the GUID, in order, as `(key, value)`; a bare key has an empty value.
    pub options: Vec<(String, String)>,
}

/// A PCB string that names no VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pre-connection string {0:?} does not start with a vm guid")]
pub struct BadTarget(pub String);

impl ConsoleTarget {
    /// Parses a PCB string: a GUID with or without braces, in any case, then `;`-separated
    /// options.
    pub fn parse(blob: &str) -> Result<ConsoleTarget, BadTarget> {
        let mut parts = blob.split(';');
        let guid = parts.next().unwrap_or_default().trim();
        let bare = guid
            .strip_prefix('{')
            .and_then(|g| g.strip_suffix('}'))
            .unwrap_or(guid);
        // Only the hyphenated 36-character form: Uuid::parse_str would also take 32 bare hex
        // digits or a urn, which no VMConnect sends.
        if bare.len() != 36 {
            return Err(BadTarget(blob.to_owned()));
        }
        let vm = Uuid::parse_str(bare).map_err(|_| BadTarget(blob.to_owned()))?;
        let options = parts
            .filter(|part| !part.trim().is_empty())
            .map(|part| match part.split_once('=') {
                Some((key, value)) => (key.trim().to_owned(), value.trim().to_owned()),
                None => (part.trim().to_owned(), String::new()),
            })
            .collect();
        Ok(ConsoleTarget { vm, options })
    }

    /// `EnhancedMode` (case-insensitive key): `Some(true)` for `1`, `Some(false)` for `0`.
    pub fn enhanced_mode(&self) -> Option<bool> {
        self.options
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case("EnhancedMode"))
            .map(|(_, value)| value == "1")
    }
}

impl fmt::Display for ConsoleTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.vm)?;
        for (key, value) in &self.options {
            write!(f, ";{key}={value}")?;
        }
        Ok(())
    }
}
