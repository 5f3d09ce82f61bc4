//! The node directory: signed node records spread as soft state, and P2PNS-style names
//! (spec A§3.1–A§3.2, seeds-digest items 57–61; P2PNS register/resolve, `002`).
//!
//! Every node publishes a [`NodeRecord`]: who it is (node ID, name, public key), where it is
//! (underlay endpoints), what it offers (overlay addresses, prefixes, relay willingness,
//! uptime class), its management neighbours (so that every node knows the management
//! topology) and a sequence number and expiry. The record is signed with the node's key;
//! the node ID must be the hash of that key, so a record cannot be forged for someone else's
//! ID. Records are refreshed before they expire and forgotten when they do; a record with a
//! bad signature, a key that does not match its ID, an old sequence number or a past expiry
//! is rejected and counted. The newest seen sequence number of a forgotten node is kept for
//! a while, so an old record cannot be replayed into the directory.
//!
//! Names: a name belongs to the node that registered it first (earliest registration time,
//! then lowest node ID); a later claim by another key is refused. A record that claims a
//! taken name is still accepted as a node record, without that name.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, OnceLock};

use base64::Engine;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::identity::{Identity, NodeId, PublicKey};

/// How often a node re-signs its record in a small overlay (seconds): the shortest
/// refresh interval ([`refresh_s`]).
pub const REFRESH_S: u64 = 30;
/// Refresh interval per node in the directory (seconds): the refresh traffic a node
/// receives, about one record every `REFRESH_PER_NODE_S` from each neighbour, does not
/// grow with the overlay.
pub const REFRESH_PER_NODE_S: u64 = 4;
/// The longest refresh interval (seconds).
pub const MAX_REFRESH_S: u64 = 6 * 3600;
/// A record is valid for this many refresh intervals after it was signed.
pub const TTL_REFRESHES: u64 = 4;
/// How long a record of a small overlay is valid after it was signed (seconds): the
/// shortest lifetime ([`record_ttl_s`]).
pub const RECORD_TTL_S: u64 = TTL_REFRESHES * REFRESH_S;
/// The longest lifetime a record may claim (seconds), plus [`CLOCK_SLACK_S`].
pub const MAX_RECORD_TTL_S: u64 = TTL_REFRESHES * MAX_REFRESH_S;
/// Clock differences tolerated when judging a record's expiry (seconds).
pub const CLOCK_SLACK_S: u64 = 600;
/// How long the sequence number of a forgotten node is remembered (seconds).
pub const TOMBSTONE_S: u64 = 3600;
/// Largest signed record accepted, in bytes.
pub const MAX_RECORD: usize = 16 * 1024;

/// How often a node re-signs its record when its directory holds `nodes` records
/// (seconds): [`REFRESH_PER_NODE_S`] per node, between [`REFRESH_S`] and
/// [`MAX_REFRESH_S`]. Records change, and are flooded, at once when their content changes;
/// the refresh only keeps them from expiring, so it can be slow in a large overlay. Nodes
/// that fail are noticed from their neighbours' records (mutual links go, see
/// [`Directory::linked`]), not from expiry.
pub fn refresh_s(nodes: usize) -> u64 {
    (nodes as u64).saturating_mul(REFRESH_PER_NODE_S).clamp(REFRESH_S, MAX_REFRESH_S)
}

/// The lifetime of a record signed with `nodes` records in the directory (seconds).
pub fn record_ttl_s(nodes: usize) -> u64 {
    TTL_REFRESHES * refresh_s(nodes)
}

/// How long a node has been up: stable hosts are preferred as neighbours and relays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Uptime {
    /// Routers and servers: up for days.
    Stable,
    /// Laptops and the like: minutes to hours.
    Ephemeral,
}

impl Uptime {
    /// Config and status spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Uptime::Stable => "stable",
            Uptime::Ephemeral => "ephemeral",
        }
    }
}

/// A name and when its holder first registered it (unix seconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Name {
    /// The name.
    pub name: String,
    /// Registration time, unix seconds.
    pub since: u64,
}

