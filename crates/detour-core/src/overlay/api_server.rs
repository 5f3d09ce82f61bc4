//! The local API server, sans I/O: requests from programs on this host (UDP datagrams on
//! 127.0.0.1 and ::1, codec in [`crate::overlay::api`]) become messages sent through the
//! management overlay, subscriptions, name lookups and registrations; messages the
//! overlay delivers go to the subscribed programs; delivery reports go back to the sender
//! (spec A§1.3.2, A§3.1; seeds-digest items 37-39).
//!
//! Every input returns the datagrams to send ([`Datagram`]); the shell owns the sockets.
//! Garbage, unknown operations and floods get an error reply and a counted error, never a
//! panic.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use crate::ctl::ApiStatus;
use crate::identity::NodeId;
use crate::overlay::api::{self, flag, kind, op, Address, ErrorCode, RateLimiter, Reply, Request, RequestError, Subscriptions};
use crate::overlay::directory::NodeRecord;
use crate::overlay::{Overlay, RegisterError};

/// A datagram for a local program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// The program's address (127.0.0.1 or ::1 and its port).
    pub to: SocketAddr,
    /// The encoded [`Reply`].
    pub bytes: Vec<u8>,
}

/// Counters of the local API.
#[derive(Debug, Default, Clone)]
struct Counters {
    sent: u64,
    delivered: u64,
    failed: u64,
    received: u64,
    unsubscribed: u64,
    errors: BTreeMap<String, u64>,
}

/// A message sent for a program, waiting for its delivery report.
#[derive(Debug, Clone)]
struct Pending {
    client: SocketAddr,
    tag: u32,
    channel: u16,
    dst: NodeId,
    report: bool,
}

/// The local API server's state: subscriptions, the rate limiter, messages waiting for a
/// report, counters.
#[derive(Debug)]
pub struct ApiServer {
    subs: Subscriptions,
    limiter: RateLimiter,
    pending: BTreeMap<u64, Pending>,
    counters: Counters,
}

impl ApiServer {
    /// A server that admits `rate` requests per second from each program.
    pub fn new(rate: u32) -> ApiServer {
        ApiServer { subs: Subscriptions::default(), limiter: RateLimiter::new(rate), pending: BTreeMap::new(), counters: Counters::default() }
    }

    fn reply(to: SocketAddr, r: &Reply) -> Datagram {
        Datagram { to, bytes: r.encode() }
    }

    fn error(&mut self, to: SocketAddr, e: &RequestError) -> Datagram {
        *self.counters.errors.entry(e.code.as_str().to_string()).or_default() += 1;
        Self::reply(to, &Reply::error(e))
    }

    /// A datagram `data` from the program at `from`; `unix` is the wall clock in seconds
    /// (name registrations). Returns the reply.
    pub fn handle_datagram(&mut self, now: Instant, unix: u64, from: SocketAddr, data: &[u8], overlay: &mut Overlay) -> Datagram {
        let req = match api::parse(data) {
            Ok(r) => r,
            Err(e) => return self.error(from, &e),
        };
        if !self.limiter.allow(now, from) {
            let e = RequestError { code: ErrorCode::RateLimited, tag: req.tag, channel: req.channel, message: "too many requests; slow down".into() };
            return self.error(from, &e);
        }
        match self.serve(now, unix, from, &req, overlay) {
            Ok(r) => Self::reply(from, &r),
            Err((code, message)) => {
                let e = RequestError { code, tag: req.tag, channel: req.channel, message };
                self.error(from, &e)
            }
        }
    }

    /// A message from node `src` on `channel` for this node: one datagram per subscribed
    /// program (none: counted as unsubscribed).
    pub fn deliver(&mut self, now: Instant, src: NodeId, channel: u16, payload: Vec<u8>) -> Vec<Datagram> {
        self.counters.received += 1;
        let to = self.subs.receivers(now, channel);
        if to.is_empty() {
            self.counters.unsubscribed += 1;
            return Vec::new();
        }
        let r = Reply { kind: kind::MESSAGE, code: 0, channel, tag: 0, node: src, message_id: 0, body: payload };
        let bytes = r.encode();
        to.into_iter().map(|to| Datagram { to, bytes: bytes.clone() }).collect()
    }

