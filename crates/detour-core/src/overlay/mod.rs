//! The management overlay of one node, sans I/O: its signed record, directory gossip,
//! the choice of management neighbours, and delivery of messages to any node ID
//! (spec A§1.3.2, A§2.2, A§3; seeds-digest items 32–39, 48–49, 57–61, 78–82).
//!
//! The shell feeds it session changes, management messages, ticks and local requests
//! (`now` on the monotonic clock, `unix` in seconds for record expiry) and carries out what
//! [`Overlay::poll`] returns. Nothing here opens a socket or reads a clock, so hundreds of
//! nodes can be simulated in one process (see the tests).
//!
//! * **Record.** The node signs a [`NodeRecord`] (sequence number = unix time in ms, never
//!   lower than one it published before) and floods it to every session when it changes
//!   (debounced) and every [`directory::refresh_s`] (slower as the directory grows: the
//!   refresh traffic a node sees stays the same). A record of its own that is newer than the one it
//!   holds — left in the network by an earlier run — is adopted: the node continues above
//!   its sequence number and keeps its names' registration times.
//! * **Gossip.** A record that is new to the directory is flooded to every session but the
//!   one it came from; on every new session, and every [`ANTI_ENTROPY`] with one random
//!   neighbour, the two sides exchange digests and then the records the other lacks
//!   (push-pull anti-entropy), so partitions that heal merge their directories. A large
//!   directory is compared by a summary of bucket hashes first, and only the buckets that
//!   differ are listed.
//! * **Neighbours.** The node keeps sessions with `k` neighbours: `k` follows the
//!   reliability rule ([`neighbours_for`]) with the measured availability of neighbours,
//!   between the configured bounds; stable nodes first, then diverse underlay groups, then
//!   a per-node pseudo-random order (rendezvous hashing) so that the graph is random and
//!   stays connected. Configured peers count towards `k`. A neighbour that cannot be
//!   reached is replaced; only nodes with a mutual link to some other node (alive, as far
//!   as their neighbours' records tell) are chosen.
//! * **Cost.** A record that arrives costs O(1) in the directory's size: a lookup, a
//!   signature check when it is new, a bucket hash, and an update of the ranked
//!   candidates. Nothing is recomputed over the whole directory per change; message routes
//!   are searched in the directory itself when a message is sent.
//! * **Delivery.** [`crate::overlay::mroute::Router`] on the topology the records describe.

pub mod admission;
pub mod api;
pub mod api_server;
pub mod directory;
pub mod mroute;
pub mod session;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use sha2::{Digest as _, Sha256};

use crate::identity::{Identity, NodeId};
use crate::overlay::directory::{Accepted, Directory, Name, NodeRecord, SignedRecord, Uptime, BUCKETS};
use crate::overlay::mroute::{MrouteConfig, Router};
use crate::wire::mgmt::Message;

/// How often a node exchanges digests with one random neighbour.
pub const ANTI_ENTROPY: Duration = Duration::from_secs(5);
/// Shortest time between two publications of the node's record.
pub const PUBLISH_DEBOUNCE: Duration = Duration::from_millis(300);
/// Longest time between a change of the node's sessions and its next publication: while
/// a large overlay forms, a node's neighbour set changes several times in a few seconds,
/// and each publication is flooded to every node (a session is used at once either way;
/// only others' routes through it wait for the record). See [`neighbour_debounce`].
pub const NEIGHBOUR_DEBOUNCE: Duration = Duration::from_secs(2);

/// How long a node waits to publish a change of its sessions with `nodes` records in its
/// directory: 20 ms per node, between [`PUBLISH_DEBOUNCE`] and [`NEIGHBOUR_DEBOUNCE`] (a
/// small overlay learns new links at once, a large one is not flooded by every step).
pub fn neighbour_debounce(nodes: usize) -> Duration {
    (Duration::from_millis(20) * nodes.min(1000) as u32).clamp(PUBLISH_DEBOUNCE, NEIGHBOUR_DEBOUNCE)
}
/// Publications of link changes remembered for damping ([`Overlay::links_debounce`]).
const DAMPING_WINDOW: Duration = Duration::from_secs(60);
/// The longest a change of links waits to be published while they churn.
const MAX_LINKS_DEBOUNCE: Duration = Duration::from_secs(30);
/// A chosen neighbour without a session for this long is replaced.
pub const NEIGHBOUR_PATIENCE: Duration = Duration::from_secs(5);
/// A chosen neighbour whose session is unusable (its direct path down) for this long is
/// replaced.
pub const UNUSABLE_PATIENCE: Duration = Duration::from_secs(3);
/// How long a replaced neighbour is not chosen again.
pub const SHUN_FOR: Duration = Duration::from_secs(60);
/// A node lowers its neighbour count (its neighbours' measured availability rose) after a
/// random delay of up to this long; it raises it at once. Nodes that started together
/// measure the same availability: at N = 100 every node went from 5 to 4 neighbours in the
/// same second about 70 s after the start, republished its record, and the burst stalled
/// the hub long enough for its peers to reroute it (issue 11).
pub const K_LOWER_SPREAD: Duration = Duration::from_secs(60);
/// How long a record announced on a lazy link ([`Message::IHave`]) may take to arrive
/// pushed from another neighbour before this node asks the announcer for it (and grafts
/// the link). A push through a busy node takes a few hundred ms: at 150 ms, 100 nodes
/// starting on 2 cores grafted and pruned links in a loop (4,700 grafts in 10 s) and
/// published ten times as many records.
pub const GRAFT_AFTER: Duration = Duration::from_millis(500);
/// A node's first neighbour choice waits until no record new to it arrived for this long
/// (at most [`FIRST_CHOICE_MAX`] after its first session). Chosen while the directory was
/// still filling, neighbours were picked that did not know the chooser yet (refused, then
/// looked up), and the mesh formed while records still flowed through the bootstrap
/// contact, turning links eager and lazy in a loop: 100 nodes starting together on two
/// cores converged in 3.2-4.6 s in 12 of 18 runs and in 5.7-8.7 s in the rest (700-1,070
/// handshakes and 1,100-3,000 grafts until then, against about 230 and 100); with the
/// wait, 3.4-4.3 s in 10 of 10 (issue 11).
pub const FIRST_CHOICE_SETTLE: Duration = Duration::from_millis(500);
/// The longest a first neighbour choice waits after the node's first session.
pub const FIRST_CHOICE_MAX: Duration = Duration::from_secs(4);
/// Records per [`Message::Records`].
pub const RECORDS_PER_MESSAGE: usize = 64;
/// Largest digest or record list taken from one message.
pub const MAX_ENTRIES: usize = 100_000;
/// Most (node ID, sequence number) pairs or node IDs sent in one digest or want message
/// (a frame stays well below [`crate::wire::mgmt::MAX_FRAME`]).
pub const ENTRIES_PER_MESSAGE: usize = 2_000;
/// Directories up to this size are compared with a full digest; larger ones with a
/// [`Message::Summary`] first.
pub const SUMMARY_ABOVE: usize = 32;
/// Longest time records to pass on wait to travel together.
pub const GOSSIP_DELAY: Duration = Duration::from_millis(100);
/// How often expired records are looked for.
pub const EXPIRE_EVERY: Duration = Duration::from_secs(10);
/// Candidates for neighbour choice kept in rank order (the rest of the directory is
/// scanned only when these run out).
pub const RANKED: usize = 64;

/// Tunables (from `[management]`).
#[derive(Debug, Clone, Copy)]
pub struct OverlayConfig {
    /// Fewest neighbours.
    pub min_neighbours: usize,
    /// Most neighbours chosen (configured peers count towards it).
    pub max_neighbours: usize,
    /// Target probability that a message finds a live path.
    pub target_delivery: f64,
    /// Message delivery tunables.
    pub mroute: MrouteConfig,
}

impl Default for OverlayConfig {
    fn default() -> Self {
        OverlayConfig { min_neighbours: 3, max_neighbours: 8, target_delivery: 0.9999, mroute: MrouteConfig::default() }
    }
}

/// What the node publishes about itself (besides its identity, names and neighbours).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OwnInfo {
    /// Its own name (registered at start).
    pub name: String,
    /// Underlay data endpoints.
    pub endpoints: Vec<SocketAddr>,
    /// Overlay IPv4 address.
    pub overlay_v4: Option<Ipv4Addr>,
    /// Overlay IPv6 address.
    pub overlay_v6: Option<Ipv6Addr>,
    /// Prefixes behind the node.
    pub prefixes: Vec<IpNet>,
    /// Relays for others.
    pub relay: bool,
    /// Uptime class.
    pub uptime: Option<Uptime>,
    /// Networks behind the node reached over the underlay (protected by peers).
    pub networks: Vec<IpNet>,
    /// Relay policy (`None`: only `relay` and `uptime` are published).
    pub policy: Option<crate::node::policy::Policy>,
}

/// An instruction to the shell, or a report.
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    /// Send a management message on the session with `to`.
    Send {
        /// A node with a live session.
        to: NodeId,
        /// The message.
        message: Message,
        /// Routed messages go before gossip.
        urgent: bool,
    },
    /// A message for a local program.
    Deliver {
        /// Originating node.
        src: NodeId,
        /// Application channel.
        channel: u16,
        /// Payload.
        payload: Vec<u8>,
    },
    /// A message sent from here was acknowledged end to end.
    Delivered {
        /// Its ID.
        id: u64,
    },
    /// A message sent from here could not be delivered.
    Failed {
        /// Its ID.
        id: u64,
    },
    /// A record of another node is new or changed.
    Learned(Arc<NodeRecord>),
    /// A node's record expired.
    Forgotten(NodeId),
    /// The neighbours this node wants sessions with (sent when the set changes).
    Neighbours(BTreeSet<NodeId>),
    /// A name this node had registered is held by an earlier registration of another node.
    NameLost {
        /// The name.
        name: String,
        /// Its holder.
        holder: NodeId,
    },
}

/// Why a name cannot be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegisterError {
    /// Another node registered it first.
    #[error("the name is held by node {0}")]
    Taken(NodeId),
    /// Not a usable name.
    #[error("names are 1-64 printable characters without spaces")]
    Invalid,
}

/// Counters of the management overlay.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Records accepted (new or newer).
    pub records_accepted: u64,
    /// Records this node published.
    pub records_published: u64,
    /// Digests sent.
    pub digests_sent: u64,
    /// Links made lazy because their pushes brought nothing new ([`Message::Prune`] sent).
    pub prunes_sent: u64,
    /// Links made eager again because a record announced on them did not arrive otherwise.
    pub grafts_sent: u64,
}

#[derive(Debug, Clone, Copy)]
struct Session {
    configured: bool,
    usable: bool,
    /// Since when the session has been unusable (its direct path is down).
    unusable_since: Option<Instant>,
}