/// What a node publishes about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node ID (first 16 bytes of SHA-256 of `public_key`).
    pub node_id: NodeId,
    /// Ed25519 public key, base64.
    pub public_key: String,
    /// Registered names; the first is the node's own name.
    pub names: Vec<Name>,
    /// Underlay endpoints of the data plane (the management port is the data port + 1).
    pub endpoints: Vec<SocketAddr>,
    /// Overlay IPv4 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay_v4: Option<Ipv4Addr>,
    /// Overlay IPv6 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay_v6: Option<Ipv6Addr>,
    /// Prefixes reachable through the node.
    #[serde(default)]
    pub prefixes: Vec<IpNet>,
    /// Whether the node relays for others.
    pub relay: bool,
    /// Uptime class.
    pub uptime: Uptime,
    /// Networks behind the node that are normally reached over the underlay (peers route
    /// them into the overlay while their path to the node is down).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<IpNet>,
    /// Relay policy (absent in records of older nodes: see [`NodeRecord::policy`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<crate::node::policy::Policy>,
    /// Management neighbours (nodes it keeps sessions with).
    #[serde(default)]
    pub neighbours: Vec<NodeId>,
    /// Sequence number; a newer record has a larger one.
    pub seq: u64,
    /// Unix time after which the record is invalid.
    pub expires: u64,
}

impl NodeRecord {
    /// The node's relay policy: the published one, or for a record without one, commitment
    /// `always` or `never` from `relay` and the lifespan from `uptime`.
    pub fn policy(&self) -> crate::node::policy::Policy {
        match &self.policy {
            Some(p) => p.clone(),
            None => crate::node::policy::Policy {
                commitment: if self.relay { crate::node::policy::Commitment::Always } else { crate::node::policy::Commitment::Never },
                lifespan: self.uptime,
                ..crate::node::policy::Policy::default()
            },
        }
    }

    /// The node's own name.
    pub fn name(&self) -> &str {
        self.names.first().map(|n| n.name.as_str()).unwrap_or("")
    }
}

/// A record as it travels: the exact signed bytes and the signature. Cloning shares them
/// (a record flooded to every neighbour is held once), and what [`SignedRecord::peek`]
/// decodes is remembered.
#[derive(Clone)]
pub struct SignedRecord(Arc<SignedInner>);

struct SignedInner {
    /// JSON of the [`NodeRecord`], base64.
    body: String,
    /// Ed25519 signature over the body bytes, base64.
    sig: String,
    /// What `peek` found, once computed.
    claim: OnceLock<Option<(NodeId, u64)>>,
}

/// The wire form of a [`SignedRecord`].
#[derive(Serialize, Deserialize)]
struct SignedWire {
    body: String,
    sig: String,
}

impl Serialize for SignedRecord {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Ref<'a> {
            body: &'a str,
            sig: &'a str,
        }
        Ref { body: &self.0.body, sig: &self.0.sig }.serialize(s)
    }
}

impl<'de> Deserialize<'de> for SignedRecord {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SignedRecord, D::Error> {
        let w = SignedWire::deserialize(d)?;
        Ok(SignedRecord::from_parts(w.body, w.sig))
    }
}

impl PartialEq for SignedRecord {
    fn eq(&self, other: &SignedRecord) -> bool {
        self.0.body == other.0.body && self.0.sig == other.0.sig
    }
}

impl Eq for SignedRecord {}

impl std::fmt::Debug for SignedRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignedRecord").field("body", &self.0.body).field("sig", &self.0.sig).finish()
    }
}

/// Checks the signature of records before they enter a directory. [`Ed25519`] checks each
/// record it is given; a simulation of thousands of nodes in one process shares one that
/// remembers what it checked (the same bytes give the same answer), so that every record is
/// verified once instead of once per node.
pub trait RecordVerifier: Send + Sync {
    /// The decoded record if the signature and key are valid.
    ///
    /// # Errors
    /// As [`SignedRecord::verify`].
    fn verify(&self, signed: &SignedRecord) -> Result<Arc<NodeRecord>, Reject>;
}

/// The plain verifier: [`SignedRecord::verify`] every time.
pub struct Ed25519;

impl RecordVerifier for Ed25519 {
    fn verify(&self, signed: &SignedRecord) -> Result<Arc<NodeRecord>, Reject> {
        signed.verify().map(Arc::new)
    }
}

