//! Node identity: Ed25519 keys, node IDs and the key file.
//!
//! A node is identified by its Ed25519 public key. Its **node ID** is the first 16 bytes
//! (128 bits) of the SHA-256 digest of the 32-byte public key, printed as 32 lowercase hex
//! digits. Node IDs are self-certifying (P2PNS, seeds `002`): whoever proves possession of
//! the private key owns the ID, and no registry is needed to check that. The node ID is
//! separate from the node's IP addresses (spec A§3.2, seeds-digest item 61).
//!
//! Reading and writing the key file is the shell's (`detour::shell::files`).
//!
//! Private keys are stored as PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), so `openssl pkey`
//! can read them. Public keys are written as standard base64 of the 32 raw bytes (44
//! characters), like WireGuard keys.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// Length of a node ID in bytes (128 bits).
pub const NODE_ID_LEN: usize = 16;

/// A 128-bit overlay node ID: the first 16 bytes of SHA-256(public key).
///
/// Text form: 32 lowercase hex digits, e.g. `3f9a0c…`. Ordering is bytewise, which the
/// management session uses to break ties between simultaneous connections.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct NodeId(pub [u8; NODE_ID_LEN]);

impl NodeId {
    /// Derives the node ID of `key` (first 16 bytes of its SHA-256 digest).
    pub fn from_public_key(key: &PublicKey) -> NodeId {
        let digest = Sha256::digest(key.0);
        let mut id = [0u8; NODE_ID_LEN];
        id.copy_from_slice(&digest[..NODE_ID_LEN]);
        NodeId(id)
    }

    /// The raw 16 bytes.
    pub fn as_bytes(&self) -> &[u8; NODE_ID_LEN] {
        &self.0
    }

    /// A short form (first 8 hex digits) for log lines and tables.
    pub fn short(&self) -> String {
        self.to_string()[..8].to_string()
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

/// Error parsing a node ID or a public key from text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// A node ID must be exactly 32 hex digits.
    #[error("expected 32 hex digits")]
    NodeIdFormat,
    /// A public key must be base64 of exactly 32 bytes.
    #[error("expected base64 of a 32-byte Ed25519 public key (44 characters)")]
    KeyFormat,
    /// The 32 bytes do not encode a valid Ed25519 point.
    #[error("not a valid Ed25519 public key")]
    KeyInvalid,
}

impl serde::Serialize for NodeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for NodeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for NodeId {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() != 2 * NODE_ID_LEN || !s.is_ascii() {
            return Err(ParseError::NodeIdFormat);
        }
        let mut id = [0u8; NODE_ID_LEN];
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| ParseError::NodeIdFormat)?;
        }
        Ok(NodeId(id))
    }
}

