//! The forwarding-overlay wire format: the common overlay header and the AEAD seal.
//!
//! Implements the common header of spec A§2.3 (seeds-digest items 50–55): version, traffic
//! type, originating node ID and destination node ID, followed by what the receiver needs to
//! pick the key and reject replays (key ID and counter). The payload is sealed with
//! ChaCha20-Poly1305 (RFC 8439, from `ring`); the header is the associated data, except the
//! hop-limit byte, which a relay decrements without holding the key. A relay forwards by the
//! destination node ID alone. Byte diagram and rationale: `docs/wire.md`.
//!
//! All functions are pure and never panic on any input.

pub mod mgmt;
pub mod packet;
pub mod replay;

use ring::aead::{Aad, LessSafeKey, Nonce, Tag, UnboundKey, CHACHA20_POLY1305};

use crate::identity::{NodeId, NODE_ID_LEN};

/// Protocol version carried in the high nibble of byte 0.
pub const VERSION: u8 = 1;
/// Header length in bytes.
pub const HEADER_LEN: usize = 4 + 2 * NODE_ID_LEN + 4 + 8;
/// AEAD tag length in bytes.
pub const TAG_LEN: usize = 16;
/// Bytes added to every inner packet: header plus tag (64).
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// Hop limit a sender puts in new packets; every relay decrements it.
pub const DEFAULT_HOP_LIMIT: u8 = 4;

const HOP_LIMIT_OFFSET: usize = 2;

/// Traffic type (low nibble of byte 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TrafficType {
    /// An IP packet of the forwarding overlay.
    Data = 0,
    /// A path probe (measurement traffic).
    Probe = 1,
    /// Signalling / management.
    Signalling = 2,
}

impl TrafficType {
    fn from_nibble(n: u8) -> Option<TrafficType> {
        match n {
            0 => Some(TrafficType::Data),
            1 => Some(TrafficType::Probe),
            2 => Some(TrafficType::Signalling),
            _ => None,
        }
    }
}

/// The decoded common overlay header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Traffic type.
    pub traffic: TrafficType,
    /// Flags (none are defined yet; receivers ignore unknown flags).
    pub flags: u8,
    /// Remaining relay hops.
    pub hop_limit: u8,
    /// Originating node.
    pub src: NodeId,
    /// Destination node.
    pub dst: NodeId,
    /// Identifies the receiver's key (and so the session) for `src → dst`.
    pub key_id: u32,
    /// Per-key packet counter: the AEAD nonce and the replay-window position.
    pub counter: u64,
}

/// Why a datagram could not be decoded or opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Shorter than header plus tag.
    #[error("datagram too short")]
    TooShort,
    /// Unknown protocol version.
    #[error("unknown version")]
    BadVersion,
    /// Unknown traffic type or non-zero reserved byte.
    #[error("malformed header")]
    Malformed,
    /// The AEAD tag did not verify (wrong key, forged or corrupted).
    #[error("authentication failed")]
    AuthFailed,
}

impl Header {
    /// Writes the header into the first [`HEADER_LEN`] bytes of `out`.
    ///
    /// # Panics
    /// If `out` is shorter than [`HEADER_LEN`] (a caller bug, never input-dependent).
    pub fn encode(&self, out: &mut [u8]) {
        out[0] = (VERSION << 4) | (self.traffic as u8);
        out[1] = self.flags;
        out[HOP_LIMIT_OFFSET] = self.hop_limit;
        out[3] = 0;
        out[4..20].copy_from_slice(&self.src.0);
        out[20..36].copy_from_slice(&self.dst.0);
        out[36..40].copy_from_slice(&self.key_id.to_be_bytes());
        out[40..48].copy_from_slice(&self.counter.to_be_bytes());
    }

    /// Decodes the header at the start of a datagram (which must also have room for a tag).
    ///
    /// # Errors
    /// [`WireError::TooShort`], [`WireError::BadVersion`] or [`WireError::Malformed`].
    pub fn decode(buf: &[u8]) -> Result<Header, WireError> {
        if buf.len() < OVERHEAD {
            return Err(WireError::TooShort);
        }
        if buf[0] >> 4 != VERSION {
            return Err(WireError::BadVersion);
        }
        let traffic = TrafficType::from_nibble(buf[0] & 0x0f).ok_or(WireError::Malformed)?;
        if buf[3] != 0 {
            return Err(WireError::Malformed);
        }
        let mut src = [0u8; NODE_ID_LEN];
        let mut dst = [0u8; NODE_ID_LEN];
        src.copy_from_slice(&buf[4..20]);
        dst.copy_from_slice(&buf[20..36]);
        Ok(Header {
            traffic,
            flags: buf[1],
            hop_limit: buf[HOP_LIMIT_OFFSET],
            src: NodeId(src),
            dst: NodeId(dst),
            key_id: u32::from_be_bytes(buf[36..40].try_into().expect("4 bytes")),
            counter: u64::from_be_bytes(buf[40..48].try_into().expect("8 bytes")),
        })
    }
}