/// A [`RecordVerifier`] for simulations that run many nodes in one process: each distinct
/// signed record (one allocation, shared by every copy of it that travels) is checked
/// once with [`SignedRecord::verify`] and the answer remembered for every node, so that
/// 1,000 directories of 1,000 records cost 1,000 signature checks, not 1,000,000. It keeps
/// every record it saw; not for a daemon.
#[derive(Default)]
pub struct CachedVerifier {
    seen: std::sync::Mutex<HashMap<usize, Checked>>,
}

/// A record and what checking it gave.
type Checked = (SignedRecord, Result<Arc<NodeRecord>, Reject>);

impl RecordVerifier for CachedVerifier {
    fn verify(&self, signed: &SignedRecord) -> Result<Arc<NodeRecord>, Reject> {
        // The allocation identifies the record while the cache holds a copy of it.
        let key = Arc::as_ptr(&signed.0) as usize;
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, r)) = seen.get(&key) {
            if s == signed {
                return r.clone();
            }
        }
        let r = signed.verify().map(Arc::new);
        seen.insert(key, (signed.clone(), r.clone()));
        r
    }
}

/// Number of digest buckets: node IDs fall into one by their first byte.
pub const BUCKETS: usize = 64;

/// The digest bucket of a node ID.
pub fn bucket_of(id: &NodeId) -> usize {
    usize::from(id.0[0]) * BUCKETS / 256
}

/// What a (node ID, sequence number) adds to its bucket's hash (XOR of all entries).
fn entry_hash(id: &NodeId, seq: u64) -> u64 {
    let d = sha2::Sha256::new().chain_update(id.0).chain_update(seq.to_be_bytes()).finalize();
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// Why a record was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum Reject {
    /// Not decodable.
    #[error("malformed record")]
    Malformed,
    /// The signature does not verify with the record's key.
    #[error("bad signature")]
    BadSignature,
    /// The node ID is not the hash of the key.
    #[error("key does not match the node ID")]
    KeyMismatch,
    /// Older than the record already known (or remembered).
    #[error("stale sequence number")]
    Stale,
    /// The record already known, received again (flooding delivers most records more than
    /// once; a replay of the current record lands here too).
    #[error("duplicate")]
    Duplicate,
    /// Its expiry has passed (or is implausibly far away).
    #[error("expired")]
    Expired,
}

impl Reject {
    /// All reasons, for counters.
    pub const ALL: [Reject; 6] = [Reject::Malformed, Reject::BadSignature, Reject::KeyMismatch, Reject::Stale, Reject::Duplicate, Reject::Expired];

    /// snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::Malformed => "malformed",
            Reject::BadSignature => "bad_signature",
            Reject::KeyMismatch => "key_mismatch",
            Reject::Stale => "stale",
            Reject::Duplicate => "duplicate",
            Reject::Expired => "expired",
        }
    }
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl SignedRecord {
    /// Signs a record with the node's identity.
    pub fn sign(record: &NodeRecord, identity: &Identity) -> SignedRecord {
        let body = serde_json::to_vec(record).expect("records serialize");
        let sig = identity.sign(&body);
        SignedRecord::from_parts(b64().encode(&body), b64().encode(sig))
    }

    /// A record from its two base64 parts as received (nothing is checked yet).
    pub fn from_parts(body: String, sig: String) -> SignedRecord {
        SignedRecord(Arc::new(SignedInner { body, sig, claim: OnceLock::new() }))
    }

    /// The body: JSON of the [`NodeRecord`], base64.
    pub fn body(&self) -> &str {
        &self.0.body
    }

    /// The Ed25519 signature over the body bytes, base64.
    pub fn sig(&self) -> &str {
        &self.0.sig
    }

    /// The node ID and sequence number the record claims, without checking anything
    /// (decoded once per received copy; copies made by cloning share it).
    pub fn peek(&self) -> Option<(NodeId, u64)> {
        *self.0.claim.get_or_init(|| {
            #[derive(Deserialize)]
            struct Claim {
                node_id: NodeId,
                seq: u64,
            }
            if self.0.body.len() > MAX_RECORD * 2 {
                return None;
            }
            let body = b64().decode(&self.0.body).ok()?;
            let c: Claim = serde_json::from_slice(&body).ok()?;
            Some((c.node_id, c.seq))
        })
    }

    /// Checks the signature and that the node ID belongs to the key, and decodes.
    ///
    /// # Errors
    /// [`Reject::Malformed`], [`Reject::BadSignature`] or [`Reject::KeyMismatch`].
    pub fn verify(&self) -> Result<NodeRecord, Reject> {
        if self.0.body.len() > MAX_RECORD * 2 {
            return Err(Reject::Malformed);
        }
        let body = b64().decode(&self.0.body).map_err(|_| Reject::Malformed)?;
        let sig = b64().decode(&self.0.sig).map_err(|_| Reject::Malformed)?;
        let rec: NodeRecord = serde_json::from_slice(&body).map_err(|_| Reject::Malformed)?;
        // The curve point is checked once, below.
        let key = PublicKey::from_base64(&rec.public_key).map_err(|_| Reject::Malformed)?;
        if key.node_id() != rec.node_id {
            return Err(Reject::KeyMismatch);
        }
        let vk = VerifyingKey::from_bytes(&key.0).map_err(|_| Reject::Malformed)?;
        let sig: [u8; 64] = sig.try_into().map_err(|_| Reject::Malformed)?;
        vk.verify(&body, &Signature::from_bytes(&sig)).map_err(|_| Reject::BadSignature)?;
        Ok(rec)
    }
}

