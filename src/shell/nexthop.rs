//! Nexthop objects over netlink (`RTM_NEWNEXTHOP`, `RTM_DELNEXTHOP`, `RTM_GETNEXTHOP`;
//! `include/uapi/linux/nexthop.h`, Linux ≥ 5.13 for resilient groups).
//!
//! netlink-packet-route has no nexthop message types, so this module defines one on top of
//! netlink-packet-core's framing and attribute buffers, and talks to the kernel over a
//! netlink-sys socket. Objects carry detour's protocol number, so a dump finds exactly
//! detour's objects (also those a crashed run left).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{anyhow, bail, Context, Result};
use netlink_packet_core::{
    DefaultNla, Emitable, NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable, Nla, NlaBuffer, NlasIterator, Parseable, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::kernel::{NexthopKind, NexthopSpec, RTPROT_DETOUR};

const RTM_NEWNEXTHOP: u16 = 104;
const RTM_DELNEXTHOP: u16 = 105;
const RTM_GETNEXTHOP: u16 = 106;

const NHA_ID: u16 = 1;
const NHA_GROUP: u16 = 2;
const NHA_GROUP_TYPE: u16 = 3;
const NHA_OIF: u16 = 5;
const NHA_GATEWAY: u16 = 6;
const NHA_RES_GROUP: u16 = 12;
const NHA_RES_GROUP_BUCKETS: u16 = 1;
const NHA_RES_GROUP_IDLE_TIMER: u16 = 2;
const NEXTHOP_GRP_TYPE_RES: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
/// `clock_t` ticks per second in netlink (USER_HZ).
const USER_HZ: u32 = 100;

const AF_UNSPEC: u8 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// A nexthop message: `struct nhmsg` and attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NexthopMessage {
    /// `RTM_NEWNEXTHOP`, `RTM_DELNEXTHOP` or `RTM_GETNEXTHOP`.
    pub kind: u16,
    /// Address family.
    pub family: u8,
    /// Scope.
    pub scope: u8,
    /// Routing protocol.
    pub protocol: u8,
    /// Flags (`NHF_*`).
    pub flags: u32,
    /// Attributes.
    pub nlas: Vec<DefaultNla>,
}

/// Why a nexthop message could not be read.
#[derive(Debug, thiserror::Error)]
#[error("malformed nexthop message: {0}")]
pub struct NexthopDecodeError(String);

impl NetlinkSerializable for NexthopMessage {
    fn message_type(&self) -> u16 {
        self.kind
    }

    fn buffer_len(&self) -> usize {
        8 + self.nlas.as_slice().buffer_len()
    }

    fn serialize(&self, buffer: &mut [u8]) {
        buffer[0] = self.family;
        buffer[1] = self.scope;
        buffer[2] = self.protocol;
        buffer[3] = 0;
        buffer[4..8].copy_from_slice(&self.flags.to_ne_bytes());
        self.nlas.as_slice().emit(&mut buffer[8..]);
    }
}

impl NetlinkDeserializable for NexthopMessage {
    type Error = NexthopDecodeError;

    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<Self, Self::Error> {
        if payload.len() < 8 {
            return Err(NexthopDecodeError(format!("{} bytes", payload.len())));
        }
        let mut nlas = Vec::new();
        for nla in NlasIterator::new(&payload[8..]) {
            let nla = nla.map_err(|e| NexthopDecodeError(e.to_string()))?;
            nlas.push(DefaultNla::parse(&nla).map_err(|e| NexthopDecodeError(e.to_string()))?);
        }
        Ok(NexthopMessage { kind: header.message_type, family: payload[0], scope: payload[1], protocol: payload[2], flags: u32::from_ne_bytes(payload[4..8].try_into().expect("4 bytes")), nlas })
    }
}

fn nla(kind: u16, value: Vec<u8>) -> DefaultNla {
    DefaultNla::new(kind, value)
}

fn nested(kind: u16, inner: &[DefaultNla]) -> DefaultNla {
    let mut buf = vec![0u8; inner.buffer_len()];
    inner.emit(&mut buf);
    DefaultNla::new(kind | NLA_F_NESTED, buf)
}