/// Underlay diversity group of a record: its first endpoint's IPv4 /24 or IPv6 /48.
fn underlay_group(rec: &NodeRecord) -> u64 {
    let key: Vec<u8> = match rec.endpoints.first().map(|e| e.ip().to_canonical()) {
        Some(IpAddr::V4(v)) => v.octets()[..3].to_vec(),
        Some(IpAddr::V6(v)) => v.octets()[..6].to_vec(),
        None => Vec::new(),
    };
    let d = Sha256::digest(&key);
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// Rendezvous weight of the pair `local`–`id`: every node orders candidates differently,
/// so the neighbour graph is random. The weight is symmetric (both ends compute the same
/// one), so two nodes that rank each other high tend to choose each other and share one
/// session, and every session costs keepalives while the overlay is idle (issue 11): 100
/// real nodes held 692 sessions (counted at both ends) at convergence instead of
/// 1,359–1,531 with weights that differ per end. Every node still has at least its `k`
/// chosen neighbours.
fn rendezvous(local: &NodeId, id: &NodeId) -> u64 {
    let (a, b) = if local <= id { (local, id) } else { (id, local) };
    let d = Sha256::new().chain_update(a.0).chain_update(b.0).finalize();
    u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
}

/// How many neighbours a node needs in an overlay of `nodes` nodes so that a message finds
/// a live path with probability `target`, when each neighbour is up with probability
/// `availability`. Series/parallel reliability (`000 Pr2 §3.2`): a path of `h` hops works
/// when each hop finds a live next hop, `R = r^h`, so each hop needs `r = target^(1/h)`;
/// a hop with `k` independent neighbours fails only if all are down, `r = 1 − (1 − a)^k`
/// ([`mroute::neighbours_needed`]). `h` is the expected path length of a random graph of
/// degree 3, `⌈ln n / ln 3⌉`.
pub fn neighbours_for(availability: f64, target: f64, nodes: usize) -> usize {
    let h = ((nodes.max(2) as f64).ln() / 3f64.ln()).ceil().max(1.0);
    let per_hop = target.clamp(0.5, 0.999_999_999).powf(1.0 / h);
    mroute::neighbours_needed(availability, per_hop)
}

/// A candidate management neighbour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Its node ID.
    pub id: NodeId,
    /// Stable uptime class.
    pub stable: bool,
    /// Underlay diversity group.
    pub group: u64,
}

/// Chooses up to `k - fixed` neighbours among `candidates`: those in `keep` stay (so the
/// graph does not churn), then stable nodes before ephemeral ones, nodes in underlay groups
/// not yet covered before others, nodes this node already has a working session with
/// (`live`: no dial, and known to be alive) before others, and otherwise the rendezvous
/// order of the pairs (`local`, candidate).
pub fn choose_neighbours(local: &NodeId, candidates: &[Candidate], keep: &BTreeSet<NodeId>, fixed_groups: &[u64], fixed: usize, k: usize) -> BTreeSet<NodeId> {
    // Each candidate's rendezvous weight, computed once.
    let ranked: Vec<(bool, u64, Candidate)> = candidates.iter().map(|c| (!c.stable, rendezvous(local, &c.id), *c)).collect();
    choose_ranked(ranked, keep, &BTreeSet::new(), fixed_groups, fixed, k)
}

/// [`choose_neighbours`] for candidates whose rank (ephemeral, rendezvous weight) is known.
fn choose_ranked(mut ranked: Vec<(bool, u64, Candidate)>, keep: &BTreeSet<NodeId>, live: &BTreeSet<NodeId>, fixed_groups: &[u64], fixed: usize, k: usize) -> BTreeSet<NodeId> {
    let need = k.saturating_sub(fixed);
    let mut chosen = BTreeSet::new();
    let mut groups: Vec<u64> = fixed_groups.to_vec();
    ranked.sort_by_key(|(eph, w, c)| (*eph, !live.contains(&c.id), *w, c.id));
    for (_, _, c) in ranked.iter().filter(|(_, _, c)| keep.contains(&c.id)).take(need) {
        chosen.insert(c.id);
        groups.push(c.group);
    }
    while chosen.len() < need {
        // The first in rank order whose group is new; else the first not chosen.
        let fresh = ranked.iter().find(|(_, _, c)| !chosen.contains(&c.id) && !groups.contains(&c.group));
        let stable_fresh = fresh.filter(|(eph, _, _)| !*eph);
        let first = ranked.iter().find(|(_, _, c)| !chosen.contains(&c.id));
        // Stability first: a stable node in a covered group beats an ephemeral one in a new group.
        let pick = match (stable_fresh, first) {
            (Some(f), _) => Some(f),
            (None, Some(x)) if !x.0 => Some(x),
            (None, x) => fresh.or(x),
        };
        match pick {
            Some((_, _, c)) => {
                chosen.insert(c.id);
                groups.push(c.group);
            }
            None => break,
        }
    }
    chosen
}

/// The management overlay state of one node.
pub struct Overlay {
    identity: Identity,
    local: NodeId,
    cfg: OverlayConfig,
    info: OwnInfo,
    names: Vec<Name>,
    seq: u64,
    dir: Directory,
    router: Router,
    sessions: BTreeMap<NodeId, Session>,
    chosen: BTreeMap<NodeId, Instant>,
    /// The neighbours listed in the last published record.
    published: BTreeSet<NodeId>,
    shunned: BTreeMap<NodeId, Instant>,
    announced: BTreeSet<NodeId>,
    /// Records to flood on, per session, sent at the next tick.
    gossip: BTreeMap<NodeId, Vec<SignedRecord>>,
    /// Sessions on which records are announced ([`Message::IHave`]) instead of pushed:
    /// the lazy links of the flood tree (pruned by either end).
    lazy: BTreeSet<NodeId>,
    /// When records were last pushed to each session.
    last_push: BTreeMap<NodeId, Instant>,
    /// Announcements to send, per lazy session, at the next tick.
    announce: BTreeMap<NodeId, Vec<(NodeId, u64)>>,
    /// Records announced to this node and not received yet: node → (sequence number,
    /// announcer, when to ask the announcer for it).
    missing: BTreeMap<NodeId, (u64, NodeId, Instant)>,
    /// Other nodes' claims on the names this node holds: name → node → registration time.
    /// Kept as records arrive, so checking this node's names costs nothing per record.
    rivals: BTreeMap<String, BTreeMap<NodeId, u64>>,
    /// The best-ranked candidates for neighbour choice: (ephemeral, rendezvous weight,
    /// node ID) → underlay group; at most [`RANKED`].
    ranked: BTreeMap<(bool, u64, NodeId), u64>,
    /// The key of each node in `ranked`.
    ranked_keys: BTreeMap<NodeId, (bool, u64, NodeId)>,
    /// Whether `ranked` holds every candidate (false once one was left out).
    ranked_all: bool,
    availability: f64,
    /// The neighbour count kept (see [`Overlay::target_neighbours`]).
    k: usize,
    /// When a lower neighbour count takes effect.
    k_lower_at: Option<Instant>,
    dirty: bool,
    /// Only the sessions changed since the last publication.
    dirty_sessions: bool,
    /// A published link is gone since the last publication.
    lost_link: bool,
    /// When this node published a change of its links, over the last [`DAMPING_WINDOW`].
    link_publications: VecDeque<Instant>,
    last_publish: Option<Instant>,
    last_publish_unix: u64,
    last_expire: Instant,
    last_tick: Instant,
    last_anti_entropy: Instant,
    last_sample: Instant,
    /// Neighbour choice runs at the next tick, not at the next second: a chosen neighbour
    /// was lost, could not be reached, or lost its links.
    choose_soon: bool,
    /// When a record new to this node last arrived, and when its first session came up:
    /// the first neighbour choice waits for the directory to settle ([`FIRST_CHOICE_SETTLE`]).
    last_fresh: Option<Instant>,
    first_session: Option<Instant>,
    /// A deferred first choice runs then.
    choose_after: Option<Instant>,
    rng: crate::rng::Rng,
    stats: Stats,
    out: VecDeque<Out>,
}

impl Overlay {
    /// A node that starts at `now` (unix seconds `unix`) and publishes its first record at
    /// the first tick.
    pub fn new(identity: Identity, cfg: OverlayConfig, info: OwnInfo, now: Instant, unix: u64, seed: u64) -> Overlay {
        let local = identity.node_id();
        let names = vec![Name { name: info.name.clone(), since: unix }];
        let own_name = info.name.clone();
        Overlay {
            router: Router::new(local, cfg.mroute, seed),
            identity,
            local,
            cfg,
            info,
            names,
            seq: 0,
            dir: Directory::with_seed(seed),
            sessions: BTreeMap::new(),
            chosen: BTreeMap::new(),
            published: BTreeSet::new(),
            shunned: BTreeMap::new(),
            announced: BTreeSet::new(),
            gossip: BTreeMap::new(),
            lazy: BTreeSet::new(),
            last_push: BTreeMap::new(),
            announce: BTreeMap::new(),
            missing: BTreeMap::new(),
            rivals: BTreeMap::from([(own_name, BTreeMap::new())]),
            ranked: BTreeMap::new(),
            ranked_keys: BTreeMap::new(),
            ranked_all: true,
            availability: 0.9,
            k: 0,
            k_lower_at: None,
            dirty: true,
            dirty_sessions: false,
            lost_link: false,
            link_publications: VecDeque::new(),
            last_publish: None,
            last_publish_unix: 0,
            last_expire: now,
            last_tick: now,
            last_anti_entropy: now,
            last_sample: now,
            choose_soon: false,
            last_fresh: None,
            first_session: None,
            choose_after: None,
            rng: crate::rng::Rng::new(seed),
            stats: Stats::default(),
            out: VecDeque::new(),
        }
    }