    /// The overlay's report about message `id` (`delivered`, or given up): the report for
    /// the program that sent it, unless it asked for none.
    pub fn report(&mut self, id: u64, delivered: bool) -> Option<Datagram> {
        let p = self.pending.remove(&id)?;
        if delivered {
            self.counters.delivered += 1;
        } else {
            self.counters.failed += 1;
        }
        let k = if delivered { kind::DELIVERED } else { kind::FAILED };
        p.report.then(|| Self::reply(p.client, &Reply { kind: k, code: 0, channel: p.channel, tag: p.tag, node: p.dst, message_id: id, body: Vec::new() }))
    }

    /// The program at `client` is gone (a datagram to it was refused): forget its
    /// subscriptions.
    pub fn unreachable(&mut self, client: SocketAddr) {
        self.subs.drop_client(client);
    }

    /// Status of the API (`port` is the shell's).
    pub fn status(&self, port: Option<u16>) -> ApiStatus {
        let c = &self.counters;
        ApiStatus { port, subscriptions: self.subs.len(), sent: c.sent, delivered: c.delivered, failed: c.failed, received: c.received, unsubscribed: c.unsubscribed, errors: c.errors.clone() }
    }

    fn lookup(overlay: &Overlay, a: &Address) -> Result<NodeRecord, (ErrorCode, String)> {
        let rec = match a {
            Address::Node(id) => overlay.directory().get(id).map(|e| NodeRecord::clone(&e.record)),
            Address::Name(n) => overlay.resolve(n).cloned(),
            Address::None => None,
        };
        rec.ok_or_else(|| {
            let what = match a {
                Address::Node(id) => format!("node {id}"),
                Address::Name(n) => format!("name {n}"),
                Address::None => "nothing".into(),
            };
            (ErrorCode::UnknownNode, format!("{what} is not in the directory"))
        })
    }

