//! Who may use the daemon: the peer credentials of a connection (`SO_PEERCRED`,
//! `SO_PEERGROUPS`) against root, the daemon's own user and an optional socket group.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

/// A connected client's credentials, as the kernel recorded them at `connect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Its process.
    pub pid: i32,
    /// Its effective user.
    pub uid: u32,
    /// Its effective group.
    pub gid: u32,
}

/// Who may use the daemon: root, the daemon's own user, and members of one optional group.
#[derive(Debug, Clone, Copy)]
pub struct AccessPolicy {
    owner: u32,
    group: Option<u32>,
}

impl AccessPolicy {
    /// The policy for a daemon running as the current user, opened to `group` too.
    pub fn new(group: Option<u32>) -> Self {
        // SAFETY: geteuid has no preconditions and cannot fail.
        let owner = unsafe { libc::geteuid() };
        AccessPolicy { owner, group }
    }

    /// Whether `peer` may talk to the daemon; `groups` gives its supplementary groups and is
    /// asked only when they decide.
    pub fn admits(&self, peer: &Peer, groups: impl FnOnce() -> Vec<u32>) -> bool {
        if peer.uid == 0 || peer.uid == self.owner {
            return true;
        }
        match self.group {
            Some(group) => peer.gid == group || groups().contains(&group),
            None => false,
        }
    }

    /// Whether the local user `uid` may talk to the daemon when only its user id is known (a
    /// loopback TCP client found through `/proc/net/tcp`): its primary and supplementary groups
    /// come from the user database.
    pub fn admits_user(&self, uid: u32) -> bool {
        let account = user_groups(uid);
        let gid = account.as_ref().map_or(u32::MAX, |(gid, _)| *gid);
        let peer = Peer { pid: 0, uid, gid };
        self.admits(&peer, || {
            account.map(|(_, groups)| groups).unwrap_or_default()
        })
    }
}

/// The primary group and all groups of user `uid` from the user database; `None` for a user
/// it does not know (who then has only its uid to go by).
fn user_groups(uid: u32) -> Option<(u32, Vec<u32>)> {
    let mut buffer: Vec<libc::c_char> = vec![0; 1024];
    // SAFETY: an all-zero `passwd` is a valid value to be overwritten.
    let mut passwd: libc::passwd = unsafe { std::mem::zeroed() };
    loop {
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call and `buffer.len()` is its real size.
        let rc = unsafe {
            libc::getpwuid_r(
                uid,
                &mut passwd,
                buffer.as_mut_ptr(),
                buffer.len(),
                &mut found,
            )
        };
        match rc {
            0 if found.is_null() => return None,
            0 => break,
            libc::ERANGE if buffer.len() < 1 << 20 => buffer.resize(buffer.len() * 2, 0),
            _ => return None,
        }
    }
    let gid = passwd.pw_gid;
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    for _ in 0..2 {
        let mut count = groups.len() as libc::c_int;
        // SAFETY: `pw_name` points into `buffer`, still alive; `groups` holds `count` entries
        // and the call writes at most that many (or sets `count` to what it needs).
        let rc =
            unsafe { libc::getgrouplist(passwd.pw_name, gid, groups.as_mut_ptr(), &mut count) };
        let count = usize::try_from(count).unwrap_or(0);
        if rc >= 0 {
            groups.truncate(count);
            return Some((gid, groups));
        }
        groups.resize(count.max(groups.len() * 2), 0);
    }
    Some((gid, vec![gid]))
}

/// The credentials of the process at the other end of `stream` (`SO_PEERCRED`).
pub fn peer_of(stream: &UnixStream) -> io::Result<Peer> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a writable ucred and `len` says its size; the kernel writes at most that.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Peer {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// The supplementary groups of the process at the other end of `stream` (`SO_PEERGROUPS`);
/// empty where the kernel cannot tell.
pub(super) fn peer_groups(stream: &UnixStream) -> Vec<u32> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    for _ in 0..2 {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: `groups` is writable for `len` bytes; the kernel writes at most that and sets
        // `len` to what it wrote (or needs, with ERANGE).
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let count = len as usize / std::mem::size_of::<libc::gid_t>();
        if rc == 0 {
            groups.truncate(count);
            return groups;
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) {
            break;
        }
        groups.resize(count, 0);
    }
    Vec::new()
}

/// The id of the group `name` (a group name or a number).
pub fn group_id(name: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse() {
        return Ok(gid);
    }
    let c_name = std::ffi::CString::new(name).map_err(|_| format!("bad group name '{name}'"))?;
    let mut buffer: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: an all-zero `group` is a valid value to be overwritten.
        let mut group: libc::group = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call and `buffer.len()` is its real size.
        let rc = unsafe {
            libc::getgrnam_r(
                c_name.as_ptr(),
                &mut group,
                buffer.as_mut_ptr(),
                buffer.len(),
                &mut found,
            )
        };
        match rc {
            0 if found.is_null() => return Err(format!("no group named '{name}'")),
            0 => return Ok(group.gr_gid),
            libc::ERANGE if buffer.len() < 1 << 20 => buffer.resize(buffer.len() * 2, 0),
            errno => {
                return Err(format!(
                    "cannot look up group '{name}': {}",
                    io::Error::from_raw_os_error(errno)
                ));
            }
        }
    }
}

/// Binds the daemon's socket: owner-only, or owner and `group` (read-write) when one is given.
///

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_and_root_are_admitted_and_others_are_not() {
        let policy = AccessPolicy {
            owner: 1000,
            group: None,
        };
        let peer = |uid| Peer {
            pid: 1,
            uid,
            gid: uid,
        };

        assert!(policy.admits(&peer(0), Vec::new));
        assert!(policy.admits(&peer(1000), Vec::new));
        assert!(!policy.admits(&peer(1001), || vec![1000]));
    }

    #[test]
    fn socket_group_members_are_admitted_by_primary_or_supplementary_group() {
        let policy = AccessPolicy {
            owner: 0,
            group: Some(50),
        };
        let primary = Peer {
            pid: 1,
            uid: 1001,
            gid: 50,
        };
        let other = Peer {
            pid: 1,
            uid: 1002,
            gid: 1002,
        };

        assert!(policy.admits(&primary, Vec::new));
        assert!(policy.admits(&other, || vec![7, 50]));
        assert!(!policy.admits(&other, || vec![7]));
    }

    #[test]
    fn peer_credentials_name_this_process() {
        let (a, _b) = UnixStream::pair().expect("pair");

        let peer = peer_of(&a).expect("SO_PEERCRED");

        assert_eq!(peer.pid, std::process::id() as i32);
        // SAFETY: geteuid has no preconditions.
        assert_eq!(peer.uid, unsafe { libc::geteuid() });
    }

    #[test]
    fn users_known_by_uid_alone_get_the_socket_policy() {
        let policy = AccessPolicy {
            owner: 1000,
            group: None,
        };
        let with_nogroup = AccessPolicy {
            owner: 1000,
            group: group_id("nogroup").ok(),
        };

        assert!(policy.admits_user(0));
        assert!(policy.admits_user(1000));
        assert!(!policy.admits_user(65534));
        assert!(!policy.admits_user(4_000_000));
        if with_nogroup.group.is_some() {
            assert!(with_nogroup.admits_user(65534));
        }
    }

    #[test]
    fn group_id_accepts_numbers_and_names() {
        assert_eq!(group_id("4242"), Ok(4242));
        assert_eq!(group_id("root"), Ok(0));
        assert!(group_id("no-such-group-here").is_err());
    }
}
