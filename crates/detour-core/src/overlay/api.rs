//! The local management API: a UDP protocol on 127.0.0.1 and ::1 through which other
//! programs on the host send messages to node IDs over the management overlay and receive
//! the messages sent to them (spec A§1.3.2 "messages that other local programs send";
//! seeds-digest items 36–39). Sans I/O: the codec, the subscriptions and the rate limiter.
//! `docs/management-api.md` documents the byte layouts.
//!
//! A request is one datagram: a 12-byte header, the destination (a node ID or a name) and
//! the payload. Every request is answered by one datagram with a 34-byte header; a sent
//! message is answered `ACCEPTED`, and later `DELIVERED` (acknowledged end to end by the
//! destination node) or `FAILED`. Messages for a channel go to every program subscribed to
//! it. Nothing here panics on any input.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::identity::NodeId;

/// First byte of every datagram.
pub const MAGIC: u8 = 0xd7;
/// Protocol version.
pub const VERSION: u8 = 1;
/// Request header length (bytes, before the address).
pub const REQUEST_HEADER: usize = 12;
/// Reply header length (bytes, before the body).
pub const REPLY_HEADER: usize = 34;
/// Largest payload of a message (bytes).
pub const MAX_PAYLOAD: usize = 16 * 1024;
/// A subscription lapses unless renewed within this time.
pub const SUBSCRIPTION_TTL: Duration = Duration::from_secs(120);
/// Subscriptions one program (address) may hold.
pub const MAX_SUBSCRIPTIONS_PER_CLIENT: usize = 64;
/// Subscriptions in all.
pub const MAX_SUBSCRIPTIONS: usize = 4096;

/// Request operations (byte 2).
pub mod op {
    /// Send a message to a node.
    pub const SEND: u8 = 1;
    /// Receive the messages of a channel (0: every channel).
    pub const SUBSCRIBE: u8 = 2;
    /// Stop receiving a channel.
    pub const UNSUBSCRIBE: u8 = 3;
    /// Look up a node by name or node ID.
    pub const RESOLVE: u8 = 4;
    /// Register a name for this node.
    pub const REGISTER: u8 = 5;
}

/// Request flags (byte 3).
pub mod flag {
    /// Send the message on two disjoint paths at once.
    pub const CRITICAL: u8 = 0x01;
    /// Do not report `DELIVERED`/`FAILED` for this message.
    pub const NO_REPORT: u8 = 0x02;
}

/// Reply kinds (byte 2).
pub mod kind {
    /// The message was taken and has this message ID.
    pub const ACCEPTED: u8 = 0x81;
    /// The destination node acknowledged the message.
    pub const DELIVERED: u8 = 0x82;
    /// The message could not be delivered (every attempt timed out).
    pub const FAILED: u8 = 0x83;
    /// A message for a subscribed channel.
    pub const MESSAGE: u8 = 0x84;
    /// The request succeeded (subscribe, unsubscribe, register).
    pub const OK: u8 = 0x85;
    /// The request failed; byte 3 is the [`ErrorCode`](super::ErrorCode), the body explains.
    pub const ERROR: u8 = 0x86;
    /// The node found by a resolve; the body is its record as JSON.
    pub const RESOLVED: u8 = 0x87;
}

/// Error codes (byte 3 of an `ERROR` reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ErrorCode {
    /// The datagram does not follow the format.
    Malformed = 1,
    /// Unknown protocol version.
    Version = 2,
    /// Unknown operation.
    UnknownOp = 3,
    /// The node ID or name is not in the directory.
    UnknownNode = 4,
    /// The payload is larger than [`MAX_PAYLOAD`].
    TooLarge = 5,
    /// Too many requests from this program.
    RateLimited = 6,
    /// Another node holds the name.
    NameTaken = 7,
    /// The name is not usable.
    InvalidName = 8,
    /// The operation needs a destination.
    NoAddress = 9,
    /// Too many subscriptions.
    TooManySubscriptions = 10,
}

impl ErrorCode {
    /// All codes.
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::Malformed,
        ErrorCode::Version,
        ErrorCode::UnknownOp,
        ErrorCode::UnknownNode,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::NameTaken,
        ErrorCode::InvalidName,
        ErrorCode::NoAddress,
        ErrorCode::TooManySubscriptions,
    ];

    /// snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Malformed => "malformed",
            ErrorCode::Version => "version",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::UnknownNode => "unknown_node",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NameTaken => "name_taken",
            ErrorCode::InvalidName => "invalid_name",
            ErrorCode::NoAddress => "no_address",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
        }
    }

    /// The code of a byte.
    pub fn from_u8(b: u8) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| *c as u8 == b)
    }
}