/// Reads only the destination node ID: what a relay needs to forward (no key involved).
pub fn peek_destination(buf: &[u8]) -> Option<NodeId> {
    if buf.len() < OVERHEAD || buf[0] >> 4 != VERSION {
        return None;
    }
    let mut dst = [0u8; NODE_ID_LEN];
    dst.copy_from_slice(&buf[20..36]);
    Some(NodeId(dst))
}

/// Decrements the hop limit in place (relays). Returns `false` if it was already 0.
pub fn decrement_hop_limit(buf: &mut [u8]) -> bool {
    match buf.get_mut(HOP_LIMIT_OFFSET) {
        Some(h) if *h > 0 => {
            *h -= 1;
            true
        }
        _ => false,
    }
}

fn aad_of(header: &[u8]) -> [u8; HEADER_LEN] {
    let mut aad = [0u8; HEADER_LEN];
    aad.copy_from_slice(&header[..HEADER_LEN]);
    aad[HOP_LIMIT_OFFSET] = 0;
    aad
}

fn nonce_of(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// A ChaCha20-Poly1305 key for one direction of one session.
pub struct PacketKey {
    key: LessSafeKey,
}

impl PacketKey {
    /// Builds a key from 32 secret bytes.
    pub fn new(secret: &[u8; 32]) -> PacketKey {
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, secret).expect("32-byte ChaCha20-Poly1305 key");
        PacketKey { key: LessSafeKey::new(unbound) }
    }

    /// Seals a packet in place.
    ///
    /// `buf[..HEADER_LEN]` receives `header`, the plaintext is `buf[HEADER_LEN..HEADER_LEN +
    /// payload_len]`, and the tag is written right after it. Returns the datagram length
    /// (`payload_len + OVERHEAD`).
    ///
    /// # Panics
    /// If `buf` is shorter than `payload_len + OVERHEAD` (a caller bug).
    pub fn seal(&self, header: &Header, buf: &mut [u8], payload_len: usize) -> usize {
        header.encode(buf);
        let aad = aad_of(buf);
        let (head, rest) = buf.split_at_mut(HEADER_LEN);
        let _ = head;
        let (payload, tail) = rest.split_at_mut(payload_len);
        let tag = self.key.seal_in_place_separate_tag(nonce_of(header.counter), Aad::from(aad), payload).expect("ChaCha20-Poly1305 seal of a packet below 256 GiB cannot fail");
        tail[..TAG_LEN].copy_from_slice(tag.as_ref());
        payload_len + OVERHEAD
    }

    /// Opens a sealed datagram in place; on success the plaintext is
    /// `buf[HEADER_LEN..HEADER_LEN + n]` and `n` is returned.
    ///
    /// # Errors
    /// [`WireError::TooShort`] or [`WireError::AuthFailed`]; the buffer content is then
    /// unspecified.
    pub fn open(&self, header: &Header, buf: &mut [u8]) -> Result<usize, WireError> {
        if buf.len() < OVERHEAD {
            return Err(WireError::TooShort);
        }
        let aad = aad_of(buf);
        let payload_len = buf.len() - OVERHEAD;
        let (_, rest) = buf.split_at_mut(HEADER_LEN);
        let (payload, tag) = rest.split_at_mut(payload_len);
        let tag: [u8; TAG_LEN] = tag[..TAG_LEN].try_into().map_err(|_| WireError::TooShort)?;
        self.key.open_in_place_separate_tag(nonce_of(header.counter), Aad::from(aad), Tag::from(tag), payload, 0..).map_err(|_| WireError::AuthFailed)?;
        Ok(payload_len)
    }
}

/// Label for the TLS exporter (RFC 8446 §7.5) that yields the data-plane keys.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-detour-data-v1";
/// Bytes taken from the exporter: two 32-byte keys and two 4-byte key IDs.
pub const EXPORTER_LEN: usize = 72;

/// The data-plane keys of one management session, seen from one side.
#[derive(Clone)]
pub struct SessionSecrets {
    /// Key ID this node puts in packets it sends.
    pub tx_key_id: u32,
    /// Key this node seals with.
    pub tx_key: [u8; 32],
    /// Key ID this node expects in packets it receives.
    pub rx_key_id: u32,
    /// Key this node opens with.
    pub rx_key: [u8; 32],
}