/// A record accepted into the directory.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The decoded record.
    pub record: Arc<NodeRecord>,
    /// The signed form, to pass on.
    pub signed: SignedRecord,
}

/// The result of offering a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// A node not known before.
    New,
    /// A newer record of a known node.
    Updated,
}

/// The directory of one node.
///
/// Work per record offered is O(1) in the directory's size (a hash lookup, the signature
/// check for a new one, and an update of its digest bucket); memory per record is the
/// entry (node ID, two shared pointers) plus the record itself.
pub struct Directory {
    /// By node ID (a keyed fast hash: lookups are on every edge of a route search). The
    /// keys come from the node's seed ([`Directory::with_seed`]): iteration order, and so
    /// what the node sends, is the same for the same seed, and no OS randomness is drawn.
    entries: HashMap<NodeId, Entry, ahash::RandomState>,
    tombstones: BTreeMap<NodeId, (u64, u64)>,
    rejected: [u64; Reject::ALL.len()],
    /// Per digest bucket, the XOR of [`entry_hash`] over its entries.
    buckets: [u64; BUCKETS],
    verifier: Option<Arc<dyn RecordVerifier>>,
}

impl Default for Directory {
    fn default() -> Directory {
        Directory::with_seed(0)
    }
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory").field("entries", &self.entries.len()).field("tombstones", &self.tombstones.len()).finish()
    }
}

impl Directory {
    /// An empty directory.
    pub fn new() -> Directory {
        Directory::default()
    }

    /// An empty directory whose hash keys come from `seed` (a daemon's seed is drawn from
    /// the OS at start, so that its keys cannot be guessed).
    pub fn with_seed(seed: u64) -> Directory {
        let mut rng = crate::rng::Rng::new(seed ^ 0x6469_7265_6374);
        let hasher = ahash::RandomState::with_seeds(rng.next_u64(), rng.next_u64(), rng.next_u64(), rng.next_u64());
        Directory { entries: HashMap::with_hasher(hasher), tombstones: BTreeMap::new(), rejected: [0; Reject::ALL.len()], buckets: [0; BUCKETS], verifier: None }
    }

    /// Checks signatures with `v` instead of [`Ed25519`].
    pub fn set_verifier(&mut self, v: Arc<dyn RecordVerifier>) {
        self.verifier = Some(v);
    }

    /// Offers a signed record received at `now` (unix seconds).
    ///
    /// # Errors
    /// Why it was rejected (also counted).
    pub fn insert(&mut self, signed: SignedRecord, now: u64) -> Result<Accepted, Reject> {
        let r = self.check(&signed, now);
        match r {
            Ok(rec) => {
                let id = rec.node_id;
                self.tombstones.remove(&id);
                let b = bucket_of(&id);
                self.buckets[b] ^= entry_hash(&id, rec.seq);
                let old = self.entries.insert(id, Entry { record: rec, signed });
                if let Some(old) = &old {
                    self.buckets[b] ^= entry_hash(&id, old.record.seq);
                }
                Ok(if old.is_none() { Accepted::New } else { Accepted::Updated })
            }
            Err(e) => {
                self.rejected[e as usize] += 1;
                Err(e)
            }
        }
    }