    fn random(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// This node's ID.
    pub fn local(&self) -> NodeId {
        self.local
    }

    /// The directory.
    pub fn directory(&self) -> &Directory {
        &self.dir
    }

    /// Checks record signatures with `v` (a simulation shares one that remembers what it
    /// checked; see [`directory::RecordVerifier`]).
    pub fn set_verifier(&mut self, v: Arc<dyn directory::RecordVerifier>) {
        self.dir.set_verifier(v);
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Delivery drops on the way through this node, by reason.
    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Measured availability of neighbours (0..1).
    pub fn availability(&self) -> f64 {
        self.availability
    }

    /// The neighbour count this node keeps: what the reliability rule asks for now, or
    /// more while a lower count waits for its turn (see [`K_LOWER_SPREAD`]).
    pub fn target_neighbours(&self) -> usize {
        self.k.max(self.rule_neighbours())
    }

    /// The neighbour count the reliability rule asks for now.
    fn rule_neighbours(&self) -> usize {
        neighbours_for(self.availability, self.cfg.target_delivery, self.dir.len().max(2)).clamp(self.cfg.min_neighbours, self.cfg.max_neighbours)
    }

    /// Follows the reliability rule: a higher count at once, a lower one after a random
    /// delay of up to [`K_LOWER_SPREAD`].
    fn update_k(&mut self, now: Instant) {
        let rule = self.rule_neighbours();
        if rule >= self.k {
            self.k = rule;
            self.k_lower_at = None;
            return;
        }
        match self.k_lower_at {
            None => {
                let spread = K_LOWER_SPREAD.as_millis() as u64;
                self.k_lower_at = Some(now + Duration::from_millis(self.random() % spread.max(1)));
            }
            Some(t) if now >= t => {
                self.k = rule;
                self.k_lower_at = None;
            }
            Some(_) => {}
        }
    }

    /// The neighbours chosen by this node (configured peers aside).
    pub fn chosen(&self) -> impl Iterator<Item = &NodeId> {
        self.chosen.keys()
    }

    /// Live sessions as (node, configured, usable).
    pub fn sessions(&self) -> impl Iterator<Item = (&NodeId, bool, bool)> {
        self.sessions.iter().map(|(id, s)| (id, s.configured, s.usable))
    }

    /// Next output.
    pub fn poll(&mut self) -> Option<Out> {
        self.out.pop_front()
    }

    /// The names this node holds.
    pub fn names(&self) -> &[Name] {
        &self.names
    }

    /// New information to publish (endpoints, addresses…).
    pub fn set_info(&mut self, info: OwnInfo) {
        if info != self.info {
            if info.name != self.info.name {
                self.names.retain(|n| n.name != self.info.name);
                self.rivals.remove(&self.info.name);
                self.names.insert(0, Name { name: info.name.clone(), since: self.last_publish_unix.max(1) });
                self.find_rivals(&info.name);
            }
            self.info = info;
            self.dirty = true;
        }
    }

    /// A management session with `id` is up.
    pub fn session_up(&mut self, now: Instant, id: NodeId, configured: bool) {
        if id == self.local {
            return;
        }
        self.first_session.get_or_insert(now);
        // A new link starts eager (it is pruned when its pushes bring nothing new).
        self.lazy.remove(&id);
        self.sessions.insert(id, Session { configured, usable: true, unusable_since: None });
        self.neighbours_changed();
        self.send_digest(now, id);
    }

    /// The session with `id` closed.
    pub fn session_down(&mut self, id: NodeId) {
        self.gossip.remove(&id);
        self.announce.remove(&id);
        self.lazy.remove(&id);
        self.last_push.remove(&id);
        if self.sessions.remove(&id).is_some() {
            self.choose_soon |= self.chosen.contains_key(&id);
            self.neighbours_changed();
        }
    }

    /// A dial to `id` failed (no endpoint answered, or the handshake did not complete). A
    /// chosen neighbour that has no session is replaced at the next tick and not chosen
    /// again for [`SHUN_FOR`], instead of after [`NEIGHBOUR_PATIENCE`]: a node that failed
    /// keeps its record (and its links, while its own neighbours have not noticed yet), and
    /// a replacement chosen among the failed nodes must not cost the whole patience again
    /// (issue 11: recovery after 10 % of 100 nodes failed).
    pub fn unreachable(&mut self, now: Instant, id: NodeId) {
        if self.chosen.contains_key(&id) && !self.sessions.contains_key(&id) {
            self.chosen.remove(&id);
            self.shunned.insert(id, now + SHUN_FOR);
            self.choose_soon = true;
        }
    }

    /// Node `id`, which this node does not know, dialled it and was refused (a node that
    /// just started is known to its bootstrap contact before its record has spread): its
    /// record is asked for at once from a session (a configured peer's first), so that the
    /// dialler's next attempt, a moment later, succeeds. Without it a node that chose a
    /// neighbour a moment too early was refused, and replaced it by another that did not
    /// know it either (issue 11: 400-1,500 refused handshakes while 100 nodes started).
    pub fn seek(&mut self, now: Instant, id: NodeId) {
        if id == self.local || self.dir.get(&id).is_some() || self.missing.contains_key(&id) || self.missing.len() >= MAX_ENTRIES {
            return;
        }
        let ask = self.sessions.iter().find(|(_, s)| s.configured).or_else(|| self.sessions.iter().next()).map(|(to, _)| *to);
        if let Some(to) = ask {
            self.missing.insert(id, (0, to, now));
        }
    }

    /// Whether the session with `id` carries messages (the failover engine may know its
    /// path is down before the session times out).
    ///
    /// A chosen neighbour whose session stays unusable for [`UNUSABLE_PATIENCE`] is
    /// replaced. The session stays a published link until it closes: a path that flaps
    /// (an overloaded peer) must not flood a new record through the overlay at each flap.
    pub fn set_usable(&mut self, now: Instant, id: NodeId, usable: bool) {
        if let Some(s) = self.sessions.get_mut(&id) {
            if s.usable != usable {
                s.usable = usable;
                s.unusable_since = (!usable).then_some(now);
                self.push_router_neighbours();
            }
        }
    }

    fn neighbours_changed(&mut self) {
        self.push_router_neighbours();
        self.check_published();
    }

    /// The links this node publishes: sessions with configured peers, with the neighbours
    /// it chose, and with nodes whose record lists it (they chose it). Sessions opened for
    /// a relay or for traffic to a node learned from the directory are not links: they come
    /// and go with traffic and failover, and publishing them would flood a new record
    /// through the whole overlay at every change (issue 11: each node's record changed
    /// every few seconds at N = 30, 70 KB/s per idle node).
    fn published_neighbours(&self) -> BTreeSet<NodeId> {
        self.sessions.iter().filter(|(id, s)| s.configured || self.chosen.contains_key(*id) || self.dir.get(id).is_some_and(|e| e.record.neighbours.contains(&self.local))).map(|(id, _)| *id).collect()
    }

    /// How long a change of links waits after the last publication: the
    /// [`neighbour_debounce`] of the directory's size, doubled for each link change
    /// published in the last minute beyond the first two, at most 30 s. Sessions that churn
    /// (an overloaded node whose sessions time out and come back) would otherwise flood a
    /// new record through the whole overlay at each step, and the flood feeds the overload;
    /// BGP damps its updates the same way (MRAI, RFC 4271 §9.2.1.1; RFC 2439).
    fn links_debounce(&self) -> Duration {
        let extra = self.recent_link_publications().saturating_sub(2).min(8) as u32;
        (neighbour_debounce(self.dir.len()) * (1u32 << extra)).min(MAX_LINKS_DEBOUNCE)
    }

    /// Republishes (after the neighbour debounce) when the published links changed.
    fn check_published(&mut self) {
        let now = self.published_neighbours();
        if now != self.published {
            self.dirty_sessions = true;
            self.lost_link = !self.published.is_subset(&now);
        } else {
            self.lost_link = false;
        }
    }

    /// Link changes published in the [`DAMPING_WINDOW`] before the last tick.
    fn recent_link_publications(&self) -> usize {
        self.link_publications.iter().filter(|t| self.last_tick.saturating_duration_since(**t) <= DAMPING_WINDOW).count()
    }

    /// How long the next publication of changed links waits after the last one. A link
    /// that went away is published within [`PUBLISH_DEBOUNCE`] while the links are not
    /// churning (at most two link changes in the damping window): other nodes must stop
    /// choosing a node that failed, and they see it fail when its links disappear from
    /// its neighbours' records (issue 11: after 10 % of 100 nodes were killed, nodes kept
    /// choosing dead ones for seconds, each costing a neighbour patience). New links wait
    /// the [`Overlay::links_debounce`].
    fn links_wait(&self) -> Duration {
        if self.lost_link && self.recent_link_publications() < 3 {
            PUBLISH_DEBOUNCE
        } else {
            self.links_debounce()
        }
    }

    fn push_router_neighbours(&mut self) {
        self.router.set_neighbours(self.sessions.iter().filter(|(_, s)| s.usable).map(|(id, _)| *id));
    }

    /// Starts anti-entropy with `to`: the whole digest of a small directory, else a
    /// summary of bucket hashes.
    fn send_digest(&mut self, _now: Instant, to: NodeId) {
        self.stats.digests_sent += 1;
        let message = if self.dir.len() <= SUMMARY_ABOVE {
            Message::Digest { entries: self.dir.digest(), buckets: None }
        } else {
            Message::Summary { hashes: self.dir.bucket_hashes().iter().map(|h| format!("{h:016x}")).collect() }
        };
        self.out.push_back(Out::Send { to, message, urgent: false });
    }

    /// Digests of the given buckets, several buckets per message up to
    /// [`ENTRIES_PER_MESSAGE`] entries.
    fn send_bucket_digests(&mut self, to: NodeId, buckets: &[u8]) {
        let mut by_bucket: Vec<Vec<(NodeId, u64)>> = vec![Vec::new(); BUCKETS];
        for (id, seq) in self.dir.digest_of(Some(buckets)) {
            by_bucket[directory::bucket_of(&id)].push((id, seq));
        }
        let mut group: Vec<u8> = Vec::new();
        let mut entries: Vec<(NodeId, u64)> = Vec::new();
        for &b in buckets {
            let more = std::mem::take(&mut by_bucket[usize::from(b) % BUCKETS]);
            if !group.is_empty() && entries.len() + more.len() > ENTRIES_PER_MESSAGE {
                self.out.push_back(Out::Send { to, message: Message::Digest { entries: std::mem::take(&mut entries), buckets: Some(std::mem::take(&mut group)) }, urgent: false });
            }
            group.push(b);
            entries.extend(more);
        }
        if !group.is_empty() {
            self.out.push_back(Out::Send { to, message: Message::Digest { entries, buckets: Some(group) }, urgent: false });
        }
    }

    /// Sends records to `to`, pushed by the flood or on request.
    fn send_records(&mut self, to: NodeId, records: Vec<SignedRecord>, push: bool) {
        for chunk in records.chunks(RECORDS_PER_MESSAGE) {
            self.out.push_back(Out::Send { to, message: Message::Records { records: chunk.to_vec(), push }, urgent: false });
        }
    }

    /// Floods fresh records on: pushed on the eager links, announced on the lazy ones.
    /// A push goes at once when the session had none in the last [`GOSSIP_DELAY`] (a
    /// change crosses the tree at the underlay's speed); otherwise it is gathered until the
    /// next tick (or a full message), so a burst of records travels in a few messages.
    /// Announcements are always gathered until the next tick. Neither goes back to `from`
    /// or to a record's own node.
    fn flood(&mut self, now: Instant, from: Option<NodeId>, fresh: &[SignedRecord]) {
        let peeked: Vec<(NodeId, u64)> = fresh.iter().map(|r| r.peek().unwrap_or_default()).collect();
        let others: Vec<NodeId> = self.sessions.keys().copied().filter(|s| Some(*s) != from).collect();
        for to in others {
            if self.lazy.contains(&to) {
                let q = self.announce.entry(to).or_default();
                q.extend(peeked.iter().filter(|(id, _)| *id != to).copied());
                if q.is_empty() {
                    self.announce.remove(&to);
                }
            } else {
                let quiet = !self.gossip.contains_key(&to) && self.last_push.get(&to).is_none_or(|t| now.saturating_duration_since(*t) >= GOSSIP_DELAY);
                let q = self.gossip.entry(to).or_default();
                q.extend(fresh.iter().zip(&peeked).filter(|(_, (id, _))| *id != to).map(|(r, _)| r.clone()));
                if q.is_empty() {
                    self.gossip.remove(&to);
                } else if quiet || q.len() >= RECORDS_PER_MESSAGE {
                    let batch = std::mem::take(q);
                    self.gossip.remove(&to);
                    self.last_push.insert(to, now);
                    self.send_records(to, batch, true);
                }
            }
        }
    }

    /// Sends `payload` to node `dst` on `channel`; returns the message ID, whose fate is
    /// reported as [`Out::Delivered`] or [`Out::Failed`].
    pub fn send(&mut self, now: Instant, dst: NodeId, channel: u16, payload: &[u8], critical: bool) -> u64 {
        let id = self.router.send(now, &self.dir, dst, channel, payload, critical);
        self.pump_router();
        id
    }

    /// P2PNS register: adds `name` to this node's record, unless another node registered it
    /// first.
    ///
    /// # Errors
    /// [`RegisterError`].
    pub fn register(&mut self, unix: u64, name: &str) -> Result<(), RegisterError> {
        if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_graphic()) {
            return Err(RegisterError::Invalid);
        }
        if self.names.iter().any(|n| n.name == name) {
            return Ok(());
        }
        // A name another node holds is refused (the earliest-registration rule only settles
        // claims that raced, e.g. in a partition).
        self.find_rivals(name);
        if let Some(holder) = self.rival(name) {
            self.rivals.remove(name);
            return Err(RegisterError::Taken(holder));
        }
        self.names.push(Name { name: name.to_string(), since: unix });
        self.dirty = true;
        Ok(())
    }

    /// Collects the other nodes' claims on `name` from the whole directory (once, when this
    /// node takes a name; O(n)).
    fn find_rivals(&mut self, name: &str) {
        let claims: BTreeMap<NodeId, u64> =
            self.dir.entries().filter(|e| e.record.node_id != self.local).filter_map(|e| e.record.names.iter().find(|n| n.name == name).map(|n| (e.record.node_id, n.since))).collect();
        self.rivals.insert(name.to_string(), claims);
    }

    /// Notes the name claims of a record that arrived (`old`: the record it replaces).
    fn note_claims(&mut self, rec: &NodeRecord, old: Option<&NodeRecord>) {
        for n in old.into_iter().flat_map(|o| o.names.iter()) {
            if let Some(c) = self.rivals.get_mut(&n.name) {
                c.remove(&old.map(|o| o.node_id).unwrap_or_default());
            }
        }
        for n in &rec.names {
            if let Some(c) = self.rivals.get_mut(&n.name) {
                c.insert(rec.node_id, n.since);
            }
        }
    }

    /// The earliest other claim on `name` (registration time, then node ID).
    fn rival(&self, name: &str) -> Option<NodeId> {
        self.rivals.get(name)?.iter().min_by_key(|(id, since)| (**since, **id)).map(|(id, _)| *id)
    }

    /// Whether this node still holds `name`, registered at `since`: no other node claimed it
    /// earlier.
    fn holds(&self, name: &str, since: u64) -> bool {
        self.rivals.get(name).is_none_or(|c| c.iter().all(|(id, s)| directory::claim_wins((since, self.local), (*s, *id))))
    }

    /// P2PNS resolve: the record of the node holding `name` (this node's own included).
    pub fn resolve(&self, name: &str) -> Option<&NodeRecord> {
        self.dir.resolve(name)
    }

    /// A management message from the session with `from`.
    pub fn handle(&mut self, now: Instant, unix: u64, from: NodeId, message: Message) {
        match message {
            Message::Records { records, push } => {
                let mut offered = 0;
                let mut fresh = Vec::new();
                for r in records.into_iter().take(MAX_ENTRIES) {
                    offered += 1;
                    if let Some(r) = self.take_record(unix, r) {
                        fresh.push(r);
                    }
                }
                for r in &fresh {
                    if let Some((id, seq)) = r.peek() {
                        if self.missing.get(&id).is_some_and(|m| m.0 <= seq) {
                            self.missing.remove(&id);
                        }
                    }
                }
                // A push that brought a record this node had: this link closes a cycle of
                // the flood tree (Plumtree's prune), it becomes lazy both ways. Records
                // still reach this node by the tree's links, and by announcements on
                // this one.
                if push && fresh.len() < offered && self.sessions.contains_key(&from) && self.lazy.insert(from) {
                    self.stats.prunes_sent += 1;
                    self.out.push_back(Out::Send { to: from, message: Message::Prune, urgent: false });
                }
                if !fresh.is_empty() {
                    self.last_fresh = Some(now);
                    self.flood(now, Some(from), &fresh);
                }
            }
            Message::Prune if self.sessions.contains_key(&from) && self.lazy.insert(from) => {
                // What was queued for it is announced instead.
                if let Some(q) = self.gossip.remove(&from) {
                    self.announce.entry(from).or_default().extend(q.iter().filter_map(|r| r.peek()));
                }
            }
            Message::IHave { mut entries } => {
                entries.truncate(MAX_ENTRIES);
                for (id, seq) in entries {
                    if id == self.local || self.dir.known_seq(&id).is_some_and(|k| k >= seq) || (self.missing.len() >= MAX_ENTRIES && !self.missing.contains_key(&id)) {
                        continue;
                    }
                    let ask_at = now + GRAFT_AFTER;
                    let m = self.missing.entry(id).or_insert((seq, from, ask_at));
                    if seq > m.0 {
                        m.0 = seq;
                        m.1 = from;
                    }
                }
            }
            Message::Digest { mut entries, buckets } => {
                entries.truncate(MAX_ENTRIES);
                let (give, want) = self.dir.diff_in(&entries, buckets.as_deref());
                self.send_records(from, give, false);
                for chunk in want.chunks(ENTRIES_PER_MESSAGE) {
                    self.out.push_back(Out::Send { to: from, message: Message::Want { nodes: chunk.to_vec() }, urgent: false });
                }
            }
            Message::Summary { hashes } => {
                let ours = self.dir.bucket_hashes();
                let theirs: Vec<u64> = (0..BUCKETS).map(|i| hashes.get(i * 16..i * 16 + 16).and_then(|h| u64::from_str_radix(h, 16).ok()).unwrap_or(0)).collect();
                let differ: Vec<u8> = (0..BUCKETS).filter(|&i| ours[i] != theirs[i]).map(|i| i as u8).collect();
                if !differ.is_empty() {
                    self.send_bucket_digests(from, &differ);
                }
            }
            Message::Want { mut nodes } => {
                // The asker missed records: push to it again (Plumtree's graft).
                self.lazy.remove(&from);
                nodes.truncate(MAX_ENTRIES);
                let records: Vec<SignedRecord> = nodes.iter().filter_map(|id| self.dir.get(id).map(|e| e.signed.clone())).collect();
                self.send_records(from, records, false);
            }
            Message::Routed { envelope } => {
                self.router.handle(now, &self.dir, from, envelope);
                self.pump_router();
            }
            _ => {}
        }
    }

    /// Offers one received record; returns it when it is new to the directory (to flood).
    fn take_record(&mut self, unix: u64, signed: SignedRecord) -> Option<SignedRecord> {
        // Our own record from an earlier run: continue above it, keep the names' ages.
        if signed.peek().is_some_and(|(id, seq)| id == self.local && seq > self.seq) {
            if let Ok(rec) = signed.verify() {
                if rec.seq > self.seq {
                    self.seq = rec.seq;
                    for old in &rec.names {
                        if let Some(n) = self.names.iter_mut().find(|n| n.name == old.name) {
                            n.since = old.since;
                        }
                    }
                    self.dirty = true;
                    self.last_publish = None;
                }
            }
        }
        if signed.peek().is_some_and(|(id, _)| id == self.local) {
            return None;
        }
        let old = signed.peek().and_then(|(id, _)| self.dir.get(&id)).map(|e| e.record.clone());
        match self.dir.insert(signed.clone(), unix) {
            Ok(a) => {
                self.stats.records_accepted += 1;
                let rec = self.dir.get(&signed.peek()?.0)?.record.clone();
                self.rank(&rec);
                self.note_claims(&rec, old.as_deref());
                // A chosen neighbour without a session lost links: it may have failed (its
                // neighbours publish that as they notice); choose again now.
                if let Some(o) = &old {
                    self.choose_soon |= o.neighbours.iter().any(|n| !rec.neighbours.contains(n) && self.chosen.contains_key(n) && !self.sessions.contains_key(n));
                }
                // A node this node has a session with listed it, or stopped listing it.
                if self.sessions.contains_key(&rec.node_id) && old.as_ref().is_none_or(|o| o.neighbours.contains(&self.local) != rec.neighbours.contains(&self.local)) {
                    self.check_published();
                }
                if a == Accepted::New || a == Accepted::Updated {
                    self.out.push_back(Out::Learned(rec));
                }
                Some(signed)
            }
            Err(_) => None,
        }
    }

    /// Rejections so far, by reason.
    pub fn rejected(&self) -> Vec<(&'static str, u64)> {
        self.dir.rejected().into_iter().collect()
    }

    fn pump_router(&mut self) {
        while let Some(o) = self.router.poll() {
            let o = match o {
                mroute::Out::Forward { to, env } => Out::Send { to, message: Message::Routed { envelope: env }, urgent: true },
                mroute::Out::Deliver { src, channel, payload } => Out::Deliver { src, channel, payload },
                mroute::Out::Delivered { id } => Out::Delivered { id },
                mroute::Out::Failed { id } => Out::Failed { id },
            };
            self.out.push_back(o);
        }
    }

    /// When [`Overlay::tick`] has something to do: records to pass on (within 100 ms), a
    /// message's retransmission, a publication that waits for its debounce or its refresh,
    /// anti-entropy (every 5 s), neighbour choice (every second, at the next tick after a
    /// chosen neighbour was lost, and when a first choice deferred by
    /// [`FIRST_CHOICE_SETTLE`] is due) and expiry (every 10 s).
    /// An idle node is woken about once a second.
    pub fn poll_timeout(&self) -> Instant {
        let mut next = if self.choose_soon { self.last_tick } else { self.last_sample + Duration::from_secs(1) };
        let mut at = |t: Instant| next = next.min(t);
        if let Some(t) = self.choose_after {
            at(t);
        }
        if !self.gossip.is_empty() || !self.announce.is_empty() {
            at(self.last_tick + GOSSIP_DELAY);
        }
        if let Some(t) = self.missing.values().map(|m| m.2).min() {
            at(t);
        }
        if let Some(t) = self.router.next_deadline() {
            at(t);
        }
        match self.last_publish {
            None => at(self.last_tick),
            Some(p) => {
                if self.dirty {
                    at(p + PUBLISH_DEBOUNCE);
                }
                if self.dirty_sessions {
                    at(p + self.links_wait());
                }
                at(p + Duration::from_secs(directory::refresh_s(self.dir.len())));
            }
        }
        at(self.last_anti_entropy + ANTI_ENTROPY);
        at(self.last_expire + EXPIRE_EVERY);
        next
    }

    /// Advances time: retries, expiry, publication, anti-entropy and neighbour choice. Call
    /// it at [`Overlay::poll_timeout`] (or more often, e.g. every 100 ms).
    pub fn tick(&mut self, now: Instant, unix: u64) {
        self.last_tick = now;
        self.router.handle_tick(now, &self.dir);
        self.pump_router();
        for (to, batch) in std::mem::take(&mut self.gossip) {
            if self.sessions.contains_key(&to) && !batch.is_empty() {
                self.last_push.insert(to, now);
                self.send_records(to, batch, true);
            }
        }
        for (to, entries) in std::mem::take(&mut self.announce) {
            if self.sessions.contains_key(&to) {
                for chunk in entries.chunks(ENTRIES_PER_MESSAGE) {
                    self.out.push_back(Out::Send { to, message: Message::IHave { entries: chunk.to_vec() }, urgent: false });
                }
            }
        }
        self.ask_missing(now);
        if now >= self.last_expire + EXPIRE_EVERY {
            self.last_expire = now;
            for id in self.dir.expire(unix) {
                self.unrank(&id);
                for c in self.rivals.values_mut() {
                    c.remove(&id);
                }
                self.out.push_back(Out::Forgotten(id));
            }
        }
        self.check_names(unix);
        let due_refresh = unix >= self.last_publish_unix + directory::refresh_s(self.dir.len());
        let debounced = self.last_publish.is_none_or(|t| now >= t + PUBLISH_DEBOUNCE);
        let sessions_debounced = self.last_publish.is_none_or(|t| now >= t + self.links_wait());
        if (self.dirty && debounced) || (self.dirty_sessions && sessions_debounced) || due_refresh {
            if self.dirty_sessions {
                self.link_publications.push_back(now);
            }
            while self.link_publications.front().is_some_and(|t| now.saturating_duration_since(*t) > DAMPING_WINDOW) {
                self.link_publications.pop_front();
            }
            self.publish(now, unix);
        }
        if now >= self.last_anti_entropy + ANTI_ENTROPY {
            self.last_anti_entropy = now;
            let ids: Vec<NodeId> = self.sessions.keys().copied().collect();
            if !ids.is_empty() {
                let pick = ids[(self.random() % ids.len() as u64) as usize];
                self.send_digest(now, pick);
            }
        }
        if now >= self.last_sample + Duration::from_secs(1) {
            self.last_sample = now;
            self.sample_availability(now);
            self.update_k(now);
            self.choose(now);
        } else if self.choose_soon || self.choose_after.is_some_and(|t| now >= t) {
            self.choose(now);
        }
    }

    fn check_names(&mut self, _unix: u64) {
        let lost: Vec<(String, NodeId)> = self.names.iter().skip(1).filter(|n| !self.holds(&n.name, n.since)).map(|n| (n.name.clone(), self.rival(&n.name).unwrap_or_default())).collect();
        for (name, holder) in lost {
            self.names.retain(|n| n.name != name);
            self.rivals.remove(&name);
            self.dirty = true;
            self.out.push_back(Out::NameLost { name, holder });
        }
    }

    /// Asks announcers for the records they announced that no other neighbour pushed in
    /// time, and makes those links eager again.
    fn ask_missing(&mut self, now: Instant) {
        if self.missing.values().all(|m| m.2 > now) {
            return;
        }
        let mut ask: BTreeMap<NodeId, Vec<NodeId>> = BTreeMap::new();
        self.missing.retain(|id, m| {
            if m.2 > now {
                return true;
            }
            ask.entry(m.1).or_default().push(*id);
            false
        });
        for (to, nodes) in ask {
            // An announcer that went away: anti-entropy with another neighbour fills the gap.
            if !self.sessions.contains_key(&to) {
                continue;
            }
            self.lazy.remove(&to);
            self.stats.grafts_sent += 1;
            for chunk in nodes.chunks(ENTRIES_PER_MESSAGE) {
                self.out.push_back(Out::Send { to, message: Message::Want { nodes: chunk.to_vec() }, urgent: false });
            }
        }
    }

    /// Signs and floods this node's record.
    fn publish(&mut self, now: Instant, unix: u64) {
        self.seq = (unix * 1000).max(self.seq + 1);
        // The node's own name is published only while nobody registered it earlier.
        let names: Vec<Name> = self.names.iter().filter(|n| self.holds(&n.name, n.since)).cloned().collect();
        let rec = NodeRecord {
            node_id: self.local,
            public_key: self.identity.public_key().to_string(),
            names,
            endpoints: self.info.endpoints.clone(),
            overlay_v4: self.info.overlay_v4,
            overlay_v6: self.info.overlay_v6,
            prefixes: self.info.prefixes.clone(),
            relay: self.info.relay,
            uptime: self.info.uptime.unwrap_or(Uptime::Stable),
            networks: self.info.networks.clone(),
            policy: self.info.policy.clone(),
            neighbours: self.published_neighbours().into_iter().collect(),
            seq: self.seq,
            expires: unix + directory::record_ttl_s(self.dir.len()),
        };
        self.published = rec.neighbours.iter().copied().collect();
        let signed = SignedRecord::sign(&rec, &self.identity);
        let _ = self.dir.insert(signed.clone(), unix);
        self.stats.records_published += 1;
        self.dirty = false;
        self.dirty_sessions = false;
        self.lost_link = false;
        self.last_publish = Some(now);
        self.last_publish_unix = unix;
        // Pushed on the eager links and announced on the lazy ones, as records of other
        // nodes are: pushing it on every link would send duplicates on along the tree.
        self.flood(now, None, &[signed]);
    }

    fn sample_availability(&mut self, now: Instant) {
        // Neighbours chosen long enough ago to have had their chance to connect.
        let settled: Vec<bool> = self.chosen.iter().filter(|(_, since)| now.saturating_duration_since(**since) > NEIGHBOUR_PATIENCE).map(|(id, _)| self.sessions.contains_key(id)).collect();
        for up in settled {
            self.availability += (if up { 1.0 } else { 0.0 } - self.availability) / 600.0;
        }
        self.availability = self.availability.clamp(0.5, 0.999);
    }

    /// Whether `rec`'s node can be a neighbour: it publishes endpoints, and it has a
    /// mutual link with some node (its neighbours still list it; a node that failed loses
    /// them as they publish).
    fn choosable(&self, rec: &NodeRecord) -> bool {
        rec.node_id != self.local && !rec.endpoints.is_empty() && !self.shunned.contains_key(&rec.node_id) && self.dir.links_of(&rec.node_id).next().is_some()
    }

    /// A record as a ranked candidate.
    fn candidate(&self, rec: &NodeRecord) -> (bool, u64, Candidate) {
        let stable = rec.uptime == Uptime::Stable;
        (!stable, rendezvous(&self.local, &rec.node_id), Candidate { id: rec.node_id, stable, group: underlay_group(rec) })
    }

    /// Puts a node's record into the ranked candidates (O(log RANKED)).
    fn rank(&mut self, rec: &NodeRecord) {
        if rec.node_id == self.local {
            return;
        }
        self.unrank(&rec.node_id);
        if rec.endpoints.is_empty() {
            return;
        }
        let key = (rec.uptime != Uptime::Stable, rendezvous(&self.local, &rec.node_id), rec.node_id);
        if self.ranked.len() >= RANKED && self.ranked.last_key_value().is_some_and(|(last, _)| key > *last) {
            self.ranked_all = false;
            return;
        }
        self.ranked.insert(key, underlay_group(rec));
        self.ranked_keys.insert(rec.node_id, key);
        if self.ranked.len() > RANKED {
            if let Some((last, _)) = self.ranked.pop_last() {
                self.ranked_keys.remove(&last.2);
            }
            self.ranked_all = false;
        }
    }

    /// Takes a node out of the ranked candidates (O(RANKED)); refills them from the
    /// directory when they ran low.
    fn unrank(&mut self, id: &NodeId) {
        let Some(key) = self.ranked_keys.remove(id) else { return };
        self.ranked.remove(&key);
        if !self.ranked_all && self.ranked.len() < RANKED / 2 {
            self.rerank();
        }
    }

    /// Ranks the whole directory again (only when the ranked candidates ran low: O(n)).
    fn rerank(&mut self) {
        let mut all: Vec<((bool, u64, NodeId), u64)> = self
            .dir
            .entries()
            .map(|e| &e.record)
            .filter(|r| r.node_id != self.local && !r.endpoints.is_empty())
            .map(|r| ((r.uptime != Uptime::Stable, rendezvous(&self.local, &r.node_id), r.node_id), underlay_group(r)))
            .collect();
        all.sort();
        self.ranked_all = all.len() <= RANKED;
        self.ranked = all.into_iter().take(RANKED).collect();
        self.ranked_keys = self.ranked.keys().map(|k| (k.2, *k)).collect();
    }

    fn choose(&mut self, now: Instant) {
        // The first choice waits while the directory is still filling (records arrived in
        // the last FIRST_CHOICE_SETTLE), for at most FIRST_CHOICE_MAX after the first
        // session: chosen from a partial directory, neighbours did not know the chooser yet
        // and refused it, and the mesh formed while the records still flowed.
        if self.chosen.is_empty() && self.first_session.is_some_and(|t| now < t + FIRST_CHOICE_MAX) && self.last_fresh.is_some_and(|t| now < t + FIRST_CHOICE_SETTLE) {
            self.choose_soon = false;
            self.choose_after = self.last_fresh.map(|t| t + FIRST_CHOICE_SETTLE);
            return;
        }
        self.choose_soon = false;
        self.choose_after = None;
        self.shunned.retain(|_, until| now < *until);
        // Neighbours that never connected (or lost their session) are replaced.
        // So are those whose session stays unusable (its path is down: the node failed, or
        // the path did) before the session itself times out.
        let working = |o: &Overlay, id: &NodeId| o.sessions.get(id).is_some_and(|s| s.unusable_since.is_none_or(|t| now.saturating_duration_since(t) <= UNUSABLE_PATIENCE));
        let stale: Vec<NodeId> = self.chosen.iter().filter(|(id, since)| !working(self, id) && now.saturating_duration_since(**since) > NEIGHBOUR_PATIENCE).map(|(id, _)| *id).collect();
        for id in stale {
            self.chosen.remove(&id);
            self.shunned.insert(id, now + SHUN_FOR);
        }
        let configured: Vec<NodeId> = self.sessions.iter().filter(|(_, s)| s.configured).map(|(id, _)| *id).collect();
        let usable = |o: &Overlay, id: &NodeId| !configured.contains(id) && (!o.sessions.contains_key(id) || working(o, id)) && o.dir.get(id).is_some_and(|e| o.choosable(&e.record));
        let mut candidates: Vec<(bool, u64, Candidate)> = self.ranked.iter().filter(|(k, _)| usable(self, &k.2)).map(|(k, g)| (k.0, k.1, Candidate { id: k.2, stable: !k.0, group: *g })).collect();
        let k = self.target_neighbours();
        let need = k.saturating_sub(configured.len());
        // Kept neighbours that fell out of the ranked set still count.
        for id in self.chosen.keys() {
            if !candidates.iter().any(|c| c.2.id == *id) && usable(self, id) {
                if let Some(e) = self.dir.get(id) {
                    candidates.push(self.candidate(&e.record));
                }
            }
        }
        if candidates.len() < need && !self.ranked_all {
            // Too few of the best-ranked are usable now: look at the whole directory (O(n),
            // only while this node lacks neighbours).
            candidates = self.dir.entries().filter(|e| usable(self, &e.record.node_id)).map(|e| self.candidate(&e.record)).collect();
        }
        let fixed_groups: Vec<u64> = configured.iter().filter_map(|id| self.dir.get(id)).map(|e| underlay_group(&e.record)).collect();
        let keep: BTreeSet<NodeId> = self.chosen.keys().copied().collect();
        // A replacement that already holds a session with this node (it chose this node, or
        // a relay or a link uses it) is alive and needs no dial: after 10 % of 100 nodes
        // were killed, replacements picked by rank alone were sometimes dead too and cost
        // a failed dial each (issue 11).
        let live: BTreeSet<NodeId> = candidates.iter().map(|c| c.2.id).filter(|id| working(self, id)).collect();
        let set = choose_ranked(candidates, &keep, &live, &fixed_groups, configured.len(), k);
        self.chosen.retain(|id, _| set.contains(id));
        for id in &set {
            self.chosen.entry(*id).or_insert(now);
        }
        self.check_published();
        if set != self.announced {
            self.announced = set.clone();
            self.out.push_back(Out::Neighbours(set));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nodes on a perfect underlay: a session exists between two live nodes when either
    /// wants it (configured or chosen) and nothing blocks them; messages take 1 ms.
    struct Sim {
        nodes: Vec<Option<Overlay>>,
        ids: Vec<NodeId>,
        index: BTreeMap<NodeId, usize>,
        configured: Vec<BTreeSet<usize>>,
        wants: Vec<BTreeSet<usize>>,
        links: BTreeSet<(usize, usize)>,
        blocked: Box<dyn Fn(usize, usize) -> bool>,
        /// Directed pairs whose messages are lost while the session looks alive.
        lossy: BTreeSet<(usize, usize)>,
        /// Per-node clock error in seconds.
        skew: Vec<i64>,
        queue: VecDeque<(Instant, usize, usize, Message)>,
        t0: Instant,
        now: Instant,
        unix: u64,
        delivered: Vec<Vec<(NodeId, Vec<u8>)>>,
        acked: BTreeSet<(usize, u64)>,
        /// Sessions opened for something else than management (a relay, traffic to a
        /// directory node): (dialler, other).
        extra: BTreeSet<(usize, usize)>,
    }

    fn ident(i: usize) -> Identity {
        let mut seed = [7u8; 32];
        seed[..8].copy_from_slice(&(i as u64).to_be_bytes());
        Identity::from_seed(seed)
    }

    impl Sim {
        fn new(n: usize) -> Sim {
            let ids: Vec<NodeId> = (0..n).map(|i| ident(i).node_id()).collect();
            let t0 = Instant::now();
            Sim {
                nodes: (0..n).map(|_| None).collect(),
                index: ids.iter().enumerate().map(|(i, id)| (*id, i)).collect(),
                ids,
                configured: vec![BTreeSet::new(); n],
                wants: vec![BTreeSet::new(); n],
                links: BTreeSet::new(),
                blocked: Box::new(|_, _| false),
                lossy: BTreeSet::new(),
                skew: vec![0; n],
                queue: VecDeque::new(),
                t0,
                now: t0,
                unix: 1_000_000,
                delivered: vec![Vec::new(); n],
                acked: BTreeSet::new(),
                extra: BTreeSet::new(),
            }
        }

        fn start(&mut self, i: usize) {
            let info = OwnInfo {
                name: format!("n{i}"),
                endpoints: vec![SocketAddr::from(([10, (i / 200) as u8, (i % 200) as u8, 1], 7720))],
                overlay_v4: None,
                overlay_v6: None,
                prefixes: vec![],
                relay: true,
                uptime: Some(Uptime::Stable),
                networks: vec![],
                policy: None,
            };
            let unix = self.unix_of(i);
            // A restarted node draws new message IDs, as the daemon does (its seed is random).
            let seed = (i as u64 + 1) ^ ((self.now - self.t0).as_millis() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            self.nodes[i] = Some(Overlay::new(ident(i), OverlayConfig::default(), info, self.now, unix, seed));
        }

        fn stop(&mut self, i: usize) {
            self.nodes[i] = None;
            self.wants[i].clear();
            let gone: Vec<(usize, usize)> = self.links.iter().copied().filter(|(a, b)| *a == i || *b == i).collect();
            for (a, b) in gone {
                self.links.remove(&(a, b));
                let other = if a == i { b } else { a };
                if let Some(n) = self.nodes[other].as_mut() {
                    n.session_down(self.ids[i]);
                }
            }
        }

        fn unix_of(&self, i: usize) -> u64 {
            self.unix.saturating_add_signed(self.skew[i])
        }

        fn configure(&mut self, a: usize, b: usize) {
            self.configured[a].insert(b);
            self.configured[b].insert(a);
        }

        fn pump(&mut self, i: usize) {
            while let Some(o) = self.nodes[i].as_mut().and_then(|n| n.poll()) {
                match o {
                    Out::Send { to, message, .. } => {
                        let j = self.index[&to];
                        self.queue.push_back((self.now + Duration::from_millis(1), i, j, message));
                    }
                    Out::Neighbours(set) => self.wants[i] = set.iter().map(|id| self.index[id]).collect(),
                    Out::Deliver { src, payload, .. } => self.delivered[i].push((src, payload)),
                    Out::Delivered { id } => {
                        self.acked.insert((i, id));
                    }
                    _ => {}
                }
            }
        }

        /// Makes sessions match what the nodes want.
        fn sessions(&mut self) {
            let n = self.nodes.len();
            let mut want = BTreeSet::new();
            for a in 0..n {
                if self.nodes[a].is_none() {
                    continue;
                }
                for &b in self.configured[a].iter().chain(self.wants[a].iter()) {
                    if self.nodes[b].is_some() && !(self.blocked)(a, b) {
                        want.insert((a.min(b), a.max(b)));
                    }
                }
            }
            for &(a, b) in &self.extra {
                if self.nodes[a].is_some() && self.nodes[b].is_some() {
                    want.insert((a.min(b), a.max(b)));
                }
            }
            // Dials to chosen neighbours that are down or cut off fail, as the shell reports.
            for a in 0..n {
                let failed: Vec<usize> = self.wants[a].iter().copied().filter(|&b| self.nodes[b].is_none() || (self.blocked)(a, b)).collect();
                let now = self.now;
                if let Some(x) = self.nodes[a].as_mut() {
                    for b in failed {
                        x.unreachable(now, self.ids[b]);
                    }
                }
            }
            let gone: Vec<(usize, usize)> = self.links.difference(&want).copied().collect();
            for (a, b) in gone {
                self.links.remove(&(a, b));
                if let Some(x) = self.nodes[a].as_mut() {
                    x.session_down(self.ids[b]);
                }
                if let Some(x) = self.nodes[b].as_mut() {
                    x.session_down(self.ids[a]);
                }
            }
            let new: Vec<(usize, usize)> = want.difference(&self.links).copied().collect();
            for (a, b) in new {
                self.links.insert((a, b));
                let now = self.now;
                let (ida, idb) = (self.ids[a], self.ids[b]);
                let ca = self.configured[a].contains(&b);
                self.nodes[a].as_mut().unwrap().session_up(now, idb, ca);
                self.nodes[b].as_mut().unwrap().session_up(now, ida, ca);
                self.pump(a);
                self.pump(b);
            }
        }

        fn run(&mut self, d: Duration) {
            let end = self.now + d;
            let mut next_tick = self.now;
            while self.now < end {
                while let Some((t, _, _, _)) = self.queue.front() {
                    if *t > next_tick {
                        break;
                    }
                    let (t, from, to, m) = self.queue.pop_front().unwrap();
                    self.now = self.now.max(t);
                    let linked = self.links.contains(&(from.min(to), from.max(to))) && !self.lossy.contains(&(from, to));
                    let unix = self.unix_of(to);
                    if let (true, Some(node)) = (linked, self.nodes[to].as_mut()) {
                        node.handle(t, unix, self.ids[from], m);
                        self.pump(to);
                    }
                }
                self.now = next_tick;
                self.unix = 1_000_000 + (self.now - self.t0).as_secs();
                for i in 0..self.nodes.len() {
                    let unix = self.unix_of(i);
                    if let Some(n) = self.nodes[i].as_mut() {
                        n.tick(self.now, unix);
                    }
                    self.pump(i);
                }
                self.sessions();
                next_tick += Duration::from_millis(100);
            }
        }
    }

    impl Sim {
        fn knows_all(&self, live: &[usize]) -> bool {
            live.iter().all(|&i| {
                let d = self.nodes[i].as_ref().unwrap().directory();
                live.iter().all(|&j| d.get(&self.ids[j]).is_some())
            })
        }
    }

    #[test]
    fn neighbour_count_follows_series_parallel_reliability() {
        // 1000 nodes: ~7 hops, each needs 0.99986 with 90 % available neighbours: 4.
        assert_eq!(neighbours_for(0.9, 0.999, 1000), 4);
        // Less available neighbours need more of them.
        assert!(neighbours_for(0.7, 0.9999, 50) > neighbours_for(0.9, 0.9999, 50));
        assert_eq!(neighbours_for(0.9, 0.9999, 50), 5);
    }

    #[test]
    fn neighbours_prefer_stable_and_diverse_nodes_and_stay_put() {
        let local = NodeId([1; 16]);
        let c = |b: u8, stable: bool, group: u64| Candidate { id: NodeId([b; 16]), stable, group };
        let cands = vec![c(2, false, 1), c(3, true, 1), c(4, true, 1), c(5, true, 2), c(6, true, 3)];
        let set = choose_neighbours(&local, &cands, &BTreeSet::new(), &[], 0, 3);
        // the ephemeral node is not chosen while stable ones remain; groups 1, 2 and 3 all appear
        assert!(!set.contains(&NodeId([2; 16])));
        assert!(set.contains(&NodeId([5; 16])) && set.contains(&NodeId([6; 16])));
        // a kept neighbour stays even when a "better" one exists
        let keep: BTreeSet<NodeId> = [NodeId([2; 16])].into();
        let set2 = choose_neighbours(&local, &cands, &keep, &[], 0, 3);
        assert!(set2.contains(&NodeId([2; 16])));
        // configured peers count towards k
        assert_eq!(choose_neighbours(&local, &cands, &BTreeSet::new(), &[], 2, 3).len(), 1);
    }

    #[test]
    fn a_replacement_neighbour_is_one_this_node_already_has_a_session_with() {
        let local = NodeId([1; 16]);
        let cands: Vec<(bool, u64, Candidate)> = (2..12u8).map(|b| (false, rendezvous(&local, &NodeId([b; 16])), Candidate { id: NodeId([b; 16]), stable: true, group: u64::from(b) })).collect();
        let by_rank = choose_ranked(cands.clone(), &BTreeSet::new(), &BTreeSet::new(), &[], 0, 3);
        // The two nodes ranked last hold sessions with this node (they chose it).
        let mut ranked = cands.clone();
        ranked.sort_by_key(|(_, w, c)| (*w, c.id));
        let live: BTreeSet<NodeId> = ranked[8..].iter().map(|c| c.2.id).collect();
        assert!(by_rank.is_disjoint(&live));
        let set = choose_ranked(cands.clone(), &BTreeSet::new(), &live, &[], 0, 3);
        assert!(live.is_subset(&set), "{set:?} lacks {live:?}");
        assert!(set.contains(&ranked[0].2.id), "the rest in rank order");
        // Kept neighbours still stay, and stability still comes first.
        let keep: BTreeSet<NodeId> = ranked[..3].iter().map(|c| c.2.id).collect();
        assert_eq!(choose_ranked(cands.clone(), &keep, &live, &[], 0, 3), keep);
        let mut eph = cands;
        for c in eph.iter_mut().filter(|c| live.contains(&c.2.id)) {
            c.0 = true;
            c.2.stable = false;
        }
        assert!(choose_ranked(eph, &BTreeSet::new(), &live, &[], 0, 3).is_disjoint(&live));
    }

    /// A ring of configured peers (each node configured with its two neighbours on the
    /// ring, as bootstrap contacts) among `n` nodes, all started.
    fn ring(n: usize) -> Sim {
        ring_of(n, n)
    }

    /// Room for `n` nodes, the first `started` on a ring and running.
    fn ring_of(n: usize, started: usize) -> Sim {
        let mut s = Sim::new(n);
        for i in 0..started {
            s.configure(i, (i + 1) % started);
        }
        for i in 0..started {
            s.start(i);
        }
        s
    }

    #[test]
    fn directories_converge_and_a_join_reaches_every_node() {
        let mut s = ring(50);
        s.run(Duration::from_secs(10));
        let live: Vec<usize> = (0..50).collect();
        assert!(s.knows_all(&live), "all 50 know each other");
        // Neighbour counts are bounded: what a node chose plus who chose it.
        for i in 0..50 {
            let n = s.nodes[i].as_ref().unwrap();
            let chosen = n.chosen().count();
            assert!(chosen <= OverlayConfig::default().max_neighbours, "node {i} chose {chosen}");
        }
        // A new node configured with one contact joins; its record reaches all within 3 s.
        let mut s = ring_of(51, 50);
        s.run(Duration::from_secs(10));
        s.configure(50, 7);
        s.start(50);
        let all: Vec<usize> = (0..51).collect();
        let t0 = s.now;
        while !s.knows_all(&all) && s.now < t0 + Duration::from_secs(10) {
            s.run(Duration::from_millis(100));
        }
        // 2.2 s: ten seconds after the start the flood tree is still forming, and parts of
        // it are reached through announcements (asked for after GRAFT_AFTER).
        assert!(s.now - t0 <= Duration::from_secs(3), "the join reached every node after {:?}", s.now - t0);
    }

    #[test]
    fn nodes_that_started_together_lower_their_neighbour_count_at_different_times_and_raise_it_at_once() {
        // Ten nodes alone (a directory of one: the rule asks for 4 neighbours at 90 %
        // availability, the minimum of 3 at 99 %).
        let mut s = Sim::new(10);
        for i in 0..10 {
            s.start(i);
        }
        s.run(Duration::from_secs(2));
        assert!(s.nodes.iter().flatten().all(|n| n.target_neighbours() == 4));
        for n in s.nodes.iter_mut().flatten() {
            n.availability = 0.99;
        }
        let t0 = s.now;
        let mut lowered: Vec<Option<Duration>> = vec![None; 10];
        while s.now < t0 + K_LOWER_SPREAD + Duration::from_secs(2) {
            s.run(Duration::from_secs(1));
            for (i, n) in s.nodes.iter().enumerate() {
                let n = n.as_ref().unwrap();
                if n.target_neighbours() == 3 && lowered[i].is_none() {
                    lowered[i] = Some(s.now - t0);
                }
            }
        }
        let at: BTreeSet<u64> = lowered.iter().map(|t| t.expect("every node lowered its count within the spread").as_secs()).collect();
        assert!(at.len() >= 5, "the nodes lowered their counts at {at:?} s: not spread");
        // Back to 90 %: 4 neighbours again at the next sample, without a wait.
        for n in s.nodes.iter_mut().flatten() {
            n.availability = 0.9;
        }
        s.run(Duration::from_millis(1100));
        assert!(s.nodes.iter().flatten().all(|n| n.target_neighbours() == 4));
    }

    #[test]
    fn the_first_neighbour_choice_waits_for_the_directory_to_settle() {
        // Records of 20 nodes that know each other (a ring), each listing its links.
        let mut a = ring(20);
        a.run(Duration::from_secs(10));
        let records: Vec<SignedRecord> = (1..20).map(|i| a.nodes[0].as_ref().unwrap().directory().get(&a.ids[i]).unwrap().signed.clone()).collect();
        // Node 20 joins through node 0 (which knows nobody else here), and the records reach
        // it one by one, 300 ms apart: node 20 chooses no neighbour while they keep coming,
        // 500 ms after the last, and no later than 4 s after its first session. (The nodes
        // of the records are not running: a choice shows as the set node 20 announces.)
        let first_choice = |count: usize| {
            let mut s = Sim::new(21);
            s.configure(0, 20);
            s.start(0);
            s.start(20);
            s.run(Duration::from_millis(200));
            let t0 = s.now;
            let mut last = t0;
            for r in records.iter().take(count) {
                let unix = s.unix;
                s.nodes[20].as_mut().unwrap().handle(s.now, unix, s.ids[0], Message::Records { records: vec![r.clone()], push: true });
                s.pump(20);
                last = s.now;
                for _ in 0..3 {
                    if !s.wants[20].is_empty() {
                        return (last - t0, s.now - t0);
                    }
                    s.run(Duration::from_millis(100));
                }
            }
            while s.wants[20].is_empty() && s.now < t0 + Duration::from_secs(10) {
                s.run(Duration::from_millis(100));
            }
            (last - t0, s.now - t0)
        };
        let (last, chose) = first_choice(8);
        assert!(chose >= last + FIRST_CHOICE_SETTLE && chose <= last + FIRST_CHOICE_SETTLE + Duration::from_millis(200), "last record at {last:?}, chose at {chose:?}");
        // Records that keep coming for 5.7 s: the choice is made 4 s after the first session
        // (which came up in the 200 ms before the first record) all the same, 200 ms after a
        // record.
        let (last, chose) = first_choice(19);
        assert!(chose + Duration::from_millis(200) >= FIRST_CHOICE_MAX && chose <= FIRST_CHOICE_MAX + Duration::from_millis(100), "chose at {chose:?}");
        assert!(chose < last + FIRST_CHOICE_SETTLE, "last record at {last:?}, chose at {chose:?}");
    }

    #[test]
    fn a_refused_dialler_is_looked_up_at_a_configured_peer() {
        // Node 1 refused node 2's handshake: node 2 chose it from the directory its bootstrap
        // peer (node 0) sent, before node 2's record had reached node 1. Node 1 asks node 0
        // for the record at once; with it, node 2's next dial is admitted.
        let mut s = Sim::new(4);
        s.configure(0, 1);
        s.configure(0, 3);
        s.start(0);
        s.start(1);
        s.start(3);
        s.run(Duration::from_secs(3));
        // Node 2's record, as node 0 would hold it.
        let now = s.now;
        s.start(2);
        s.nodes[2].as_mut().unwrap().tick(now, s.unix);
        let rec = s.nodes[2].as_ref().unwrap().directory().get(&s.ids[2]).unwrap().signed.clone();
        let unix = s.unix;
        assert!(s.nodes[0].as_mut().unwrap().dir.insert(rec, unix).is_ok());
        s.stop(2);
        let n1 = s.nodes[1].as_mut().unwrap();
        assert!(n1.directory().get(&s.ids[2]).is_none());
        while n1.poll().is_some() {}
        n1.seek(now, s.ids[2]);
        n1.seek(now, s.ids[2]);
        n1.tick(now, unix);
        let asks: Vec<(NodeId, Vec<NodeId>)> = std::iter::from_fn(|| n1.poll())
            .filter_map(|o| match o {
                Out::Send { to, message: Message::Want { nodes }, .. } => Some((to, nodes)),
                _ => None,
            })
            .collect();
        assert_eq!(asks, vec![(s.ids[0], vec![s.ids[2]])], "asked once, of the configured peer");
        let t = s.now + Duration::from_millis(1);
        s.queue.push_back((t, 1, 0, Message::Want { nodes: vec![s.ids[2]] }));
        s.run(Duration::from_millis(100));
        assert!(s.nodes[1].as_ref().unwrap().directory().get(&s.ids[2]).is_some(), "the record arrived");
        // A node it knows already is not asked for.
        let n1 = s.nodes[1].as_mut().unwrap();
        n1.seek(s.now, s.ids[3]);
        n1.tick(s.now, unix);
        assert!(!std::iter::from_fn(|| n1.poll()).any(|o| matches!(o, Out::Send { message: Message::Want { .. }, .. })));
    }

    #[test]
    fn the_flood_prunes_itself_to_a_tree_and_still_reaches_everyone_when_the_hub_fails() {
        // A star (node 0 is every node's configured peer) plus the neighbours each node
        // chooses: with a plain flood, the hub receives every record from every node.
        let n = 40;
        let mut s = Sim::new(n);
        for i in 1..n {
            s.configure(0, i);
        }
        for i in 0..n {
            s.start(i);
        }
        s.run(Duration::from_secs(30));
        let all: Vec<usize> = (0..n).collect();
        assert!(s.knows_all(&all));
        let copies =
            |s: &Sim| -> Vec<u64> { s.nodes.iter().map(|n| n.as_ref().map_or(0, |n| n.rejected().iter().filter(|(k, _)| *k == "duplicate" || *k == "stale").map(|(_, v)| v).sum())).collect() };
        let prunes: u64 = s.nodes.iter().flatten().map(|n| n.stats().prunes_sent).sum();
        assert!(prunes > n as u64, "{prunes} links pruned");

        // One node's record changes: it reaches every node, and the hub gets it about
        // once, not once per node. (Without the prunes: 290 extra copies in all, 10 at the
        // hub; with them: 10 and 0.)
        let change = |s: &mut Sim, i: usize, port: u16| -> u64 {
            let node = s.nodes[i].as_mut().unwrap();
            let mut info = node.info.clone();
            info.endpoints = vec![SocketAddr::from(([10, 0, i as u8, 1], port))];
            node.set_info(info);
            s.run(Duration::from_millis(500));
            s.nodes[i].as_ref().unwrap().directory().get(&s.ids[i]).unwrap().record.seq
        };
        let before = copies(&s);
        let seq = change(&mut s, 7, 7000);
        s.run(Duration::from_secs(1));
        let has = |s: &Sim, live: &[usize], i: usize, seq: u64| live.iter().all(|&j| s.nodes[j].as_ref().unwrap().directory().get(&s.ids[i]).is_some_and(|e| e.record.seq >= seq));
        assert!(has(&s, &all, 7, seq), "the change reached every node");
        let after = copies(&s);
        let extra: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let total: u64 = extra.iter().sum();
        assert!(extra[0] <= 2, "the hub received {} extra copies", extra[0]);
        assert!(total <= n as u64 / 2, "{total} extra copies in all ({extra:?})");
        // The hub fails: the tree's links through it are gone, and records still reach
        // every live node over the lazy links (announced, then asked for).
        s.stop(0);
        s.run(Duration::from_secs(1));
        let live: Vec<usize> = (1..n).collect();
        let seq = change(&mut s, 9, 7001);
        s.run(Duration::from_secs(2));
        assert!(has(&s, &live, 9, seq), "the change reached every live node without the hub");
        let grafts: u64 = s.nodes.iter().flatten().map(|n| n.stats().grafts_sent).sum();
        eprintln!("prunes {prunes}, extra copies {total} (hub {}), grafts after the hub failed {grafts}", extra[0]);
    }

    #[test]
    fn failed_nodes_disappear_from_their_neighbours_records_at_once() {
        // 100 nodes: new links wait 2 s after a publication to be published
        // (neighbour_debounce); lost ones do not.
        let mut s = ring(100);
        s.run(Duration::from_secs(70));
        // Two nodes that share a neighbour fail one after the other: that neighbour
        // publishes the second loss as soon as the first.
        let a = 4;
        let shared = (0..100).find(|&j| j != a && s.links.contains(&(a.min(j), a.max(j)))).expect("node 4 has a neighbour");
        let b = (0..100).find(|&j| j != a && j != shared && s.links.contains(&(shared.min(j), shared.max(j)))).expect("another neighbour");
        let live: Vec<usize> = (0..100).filter(|&i| i != a && i != b).collect();
        let listing = |s: &Sim, dead: usize| -> Vec<usize> {
            live.iter().copied().filter(|&j| live.iter().any(|&k| s.nodes[k].as_ref().unwrap().directory().get(&s.ids[j]).is_some_and(|e| e.record.neighbours.contains(&s.ids[dead])))).collect()
        };
        // The sessions end (the shell reports them down when QUIC times out).
        s.stop(a);
        s.run(Duration::from_millis(500));
        s.stop(b);
        let t0 = s.now;
        while !(listing(&s, a).is_empty() && listing(&s, b).is_empty()) && s.now < t0 + Duration::from_secs(10) {
            s.run(Duration::from_millis(100));
        }
        // 1.6 s here, through a flood tree that lost two of its nodes and repairs itself
        // (announce, wait GRAFT_AFTER, ask); with a graft after 150 ms it took 0.9 s, and
        // debounced like new links, the second loss 2.1 s.
        assert!(s.now - t0 <= Duration::from_secs(2), "records of {:?} still list the failed nodes after {:?}", listing(&s, b), s.now - t0);
    }

    #[test]
    fn link_damping_counts_only_the_publications_of_its_window() {
        let t0 = Instant::now();
        let mut o = Overlay::new(ident(0), OverlayConfig::default(), OwnInfo { name: "n0".into(), ..Default::default() }, t0, 1_000_000, 1);
        o.link_publications.extend([t0, t0 + Duration::from_secs(1), t0 + Duration::from_secs(2), t0 + Duration::from_secs(3)]);
        o.last_tick = t0 + Duration::from_secs(10);
        assert_eq!(o.links_debounce(), neighbour_debounce(1) * 4, "four changes in the last minute: doubled twice");
        // A minute later they no longer count, whether or not a publication pruned them
        // (a large overlay refreshes its record only every few minutes).
        o.last_tick = t0 + Duration::from_secs(70);
        assert_eq!(o.links_debounce(), neighbour_debounce(1));
    }

    #[test]
    fn relay_and_traffic_sessions_are_not_published_and_cause_no_flood() {
        let mut s = ring(12);
        s.run(Duration::from_secs(10));
        let published = |s: &Sim| -> u64 { s.nodes.iter().flatten().map(|n| n.stats().records_published).sum() };
        let before = published(&s);
        // Sessions between nodes that are not each other's neighbours come and go every
        // second, as relay sessions and on-demand links do.
        let pairs: Vec<(usize, usize)> = (0..12).flat_map(|a| (0..12).map(move |b| (a, b))).filter(|&(a, b)| a < b && !s.links.contains(&(a, b))).take(6).collect();
        assert!(!pairs.is_empty());
        for round in 0..20 {
            if round % 2 == 0 {
                s.extra.extend(pairs.iter().copied());
            } else {
                s.extra.clear();
            }
            s.run(Duration::from_secs(1));
        }
        let flooded = published(&s) - before;
        assert!(flooded <= 12, "{flooded} records published in 20 s by 12 idle nodes");
        // None of those sessions is a published link.
        s.extra.extend(pairs.iter().copied());
        s.run(Duration::from_secs(3));
        for &(a, b) in &pairs {
            let rec = s.nodes[a].as_ref().unwrap().directory().get(&s.ids[a]).unwrap().record.clone();
            if !s.nodes[a].as_ref().unwrap().chosen().any(|c| *c == s.ids[b]) {
                let linked = s.nodes[a].as_ref().unwrap().directory().linked(&s.ids[a], &s.ids[b]);
                assert!(!rec.neighbours.contains(&s.ids[b]) || linked, "n{a} published its extra session with n{b}");
            }
        }
        let live: Vec<usize> = (0..12).collect();
        assert!(s.knows_all(&live));
    }

    #[test]
    fn a_neighbour_whose_path_is_down_is_replaced_before_its_session_times_out() {
        let mut s = ring(12);
        s.run(Duration::from_secs(10));
        let c = *s.nodes[0].as_ref().unwrap().chosen().next().expect("node 0 chose a neighbour");
        let now = s.now;
        s.nodes[0].as_mut().unwrap().set_usable(now, c, false);
        s.run(UNUSABLE_PATIENCE + Duration::from_secs(3));
        let n = s.nodes[0].as_ref().unwrap();
        assert!(!n.chosen().any(|x| *x == c), "the neighbour behind a dead path is still chosen");
        let up = n.chosen().filter(|x| n.sessions().any(|(id, _, usable)| id == *x && usable)).count() + n.sessions().filter(|(_, conf, _)| *conf).count();
        assert!(up >= n.target_neighbours().min(11), "{up} working neighbours, want {}", n.target_neighbours());
    }

    #[test]
    fn a_chosen_neighbour_that_cannot_be_reached_is_replaced_at_once() {
        // The three nodes node 0 ranks first (not its ring neighbours) are alive and
        // linked with everyone else, but node 0 cannot reach them: its dials fail.
        let n = 16;
        let mut s = ring(n);
        let local = s.ids[0];
        let mut order: Vec<usize> = (2..n - 1).collect();
        order.sort_by_key(|&j| rendezvous(&local, &s.ids[j]));
        let cut: Vec<usize> = order[..3].to_vec();
        let c2 = cut.clone();
        s.blocked = Box::new(move |a, b| (a == 0 && c2.contains(&b)) || (b == 0 && c2.contains(&a)));
        let all: Vec<usize> = (0..n).collect();
        let mut waited = Duration::ZERO;
        while !s.knows_all(&all) {
            s.run(Duration::from_millis(100));
            waited += Duration::from_millis(100);
            assert!(waited < Duration::from_secs(10), "directories did not converge");
        }
        // Well within the patience a neighbour that never connects gets otherwise.
        s.run(NEIGHBOUR_PATIENCE / 2);
        let node = s.nodes[0].as_ref().unwrap();
        let chosen: Vec<usize> = node.chosen().map(|id| s.index[id]).collect();
        assert!(chosen.iter().all(|j| !cut.contains(j)), "node 0 still waits for {chosen:?} (cut off: {cut:?})");
        let up = node.chosen().filter(|x| node.sessions().any(|(id, _, _)| id == *x)).count() + node.sessions().filter(|(_, conf, _)| *conf).count();
        assert!(up >= node.target_neighbours(), "{up} neighbours up, want {}", node.target_neighbours());
    }

    #[test]
    fn a_link_that_flaps_is_published_at_a_damped_rate_and_the_last_state_gets_out() {
        let mut s = ring(12);
        s.run(Duration::from_secs(10));
        let before = s.nodes[0].as_ref().unwrap().stats().records_published;
        // The session 0-1 (configured) goes down and up every second for a minute.
        for round in 0..60 {
            s.blocked = if round % 2 == 0 { Box::new(|a, b| (a, b) == (0, 1) || (a, b) == (1, 0)) } else { Box::new(|_, _| false) };
            s.run(Duration::from_secs(1));
        }
        let flaps = s.nodes[0].as_ref().unwrap().stats().records_published - before;
        assert!(flaps <= 12, "{flaps} records for 60 link changes");
        // Once it holds still, the last state is published within the longest debounce.
        s.blocked = Box::new(|_, _| false);
        s.run(MAX_LINKS_DEBOUNCE + Duration::from_secs(2));
        let d = s.nodes[5].as_ref().unwrap().directory();
        assert!(d.linked(&s.ids[0], &s.ids[1]), "the link that came back is known at other nodes");
    }

    #[test]
    fn a_partition_that_heals_merges_the_directory() {
        let mut s = ring_of(41, 40);
        s.run(Duration::from_secs(10));
        // Cut the overlay in two halves for longer than a record lives.
        s.blocked = Box::new(|a, b| (a < 20) != (b < 20));
        s.run(Duration::from_secs(directory::record_ttl_s(41) + 30));
        let d0 = s.nodes[0].as_ref().unwrap().directory();
        assert!(d0.get(&s.ids[30]).is_none(), "the other half's records expired");
        // A node joins the first half during the partition.
        s.configure(40, 3);
        s.start(40);
        s.run(Duration::from_secs(5));
        assert!(s.nodes[30].as_ref().unwrap().directory().get(&s.ids[40]).is_none());
        // Heal: the configured ring links across the cut come back and everything merges.
        s.blocked = Box::new(|_, _| false);
        s.run(Duration::from_secs(10));
        let all: Vec<usize> = (0..41).collect();
        assert!(s.knows_all(&all), "directories merged");
    }

    #[test]
    fn messages_go_around_a_dead_link_and_critical_ones_need_no_retry() {
        let mut s = ring(30);
        s.run(Duration::from_secs(10));
        // Pick a neighbour of node 0 and make their link silently lose everything.
        let b = *s.nodes[0].as_ref().unwrap().sessions().map(|(id, _, _)| id).next().map(|id| &s.index[id]).unwrap();
        s.lossy.insert((0, b));
        s.lossy.insert((b, 0));
        let t0 = s.now;
        let now = s.now;
        let id = s.nodes[0].as_mut().unwrap().send(now, s.ids[b], 9, b"plain", false);
        s.pump(0);
        s.run(Duration::from_secs(3));
        assert!(s.acked.contains(&(0, id)), "acknowledged after a retry on another path");
        assert_eq!(s.delivered[b], vec![(s.ids[0], b"plain".to_vec())]);
        // A critical message takes two disjoint paths at once: it arrives before the first
        // retry would be sent.
        let now = s.now;
        let id = s.nodes[0].as_mut().unwrap().send(now, s.ids[b], 9, b"critical", true);
        s.pump(0);
        s.run(Duration::from_millis(400));
        assert!(s.acked.contains(&(0, id)), "acknowledged within 400 ms, without a retry");
        assert_eq!(s.delivered[b].len(), 2);
        assert!(s.now - t0 < Duration::from_secs(4));
    }

    #[test]
    fn churn_loses_no_acknowledged_message() {
        let n = 30;
        let mut s = ring(n);
        s.run(Duration::from_secs(10));
        let mut rng = 12345u64;
        let mut rand = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut sent: Vec<(usize, u64, usize, Vec<u8>)> = Vec::new();
        for round in 0..40 {
            // every second one node dies and one dead node comes back
            let victim = (rand() % n as u64) as usize;
            if s.nodes[victim].is_some() {
                s.stop(victim);
            }
            let dead: Vec<usize> = (0..n).filter(|i| s.nodes[*i].is_none() && *i != victim).collect();
            if let Some(&back) = dead.first() {
                s.start(back);
            }
            for k in 0..10 {
                let live: Vec<usize> = (0..n).filter(|i| s.nodes[*i].is_some()).collect();
                let a = live[(rand() % live.len() as u64) as usize];
                let b = live[(rand() % live.len() as u64) as usize];
                if a == b {
                    continue;
                }
                let payload = format!("{round}/{k}").into_bytes();
                let now = s.now;
                let dst = s.ids[b];
                let id = s.nodes[a].as_mut().unwrap().send(now, dst, 1, &payload, false);
                s.pump(a);
                sent.push((a, id, b, payload));
            }
            s.run(Duration::from_secs(1));
        }
        s.run(Duration::from_secs(10));
        let acked: Vec<&(usize, u64, usize, Vec<u8>)> = sent.iter().filter(|(a, id, _, _)| s.acked.contains(&(*a, *id))).collect();
        for (a, _, b, p) in &acked {
            assert!(s.delivered[*b].contains(&(s.ids[*a], p.clone())), "acknowledged but not delivered");
        }
        // and most messages between nodes that stayed up made it
        assert!(acked.len() * 10 >= sent.len() * 8, "{} of {} acknowledged", acked.len(), sent.len());
    }

    #[test]
    fn a_restarted_node_continues_above_its_old_sequence_number_and_keeps_its_name() {
        let mut s = ring(10);
        s.run(Duration::from_secs(5));
        let old = s.nodes[3].as_ref().unwrap().directory().get(&s.ids[3]).unwrap().record.clone();
        // The node restarts with a clock that went back; the network still holds its record.
        s.stop(3);
        s.skew[3] = -100;
        s.start(3);
        s.run(Duration::from_secs(3));
        let n3 = s.nodes[3].as_ref().unwrap();
        let mine = n3.directory().get(&s.ids[3]).unwrap().record.clone();
        assert!(mine.seq > old.seq, "continued above {} (now {})", old.seq, mine.seq);
        assert_eq!(mine.names[0].since, old.names[0].since, "kept the registration time");
        let elsewhere = s.nodes[7].as_ref().unwrap().directory().get(&s.ids[3]).unwrap().record.seq;
        assert_eq!(elsewhere, mine.seq, "the others took the new record");
    }

    #[test]
    fn a_second_key_cannot_register_a_held_name() {
        let mut s = ring(6);
        s.run(Duration::from_secs(5));
        let unix = s.unix;
        s.nodes[1].as_mut().unwrap().register(unix, "sip:alice").unwrap();
        s.run(Duration::from_secs(2));
        let unix = s.unix;
        let r = s.nodes[4].as_mut().unwrap().register(unix, "sip:alice");
        assert_eq!(r, Err(RegisterError::Taken(s.ids[1])));
        assert_eq!(s.nodes[4].as_ref().unwrap().resolve("sip:alice").unwrap().node_id, s.ids[1]);
        assert_eq!(s.nodes[4].as_ref().unwrap().resolve("n2").unwrap().node_id, s.ids[2]);
        // The same name claimed by a node's own start-up name elsewhere is not published.
        assert_eq!(s.nodes[0].as_ref().unwrap().resolve("sip:alice").unwrap().node_id, s.ids[1]);
    }
}