impl std::fmt::Debug for SessionSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionSecrets(tx {:08x}, rx {:08x})", self.tx_key_id, self.rx_key_id)
    }
}

/// Splits exporter output into directional keys: bytes 0..32 are the key from the lower to
/// the higher node ID, 32..64 the other direction, 64..68 and 68..72 the matching key IDs.
/// Both ends compute the same material from the same TLS session, so no extra handshake is
/// needed.
pub fn split_exporter(material: &[u8; EXPORTER_LEN], local: &NodeId, remote: &NodeId) -> SessionSecrets {
    let mut lo_hi = [0u8; 32];
    let mut hi_lo = [0u8; 32];
    lo_hi.copy_from_slice(&material[0..32]);
    hi_lo.copy_from_slice(&material[32..64]);
    let id_lo_hi = u32::from_be_bytes(material[64..68].try_into().expect("4"));
    let id_hi_lo = u32::from_be_bytes(material[68..72].try_into().expect("4"));
    if local < remote {
        SessionSecrets { tx_key_id: id_lo_hi, tx_key: lo_hi, rx_key_id: id_hi_lo, rx_key: hi_lo }
    } else {
        SessionSecrets { tx_key_id: id_hi_lo, tx_key: hi_lo, rx_key_id: id_lo_hi, rx_key: lo_hi }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hdr(counter: u64) -> Header {
        Header { traffic: TrafficType::Data, flags: 0, hop_limit: DEFAULT_HOP_LIMIT, src: NodeId([1; 16]), dst: NodeId([2; 16]), key_id: 0xdead_beef, counter }
    }

    #[test]
    fn header_is_48_bytes_and_round_trips() {
        assert_eq!(HEADER_LEN, 48);
        let mut buf = [0u8; OVERHEAD];
        hdr(77).encode(&mut buf);
        assert_eq!(buf[0], 0x10);
        assert_eq!(Header::decode(&buf).unwrap(), hdr(77));
        assert_eq!(peek_destination(&buf), Some(NodeId([2; 16])));
    }

    #[test]
    fn seal_open_round_trip_and_hop_limit_is_not_authenticated() {
        let key = PacketKey::new(&[5; 32]);
        let mut buf = vec![0u8; 100 + OVERHEAD];
        buf[HEADER_LEN..HEADER_LEN + 100].copy_from_slice(&[0xab; 100]);
        let n = key.seal(&hdr(1), &mut buf, 100);
        assert_eq!(n, 100 + OVERHEAD);
        assert!(decrement_hop_limit(&mut buf));
        let h = Header::decode(&buf).unwrap();
        assert_eq!(h.hop_limit, DEFAULT_HOP_LIMIT - 1);
        assert_eq!(key.open(&h, &mut buf).unwrap(), 100);
        assert_eq!(&buf[HEADER_LEN..HEADER_LEN + 100], &[0xab; 100]);
    }

    #[test]
    fn any_header_bit_flip_breaks_authentication() {
        let key = PacketKey::new(&[5; 32]);
        let mut sealed = vec![0u8; 20 + OVERHEAD];
        key.seal(&hdr(9), &mut sealed, 20);
        for byte in (0..sealed.len()).filter(|&b| b != HOP_LIMIT_OFFSET) {
            let mut buf = sealed.clone();
            buf[byte] ^= 0x01;
            let ok = Header::decode(&buf).and_then(|h| key.open(&h, &mut buf));
            assert!(ok.is_err(), "flip in byte {byte} was accepted");
        }
    }

    #[test]
    fn exporter_split_is_mirrored() {
        let mut m = [0u8; EXPORTER_LEN];
        for (i, b) in m.iter_mut().enumerate() {
            *b = i as u8;
        }
        let a = NodeId([1; 16]);
        let b = NodeId([2; 16]);
        let sa = split_exporter(&m, &a, &b);
        let sb = split_exporter(&m, &b, &a);
        assert_eq!(sa.tx_key, sb.rx_key);
        assert_eq!(sa.rx_key, sb.tx_key);
        assert_eq!(sa.tx_key_id, sb.rx_key_id);
        assert_ne!(sa.tx_key, sa.rx_key);
    }

    proptest! {
        #[test]
        fn decode_and_open_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let key = PacketKey::new(&[1; 32]);
            let mut buf = data.clone();
            if let Ok(h) = Header::decode(&buf) {
                let _ = key.open(&h, &mut buf);
            }
            let _ = peek_destination(&data);
        }
    }
}