    fn check(&self, signed: &SignedRecord, now: u64) -> Result<Arc<NodeRecord>, Reject> {
        // Most records arrive more than once (flooding): compare the sequence number before
        // paying for the signature check.
        if let Some((id, seq)) = signed.peek() {
            match self.known_seq(&id) {
                Some(k) if seq < k => return Err(Reject::Stale),
                Some(k) if seq == k => return Err(Reject::Duplicate),
                _ => {}
            }
        }
        let rec = match &self.verifier {
            Some(v) => v.verify(signed)?,
            None => Arc::new(signed.verify()?),
        };
        if rec.expires <= now || rec.expires > now + MAX_RECORD_TTL_S + CLOCK_SLACK_S {
            return Err(Reject::Expired);
        }
        let known = self.entries.get(&rec.node_id).map(|e| e.record.seq).or_else(|| self.tombstones.get(&rec.node_id).map(|t| t.0));
        match known {
            Some(k) if rec.seq < k => return Err(Reject::Stale),
            Some(k) if rec.seq == k => return Err(Reject::Duplicate),
            _ => {}
        }
        Ok(rec)
    }

    /// Forgets expired records (keeping their sequence numbers for [`TOMBSTONE_S`]).
    /// Returns the nodes forgotten.
    pub fn expire(&mut self, now: u64) -> Vec<NodeId> {
        let gone: Vec<NodeId> = self.entries.iter().filter(|(_, e)| e.record.expires <= now).map(|(id, _)| *id).collect();
        for id in &gone {
            if let Some(e) = self.entries.remove(id) {
                self.buckets[bucket_of(id)] ^= entry_hash(id, e.record.seq);
                self.tombstones.insert(*id, (e.record.seq, now + TOMBSTONE_S));
            }
        }
        self.tombstones.retain(|_, (_, until)| *until > now);
        gone
    }

    /// A node's record.
    pub fn get(&self, id: &NodeId) -> Option<&Entry> {
        self.entries.get(id)
    }

    /// Every record.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// (node ID, sequence number) of every record: what anti-entropy exchanges.
    pub fn digest(&self) -> Vec<(NodeId, u64)> {
        self.digest_of(None)
    }

    /// (node ID, sequence number) of the records in the given digest buckets (all with
    /// `None`), sorted.
    pub fn digest_of(&self, buckets: Option<&[u8]>) -> Vec<(NodeId, u64)> {
        let mut d: Vec<(NodeId, u64)> = self.entries.iter().filter(|(id, _)| in_buckets(id, buckets)).map(|(id, e)| (*id, e.record.seq)).collect();
        d.sort();
        d
    }

    /// The hash of every digest bucket ([`BUCKETS`] of them): two directories whose bucket
    /// hashes agree hold the same (node ID, sequence number) pairs in it. Kept up to date
    /// on every change, so a summary costs nothing to make and its size does not grow
    /// with the directory.
    pub fn bucket_hashes(&self) -> [u64; BUCKETS] {
        self.buckets
    }

    /// Compares with a neighbour's digest: the records this directory has that are newer
    /// (or missing there), and the node IDs it should ask for.
    pub fn diff(&self, theirs: &[(NodeId, u64)]) -> (Vec<SignedRecord>, Vec<NodeId>) {
        self.diff_in(theirs, None)
    }

    /// [`Directory::diff`] for a digest that covers only the given buckets (all with
    /// `None`).
    pub fn diff_in(&self, theirs: &[(NodeId, u64)], buckets: Option<&[u8]>) -> (Vec<SignedRecord>, Vec<NodeId>) {
        let their: HashMap<NodeId, u64> = theirs.iter().copied().collect();
        let give = self.entries.iter().filter(|(id, e)| in_buckets(id, buckets) && their.get(id).is_none_or(|s| *s < e.record.seq)).map(|(_, e)| e.signed.clone()).collect();
        let want = theirs.iter().filter(|(id, s)| self.entries.get(id).is_none_or(|e| e.record.seq < *s)).map(|(id, _)| *id).collect();
        (give, want)
    }