/// A destination or lookup key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// None given.
    None,
    /// A node ID.
    Node(NodeId),
    /// A registered name.
    Name(String),
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Operation ([`op`]).
    pub op: u8,
    /// Flags ([`flag`]).
    pub flags: u8,
    /// Application channel.
    pub channel: u16,
    /// Echoed in the replies.
    pub tag: u32,
    /// Destination (send), key (resolve) or name (register).
    pub address: Address,
    /// The message (send).
    pub payload: Vec<u8>,
}

/// Why a request was refused: the code and, when the header could be read, its tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    /// What is wrong.
    pub code: ErrorCode,
    /// The request's tag (0 if unreadable).
    pub tag: u32,
    /// The request's channel (0 if unreadable).
    pub channel: u16,
    /// A short explanation for humans.
    pub message: String,
}

fn err(code: ErrorCode, tag: u32, channel: u16, message: impl Into<String>) -> RequestError {
    RequestError { code, tag, channel, message: message.into() }
}

/// Parses one request datagram.
///
/// # Errors
/// A [`RequestError`] for anything that does not follow the format; never panics.
pub fn parse(d: &[u8]) -> Result<Request, RequestError> {
    if d.len() < REQUEST_HEADER {
        return Err(err(ErrorCode::Malformed, 0, 0, format!("datagram of {} bytes is shorter than the {REQUEST_HEADER}-byte header", d.len())));
    }
    if d[0] != MAGIC {
        return Err(err(ErrorCode::Malformed, 0, 0, format!("first byte is 0x{:02x}, expected 0x{MAGIC:02x}", d[0])));
    }
    let channel = u16::from_be_bytes([d[4], d[5]]);
    let tag = u32::from_be_bytes([d[6], d[7], d[8], d[9]]);
    if d[1] != VERSION {
        return Err(err(ErrorCode::Version, tag, channel, format!("version {} is not supported; this daemon speaks version {VERSION}", d[1])));
    }
    let op = d[2];
    if !(op::SEND..=op::REGISTER).contains(&op) {
        return Err(err(ErrorCode::UnknownOp, tag, channel, format!("unknown operation {op}")));
    }
    let (akind, alen) = (d[10], usize::from(d[11]));
    let rest = &d[REQUEST_HEADER..];
    if rest.len() < alen {
        return Err(err(ErrorCode::Malformed, tag, channel, format!("address of {alen} bytes but only {} bytes follow the header", rest.len())));
    }
    let (abytes, payload) = rest.split_at(alen);
    let address = match (akind, alen) {
        (0, 0) => Address::None,
        (1, 16) => Address::Node(NodeId(abytes.try_into().map_err(|_| err(ErrorCode::Malformed, tag, channel, "bad node ID"))?)),
        (1, n) => return Err(err(ErrorCode::Malformed, tag, channel, format!("a node ID is 16 bytes, got {n}"))),
        (2, 1..) => match std::str::from_utf8(abytes) {
            Ok(s) => Address::Name(s.to_string()),
            Err(_) => return Err(err(ErrorCode::InvalidName, tag, channel, "the name is not UTF-8")),
        },
        (k, n) => return Err(err(ErrorCode::Malformed, tag, channel, format!("address kind {k} with length {n}"))),
    };
    if payload.len() > MAX_PAYLOAD {
        return Err(err(ErrorCode::TooLarge, tag, channel, format!("payload of {} bytes; at most {MAX_PAYLOAD}", payload.len())));
    }
    if op != op::SEND && !payload.is_empty() {
        return Err(err(ErrorCode::Malformed, tag, channel, "only send carries a payload"));
    }
    if matches!(op, op::SEND | op::RESOLVE | op::REGISTER) && address == Address::None {
        return Err(err(ErrorCode::NoAddress, tag, channel, "this operation needs a node ID or a name"));
    }
    if op == op::REGISTER && !matches!(address, Address::Name(_)) {
        return Err(err(ErrorCode::InvalidName, tag, channel, "register takes a name"));
    }
    Ok(Request { op, flags: d[3], channel, tag, address, payload: payload.to_vec() })
}

