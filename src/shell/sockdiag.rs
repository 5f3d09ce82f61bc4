//! sock_diag (NETLINK_SOCK_DIAG) reads of TCP connections, for the TCP-stall monitor and the
//! ICMP plausibility check. Blocking; used from the monitor's own thread.

use std::io;
use std::net::SocketAddr;

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{nlas::Nla, ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket, SocketAddr as NlAddr};

/// TCP state numbers (include/net/tcp_states.h).
pub const TCP_ESTABLISHED: u8 = 1;
/// A connection waiting for the SYN-ACK.
pub const TCP_SYN_SENT: u8 = 2;

/// One TCP connection and the tcp_info fields the monitor uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpConn {
    /// Local address.
    pub local: SocketAddr,
    /// Remote address.
    pub remote: SocketAddr,
    /// TCP state.
    pub state: u8,
    /// Consecutive retransmission timeouts of the current segment (icsk_retransmits).
    pub retransmits: u8,
    /// Unacknowledged segments.
    pub unacked: u32,
}

fn open() -> io::Result<Socket> {
    let mut s = Socket::new(NETLINK_SOCK_DIAG)?;
    s.bind_auto()?;
    s.connect(&NlAddr::new(0, 0))?;
    Ok(s)
}

fn request(sock: &Socket, req: InetRequest, dump: bool) -> io::Result<Vec<TcpConn>> {
    let mut hdr = NetlinkHeader::default();
    hdr.flags = NLM_F_REQUEST | if dump { NLM_F_DUMP } else { 0 };
    let mut msg = NetlinkMessage::new(hdr, SockDiagMessage::InetRequest(req).into());
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    sock.send(&buf, 0)?;
    let mut out = Vec::new();
    let mut rx = vec![0u8; 64 * 1024];
    loop {
        let n = sock.recv(&mut &mut rx[..], 0)?;
        super::capture::sample(super::capture::Target::SockDiag, &[&[u8::from(dump)], &rx[..n]]);
        match parse_batch(&rx[..n], dump, &mut out) {
            Step::More => {}
            Step::Finished => return Ok(out),
            Step::Failed(e) => return Err(io::Error::other(e)),
        }
    }
}

/// What a received buffer of sock_diag answers says about the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// More answers follow in the next buffer.
    More,
    /// The answer is complete (the dump's end, the one connection asked for, or an
    /// undecodable message, after which nothing is trusted).
    Finished,
    /// The kernel answered a dump with an error.
    Failed(String),
}

/// Appends the TCP connections in one received buffer `buf` of sock_diag answers to
/// `out`; `dump`: the answer to a dump (else to a single lookup, which ends at its first
/// connection or at an error such as ENOENT).
pub fn parse_batch(buf: &[u8], dump: bool, out: &mut Vec<TcpConn>) -> Step {
    let mut off = 0;
    while off < buf.len() {
        let Ok(m) = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[off..]) else { return Step::Finished };
        let len = m.header.length as usize;
        match m.payload {
            NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
                let id = &r.header.socket_id;
                let mut conn = TcpConn {
                    local: SocketAddr::new(id.source_address.to_canonical(), id.source_port),
                    remote: SocketAddr::new(id.destination_address.to_canonical(), id.destination_port),
                    state: r.header.state,
                    retransmits: 0,
                    unacked: 0,
                };
                for nla in r.nlas.iter() {
                    if let Nla::TcpInfo(info) = nla {
                        conn.retransmits = info.retransmits;
                        conn.unacked = info.unacked;
                    }
                }
                out.push(conn);
                if !dump {
                    return Step::Finished;
                }
            }
            NetlinkPayload::Done(_) => return Step::Finished,
            NetlinkPayload::Error(e) => {
                // ENOENT for a single lookup: no such socket.
                return if dump { Step::Failed(format!("sock_diag: {e:?}")) } else { Step::Finished };
            }
            _ => {}
        }
        if len == 0 {
            break;
        }
        off += len;
    }
    Step::More
}

/// Every TCP connection in SYN_SENT or ESTABLISHED, IPv4 and IPv6, with tcp_info.
///
/// # Errors
/// Netlink failures.
pub fn tcp_connections() -> io::Result<Vec<TcpConn>> {
    let sock = open()?;
    let mut all = Vec::new();
    for (family, id) in [(AF_INET, SocketId::new_v4()), (AF_INET6, SocketId::new_v6())] {
        let req = InetRequest { family, protocol: IPPROTO_TCP, extensions: ExtensionFlags::INFO, states: StateFlags::ESTABLISHED | StateFlags::SYN_SENT, socket_id: id };
        all.extend(request(&sock, req, true)?);
    }
    Ok(all)
}

/// Whether a TCP connection from `local` to `remote` exists (any state but LISTEN).
///
/// # Errors
/// Netlink failures.
pub fn tcp_exists(local: SocketAddr, remote: SocketAddr) -> io::Result<bool> {
    let sock = open()?;
    let (family, mut id) = if local.is_ipv4() { (AF_INET, SocketId::new_v4()) } else { (AF_INET6, SocketId::new_v6()) };
    id.source_address = local.ip();
    id.source_port = local.port();
    id.destination_address = remote.ip();
    id.destination_port = remote.port();
    id.cookie = [0xff; 8];
    let req = InetRequest { family, protocol: IPPROTO_TCP, extensions: ExtensionFlags::empty(), states: StateFlags::all(), socket_id: id };
    Ok(!request(&sock, req, false)?.is_empty())
}