    /// Whether `a` and `b` each list the other as a management neighbour: the links the
    /// management overlay routes over. A node that failed loses them as soon as its
    /// neighbours publish their new neighbour sets.
    pub fn linked(&self, a: &NodeId, b: &NodeId) -> bool {
        let lists = |x: &NodeId, y: &NodeId| self.entries.get(x).is_some_and(|e| e.record.neighbours.contains(y));
        lists(a, b) && lists(b, a)
    }

    /// The nodes `a` has a mutual link with ([`Directory::linked`]).
    pub fn links_of<'a>(&'a self, a: &'a NodeId) -> impl Iterator<Item = NodeId> + 'a {
        // `a` lists each of these: only the other direction needs a lookup.
        self.entries.get(a).into_iter().flat_map(move |e| e.record.neighbours.iter().copied().filter(move |b| b != a && self.entries.get(b).is_some_and(|x| x.record.neighbours.contains(a))))
    }

    /// Who holds a name: the earliest registration wins, then the lowest node ID.
    pub fn holder(&self, name: &str) -> Option<&Entry> {
        self.entries.values().filter_map(|e| e.record.names.iter().find(|n| n.name == name).map(|n| (n.since, e.record.node_id, e))).min_by_key(|(since, id, _)| (*since, *id)).map(|(_, _, e)| e)
    }

    /// P2PNS resolve: the node holding `name`.
    pub fn resolve(&self, name: &str) -> Option<&NodeRecord> {
        self.holder(name).map(|e| &*e.record)
    }

    /// Whether `node` may register `name` registered at `since`: it is free, or held by
    /// `node` itself, or `node`'s claim is older.
    pub fn may_register(&self, node: &NodeId, name: &str, since: u64) -> bool {
        match self.holder(name) {
            None => true,
            Some(e) if e.record.node_id == *node => true,
            Some(e) => {
                let theirs = e.record.names.iter().find(|n| n.name == name).map(|n| n.since).unwrap_or(u64::MAX);
                claim_wins((since, *node), (theirs, e.record.node_id))
            }
        }
    }

    /// Rejections so far, by reason (reasons never seen are left out).
    pub fn rejected(&self) -> BTreeMap<&'static str, u64> {
        Reject::ALL.iter().filter(|r| self.rejected[**r as usize] > 0).map(|r| (r.as_str(), self.rejected[*r as usize])).collect()
    }

    /// The highest sequence number known or remembered for a node.
    pub fn known_seq(&self, id: &NodeId) -> Option<u64> {
        self.entries.get(id).map(|e| e.record.seq).or_else(|| self.tombstones.get(id).map(|t| t.0))
    }
}

/// Whether a claim on a name, (registration time, node ID), beats another: the earliest
/// registration wins, then the lowest node ID.
pub fn claim_wins(ours: (u64, NodeId), theirs: (u64, NodeId)) -> bool {
    ours < theirs
}