/// Encodes a request (for clients such as `detourctl`).
pub fn encode_request(r: &Request) -> Vec<u8> {
    let (akind, abytes): (u8, Vec<u8>) = match &r.address {
        Address::None => (0, Vec::new()),
        Address::Node(id) => (1, id.0.to_vec()),
        Address::Name(n) => (2, n.as_bytes()[..n.len().min(255)].to_vec()),
    };
    let mut v = Vec::with_capacity(REQUEST_HEADER + abytes.len() + r.payload.len());
    v.extend_from_slice(&[MAGIC, VERSION, r.op, r.flags]);
    v.extend_from_slice(&r.channel.to_be_bytes());
    v.extend_from_slice(&r.tag.to_be_bytes());
    v.push(akind);
    v.push(abytes.len() as u8);
    v.extend_from_slice(&abytes);
    v.extend_from_slice(&r.payload);
    v
}

/// A reply or notification datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Kind ([`kind`]).
    pub kind: u8,
    /// Error code for `ERROR`, else 0.
    pub code: u8,
    /// Channel.
    pub channel: u16,
    /// The request's tag (0 for `MESSAGE`).
    pub tag: u32,
    /// Source node (`MESSAGE`), resolved node (`RESOLVED`), destination (send replies).
    pub node: NodeId,
    /// Message ID (send replies).
    pub message_id: u64,
    /// Payload (`MESSAGE`), explanation (`ERROR`), JSON record (`RESOLVED`).
    pub body: Vec<u8>,
}

impl Reply {
    /// An `ERROR` reply for a refused request.
    pub fn error(e: &RequestError) -> Reply {
        Reply { kind: kind::ERROR, code: e.code as u8, channel: e.channel, tag: e.tag, node: NodeId::default(), message_id: 0, body: e.message.clone().into_bytes() }
    }

    /// Encodes it.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(REPLY_HEADER + self.body.len());
        v.extend_from_slice(&[MAGIC, VERSION, self.kind, self.code]);
        v.extend_from_slice(&self.channel.to_be_bytes());
        v.extend_from_slice(&self.tag.to_be_bytes());
        v.extend_from_slice(&self.node.0);
        v.extend_from_slice(&self.message_id.to_be_bytes());
        v.extend_from_slice(&self.body);
        v
    }

    /// Decodes one (for clients).
    pub fn decode(d: &[u8]) -> Option<Reply> {
        if d.len() < REPLY_HEADER || d[0] != MAGIC || d[1] != VERSION {
            return None;
        }
        Some(Reply {
            kind: d[2],
            code: d[3],
            channel: u16::from_be_bytes([d[4], d[5]]),
            tag: u32::from_be_bytes(d[6..10].try_into().ok()?),
            node: NodeId(d[10..26].try_into().ok()?),
            message_id: u64::from_be_bytes(d[26..34].try_into().ok()?),
            body: d[REPLY_HEADER..].to_vec(),
        })
    }
}

/// Which programs receive which channels. Subscriptions lapse after
/// [`SUBSCRIPTION_TTL`] unless renewed.
#[derive(Debug, Default)]
pub struct Subscriptions {
    by_channel: HashMap<u16, HashMap<SocketAddr, Instant>>,
}

impl Subscriptions {
    /// Subscribes (or renews) `who` to `channel` (0: every channel).
    ///
    /// # Errors
    /// [`ErrorCode::TooManySubscriptions`].
    pub fn subscribe(&mut self, now: Instant, who: SocketAddr, channel: u16) -> Result<(), ErrorCode> {
        let renewing = self.by_channel.get(&channel).is_some_and(|m| m.contains_key(&who));
        if !renewing {
            let mine = self.by_channel.values().filter(|m| m.contains_key(&who)).count();
            let total: usize = self.by_channel.values().map(|m| m.len()).sum();
            if mine >= MAX_SUBSCRIPTIONS_PER_CLIENT || total >= MAX_SUBSCRIPTIONS {
                return Err(ErrorCode::TooManySubscriptions);
            }
        }
        self.by_channel.entry(channel).or_default().insert(who, now + SUBSCRIPTION_TTL);
        Ok(())
    }

