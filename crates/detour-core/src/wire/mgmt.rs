//! Management-overlay messages and their framing on QUIC streams (sans I/O).
//!
//! Every management message carries the common overlay header of spec A§2.3 (version,
//! traffic type = signalling, flags, hop limit, source and destination node IDs), like the
//! data plane, preceded by a length. QUIC provides confidentiality, integrity and replay
//! protection, so no key ID or counter is needed here. The body is JSON, so fields can be
//! added without breaking older nodes.
//!
//! ```text
//! u32 length (big endian, of what follows) | 36-byte header | JSON body
//! header: ver<<4|type (1) | flags (1) | hop limit (1) | reserved 0 (1) | src (16) | dst (16)
//! ```

use serde::{Deserialize, Serialize};

use crate::identity::NodeId;
use crate::wire::{TrafficType, VERSION};

/// Header length of a management frame (no key ID or counter).
pub const FRAME_HEADER_LEN: usize = 36;
/// Largest accepted frame body + header, in bytes.
pub const MAX_FRAME: usize = 256 * 1024;

/// A management message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// First message on a new session, sent by each side: who it is and where its data
    /// plane listens.
    Hello {
        /// Protocol version (1).
        version: u32,
        /// Node name.
        name: String,
        /// UDP port of the sender's data plane.
        data_port: u16,
    },
    /// Asks the receiver to relay between the sender (`a`) and node `b`, both ways.
    RelayRequest {
        /// The requesting end (must be the sender).
        a: NodeId,
        /// The other end.
        b: NodeId,
        /// Why the requester wants the relay (older nodes send none: failover).
        #[serde(default)]
        purpose: crate::node::policy::Purpose,
    },
    /// Answer to a relay request.
    RelayResponse {
        /// The other end named in the request.
        b: NodeId,
        /// Whether the relay session is in place.
        accepted: bool,
        /// Why not, when refused.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// The refusal may go away soon (the relay has no session to `b` yet).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        transient: bool,
    },
    /// The sender no longer needs the relay session between itself and `b`.
    RelayRelease {
        /// The releasing end (must be the sender).
        a: NodeId,
        /// The other end.
        b: NodeId,
    },
    /// The sender's direct links, for relay choice (RON-style link state, but only what
    /// the receiver asked for: its cost does not grow with the overlay).
    LinkReport {
        /// The sender's links to the nodes the receiver wants reports about.
        links: Vec<Link>,
        /// The nodes the sender picks relays for (its monitored peers): the receiver
        /// reports its links to these from now on. Sent when it changes and now and then;
        /// absent: unchanged.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        want: Option<Vec<NodeId>>,
    },
    /// Signed node records (directory gossip: new and updated records are pushed along
    /// the eager links of the flood tree and announced on the lazy ones, see
    /// [`Message::IHave`]; and sent when a digest or a [`Message::Want`] shows they are
    /// missing).
    Records {
        /// The records, as signed by their nodes.
        records: Vec<crate::overlay::directory::SignedRecord>,
        /// Pushed by the flood (an eager push of Plumtree, Leitão et al., "Epidemic
        /// Broadcast Trees", SRDS 2007): a receiver that had every record already answers
        /// with [`Message::Prune`]. Absent (false): sent on request. Older nodes send none.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        push: bool,
    },
    /// The sender received only records it already had from the receiver's pushes: the
    /// receiver announces new records to it ([`Message::IHave`]) instead of pushing them
    /// (the link becomes lazy in that direction; the sender still pushes to the receiver
    /// until the receiver prunes too).
    Prune,
    /// Asks for nothing: sent on a session that has been silent for a while, so that the
    /// receiver's QUIC acknowledgement (sent within its `max_ack_delay`, RFC 9000 §13.2.1)
    /// shows the sender that the receiver is alive ([`crate::overlay::session::Silence`]). The
    /// receiver ignores it; older nodes count it as an undecodable frame.
    Ping,
    /// Records the sender holds, announced instead of pushed on a lazy link: a receiver
    /// that lacks one and does not get it pushed by another neighbour soon asks for it
    /// ([`Message::Want`]), which makes the link eager again (a graft).
    IHave {
        /// (node ID, sequence number) of each record.
        entries: Vec<(NodeId, u64)>,
    },
    /// The sender's directory as (node ID, sequence number) pairs (anti-entropy).
    Digest {
        /// Every record the sender holds (in `buckets`, when given).
        entries: Vec<(NodeId, u64)>,
        /// The digest buckets ([`crate::overlay::directory::bucket_of`]) this digest covers, in
        /// answer to a [`Message::Summary`]; absent: the whole directory.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        buckets: Option<Vec<u8>>,
    },
    /// A summary of the sender's directory: one hash per digest bucket
    /// ([`crate::overlay::directory::Directory::bucket_hashes`]), hex, 16 digits each. The receiver
    /// answers with a [`Message::Digest`] of the buckets that differ: anti-entropy costs
    /// the same whatever the directory's size while the two agree.
    Summary {
        /// [`crate::overlay::directory::BUCKETS`] hashes.
        hashes: String,
    },
    /// Asks for the records of these nodes.
    Want {
        /// Node IDs.
        nodes: Vec<NodeId>,
    },
    /// A message routed over the management overlay to any node ID.
    Routed {
        /// The envelope (source route, hop limit, body).
        envelope: crate::overlay::mroute::Envelope,
    },
}