/// The message that creates or replaces `spec` (devices named by index in `index`).
///
/// # Errors
/// If a device is unknown.
pub fn new_message(spec: &NexthopSpec, index: &HashMap<String, u32>) -> Result<NexthopMessage> {
    let mut m = NexthopMessage { kind: RTM_NEWNEXTHOP, family: AF_UNSPEC, scope: 0, protocol: RTPROT_DETOUR, flags: 0, nlas: vec![nla(NHA_ID, spec.id.to_ne_bytes().to_vec())] };
    match &spec.kind {
        NexthopKind::Via { gw, dev } => {
            m.family = if spec.v6 { AF_INET6 } else { AF_INET };
            let oif = index.get(dev).copied().with_context(|| format!("interface {dev} does not exist"))?;
            m.nlas.push(nla(NHA_OIF, oif.to_ne_bytes().to_vec()));
            if let Some(gw) = gw {
                let bytes = match gw {
                    IpAddr::V4(a) => a.octets().to_vec(),
                    IpAddr::V6(a) => a.octets().to_vec(),
                };
                m.nlas.push(nla(NHA_GATEWAY, bytes));
            }
        }
        NexthopKind::Resilient { members, buckets, idle_timer_s } => {
            let mut group = Vec::with_capacity(members.len() * 8);
            for (id, weight) in members {
                let w = weight.clamp(&1, &256) - 1;
                group.extend_from_slice(&id.to_ne_bytes());
                group.push((w & 0xff) as u8);
                group.push((w >> 8) as u8);
                group.extend_from_slice(&[0, 0]);
            }
            m.nlas.push(nla(NHA_GROUP, group));
            m.nlas.push(nla(NHA_GROUP_TYPE, NEXTHOP_GRP_TYPE_RES.to_ne_bytes().to_vec()));
            m.nlas.push(nested(NHA_RES_GROUP, &[nla(NHA_RES_GROUP_BUCKETS, buckets.to_ne_bytes().to_vec()), nla(NHA_RES_GROUP_IDLE_TIMER, (idle_timer_s * USER_HZ).to_ne_bytes().to_vec())]));
        }
    }
    Ok(m)
}

fn u32_of(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
}

fn u16_of(v: &[u8]) -> Option<u16> {
    Some(u16::from_ne_bytes(v.get(..2)?.try_into().ok()?))
}

/// Decodes the payload of a nexthop message of type `kind` (`RTM_NEWNEXTHOP`, ...) as the
/// kernel sends it, and reads it back into a spec when detour owns it ([`parse`]).
pub fn decode(kind: u16, payload: &[u8], names: &HashMap<u32, String>) -> Option<NexthopSpec> {
    let mut header = NetlinkHeader::default();
    header.message_type = kind;
    parse(&NexthopMessage::deserialize(&header, payload).ok()?, names)
}

/// Reads a nexthop message detour owns back into a spec (the family of a group is filled
/// in later from its members; `v6` is false until then). Objects of other protocols give
/// `None`.
pub fn parse(m: &NexthopMessage, names: &HashMap<u32, String>) -> Option<NexthopSpec> {
    if m.protocol != RTPROT_DETOUR {
        return None;
    }
    let get = |k: u16| {
        m.nlas.iter().find(|n| n.kind() & !NLA_F_NESTED == k).map(|n| {
            let mut v = vec![0u8; n.value_len()];
            n.emit_value(&mut v);
            v
        })
    };
    let id = u32_of(&get(NHA_ID)?)?;
    if let Some(group) = get(NHA_GROUP) {
        // struct nexthop_grp: id, weight - 1 (low byte), its high byte (newer kernels),
        // reserved. A weight of 65,536 (the kernel's largest) saturates at 65,535: detour
        // writes at most 256, and the fuzzer found that the sum overflowed.
        let members: Vec<(u32, u16)> = group.chunks_exact(8).filter_map(|c| Some((u32_of(&c[..4])?, (u16::from(c[4]) | (u16::from(c[5]) << 8)).saturating_add(1)))).collect();
        let (mut buckets, mut idle) = (0u16, 0u32);
        if let Some(res) = get(NHA_RES_GROUP) {
            for inner in NlasIterator::new(&res[..]).flatten() {
                let buf: NlaBuffer<&[u8]> = inner;
                match buf.kind() & !NLA_F_NESTED {
                    NHA_RES_GROUP_BUCKETS => buckets = u16_of(buf.value()).unwrap_or(0),
                    NHA_RES_GROUP_IDLE_TIMER => idle = u32_of(buf.value()).unwrap_or(0) / USER_HZ,
                    _ => {}
                }
            }
        }
        return Some(NexthopSpec { id, v6: false, kind: NexthopKind::Resilient { members, buckets, idle_timer_s: idle } });
    }
    let dev = names.get(&u32_of(&get(NHA_OIF)?)?).cloned().unwrap_or_default();
    let gw = get(NHA_GATEWAY).and_then(|v| match v.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(&v[..]).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&v[..]).ok()?))),
        _ => None,
    });
    Some(NexthopSpec { id, v6: m.family == AF_INET6, kind: NexthopKind::Via { gw, dev } })
}