    /// Ends a subscription.
    pub fn unsubscribe(&mut self, who: SocketAddr, channel: u16) {
        if let Some(m) = self.by_channel.get_mut(&channel) {
            m.remove(&who);
            if m.is_empty() {
                self.by_channel.remove(&channel);
            }
        }
    }

    /// Forgets a program (its socket is gone).
    pub fn drop_client(&mut self, who: SocketAddr) {
        for m in self.by_channel.values_mut() {
            m.remove(&who);
        }
        self.by_channel.retain(|_, m| !m.is_empty());
    }

    /// Who receives a message on `channel` at `now`.
    pub fn receivers(&mut self, now: Instant, channel: u16) -> Vec<SocketAddr> {
        for m in self.by_channel.values_mut() {
            m.retain(|_, until| *until > now);
        }
        self.by_channel.retain(|_, m| !m.is_empty());
        let mut v: Vec<SocketAddr> = self.by_channel.get(&channel).map(|m| m.keys().copied().collect()).unwrap_or_default();
        if channel != 0 {
            for a in self.by_channel.get(&0).map(|m| m.keys().copied().collect::<Vec<_>>()).unwrap_or_default() {
                if !v.contains(&a) {
                    v.push(a);
                }
            }
        }
        v.sort();
        v
    }

    /// Number of subscriptions.
    pub fn len(&self) -> usize {
        self.by_channel.values().map(|m| m.len()).sum()
    }

    /// True without subscriptions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Token buckets per key: `rate` tokens per second, bursts of `burst`; at most `max_keys`
/// buckets (past it, buckets that have refilled are forgotten first, and if none has, all
/// are). The local API keys them by program (`rate` requests per second, bursts of
/// `2 × rate`); management handshake admission by source ([`crate::overlay::admission`]).
#[derive(Debug)]
pub struct RateLimiter<K = SocketAddr> {
    rate: f64,
    burst: f64,
    max_keys: usize,
    buckets: HashMap<K, (f64, Instant)>,
}

impl RateLimiter<SocketAddr> {
    /// A limiter of `rate` requests per second per program (bursts of `2 × rate`, 10,000
    /// programs tracked).
    pub fn new(rate: u32) -> RateLimiter {
        RateLimiter::with_burst(rate, rate.saturating_mul(2), 10_000)
    }
}

impl<K: std::hash::Hash + Eq> RateLimiter<K> {
    /// A limiter of `rate` tokens per second and bursts of `burst` per key (both at least
    /// 1), tracking at most `max_keys` keys.
    pub fn with_burst(rate: u32, burst: u32, max_keys: usize) -> RateLimiter<K> {
        RateLimiter { rate: f64::from(rate.max(1)), burst: f64::from(burst.max(1)), max_keys: max_keys.max(1), buckets: HashMap::new() }
    }