    fn serve(&mut self, now: Instant, unix: u64, from: SocketAddr, req: &Request, overlay: &mut Overlay) -> Result<Reply, (ErrorCode, String)> {
        let ok = |node: NodeId, message_id: u64, body: Vec<u8>, k: u8| Reply { kind: k, code: 0, channel: req.channel, tag: req.tag, node, message_id, body };
        match req.op {
            op::SEND => {
                let rec = Self::lookup(overlay, &req.address)?;
                let id = overlay.send(now, rec.node_id, req.channel, &req.payload, req.flags & flag::CRITICAL != 0);
                self.counters.sent += 1;
                self.pending.insert(id, Pending { client: from, tag: req.tag, channel: req.channel, dst: rec.node_id, report: req.flags & flag::NO_REPORT == 0 });
                Ok(ok(rec.node_id, id, Vec::new(), kind::ACCEPTED))
            }
            op::SUBSCRIBE => {
                self.subs.subscribe(now, from, req.channel).map_err(|c| (c, format!("at most {} subscriptions per program", api::MAX_SUBSCRIPTIONS_PER_CLIENT)))?;
                Ok(ok(NodeId::default(), 0, Vec::new(), kind::OK))
            }
            op::UNSUBSCRIBE => {
                self.subs.unsubscribe(from, req.channel);
                Ok(ok(NodeId::default(), 0, Vec::new(), kind::OK))
            }
            op::RESOLVE => {
                let rec = Self::lookup(overlay, &req.address)?;
                let body = serde_json::to_vec(&rec).unwrap_or_default();
                Ok(ok(rec.node_id, 0, body, kind::RESOLVED))
            }
            op::REGISTER => {
                let Address::Name(name) = &req.address else { return Err((ErrorCode::InvalidName, "register takes a name".into())) };
                match overlay.register(unix, name) {
                    Ok(()) => {
                        tracing::info!("registered name {name}");
                        Ok(ok(overlay.local(), 0, Vec::new(), kind::OK))
                    }
                    Err(RegisterError::Taken(holder)) => Err((ErrorCode::NameTaken, format!("{name} is held by node {holder}"))),
                    Err(RegisterError::Invalid) => Err((ErrorCode::InvalidName, "names are 1-64 printable characters without spaces".into())),
                }
            }
            _ => Err((ErrorCode::UnknownOp, "unknown operation".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::overlay::{OverlayConfig, OwnInfo};

    fn setup() -> (ApiServer, Overlay, Instant, SocketAddr) {
        let t0 = Instant::now();
        let overlay = Overlay::new(Identity::from_seed([3; 32]), OverlayConfig::default(), OwnInfo { name: "n0".into(), ..Default::default() }, t0, 1_800_000_000, 1);
        (ApiServer::new(100), overlay, t0, "127.0.0.1:40000".parse().unwrap())
    }

    fn request(op: u8, channel: u16, tag: u32, address: Address) -> Vec<u8> {
        let payload = if op == op::SEND { b"hi".to_vec() } else { Vec::new() };
        api::encode_request(&Request { op, flags: 0, channel, tag, address, payload })
    }

    #[test]
    fn garbage_and_unknown_operations_get_an_error_reply_and_are_counted() {
        let (mut s, mut o, t0, from) = setup();
        let r = s.handle_datagram(t0, 0, from, b"\xffgarbage", &mut o);
        assert_eq!(r.to, from);
        let reply = Reply::decode(&r.bytes).expect("an error reply");
        assert_eq!(reply.kind, kind::ERROR);
        let r = s.handle_datagram(t0, 0, from, &request(200, 1, 9, Address::None), &mut o);
        let reply = Reply::decode(&r.bytes).unwrap();
        assert_eq!((reply.kind, reply.tag), (kind::ERROR, 9));
        let st = s.status(Some(7000));
        assert_eq!(st.errors.values().sum::<u64>(), 2, "{:?}", st.errors);
        assert_eq!(st.port, Some(7000));
    }

    #[test]
    fn a_subscribed_program_gets_the_messages_of_its_channel_and_others_are_counted() {
        let (mut s, mut o, t0, from) = setup();
        let r = s.handle_datagram(t0, 0, from, &request(op::SUBSCRIBE, 5, 1, Address::None), &mut o);
        assert_eq!(Reply::decode(&r.bytes).unwrap().kind, kind::OK);
        let src = Identity::from_seed([4; 32]).node_id();
        let out = s.deliver(t0, src, 5, b"payload".to_vec());
        assert_eq!(out.len(), 1);
        let m = Reply::decode(&out[0].bytes).unwrap();
        assert_eq!((m.kind, m.node, m.body.as_slice()), (kind::MESSAGE, src, &b"payload"[..]));
        assert!(s.deliver(t0, src, 6, b"x".to_vec()).is_empty());
        s.unreachable(from);
        assert!(s.deliver(t0, src, 5, b"y".to_vec()).is_empty(), "a program that went away gets nothing");
        let st = s.status(None);
        assert_eq!((st.received, st.unsubscribed, st.subscriptions), (3, 2, 0));
    }

    #[test]
    fn sending_to_an_unknown_node_is_an_error_and_a_report_reaches_the_sender_once() {
        let (mut s, mut o, t0, from) = setup();
        let nobody = Identity::from_seed([9; 32]).node_id();
        let r = s.handle_datagram(t0, 0, from, &request(op::SEND, 1, 2, Address::Node(nobody)), &mut o);
        let reply = Reply::decode(&r.bytes).unwrap();
        assert_eq!((reply.kind, reply.code), (kind::ERROR, ErrorCode::UnknownNode as u8));
        // to this node itself (its own record is in its directory once published)
        o.tick(t0 + std::time::Duration::from_secs(1), 1_800_000_001);
        let me = o.local();
        let r = s.handle_datagram(t0, 0, from, &request(op::SEND, 1, 3, Address::Node(me)), &mut o);
        let reply = Reply::decode(&r.bytes).unwrap();
        assert_eq!(reply.kind, kind::ACCEPTED, "{reply:?}");
        let report = s.report(reply.message_id, true).expect("a delivery report");
        assert_eq!((report.to, Reply::decode(&report.bytes).unwrap().kind), (from, kind::DELIVERED));
        assert!(s.report(reply.message_id, true).is_none(), "reported once");
        let st = s.status(None);
        assert_eq!((st.sent, st.delivered), (1, 1));
    }

    #[test]
    fn a_flooding_program_is_rate_limited() {
        let (mut s, mut o, t0, from) = setup();
        let limited =
            (0..1000).filter(|_| Reply::decode(&s.handle_datagram(t0, 0, from, &request(op::UNSUBSCRIBE, 1, 0, Address::None), &mut o).bytes).unwrap().code == ErrorCode::RateLimited as u8).count();
        assert!(limited > 500, "{limited}");
        assert!(s.status(None).errors.contains_key(ErrorCode::RateLimited.as_str()));
    }
}