/// A netlink socket for nexthop requests (blocking, with a timeout; requests take
/// microseconds).
pub struct Nexthops {
    sock: Socket,
    seq: u32,
}

impl Nexthops {
    /// Opens the socket.
    ///
    /// # Errors
    /// Socket errors.
    pub fn open() -> Result<Nexthops> {
        let mut sock = Socket::new(NETLINK_ROUTE).context("opening a netlink socket")?;
        sock.bind_auto().context("binding the netlink socket")?;
        sock.connect(&SocketAddr::new(0, 0)).context("connecting the netlink socket")?;
        let tv = nix::sys::time::TimeVal::from(libc::timeval { tv_sec: 2, tv_usec: 0 });
        nix::sys::socket::setsockopt(&std::os::fd::AsFd::as_fd(&sock), nix::sys::socket::sockopt::ReceiveTimeout, &tv).context("netlink socket timeout")?;
        Ok(Nexthops { sock, seq: 0 })
    }

    fn send(&mut self, msg: NexthopMessage, flags: u16) -> Result<Vec<NexthopMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut req = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::InnerMessage(msg));
        req.header.flags = flags;
        req.header.sequence_number = self.seq;
        req.finalize();
        let mut buf = vec![0u8; req.buffer_len()];
        req.serialize(&mut buf);
        self.sock.send(&buf, 0).context("netlink send")?;
        let mut out = Vec::new();
        let dump = flags & NLM_F_DUMP != 0;
        loop {
            let mut rx = Vec::with_capacity(64 * 1024);
            let n = self.sock.recv(&mut rx, 0).map_err(|e| anyhow!("netlink receive: {e}"))?;
            let mut off = 0;
            while off < n {
                let m: NetlinkMessage<NexthopMessage> = NetlinkMessage::deserialize(&rx[off..n]).map_err(|e| anyhow!("netlink: {e}"))?;
                let len = m.header.length as usize;
                if len == 0 {
                    bail!("netlink: empty message");
                }
                if let (NetlinkPayload::InnerMessage(_), Some(payload)) = (&m.payload, rx.get(off + 16..off + len)) {
                    super::capture::sample(super::capture::Target::Nexthop, &[&m.header.message_type.to_le_bytes(), payload]);
                }
                off += (len + 3) & !3;
                if m.header.sequence_number != self.seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::InnerMessage(x) => out.push(x),
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => match e.code {
                        None => return Ok(out),
                        Some(c) => return Err(std::io::Error::from_raw_os_error(-c.get()).into()),
                    },
                    _ => {}
                }
            }
            if !dump && !out.is_empty() {
                return Ok(out);
            }
        }
    }

    /// Every nexthop object detour owns.
    ///
    /// # Errors
    /// Netlink failures.
    pub fn dump(&mut self, names: &HashMap<u32, String>) -> Result<Vec<NexthopSpec>> {
        let req = NexthopMessage { kind: RTM_GETNEXTHOP, family: AF_UNSPEC, scope: 0, protocol: 0, flags: 0, nlas: Vec::new() };
        let msgs = self.send(req, NLM_F_REQUEST | NLM_F_DUMP)?;
        let mut specs: Vec<NexthopSpec> = msgs.iter().filter_map(|m| parse(m, names)).collect();
        // A group takes its members' family.
        let fam: HashMap<u32, bool> = specs.iter().filter(|s| matches!(s.kind, NexthopKind::Via { .. })).map(|s| (s.id, s.v6)).collect();
        for s in specs.iter_mut() {
            if let NexthopKind::Resilient { members, .. } = &s.kind {
                s.v6 = members.first().and_then(|(m, _)| fam.get(m)).copied().unwrap_or(false);
            }
        }
        Ok(specs)
    }

    /// Creates or replaces a nexthop object.
    ///
    /// # Errors
    /// Netlink failures.
    pub fn set(&mut self, spec: &NexthopSpec, index: &HashMap<String, u32>) -> Result<()> {
        let m = new_message(spec, index)?;
        self.send(m, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE).map(|_| ()).with_context(|| format!("setting nexthop {}", spec.id))
    }

    /// Deletes a nexthop object; a missing one counts as deleted.
    ///
    /// # Errors
    /// Netlink failures.
    pub fn delete(&mut self, id: u32) -> Result<()> {
        let m = NexthopMessage { kind: RTM_DELNEXTHOP, family: AF_UNSPEC, scope: 0, protocol: 0, flags: 0, nlas: vec![nla(NHA_ID, id.to_ne_bytes().to_vec())] };
        match self.send(m, NLM_F_REQUEST | NLM_F_ACK) {
            Ok(_) => Ok(()),
            Err(e) if e.downcast_ref::<std::io::Error>().and_then(|e| e.raw_os_error()) == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(e.context(format!("deleting nexthop {id}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_member_of_the_largest_weight_reads_back_without_overflow() {
        // The kernel's largest weight, 65,536, is 0xffff in the two weight bytes; found by
        // the nexthop fuzz target (the sum overflowed).
        let mut group = 21u32.to_ne_bytes().to_vec();
        group.extend([0xff, 0xff, 0, 0]);
        let m = NexthopMessage { kind: 104, family: 2, scope: 0, protocol: RTPROT_DETOUR, flags: 0, nlas: vec![nla(NHA_ID, 9u32.to_ne_bytes().to_vec()), nla(NHA_GROUP, group)] };
        match parse(&m, &HashMap::new()).map(|s| s.kind) {
            Some(NexthopKind::Resilient { members, .. }) => assert_eq!(members, vec![(21, u16::MAX)]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn specs_round_trip_through_messages() {
        let index: HashMap<String, u32> = [("eth0".to_string(), 2), ("dt-bob".to_string(), 7)].into();
        let names: HashMap<u32, String> = index.iter().map(|(k, v)| (*v, k.clone())).collect();
        let specs = [
            NexthopSpec { id: 11, v6: false, kind: NexthopKind::Via { gw: Some("10.0.1.1".parse().unwrap()), dev: "eth0".into() } },
            NexthopSpec { id: 12, v6: true, kind: NexthopKind::Via { gw: None, dev: "dt-bob".into() } },
            NexthopSpec { id: 13, v6: false, kind: NexthopKind::Resilient { members: vec![(11, 200), (12, 56)], buckets: 128, idle_timer_s: 60 } },
        ];
        for spec in specs {
            let m = new_message(&spec, &index).unwrap();
            let mut req = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::InnerMessage(m));
            req.finalize();
            let mut buf = vec![0u8; req.buffer_len()];
            req.serialize(&mut buf);
            let back: NetlinkMessage<NexthopMessage> = NetlinkMessage::deserialize(&buf).unwrap();
            let NetlinkPayload::InnerMessage(back) = back.payload else { panic!() };
            let mut parsed = parse(&back, &names).unwrap();
            if matches!(parsed.kind, NexthopKind::Resilient { .. }) {
                parsed.v6 = spec.v6;
            }
            assert_eq!(parsed, spec);
        }
        assert!(new_message(&NexthopSpec { id: 1, v6: false, kind: NexthopKind::Via { gw: None, dev: "nope".into() } }, &index).is_err());
    }
}