/// An Ed25519 public key (32 bytes), the identity a peer is pinned by.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// The node ID derived from this key.
    pub fn node_id(&self) -> NodeId {
        NodeId::from_public_key(self)
    }

    /// The DER SubjectPublicKeyInfo of this key (RFC 8410), as it appears in certificates.
    pub fn spki_der(&self) -> Vec<u8> {
        // SEQUENCE { SEQUENCE { OID 1.3.101.112 } BIT STRING { 0x00, key } }
        let mut der = vec![0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
        der.extend_from_slice(&self.0);
        der
    }

    /// Extracts the key from a DER Ed25519 SubjectPublicKeyInfo; `None` for any other shape.
    pub fn from_spki_der(der: &[u8]) -> Option<PublicKey> {
        const PREFIX: [u8; 12] = [0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
        if der.len() != PREFIX.len() + 32 || der[..PREFIX.len()] != PREFIX {
            return None;
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&der[PREFIX.len()..]);
        Some(PublicKey(key))
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&base64::engine::general_purpose::STANDARD.encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl PublicKey {
    /// The 32 bytes of a base64 key, without checking that they are a point of the curve
    /// (a point decompression, the cost of parsing a key): for a key that was just used to verify a signature (a directory
    /// record's), or one checked again before use. [`str::parse`] checks.
    ///
    /// # Errors
    /// [`ParseError::KeyFormat`] when it is not base64 of 32 bytes.
    pub fn from_base64(s: &str) -> Result<PublicKey, ParseError> {
        let bytes = base64::engine::general_purpose::STANDARD.decode(s.trim()).map_err(|_| ParseError::KeyFormat)?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| ParseError::KeyFormat)?;
        Ok(PublicKey(key))
    }
}

impl FromStr for PublicKey {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let key = PublicKey::from_base64(s)?;
        VerifyingKey::from_bytes(&key.0).map_err(|_| ParseError::KeyInvalid)?;
        Ok(key)
    }
}

/// This node's identity: its Ed25519 signing key.
#[derive(Clone)]
pub struct Identity {
    signing: SigningKey,
}

impl Identity {
    /// Generates a new random identity from `rng` (the shell passes the OS random source;
    /// the core never reads it).
    pub fn generate(rng: &mut impl rand_core::CryptoRngCore) -> Identity {
        Identity { signing: SigningKey::generate(rng) }
    }

    /// Builds an identity from a 32-byte secret seed (tests and simulations).
    pub fn from_seed(seed: [u8; 32]) -> Identity {
        Identity { signing: SigningKey::from_bytes(&seed) }
    }

    /// Parses a PKCS#8 PEM private key.
    pub fn from_pem(pem: &str) -> Option<Identity> {
        SigningKey::from_pkcs8_pem(pem).ok().map(|signing| Identity { signing })
    }

    /// The PKCS#8 PEM text of the private key.
    pub fn to_pem(&self) -> String {
        self.signing.to_pkcs8_pem(Default::default()).expect("encoding an Ed25519 key as PKCS#8 cannot fail").to_string()
    }

    /// The PKCS#8 DER of the private key (what rustls and rcgen consume).
    pub fn pkcs8_der(&self) -> Vec<u8> {
        self.signing.to_pkcs8_der().expect("encoding an Ed25519 key as PKCS#8 cannot fail").as_bytes().to_vec()
    }

    /// The public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.signing.verifying_key().to_bytes())
    }

    /// The node ID (first 16 bytes of SHA-256 of the public key).
    pub fn node_id(&self) -> NodeId {
        self.public_key().node_id()
    }

    /// An Ed25519 signature of `msg` (64 bytes).
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        use ed25519_dalek::Signer;
        self.signing.sign(msg).to_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_is_sha256_prefix_of_public_key() {
        let id = Identity::from_seed([7u8; 32]);
        let pk = id.public_key();
        let digest = Sha256::digest(pk.0);
        assert_eq!(&id.node_id().0[..], &digest[..16]);
        assert_eq!(id.node_id().to_string().len(), 32);
    }

    #[test]
    fn text_forms_round_trip() {
        let id = Identity::from_seed([9u8; 32]);
        let pk = id.public_key();
        assert_eq!(pk.to_string().len(), 44);
        assert_eq!(pk.to_string().parse::<PublicKey>().unwrap(), pk);
        let nid = id.node_id();
        assert_eq!(nid.to_string().parse::<NodeId>().unwrap(), nid);
        assert_eq!(Identity::from_pem(&id.to_pem()).unwrap().public_key(), pk);
    }

    #[test]
    fn bad_text_is_rejected() {
        assert_eq!("xyz".parse::<NodeId>(), Err(ParseError::NodeIdFormat));
        assert_eq!("zz".repeat(16).parse::<NodeId>(), Err(ParseError::NodeIdFormat));
        assert_eq!("AAAA".parse::<PublicKey>(), Err(ParseError::KeyFormat));
        assert!(Identity::from_pem("garbage").is_none());
    }

    #[test]
    fn spki_round_trip() {
        let pk = Identity::from_seed([3u8; 32]).public_key();
        assert_eq!(PublicKey::from_spki_der(&pk.spki_der()), Some(pk));
        let mut bad = pk.spki_der();
        bad[5] ^= 1;
        assert_eq!(PublicKey::from_spki_der(&bad), None);
    }
}