fn in_buckets(id: &NodeId, buckets: Option<&[u8]>) -> bool {
    buckets.is_none_or(|b| b.contains(&(bucket_of(id) as u8)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &Identity, name: &str, since: u64, seq: u64, expires: u64) -> NodeRecord {
        NodeRecord {
            node_id: id.node_id(),
            public_key: id.public_key().to_string(),
            names: vec![Name { name: name.into(), since }],
            endpoints: vec!["192.0.2.1:7720".parse().unwrap()],
            overlay_v4: Some("10.77.0.1".parse().unwrap()),
            overlay_v6: None,
            prefixes: vec![],
            relay: true,
            uptime: Uptime::Stable,
            networks: vec![],
            policy: None,
            neighbours: vec![],
            seq,
            expires,
        }
    }

    #[test]
    fn signed_records_verify_and_update_by_sequence() {
        let a = Identity::from_seed([1; 32]);
        let mut d = Directory::new();
        assert_eq!(d.insert(SignedRecord::sign(&record(&a, "alice", 10, 1, 200), &a), 100), Ok(Accepted::New));
        assert_eq!(d.insert(SignedRecord::sign(&record(&a, "alice", 10, 2, 200), &a), 100), Ok(Accepted::Updated));
        assert_eq!(d.insert(SignedRecord::sign(&record(&a, "alice", 10, 2, 200), &a), 100), Err(Reject::Duplicate), "replay");
        assert_eq!(d.insert(SignedRecord::sign(&record(&a, "alice", 10, 1, 200), &a), 100), Err(Reject::Stale), "older");
        assert_eq!(d.get(&a.node_id()).unwrap().record.seq, 2);
        assert_eq!(d.rejected().get("stale"), Some(&1));
        assert_eq!(d.rejected().get("duplicate"), Some(&1));
    }

    #[test]
    fn forgeries_are_rejected() {
        let a = Identity::from_seed([1; 32]);
        let m = Identity::from_seed([2; 32]);
        let mut d = Directory::new();
        // mallory signs a record for alice's node ID with her own key
        let mut r = record(&a, "alice", 10, 5, 200);
        r.public_key = m.public_key().to_string();
        assert_eq!(d.insert(SignedRecord::sign(&r, &m), 100), Err(Reject::KeyMismatch));
        // a valid record with its body changed after signing
        let good = SignedRecord::sign(&record(&a, "alice", 10, 5, 200), &a);
        let mut body = b64().decode(good.body()).unwrap();
        let text = String::from_utf8(body.clone()).unwrap().replace("192.0.2.1", "192.0.2.9");
        body = text.into_bytes();
        let tampered = SignedRecord::from_parts(b64().encode(body), good.sig().to_string());
        assert_eq!(d.insert(tampered, 100), Err(Reject::BadSignature));
        assert_eq!(d.insert(SignedRecord::from_parts("!!".into(), "".into()), 100), Err(Reject::Malformed));
        assert_eq!(d.insert(SignedRecord::sign(&record(&a, "alice", 10, 5, 90), &a), 100), Err(Reject::Expired));
        assert!(d.is_empty());
    }

    #[test]
    fn expired_records_go_and_cannot_be_replayed() {
        let a = Identity::from_seed([1; 32]);
        let mut d = Directory::new();
        let old = SignedRecord::sign(&record(&a, "alice", 10, 3, 200), &a);
        d.insert(old.clone(), 100).unwrap();
        assert_eq!(d.expire(250), vec![a.node_id()]);
        assert!(d.is_empty());
        // the same record replayed later is refused by the tombstone, and is expired anyway
        assert!(d.insert(old, 150).is_err());
        assert_eq!(d.insert(SignedRecord::sign(&record(&a, "alice", 10, 3, 400), &a), 260), Err(Reject::Duplicate));
        assert_eq!(d.insert(SignedRecord::sign(&record(&a, "alice", 10, 2, 400), &a), 260), Err(Reject::Stale));
        assert_eq!(d.insert(SignedRecord::sign(&record(&a, "alice", 10, 4, 400), &a), 260), Ok(Accepted::New));
    }

    #[test]
    fn first_registration_holds_a_name() {
        let a = Identity::from_seed([1; 32]);
        let b = Identity::from_seed([2; 32]);
        let mut d = Directory::new();
        d.insert(SignedRecord::sign(&record(&a, "sip:office", 10, 1, 200), &a), 100).unwrap();
        // b claims the same name later: its record is accepted, the name stays a's
        d.insert(SignedRecord::sign(&record(&b, "sip:office", 20, 1, 200), &b), 100).unwrap();
        assert_eq!(d.resolve("sip:office").unwrap().node_id, a.node_id());
        assert!(!d.may_register(&b.node_id(), "sip:office", 20));
        assert!(d.may_register(&a.node_id(), "sip:office", 10));
        assert!(d.may_register(&b.node_id(), "other", 20));
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn digests_find_what_each_side_lacks() {
        let a = Identity::from_seed([1; 32]);
        let b = Identity::from_seed([2; 32]);
        let mut x = Directory::new();
        let mut y = Directory::new();
        x.insert(SignedRecord::sign(&record(&a, "a", 1, 5, 200), &a), 100).unwrap();
        y.insert(SignedRecord::sign(&record(&a, "a", 1, 3, 200), &a), 100).unwrap();
        y.insert(SignedRecord::sign(&record(&b, "b", 1, 1, 200), &b), 100).unwrap();
        let (give, want) = x.diff(&y.digest());
        assert_eq!(give.len(), 1, "x has a newer record of a");
        assert_eq!(want, vec![b.node_id()]);
        for r in give {
            y.insert(r, 100).unwrap();
        }
        assert_eq!(y.get(&a.node_id()).unwrap().record.seq, 5);
    }
}