    /// Takes a token for `who` at `now`; false when it is over its rate.
    pub fn allow(&mut self, now: Instant, who: K) -> bool {
        let (rate, cap) = (self.rate, self.burst);
        if self.buckets.len() >= self.max_keys && !self.buckets.contains_key(&who) {
            self.buckets.retain(|_, (tokens, at)| *tokens + now.saturating_duration_since(*at).as_secs_f64() * rate < cap);
            if self.buckets.len() >= self.max_keys {
                self.buckets.clear();
            }
        }
        let (tokens, at) = self.buckets.entry(who).or_insert((cap, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * rate).min(cap);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Keys with a bucket.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// True when no key has a bucket.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn send_to(id: NodeId, payload: &[u8]) -> Request {
        Request { op: op::SEND, flags: flag::CRITICAL, channel: 7, tag: 42, address: Address::Node(id), payload: payload.to_vec() }
    }

    #[test]
    fn requests_round_trip() {
        for r in [
            send_to(NodeId([3; 16]), b"hello"),
            Request { op: op::SEND, flags: 0, channel: 1, tag: 1, address: Address::Name("sip:office".into()), payload: vec![0; MAX_PAYLOAD] },
            Request { op: op::SUBSCRIBE, flags: 0, channel: 9, tag: 2, address: Address::None, payload: vec![] },
            Request { op: op::RESOLVE, flags: 0, channel: 0, tag: 3, address: Address::Name("bob".into()), payload: vec![] },
            Request { op: op::REGISTER, flags: 0, channel: 0, tag: 4, address: Address::Name("sip:bob".into()), payload: vec![] },
        ] {
            assert_eq!(parse(&encode_request(&r)), Ok(r));
        }
    }

    #[test]
    fn bad_requests_get_the_right_error() {
        let good = encode_request(&send_to(NodeId([3; 16]), b"x"));
        let code = |d: &[u8]| parse(d).unwrap_err().code;
        assert_eq!(code(&good[..5]), ErrorCode::Malformed, "truncated header");
        assert_eq!(code(&good[..20]), ErrorCode::Malformed, "truncated address");
        let mut v = good.clone();
        v[0] = 0;
        assert_eq!(code(&v), ErrorCode::Malformed);
        let mut v = good.clone();
        v[1] = 9;
        assert_eq!(code(&v), ErrorCode::Version);
        assert_eq!(parse(&v).unwrap_err().tag, 42, "the tag is echoed when readable");
        let mut v = good.clone();
        v[2] = 77;
        assert_eq!(code(&v), ErrorCode::UnknownOp);
        let big = encode_request(&send_to(NodeId([3; 16]), &vec![1; MAX_PAYLOAD + 1]));
        assert_eq!(code(&big), ErrorCode::TooLarge);
        let none = encode_request(&Request { op: op::SEND, flags: 0, channel: 1, tag: 1, address: Address::None, payload: b"x".to_vec() });
        assert_eq!(code(&none), ErrorCode::NoAddress);
        let mut short_id = good.clone();
        short_id[11] = 15;
        assert_eq!(code(&short_id), ErrorCode::Malformed);
    }

    #[test]
    fn replies_round_trip() {
        let r = Reply { kind: kind::MESSAGE, code: 0, channel: 5, tag: 0, node: NodeId([9; 16]), message_id: 77, body: b"hi".to_vec() };
        assert_eq!(Reply::decode(&r.encode()), Some(r));
        assert_eq!(Reply::decode(&[MAGIC; 10]), None);
    }

    #[test]
    fn subscriptions_fan_out_lapse_and_are_bounded() {
        let t0 = Instant::now();
        let a: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let b: SocketAddr = "[::1]:4001".parse().unwrap();
        let mut s = Subscriptions::default();
        s.subscribe(t0, a, 5).unwrap();
        s.subscribe(t0, b, 0).unwrap();
        assert_eq!(s.receivers(t0, 5), vec![a, b]);
        assert_eq!(s.receivers(t0, 6), vec![b], "channel 0 hears everything");
        s.unsubscribe(a, 5);
        assert_eq!(s.receivers(t0, 5), vec![b]);
        assert!(s.receivers(t0 + SUBSCRIPTION_TTL, 5).is_empty(), "lapsed");
        for c in 1..=MAX_SUBSCRIPTIONS_PER_CLIENT as u16 {
            s.subscribe(t0, a, c).unwrap();
        }
        assert_eq!(s.subscribe(t0, a, 999), Err(ErrorCode::TooManySubscriptions));
        assert!(s.subscribe(t0, a, 1).is_ok(), "renewing is always allowed");
    }

    #[test]
    fn rate_limits_bursts_and_refills() {
        let t0 = Instant::now();
        let a: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let mut r = RateLimiter::new(10);
        let allowed = (0..100).filter(|_| r.allow(t0, a)).count();
        assert_eq!(allowed, 20, "a burst of twice the rate");
        assert!(!r.allow(t0, a));
        assert!(r.allow(t0 + Duration::from_millis(150), a), "refilled");
        assert!(r.allow(t0, "127.0.0.1:4001".parse().unwrap()), "per program");
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_errors_carry_a_message(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Err(e) = parse(&data) {
                prop_assert!(!e.message.is_empty());
            }
        }

        #[test]
        fn valid_requests_survive_any_truncation(payload in proptest::collection::vec(any::<u8>(), 0..64), cut in 0usize..100) {
            let d = encode_request(&send_to(NodeId([1; 16]), &payload));
            let cut = cut.min(d.len());
            match parse(&d[..cut]) {
                Ok(r) => prop_assert!(cut >= REQUEST_HEADER + 16 && r.payload.len() == cut - REQUEST_HEADER - 16),
                Err(e) => prop_assert_eq!(e.code, ErrorCode::Malformed),
            }
        }

        #[test]
        fn reply_decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = Reply::decode(&data);
        }
    }
}
