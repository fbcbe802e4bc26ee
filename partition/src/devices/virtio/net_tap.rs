//! A TAP device: the host end of a virtio-net device.
//!
//! The TAP is opened with `IFF_VNET_HDR`, so every frame read or written carries the 12-byte
//! virtio-net header (`TUNSETVNETHDRSZ`) in front: checksum and segmentation offloads travel
//! between the guest and the host's network stack unchanged, as they do with vhost-net. The
//! descriptor is non-blocking: the device's I/O thread polls it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::VirtioError;

/// `TUNSETIFF`: `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `TUNSETPERSIST`: `_IOW('T', 203, int)`.
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
/// `TUNSETOFFLOAD`: `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `TUNGETIFF`: `_IOR('T', 210, unsigned int)`.
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
/// `TUNSETVNETHDRSZ`: `_IOW('T', 216, int)`.
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `TUN_F_CSUM`: the guest takes frames with partial checksums.
pub(super) const TUN_F_CSUM: u32 = 0x01;
/// `TUN_F_TSO4`: the guest takes TCPv4 segmentation-offloaded frames.
pub(super) const TUN_F_TSO4: u32 = 0x02;
/// `TUN_F_TSO6`: the guest takes TCPv6 segmentation-offloaded frames.
pub(super) const TUN_F_TSO6: u32 = 0x04;
/// `TUN_F_TSO_ECN`: ... with ECN.
pub(super) const TUN_F_TSO_ECN: u32 = 0x08;

/// Bytes of the virtio-net header with `VIRTIO_F_VERSION_1` (`struct virtio_net_hdr_v1`).
pub const VNET_HDR_LEN: usize = 12;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags in the union.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TAP queue with the virtio-net header on.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (creating if needed) the TAP interface `name` through `/dev/net/tun`, with the vnet
    /// header on and non-blocking I/O. The interface goes away with its last descriptor unless
    /// made persistent ([`set_persistent`](Self::set_persistent)).
    pub fn open(name: &str) -> Result<Self, VirtioError> {
        let error = |source| VirtioError::Tap {
            name: name.to_owned(),
            source,
        };
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
            return Err(error(io::Error::from(io::ErrorKind::InvalidInput)));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(error)?;
        let mut request = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        request.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads a `struct ifreq` (IfReq has its layout and size) from a valid
        // pointer and writes the chosen name back into it.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut request) };
        if rc < 0 {
            return Err(error(io::Error::last_os_error()));
        }
        let tap = Self {
            file,
            name: name.to_owned(),
        };
        tap.set_vnet_header().map_err(error)?;
        Ok(tap)
    }

    /// Takes a TAP descriptor opened elsewhere (by a daemon that passed it to this process): it
    /// must be a TAP with `IFF_VNET_HDR`; the header size and non-blocking mode are set here.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, VirtioError> {
        let file = File::from(fd);
        let error = |source| VirtioError::Tap {
            name: String::new(),
            source,
        };
        let mut request = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes a `struct ifreq` into a valid, writable IfReq.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNGETIFF, &mut request) };
        if rc < 0 {
            return Err(error(io::Error::last_os_error()));
        }
        if request.flags & IFF_TAP == 0 || request.flags & IFF_VNET_HDR == 0 {
            return Err(error(io::Error::from(io::ErrorKind::InvalidInput)));
        }
        let len = request.name.iter().position(|&b| b == 0).unwrap_or(0);
        let name = String::from_utf8_lossy(&request.name[..len]).into_owned();
        set_nonblocking(file.as_raw_fd()).map_err(error)?;
        let tap = Self { file, name };
        tap.set_vnet_header().map_err(error)?;
        Ok(tap)
    }

    /// Duplicates the descriptor (another handle on the same TAP queue).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Keeps the interface (and its bridge port) when the last descriptor closes, or lets it go.
    pub fn set_persistent(&self, persistent: bool) -> io::Result<()> {
        // SAFETY: TUNSETPERSIST takes its argument by value.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETPERSIST,
                libc::c_ulong::from(persistent),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Tells the TAP which offloads the guest accepts (`TUN_F_*`): frames towards the guest may
    /// then carry partial checksums or be segmentation-offloaded.
    pub(super) fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reads one frame (vnet header first) into `buf`; `Ok(None)` when none is waiting.
    pub(super) fn read_frame(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let error = io::Error::last_os_error();
            return match error.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                _ => Err(error),
            };
        }
        Ok(Some(n as usize))
    }

    /// Writes one frame (vnet header first).
    pub(super) fn write_frame(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` is valid for reads of `frame.len()` bytes.
        let n = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn set_vnet_header(&self) -> io::Result<()> {
        let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int from a valid pointer.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETVNETHDRSZ, &size) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl From<Tap> for OwnedFd {
    fn from(tap: Tap) -> Self {
        tap.file.into()
    }
}

/// Sets `O_NONBLOCK` on `fd`.
fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor the caller owns; no memory is passed.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