/// One direct link in a [`Message::LinkReport`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Link {
    /// The far end.
    pub node: NodeId,
    /// Whether the path is up (not down or degraded).
    pub up: bool,
    /// Smoothed RTT in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    /// Smoothed loss, 0..1.
    pub loss: f64,
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// Originating node.
    pub src: NodeId,
    /// Destination node.
    pub dst: NodeId,
    /// Remaining hops.
    pub hop_limit: u8,
    /// The message.
    pub message: Message,
}

/// Why a frame was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Length below the header or above [`MAX_FRAME`].
    #[error("bad frame length {0}")]
    Length(usize),
    /// Wrong version, type or reserved byte.
    #[error("bad frame header")]
    Header,
    /// The body is not a known message.
    #[error("bad message body: {0}")]
    Body(String),
}

/// Encodes a frame including its length prefix.
pub fn encode(frame: &Frame) -> Vec<u8> {
    let body = serde_json::to_vec(&frame.message).expect("messages always serialize");
    let len = FRAME_HEADER_LEN + body.len();
    let mut out = Vec::with_capacity(4 + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.push((VERSION << 4) | TrafficType::Signalling as u8);
    out.push(0);
    out.push(frame.hop_limit);
    out.push(0);
    out.extend_from_slice(&frame.src.0);
    out.extend_from_slice(&frame.dst.0);
    out.extend_from_slice(&body);
    out
}

/// Checks a length prefix before the frame is read.
///
/// # Errors
/// [`FrameError::Length`] when out of range.
pub fn check_len(len: usize) -> Result<usize, FrameError> {
    if (FRAME_HEADER_LEN..=MAX_FRAME).contains(&len) {
        Ok(len)
    } else {
        Err(FrameError::Length(len))
    }
}

/// Decodes a frame (without its length prefix).
///
/// # Errors
/// Any [`FrameError`]; never panics.
pub fn decode(buf: &[u8]) -> Result<Frame, FrameError> {
    check_len(buf.len())?;
    if buf[0] != (VERSION << 4) | TrafficType::Signalling as u8 || buf[3] != 0 {
        return Err(FrameError::Header);
    }
    let src = NodeId(buf[4..20].try_into().map_err(|_| FrameError::Header)?);
    let dst = NodeId(buf[20..36].try_into().map_err(|_| FrameError::Header)?);
    let message = serde_json::from_slice(&buf[FRAME_HEADER_LEN..]).map_err(|e| FrameError::Body(e.to_string()))?;
    Ok(Frame { src, dst, hop_limit: buf[2], message })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip() {
        let f = Frame { src: NodeId([1; 16]), dst: NodeId([2; 16]), hop_limit: 3, message: Message::Hello { version: 1, name: "alice".into(), data_port: 7720 } };
        let bytes = encode(&f);
        let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len() - 4);
        assert_eq!(decode(&bytes[4..]).unwrap(), f);
    }

    #[test]
    fn relay_and_link_messages_round_trip() {
        for message in [
            Message::RelayRequest { a: NodeId([1; 16]), b: NodeId([2; 16]), purpose: crate::node::policy::Purpose::LastResort },
            Message::RelayResponse { b: NodeId([2; 16]), accepted: false, reason: Some("no path".into()), transient: true },
            Message::RelayRelease { a: NodeId([1; 16]), b: NodeId([2; 16]) },
            Message::Ping,
            Message::LinkReport { links: vec![Link { node: NodeId([3; 16]), up: true, rtt_ms: Some(1.5), loss: 0.01 }], want: Some(vec![NodeId([4; 16])]) },
        ] {
            let f = Frame { src: NodeId([1; 16]), dst: NodeId([9; 16]), hop_limit: 0, message };
            assert_eq!(decode(&encode(&f)[4..]).unwrap(), f);
        }
        // a node ID that is not 32 hex digits is refused
        let mut bad = encode(&Frame { src: NodeId([1; 16]), dst: NodeId([9; 16]), hop_limit: 0, message: Message::RelayRelease { a: NodeId([1; 16]), b: NodeId([2; 16]) } });
        let at = bad.len() - 10;
        bad[at] = b'z';
        assert!(matches!(decode(&bad[4..]), Err(FrameError::Body(_))));
    }

    #[test]
    fn rejects_bad_frames() {
        assert_eq!(check_len(3), Err(FrameError::Length(3)));
        assert_eq!(check_len(MAX_FRAME + 1), Err(FrameError::Length(MAX_FRAME + 1)));
        let mut b = encode(&Frame { src: NodeId([1; 16]), dst: NodeId([2; 16]), hop_limit: 0, message: Message::Hello { version: 1, name: "x".into(), data_port: 1 } });
        b[4] = 0x20;
        assert_eq!(decode(&b[4..]), Err(FrameError::Header));
    }

    proptest! {
        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&data);
        }
    }
}
