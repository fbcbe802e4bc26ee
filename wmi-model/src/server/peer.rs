//! Who is at the other end of a loopback TCP connection, the way identd finds out: the
//! client's socket is the one whose local address is the connection's peer address and whose
//! remote address is the server's local address; `/proc/net/tcp` and `/proc/net/tcp6` name the
//! user that owns it.
//!
//! This is what lets the loopback endpoint apply the same access policy as the daemon's Unix
//! socket (`SO_PEERCRED`) instead of serving every local user.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Decides whether a local user may use the endpoint (the daemon's socket policy).
pub trait LocalAccess: Send + Sync + fmt::Debug {
    /// Whether the user `uid` may manage VMs.
    fn admits_uid(&self, uid: u32) -> bool;

    /// Told of every refused connection, so the daemon can log it.
    fn refused(&self, peer: SocketAddr, reason: &str) {
        tracing::warn!(%peer, reason, "cim: connection refused");
    }
}

/// One socket of a `/proc/net/tcp{,6}` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSocket {
    /// Its own address.
    pub local: SocketAddr,
    /// The address it is connected to (all zero when listening).
    pub remote: SocketAddr,
    /// The user owning it.
    pub uid: u32,
}

/// Parses one line of `/proc/net/tcp` or `/proc/net/tcp6`; `None` for the header line and for
/// anything malformed.
///
/// The kernel prints each address as the native-endian `u32`s of its network-order bytes
/// (`%08X` each) and the port in host order (`%04X`).
pub fn parse_tcp_line(line: &str) -> Option<TcpSocket> {
    let mut fields = line.split_whitespace();
    let slot = fields.next()?;
    if !slot.ends_with(':') {
        return None;
    }
    let local = parse_address(fields.next()?)?;
    let remote = parse_address(fields.next()?)?;
    // st, tx_queue:rx_queue, tr:tm->when, retrnsmt, then uid.
    let uid = fields.nth(4)?.parse().ok()?;
    Some(TcpSocket { local, remote, uid })
}

fn parse_address(field: &str) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    if port.len() != 4 {
        return None;
    }
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(parse_word(ip)?.to_ne_bytes())),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                let word = parse_word(ip.get(i * 8..i * 8 + 8)?)?;
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn parse_word(hex: &str) -> Option<u32> {
    if hex.len() != 8 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(hex, 16).ok()
}

/// The same address with a v4-mapped IPv6 address (`::ffff:a.b.c.d`) written as IPv4.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// The owner of the client socket of a connection, found in the table `text`: the socket whose
/// local address is `peer` and whose remote address is `server`.
pub fn owner_in_table(text: &str, peer: SocketAddr, server: SocketAddr) -> Option<u32> {
    let (peer, server) = (canonical(peer), canonical(server));
    text.lines()
        .filter_map(parse_tcp_line)
        .find(|s| canonical(s.local) == peer && canonical(s.remote) == server)
        .map(|s| s.uid)
}

/// The user owning the client end of the loopback connection from `peer` to `server`, from
/// `/proc/net/tcp` and `/proc/net/tcp6`; `None` when neither table holds it (the client is
/// then not on this host's network namespace, or it has gone).
pub fn local_peer_uid(peer: SocketAddr, server: SocketAddr) -> Option<u32> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .find_map(|text| owner_in_table(&text, peer, server))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use proptest::prelude::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:176C 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 31337 1 0000000000000000 100 0 0 10 0
   1: 0100007F:D431 0100007F:176C 01 00000000:00000000 00:00000000 00000000 65534        0 31338 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:176C 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 31339 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    fn ipv4_line_gives_addresses_and_owner() {
        let line = TCP.lines().nth(2).unwrap();

        let socket = parse_tcp_line(line).unwrap();

        assert_eq!(socket.local, "127.0.0.1:54321".parse().unwrap());
        assert_eq!(socket.remote, "127.0.0.1:5996".parse().unwrap());
        assert_eq!(socket.uid, 65534);
    }

    #[test]
    fn ipv6_line_gives_addresses_and_owner() {
        let line = "   3: 00000000000000000000000001000000:D432 00000000000000000000000001000000:176C 01 00000000:00000000 00:00000000 00000000  1000        0 4242 1";

        let socket = parse_tcp_line(line).unwrap();

        assert_eq!(socket.local, "[::1]:54322".parse().unwrap());
        assert_eq!(socket.remote, "[::1]:5996".parse().unwrap());
        assert_eq!(socket.uid, 1000);
    }

    #[test]
    fn header_and_garbage_lines_are_skipped() {
        assert_eq!(parse_tcp_line(TCP.lines().next().unwrap()), None);
        assert_eq!(parse_tcp_line(""), None);
        assert_eq!(
            parse_tcp_line("0: 0100007F:17 0100007F:176C 01 a b c d 0"),
            None
        );
        assert_eq!(
            parse_tcp_line("0: 0100007F:176C 0100007F:176C 01 a b c"),
            None
        );
    }

    #[test]
    fn the_client_socket_is_told_from_the_server_side() {
        let peer = "127.0.0.1:54321".parse().unwrap();
        let server = "127.0.0.1:5996".parse().unwrap();

        assert_eq!(owner_in_table(TCP, peer, server), Some(65534));
        assert_eq!(owner_in_table(TCP, server, peer), Some(0));
        assert_eq!(
            owner_in_table(TCP, "127.0.0.1:1".parse().unwrap(), server),
            None
        );
    }

    #[test]
    fn v4_mapped_addresses_match_ipv4_entries() {
        let peer = "[::ffff:127.0.0.1]:54321".parse().unwrap();
        let server = "[::ffff:127.0.0.1]:5996".parse().unwrap();

        assert_eq!(owner_in_table(TCP, peer, server), Some(65534));
    }

    #[test]
    fn a_real_loopback_connection_is_owned_by_this_process_user() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server_side, peer) = listener.accept().unwrap();

        let uid = local_peer_uid(peer, listener.local_addr().unwrap());

        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let euid: u32 = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|u| u.parse().ok())
            .unwrap();
        assert_eq!(uid, Some(euid));
        drop(client);
    }

    proptest! {
        #[test]
        fn parser_never_panics(line in "\\PC{0,200}") {
            let _ = parse_tcp_line(&line);
        }

        #[test]
        fn parser_never_panics_on_near_lines(
            a in "[0-9A-Fa-f:]{0,40}", b in "[0-9A-Fa-f:]{0,40}", rest in "[ 0-9:A-F-]{0,60}"
        ) {
            let _ = parse_tcp_line(&format!("0: {a} {b} {rest}"));
        }
    }
}
