//! The few rtnetlink requests a virtual switch needs, over a plain `NETLINK_ROUTE` socket:
//! create and delete links (bridges), bring them up, enslave ports to a bridge, add an IPv4
//! address. Each request asks for an acknowledgement and turns a netlink error into an
//! [`io::Error`] carrying its errno.
//!
//! Requests act on the network namespace of the thread that opened the socket.

use std::ffi::CString;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NLMSG_ERROR: u16 = 2;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_SETLINK: u16 = 19;
const RTM_NEWADDR: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const NLA_F_NESTED: u16 = 0x8000;
const IFF_UP: u32 = 1;
const HEADER_LEN: usize = 16;

/// A `NETLINK_ROUTE` socket.
#[derive(Debug)]
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    /// Opens a route netlink socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Self> {
        // SAFETY: plain socket(2); the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, seq: 0 })
    }

    /// Creates a link of `kind` ("bridge") named `name`; fails with `EEXIST` if one exists.
    pub fn create_link(&mut self, name: &str, kind: &str) -> io::Result<()> {
        let mut message = Message::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL);
        message.ifinfo(0, 0, 0);
        message.attr_str(IFLA_IFNAME, name);
        let nest = message.begin_nested(IFLA_LINKINFO);
        message.attr_str(IFLA_INFO_KIND, kind);
        message.end_nested(nest);
        self.request(message)
    }

    /// Deletes the link `index`.
    pub fn delete_link(&mut self, index: u32) -> io::Result<()> {
        let mut message = Message::new(RTM_DELLINK, 0);
        message.ifinfo(index, 0, 0);
        self.request(message)
    }

    /// Brings link `index` up (or down).
    pub fn set_up(&mut self, index: u32, up: bool) -> io::Result<()> {
        let mut message = Message::new(RTM_SETLINK, 0);
        message.ifinfo(index, if up { IFF_UP } else { 0 }, IFF_UP);
        self.request(message)
    }

    /// Makes link `index` a port of the bridge `master` (0: of none).
    pub fn set_master(&mut self, index: u32, master: u32) -> io::Result<()> {
        let mut message = Message::new(RTM_SETLINK, 0);
        message.ifinfo(index, 0, 0);
        message.attr(IFLA_MASTER, &master.to_ne_bytes());
        self.request(message)
    }

    /// Adds `address/prefix` to link `index`.
    pub fn add_address(&mut self, index: u32, address: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut message = Message::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL);
        // struct ifaddrmsg: family, prefixlen, flags, scope, index.
        message.bytes(&[libc::AF_INET as u8, prefix, 0, 0]);
        message.bytes(&index.to_ne_bytes());
        message.attr(IFA_LOCAL, &address.octets());
        message.attr(IFA_ADDRESS, &address.octets());
        self.request(message)
    }

    fn request(&mut self, mut message: Message) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let bytes = message.finish(seq);
        // SAFETY: `bytes` is valid for reads of its length; the kernel is the default destination
        // of an unbound netlink socket's send.
        let sent =
            unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut reply = [0u8; 8192];
        loop {
            // SAFETY: `reply` is valid for writes of its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    reply.as_mut_ptr().cast(),
                    reply.len(),
                    0,
                )
            };
            if n < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error);
            }
            let mut rest = reply.get(..n as usize).unwrap_or_default();
            while rest.len() >= HEADER_LEN {
                let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap_or_default()) as usize;
                let kind = u16::from_ne_bytes(rest[4..6].try_into().unwrap_or_default());
                let reply_seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap_or_default());
                if len < HEADER_LEN || len > rest.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "bad netlink reply",
                    ));
                }
                if kind == NLMSG_ERROR && reply_seq == seq && len >= HEADER_LEN + 4 {
                    let errno = i32::from_ne_bytes(
                        rest[HEADER_LEN..HEADER_LEN + 4]
                            .try_into()
                            .unwrap_or_default(),
                    );
                    return match errno {
                        0 => Ok(()),
                        errno => Err(io::Error::from_raw_os_error(-errno)),
                    };
                }
                rest = &rest[align(len).min(rest.len())..];
            }
        }
    }
}

/// The index of interface `name`, if it exists (in the calling thread's namespace).
pub fn link_index(name: &str) -> Option<u32> {
    let name = CString::new(name).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// A netlink request being built: header placeholder, family header, attributes.
struct Message {
    buf: Vec<u8>,
}

impl Message {
    fn new(kind: u16, flags: u16) -> Self {
        let mut buf = vec![0u8; HEADER_LEN];
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        buf[6..8].copy_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        Self { buf }
    }

    /// `struct ifinfomsg`: family, type, index, flags, change.
    fn ifinfo(&mut self, index: u32, flags: u32, change: u32) {
        self.bytes(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
        self.bytes(&index.to_ne_bytes());
        self.bytes(&flags.to_ne_bytes());
        self.bytes(&change.to_ne_bytes());
    }

    fn bytes(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    fn attr(&mut self, kind: u16, value: &[u8]) {
        let len = 4 + value.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.buf.resize(align(self.buf.len()), 0);
    }

    fn attr_str(&mut self, kind: u16, value: &str) {
        let mut bytes = value.as_bytes().to_vec();
        bytes.push(0);
        self.attr(kind, &bytes);
    }

    fn begin_nested(&mut self, kind: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn end_nested(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(&mut self, seq: u32) -> &[u8] {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        &self.buf
    }
}
