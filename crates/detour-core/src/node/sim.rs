//! Whole-node simulator: N nodes, each its real [`NodeState`] (failover, relay server,
//! REPLEX, link reports) and its real data plane ([`TxState`], [`RxState`]: probes are
//! sealed, relayed and opened as on the wire), on a simulated underlay with per-direction
//! cuts and loss, delay, ICMP unreachable signals and node crashes, under one simulated
//! clock. Seeded and deterministic: the same seed gives the same trace.
//!
//! Each node's state also runs its management overlay (records, neighbours, message
//! routing) and its local API server: a program on every node (a simulated address)
//! subscribes to channel 1, and messages are sent through the API as programs send them.
//!
//! Management sessions are modelled, not run: a session between two nodes is up while
//! both are alive and neither direction has been cut for [`SESSION_TIMEOUT`] (QUIC's idle
//! timeout); management messages over it arrive after the link delay, and are lost while
//! a direction is cut (the session then times out).
//!
//! Time moves from event to event (a datagram or message arriving, a node's
//! [`NodeState::poll_timeout`], a session timing out), not in fixed steps, and only the
//! nodes an event touches do any work: a thousand idle nodes cost nothing between their
//! timers.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::dataplane::{DataCommand, Rx, RxState, TxState};
use crate::identity::{Identity, NodeId};
use crate::node::model::{Learned, Model};
use crate::node::state::{NodeAction, NodeState};
use crate::overlay::api::{self, kind, op, Address, Reply, Request};
use crate::overlay::directory::CachedVerifier;
use crate::overlay::OwnInfo;
use crate::path::failover::PathId;
use crate::rng::Rng;
use crate::wire::{self, mgmt::Message, OVERHEAD};

/// A management session whose direction stays cut this long closes (QUIC idle timeout).
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(6);
/// The smallest step of simulated time: a node whose timer is due again at the instant it
/// ran is woken this much later.
pub const STEP: Duration = Duration::from_millis(1);
/// How often the traffic of [`Sim::flows`] is reported to the nodes.
pub const FLOW_REPORT: Duration = Duration::from_millis(100);

/// One simulated node.
pub struct SimNode {
    /// The node's model (its configuration and peers).
    pub model: Model,
    /// The node's state machine.
    pub state: NodeState,
    tx: TxState,
    rx: RxState,
    /// Its data-port address on the underlay.
    pub addr: SocketAddr,
    /// Alive (a crashed node neither sends nor receives).
    pub alive: bool,
}

/// Something due at a simulated instant.
enum Due {
    /// Sessions of these nodes may go up or down (a cut timing out).
    Sessions(Vec<usize>),
    /// Report the traffic of [`Sim::flows`].
    Flows,
    /// A datagram or message arrives.
    Flight(Flight),
    /// Node `i`'s timer, as scheduled at `at` (stale when the node rescheduled since).
    Wake(usize),
}

/// An entry of the event queue, ordered by time, then kind (sessions, traffic reports,
/// arrivals, timers: the order of one step of a stepped simulation), then order of
/// scheduling.
struct Event {
    at: Instant,
    class: u8,
    seq: u64,
    due: Due,
}

impl PartialEq for Event {
    fn eq(&self, o: &Event) -> bool {
        (self.at, self.class, self.seq) == (o.at, o.class, o.seq)
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, o: &Event) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Event {
    fn cmp(&self, o: &Event) -> std::cmp::Ordering {
        (self.at, self.class, self.seq).cmp(&(o.at, o.class, o.seq))
    }
}

enum Flight {
    /// A data-plane datagram from `from` (underlay address) to `to`.
    Datagram { from: SocketAddr, to: SocketAddr, bytes: Vec<u8> },
    /// A management message from node `src` to node `dst`.
    Message { src: usize, dst: usize, message: Message },
}

/// The simulated underlay and its nodes.
pub struct Sim {
    /// The nodes, by index (node `i` is `n{i}`, data port at 10.0.0.`i+1`:51820).
    pub nodes: Vec<SimNode>,
    /// Simulated now.
    pub now: Instant,
    start: Instant,
    unix: u64,
    rng: Rng,
    /// One-way delay of every link.
    pub delay: Duration,
    /// Directions (from node, to node) that drop everything.
    cut: BTreeSet<(usize, usize)>,
    /// Directions (from node, to node) that drop datagrams with this probability (1/1000).
    lossy: BTreeMap<(usize, usize), u64>,
    /// Since when a direction has been cut (for session timeouts).
    cut_since: BTreeMap<(usize, usize), Instant>,
    /// Management sessions up (unordered pairs, lower index first).
    sessions: BTreeSet<(usize, usize)>,
    /// Per node, the nodes it has a session with.
    adj: Vec<BTreeSet<usize>>,
    queue: BinaryHeap<Reverse<Event>>,
    seq: u64,
    /// Per node, the instant its timer is scheduled for.
    wake: Vec<Option<Instant>>,
    /// Per node, the last instant its timer ran.
    woken: Vec<Option<Instant>>,
    /// Everything the nodes did, in order: the trace two runs with one seed must share.
    pub trace: Vec<String>,
    /// Relay requests sent: (requester, relay, purpose word).
    pub asked: Vec<(usize, usize, String)>,
    /// Datagrams a relay forwarded: (relay, count).
    pub forwarded: BTreeMap<usize, u64>,
    /// (from, to) pairs with forwarding traffic: reported every [`FLOW_REPORT`], as the
    /// data path and the netfilter log rules report it.
    pub flows: Vec<(usize, usize)>,
    /// Messages the overlays delivered to local programs: (node, source node, payload).
    pub delivered: Vec<(usize, NodeId, Vec<u8>)>,
    /// Message IDs acknowledged end to end, per sending node.
    pub acked: BTreeSet<(usize, u64)>,
    /// Message IDs given up, per sending node.
    pub failed: BTreeSet<(usize, u64)>,
    /// Message IDs the API accepted, per sending node.
    pub accepted: Vec<(usize, u64)>,
    /// Whether every node's actions are written to [`Sim::trace`] (off for large runs).
    pub tracing: bool,
    /// Per node, the neighbours its overlay chose, and the nodes that chose it.
    wants_out: Vec<BTreeSet<usize>>,
    wants_in: Vec<BTreeSet<usize>>,
    /// Per node, the nodes it configures and the nodes that configure it.
    conf_out: Vec<Vec<usize>>,
    conf_in: Vec<Vec<usize>>,
    /// Nodes whose sessions may have to go up or down.
    dirty: BTreeSet<usize>,
    by_addr: HashMap<SocketAddr, usize>,
    by_id: HashMap<NodeId, usize>,
}

/// The local program on every node (the local API's client).
const PROGRAM: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40000);

fn identity(i: usize) -> Identity {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
    seed[31] = 0x5a;
    Identity::from_seed(seed)
}

fn data_addr(i: usize) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, (i / 250) as u8, (i % 250 + 1) as u8)), 51820)
}

impl Sim {
    /// `n` nodes in a full mesh of configured peers; `policy(i)` is node `i`'s `[policy]`
    /// section (empty: the default).
    pub fn new(n: usize, seed: u64, policy: impl Fn(usize) -> String) -> Sim {
        Sim::with(
            n,
            seed,
            |i| {
                let p = policy(i);
                if p.is_empty() {
                    p
                } else {
                    format!("[policy]\n{p}\n")
                }
            },
            |_, _| true,
        )
    }

    /// `n` nodes where node `i` has node `j` as a configured peer when `configured(i, j)`;
    /// the others it learns from the directory. `sections(i)` is more of node `i`'s
    /// configuration (TOML sections such as `[policy]` or `[replex]`).
    pub fn with(n: usize, seed: u64, sections: impl Fn(usize) -> String, configured: impl Fn(usize, usize) -> bool) -> Sim {
        let start = Instant::now();
        let ids: Vec<Identity> = (0..n).map(identity).collect();
        let mut nodes = Vec::new();
        let mut models = Vec::new();
        for i in 0..n {
            let mut text = format!("[node]\nname = \"n{i}\"\nprivate_key = \"/unused\"\noverlay_ipv4 = \"10.77.{}.{}/16\"\n", i / 250, i % 250 + 1);
            let extra = sections(i);
            if !extra.is_empty() {
                text += &format!("\n{extra}\n");
            }
            for (j, id) in ids.iter().enumerate().filter(|(j, _)| *j != i && configured(i, *j)) {
                text += &format!("\n[[peer]]\nname = \"n{j}\"\npublic_key = \"{}\"\nendpoints = [\"{}\"]\noverlay_ipv4 = \"10.77.{}.{}\"\n", id.public_key(), data_addr(j).ip(), j / 250, j % 250 + 1);
            }
            let cfg = Config::parse(&text, &format!("n{i}.toml")).unwrap_or_else(|e| panic!("sim config of n{i}: {e}"));
            models.push(Model::new(cfg, ids[i].node_id()));
        }
        // What each node's signed record tells the others (the directory's part): its
        // policy is known.
        let policies: Vec<_> = models.iter().map(|m| (m.local, m.cfg.node.policy.clone())).collect();
        for model in models.iter_mut() {
            for def in model.peers.iter_mut() {
                def.known = true;
                def.policy = policies.iter().find(|(id, _)| *id == def.cfg.node_id).map(|(_, p)| p.clone()).unwrap_or_default();
            }
        }
        for (i, model) in models.into_iter().enumerate() {
            let spec = model.dataplane_spec();
            let info = OwnInfo { name: format!("n{i}"), endpoints: vec![data_addr(i)], relay: true, policy: Some(model.cfg.node.policy.clone()), ..Default::default() };
            let state = NodeState::new(&model, ids[i].clone(), info, seed ^ (i as u64).wrapping_mul(0x9e37_79b9), start, 1_800_000_000);
            nodes.push(SimNode { tx: TxState::new(&spec), rx: RxState::new(&spec), model, state, addr: data_addr(i), alive: true });
        }
        let verifier = Arc::new(CachedVerifier::default());
        for node in nodes.iter_mut() {
            node.state.set_verifier(verifier.clone());
        }
        let by_addr = nodes.iter().enumerate().map(|(i, n)| (n.addr, i)).collect();
        let by_id: HashMap<NodeId, usize> = nodes.iter().enumerate().map(|(i, n)| (n.model.local, i)).collect();
        let conf_out: Vec<Vec<usize>> = nodes.iter().map(|n| n.model.peers.iter().filter(|p| p.configured).filter_map(|p| by_id.get(&p.cfg.node_id).copied()).collect()).collect();
        let mut conf_in = vec![Vec::new(); n];
        for (i, out) in conf_out.iter().enumerate() {
            for &j in out {
                conf_in[j].push(i);
            }
        }
        let mut sim = Sim {
            nodes,
            now: start,
            start,
            unix: 1_800_000_000,
            rng: Rng::new(seed),
            delay: Duration::from_millis(5),
            cut: BTreeSet::new(),
            lossy: BTreeMap::new(),
            cut_since: BTreeMap::new(),
            sessions: BTreeSet::new(),
            adj: vec![BTreeSet::new(); n],
            queue: BinaryHeap::new(),
            seq: 0,
            wake: vec![None; n],
            woken: vec![None; n],
            trace: Vec::new(),
            asked: Vec::new(),
            forwarded: BTreeMap::new(),
            flows: Vec::new(),
            delivered: Vec::new(),
            acked: BTreeSet::new(),
            failed: BTreeSet::new(),
            accepted: Vec::new(),
            tracing: true,
            wants_out: vec![BTreeSet::new(); n],
            wants_in: vec![BTreeSet::new(); n],
            conf_out,
            conf_in,
            dirty: (0..n).collect(),
            by_addr,
            by_id,
        };
        sim.push(start + FLOW_REPORT, 1, Due::Flows);
        for i in 0..n {
            sim.drain(i);
            let sub = api::encode_request(&Request { op: op::SUBSCRIBE, flags: 0, channel: 1, tag: 0, address: Address::None, payload: Vec::new() });
            let (now, unix) = (sim.now, sim.unix);
            let node = &mut sim.nodes[i];
            node.state.handle_api_datagram(now, unix, &node.model, PROGRAM, &sub);
            sim.drain(i);
        }
        sim
    }

    fn push(&mut self, at: Instant, class: u8, due: Due) {
        self.seq += 1;
        self.queue.push(Reverse(Event { at, class, seq: self.seq, due }));
    }

    /// Node `i`'s peer index for node `j` (`None`: `i` does not know `j`).
    pub fn peer(&self, i: usize, j: usize) -> Option<usize> {
        self.nodes[i].model.index_of(&self.id(j))
    }

    /// The node that is node `i`'s peer `p`.
    pub fn node(&self, i: usize, p: usize) -> Option<usize> {
        let id = self.nodes[i].model.peers.get(p)?.cfg.node_id;
        self.by_id.get(&id).copied()
    }

    /// Node `i`'s node ID.
    pub fn id(&self, i: usize) -> NodeId {
        self.nodes[i].model.local
    }

    fn now_ms(&self) -> u64 {
        self.now.saturating_duration_since(self.start).as_millis() as u64
    }

    fn unix_now(&self) -> u64 {
        self.unix + self.now.saturating_duration_since(self.start).as_secs()
    }

    fn log(&mut self, f: impl FnOnce() -> String) {
        if self.tracing {
            let line = format!("{} {}", self.now_ms(), f());
            self.trace.push(line);
        }
    }

    /// Drops everything from `a` to `b` (and back, if `both`).
    pub fn cut(&mut self, a: usize, b: usize, both: bool) {
        self.dirty.extend([a, b]);
        for d in [(a, b), (b, a)].into_iter().take(if both { 2 } else { 1 }) {
            self.cut.insert(d);
            self.cut_since.entry(d).or_insert(self.now);
        }
        // The session times out then, unless the cut heals first.
        self.push(self.now + SESSION_TIMEOUT, 0, Due::Sessions(vec![a, b]));
    }

    /// Repairs the link between `a` and `b` in both directions.
    pub fn heal(&mut self, a: usize, b: usize) {
        self.dirty.extend([a, b]);
        for d in [(a, b), (b, a)] {
            self.cut.remove(&d);
            self.cut_since.remove(&d);
        }
        self.settle();
    }

    /// Datagrams from `a` to `b` are lost with probability `per_mille`/1000.
    pub fn lossy(&mut self, a: usize, b: usize, per_mille: u64) {
        self.lossy.insert((a, b), per_mille);
    }

    /// An ICMP host unreachable about `b`'s destinations reaches `a` (the kernel's answer to
    /// traffic on a path that failed, as the NFQUEUE classifier hands it on).
    pub fn icmp(&mut self, a: usize, b: usize) {
        let (now, p) = (self.now, self.peer(a, b).expect("a knows b"));
        let node = &mut self.nodes[a];
        node.state.handle_icmp(now, &node.model, p);
        self.drain(a);
        self.settle();
    }

    /// TCP connections from `a` to `b`'s destinations stall (the TCP monitor's report).
    pub fn tcp_stall(&mut self, a: usize, b: usize) {
        let (now, p) = (self.now, self.peer(a, b).expect("a knows b"));
        let node = &mut self.nodes[a];
        node.state.handle_tcp_stall(now, &node.model, p);
        self.drain(a);
        self.settle();
    }

    /// Forwarding traffic from `a` to `b` (its paths are probed at the fast rate).
    pub fn traffic(&mut self, a: usize, b: usize) {
        let Some(p) = self.peer(a, b) else { return };
        let now = self.now;
        let node = &mut self.nodes[a];
        node.state.handle_traffic(now, &node.model, p);
        self.drain(a);
    }

    /// Node `i` crashes: its sessions end, nothing reaches it.
    pub fn crash(&mut self, i: usize) {
        self.nodes[i].alive = false;
        self.dirty.insert(i);
        self.settle();
    }

    /// Whether the session between `a` and `b` can be up: both alive and knowing each
    /// other (a key not in the configuration or the directory is refused), one of them
    /// wanting it (configured, or chosen by its overlay), and no direction cut for longer
    /// than [`SESSION_TIMEOUT`].
    fn session_can(&self, a: usize, b: usize) -> bool {
        let timed_out = [(a, b), (b, a)].iter().any(|d| self.cut_since.get(d).is_some_and(|t| self.now.saturating_duration_since(*t) >= SESSION_TIMEOUT));
        let (pa, pb) = (self.peer(a, b), self.peer(b, a));
        let wanted = |x: usize, px: Option<usize>, y: usize| px.is_some_and(|p| self.nodes[x].model.peers[p].configured) || self.wants_out[x].contains(&y);
        self.nodes[a].alive && self.nodes[b].alive && !timed_out && pa.is_some() && pb.is_some() && (wanted(a, pa, b) || wanted(b, pb, a))
    }

    /// Brings up every management session of the nodes whose sessions may have changed
    /// that can be up, and takes down those that cannot.
    fn settle(&mut self) {
        while let Some(a) = self.dirty.pop_first() {
            let mut others: BTreeSet<usize> = self.adj[a].clone();
            others.extend(self.conf_out[a].iter().chain(self.conf_in[a].iter()).copied());
            others.extend(self.wants_out[a].iter().chain(self.wants_in[a].iter()).copied());
            others.remove(&a);
            for b in others {
                self.session_pair(a.min(b), a.max(b));
            }
        }
    }

    fn session_pair(&mut self, a: usize, b: usize) {
        let can = self.session_can(a, b);
        let cut_now = self.cut.contains(&(a, b)) || self.cut.contains(&(b, a));
        let up = self.sessions.contains(&(a, b));
        if up && !can {
            self.sessions.remove(&(a, b));
            self.adj[a].remove(&b);
            self.adj[b].remove(&a);
            self.log(|| format!("session down n{a} n{b}"));
            for (x, y) in [(a, b), (b, a)] {
                let Some(p) = self.peer(x, y) else { continue };
                let now = self.now;
                let node = &mut self.nodes[x];
                if node.alive {
                    node.state.handle_session_down(now, &node.model, p);
                    self.drain(x);
                }
            }
        } else if !up && can && !cut_now {
            self.sessions.insert((a, b));
            self.adj[a].insert(b);
            self.adj[b].insert(a);
            self.log(|| format!("session up n{a} n{b}"));
            // Keys as the QUIC exporter would give them: the same material on both
            // sides, split by node ID order.
            let mut material = [0u8; wire::EXPORTER_LEN];
            for (k, byte) in material.iter_mut().enumerate() {
                *byte = (self.rng.next_u64() >> (k % 8)) as u8;
            }
            for (x, y) in [(a, b), (b, a)] {
                let secrets = wire::split_exporter(&material, &self.id(x), &self.id(y));
                let (now, p, data) = (self.now, self.peer(x, y).expect("checked"), self.nodes[y].addr);
                let node = &mut self.nodes[x];
                let cmd = DataCommand::InstallSession { peer: p, secrets };
                node.tx.apply(&cmd);
                node.rx.apply(&cmd);
                let configured = node.model.peers[p].configured;
                node.state.handle_session_up(now, &node.model, p, data, Some(node.addr.ip()), configured, configured);
                self.drain(x);
            }
        }
    }

    /// Whether a datagram from node `a` to node `b` gets through now.
    fn passes(&mut self, a: usize, b: usize) -> bool {
        if self.cut.contains(&(a, b)) || !self.nodes[b].alive {
            return false;
        }
        match self.lossy.get(&(a, b)) {
            Some(&pm) => self.rng.below(1000) >= pm,
            None => true,
        }
    }

    /// Whether a management message from `src` to `dst` leaves now (a session is up and
    /// the direction is not cut).
    fn carries(&self, src: usize, dst: usize) -> bool {
        self.adj[src].contains(&dst) && !self.cut.contains(&(src, dst))
    }

    /// Carries out node `i`'s actions, then schedules its timer.
    fn drain(&mut self, i: usize) {
        while let Some(a) = self.nodes[i].state.poll_action() {
            match a {
                NodeAction::Data(DataCommand::SendControl { peer, to, payload }) => {
                    let mut buf = vec![0u8; payload.len() + OVERHEAD];
                    let node = &mut self.nodes[i];
                    node.tx.set_now(self.now.saturating_duration_since(self.start).as_millis() as u64);
                    if let Ok(len) = node.tx.seal_control(peer, &payload, &mut buf) {
                        buf.truncate(len);
                        let from = node.addr;
                        self.send_datagram(from, to, buf);
                    }
                }
                NodeAction::Data(cmd) => {
                    self.log(|| format!("n{i} data {}", short(&cmd)));
                    let node = &mut self.nodes[i];
                    node.tx.apply(&cmd);
                    node.rx.apply(&cmd);
                }
                NodeAction::Send { peer, message, .. } => {
                    let Some(dst) = self.node(i, peer) else { continue };
                    if let Message::RelayRequest { purpose, .. } = &message {
                        self.asked.push((i, dst, purpose.as_str().to_string()));
                    }
                    self.log(|| format!("n{i} -> n{dst} {}", message_kind(&message)));
                    if self.carries(i, dst) {
                        self.push(self.now + self.delay, 2, Due::Flight(Flight::Message { src: i, dst, message }));
                    }
                }
                NodeAction::SendOverlay { to, message, .. } => {
                    let Some(&dst) = self.by_id.get(&to) else { continue };
                    if self.carries(i, dst) {
                        self.push(self.now + self.delay, 2, Due::Flight(Flight::Message { src: i, dst, message }));
                    }
                }
                NodeAction::Api(d) => {
                    let Some(r) = Reply::decode(&d.bytes) else { continue };
                    match r.kind {
                        kind::MESSAGE => {
                            self.log(|| format!("n{i} delivered from {}", r.node.short()));
                            self.delivered.push((i, r.node, r.body));
                        }
                        kind::ACCEPTED => self.accepted.push((i, r.message_id)),
                        kind::DELIVERED => {
                            self.acked.insert((i, r.message_id));
                        }
                        kind::FAILED => {
                            self.failed.insert((i, r.message_id));
                        }
                        _ => {}
                    }
                }
                NodeAction::Learned(rec) => {
                    self.log(|| format!("n{i} learned {}", rec.node_id.short()));
                    // As the shell applies it: the model, then the data plane.
                    let node = &mut self.nodes[i];
                    if let Learned::New(p) | Learned::Changed(p) = node.model.learn(&rec) {
                        let cmd = DataCommand::AddPeer { peer: p, spec: node.model.peer_spec(p) };
                        node.tx.apply(&cmd);
                        node.rx.apply(&cmd);
                    }
                    // A session both sides now know may come up.
                    if let Some(&j) = self.by_id.get(&rec.node_id) {
                        if self.wants_out[i].contains(&j) || self.wants_in[i].contains(&j) {
                            self.dirty.insert(i);
                        }
                    }
                }
                NodeAction::Forgotten(id) => {
                    self.dirty.insert(i);
                    let node = &mut self.nodes[i];
                    if let Some(p) = node.model.forget(&id) {
                        let cmd = DataCommand::RemovePeer { peer: p };
                        node.tx.apply(&cmd);
                        node.rx.apply(&cmd);
                    }
                }
                NodeAction::Neighbours(set) => {
                    let new: BTreeSet<usize> = set.iter().filter_map(|id| self.by_id.get(id).copied()).collect();
                    let old = std::mem::replace(&mut self.wants_out[i], new.clone());
                    for &j in old.difference(&new) {
                        self.wants_in[j].remove(&i);
                        self.dirty.insert(j);
                    }
                    for &j in new.difference(&old) {
                        self.wants_in[j].insert(i);
                        self.dirty.insert(j);
                    }
                    self.dirty.insert(i);
                }
                other => self.log(|| format!("n{i} {}", action_kind(&other))),
            }
        }
        self.schedule(i);
    }

    /// Puts node `i`'s next timer in the queue (once: an earlier entry that no longer
    /// matches is skipped when it comes up).
    fn schedule(&mut self, i: usize) {
        if !self.nodes[i].alive {
            return;
        }
        let mut at = self.nodes[i].state.poll_timeout().max(self.now);
        if self.woken[i] == Some(self.now) && at <= self.now {
            at = self.now + STEP;
        }
        if self.wake[i] != Some(at) {
            self.wake[i] = Some(at);
            self.push(at, 3, Due::Wake(i));
        }
    }

    /// The program on node `a` sends `payload` to node `b` on channel 1 through the local
    /// API; the message ID the API answered with.
    pub fn send_message(&mut self, a: usize, b: usize, payload: &[u8]) -> u64 {
        let req = api::encode_request(&Request { op: op::SEND, flags: 0, channel: 1, tag: 7, address: Address::Node(self.id(b)), payload: payload.to_vec() });
        let (now, unix) = (self.now, self.unix_now());
        let node = &mut self.nodes[a];
        node.state.handle_api_datagram(now, unix, &node.model, PROGRAM, &req);
        self.drain(a);
        self.settle();
        self.accepted.iter().rev().find(|(n, _)| *n == a).map(|(_, id)| *id).expect("the API accepted the message")
    }

    fn send_datagram(&mut self, from: SocketAddr, to: SocketAddr, bytes: Vec<u8>) {
        let (Some(&a), Some(&b)) = (self.by_addr.get(&from), self.by_addr.get(&to)) else { return };
        if self.passes(a, b) {
            self.push(self.now + self.delay, 2, Due::Flight(Flight::Datagram { from, to, bytes }));
        }
    }

    fn deliver(&mut self, f: Flight) {
        match f {
            Flight::Datagram { from, to, mut bytes } => {
                let Some(&b) = self.by_addr.get(&to) else { return };
                if !self.nodes[b].alive {
                    return;
                }
                let now_ms = self.now_ms();
                let now = self.now;
                let node = &mut self.nodes[b];
                match node.rx.decapsulate(&mut bytes, from, now_ms) {
                    Ok(Rx::Control { peer, payload }) => {
                        let payload = bytes[payload].to_vec();
                        node.state.handle_probe(now, &node.model, now, peer, from, &payload);
                        self.drain(b);
                    }
                    Ok(Rx::Forward { to: next }) => {
                        *self.forwarded.entry(b).or_default() += 1;
                        let from = self.nodes[b].addr;
                        self.send_datagram(from, next, bytes);
                    }
                    Ok(Rx::Deliver(_)) | Err(_) => {}
                }
            }
            Flight::Message { src, dst, message } => {
                if !self.nodes[dst].alive || !self.adj[src].contains(&dst) {
                    return;
                }
                let Some(p) = self.peer(dst, src) else { return };
                let (now, unix) = (self.now, self.unix_now());
                let node = &mut self.nodes[dst];
                node.state.handle_message(now, unix, &node.model, p, message);
                self.drain(dst);
            }
        }
    }

    /// Handles one event.
    fn handle(&mut self, due: Due) {
        match due {
            Due::Sessions(v) => self.dirty.extend(v),
            Due::Flows => {
                for (a, b) in self.flows.clone() {
                    if self.nodes[a].alive {
                        self.traffic(a, b);
                    }
                }
                self.push(self.now + FLOW_REPORT, 1, Due::Flows);
            }
            Due::Flight(f) => self.deliver(f),
            Due::Wake(i) => {
                if self.wake[i] != Some(self.now) || !self.nodes[i].alive {
                    return;
                }
                self.wake[i] = None;
                self.woken[i] = Some(self.now);
                let unix = self.unix_now();
                let now = self.now;
                let node = &mut self.nodes[i];
                node.state.handle_timeout(now, unix, &node.model);
                self.drain(i);
            }
        }
        self.settle();
    }

    /// Handles every event due at the next instant, if it is no later than `end`; whether
    /// there was one.
    fn step(&mut self, end: Instant) -> bool {
        let Some(at) = self.queue.peek().map(|e| e.0.at).filter(|t| *t <= end) else { return false };
        self.now = self.now.max(at);
        while self.queue.peek().is_some_and(|e| e.0.at <= at) {
            let Reverse(ev) = self.queue.pop().expect("peeked");
            self.handle(ev.due);
        }
        true
    }

    /// Runs for `d` of simulated time.
    pub fn run(&mut self, d: Duration) {
        let end = self.now + d;
        while self.step(end) {}
        self.now = end;
    }

    /// The path node `a` sends `b`'s traffic on.
    pub fn path(&self, a: usize, b: usize) -> PathId {
        self.nodes[a].state.failover().route(self.peer(a, b).expect("a knows b")).expect("peer").path
    }

    /// Whether node `a` routes `b`'s protected destinations into the overlay.
    pub fn protected(&self, a: usize, b: usize) -> bool {
        self.nodes[a].state.failover().route(self.peer(a, b).expect("a knows b")).expect("peer").protect
    }

    /// Runs until `f` holds (checked after every instant at which something happened), at
    /// most `limit`; how long it took, or `None`.
    pub fn run_until(&mut self, limit: Duration, mut f: impl FnMut(&Sim) -> bool) -> Option<Duration> {
        let t0 = self.now;
        let end = t0 + limit;
        loop {
            if f(self) {
                return Some(self.now - t0);
            }
            if !self.step(end) {
                break;
            }
        }
        self.now = end;
        f(self).then(|| self.now - t0)
    }
}

fn short(cmd: &DataCommand) -> String {
    match cmd {
        DataCommand::SetEndpoint { peer, endpoint } => format!("endpoint {peer} {:?}", endpoint.map(|e| e.remote)),
        DataCommand::SetRelay { a, b, .. } => format!("relay {} {}", a.short(), b.short()),
        DataCommand::ClearRelay { a, b } => format!("clear relay {} {}", a.short(), b.short()),
        DataCommand::SetSplit { peer, routes, .. } => format!("split {peer} {}", routes.len()),
        other => format!("{other:?}").split([' ', '{', '(']).next().unwrap_or("").to_string(),
    }
}

fn message_kind(m: &Message) -> String {
    match m {
        Message::RelayRequest { b, purpose, .. } => format!("relay request {} {}", b.short(), purpose.as_str()),
        Message::RelayResponse { b, accepted, .. } => format!("relay response {} {accepted}", b.short()),
        Message::RelayRelease { b, .. } => format!("relay release {}", b.short()),
        Message::LinkReport { links, .. } => format!("link report {}", links.len()),
        _ => "other".into(),
    }
}

fn action_kind(a: &NodeAction) -> String {
    match a {
        NodeAction::NeedSession(p) => format!("need session {p}"),
        NodeAction::RelayLink { peer, on } => format!("relay link {peer} {on}"),
        NodeAction::ProtectChanged => "protect changed".into(),
        NodeAction::Exits(e) => format!("exits {}", e.len()),
        NodeAction::WatchProtected { net, peer } => format!("watch {net} {peer}"),
        NodeAction::WatchOutside(net) => format!("watch outside {net}"),
        NodeAction::Data(_) | NodeAction::Send { .. } | NodeAction::SendOverlay { .. } | NodeAction::Api(_) | NodeAction::Learned(_) | NodeAction::Forgotten(_) | NodeAction::Neighbours(_) => {
            unreachable!("handled by the caller")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(sim: &Sim, r: usize) -> PathId {
        PathId::Relay(sim.id(r))
    }

    /// Three nodes with traffic between 0 and 1 both ways, settled (sessions, standby
    /// relay paths).
    fn triangle(seed: u64) -> Sim {
        let mut sim = Sim::new(3, seed, |_| String::new());
        sim.flows = vec![(0, 1), (1, 0)];
        sim.run(Duration::from_secs(8));
        assert_eq!(sim.path(0, 1), PathId::Direct);
        sim
    }

    #[test]
    fn a_silent_cut_is_repaired_through_the_relay_whose_data_plane_forwards_and_traffic_returns_after_the_hold_down() {
        let mut sim = triangle(1);
        let before = sim.forwarded.get(&2).copied().unwrap_or(0);
        sim.cut(0, 1, true);
        let took = sim.run_until(Duration::from_secs(2), |s| s.path(0, 1) == relay(s, 2) && s.path(1, 0) == relay(s, 2)).expect("rerouted through n2");
        assert!(took < Duration::from_millis(1500), "{took:?}");
        assert!(sim.protected(0, 1) && sim.protected(1, 0));
        sim.run(Duration::from_secs(1));
        // The relay's own data plane forwards the probes of the relayed path (its relay
        // server admitted the session and installed it).
        assert!(sim.forwarded.get(&2).copied().unwrap_or(0) > before + 10, "{:?}", sim.forwarded);
        assert!(sim.asked.iter().any(|(a, r, _)| *a == 0 && *r == 2));
        sim.heal(0, 1);
        let back = sim.run_until(Duration::from_secs(10), |s| s.path(0, 1) == PathId::Direct).expect("back on the direct path");
        assert!(back >= Duration::from_secs(2), "the hold-down kept it on the relay a while: {back:?}");
        assert!(!sim.protected(0, 1));
    }

    #[test]
    fn an_icmp_unreachable_reroutes_at_once() {
        let mut sim = triangle(2);
        sim.cut(0, 1, true);
        sim.icmp(0, 1);
        let took = sim.run_until(Duration::from_secs(1), |s| s.path(0, 1) == relay(s, 2)).expect("rerouted");
        assert!(took < Duration::from_millis(100), "{took:?}");
    }

    #[test]
    fn twenty_percent_loss_on_the_direct_path_moves_nothing() {
        let mut sim = triangle(12);
        sim.lossy(0, 1, 200);
        sim.lossy(1, 0, 200);
        for _ in 0..200 {
            sim.run(Duration::from_millis(100));
            assert_eq!(sim.path(0, 1), PathId::Direct, "moved at {} ms", sim.now_ms());
            assert_eq!(sim.path(1, 0), PathId::Direct, "moved at {} ms", sim.now_ms());
        }
    }

    #[test]
    fn a_tcp_stall_reroutes_only_when_probes_confirm_the_path_is_down() {
        let mut sim = triangle(13);
        // A stall on a healthy path (the far host is slow, not the path): nothing moves.
        sim.tcp_stall(0, 1);
        sim.run(Duration::from_secs(3));
        assert_eq!(sim.path(0, 1), PathId::Direct);
        // A stall on a path that died: the confirmation probes find it down.
        sim.cut(0, 1, true);
        sim.run(Duration::from_millis(50));
        sim.tcp_stall(0, 1);
        let took = sim.run_until(Duration::from_secs(2), |s| s.path(0, 1) == relay(s, 2)).expect("rerouted");
        assert!(took < Duration::from_millis(1500), "{took:?}");
    }

    #[test]
    fn when_the_relay_in_use_crashes_the_traffic_moves_to_another_relay() {
        let mut sim = Sim::new(4, 14, |_| String::new());
        sim.flows = vec![(0, 1), (1, 0)];
        sim.run(Duration::from_secs(8));
        sim.cut(0, 1, true);
        sim.run_until(Duration::from_secs(2), |s| matches!(s.path(0, 1), PathId::Relay(_))).expect("through a relay");
        let PathId::Relay(first) = sim.path(0, 1) else { unreachable!() };
        let r = sim.by_id[&first];
        let other = if r == 2 { 3 } else { 2 };
        sim.run(Duration::from_secs(1));
        sim.crash(r);
        let took = sim.run_until(Duration::from_secs(3), |s| s.path(0, 1) == relay(s, other)).expect("through the other relay");
        assert!(took < Duration::from_millis(1500), "{took:?}");
        assert!(sim.protected(0, 1), "still protected: the direct path is cut");
    }

    #[test]
    fn a_one_way_failure_reroutes_only_the_broken_direction() {
        let mut sim = triangle(3);
        sim.cut(0, 1, false);
        sim.run_until(Duration::from_secs(3), |s| s.path(0, 1) == relay(s, 2)).expect("0 -> 1 rerouted");
        sim.run(Duration::from_secs(2));
        assert_eq!(sim.path(0, 1), relay(&sim, 2));
        assert_eq!(sim.path(1, 0), PathId::Direct, "the working direction stays direct");
    }

    #[test]
    fn relays_are_used_by_their_policy_never_ones_are_not_asked_and_a_last_resort_only_when_no_other_works() {
        // n2 never relays, n3 relays on failure only, n4 is a last resort.
        let policy = |i: usize| match i {
            2 => "commitment = \"never\"".to_string(),
            3 => "commitment = \"failure\"".to_string(),
            4 => "commitment = \"last_resort\"".to_string(),
            _ => String::new(),
        };
        let mut sim = Sim::new(5, 4, policy);
        sim.flows = vec![(0, 1), (1, 0)];
        sim.run(Duration::from_secs(8));
        sim.cut(0, 1, true);
        sim.run_until(Duration::from_secs(3), |s| s.path(0, 1) == relay(s, 3)).expect("through the failure-only relay");
        sim.run(Duration::from_secs(1));
        assert!(!sim.asked.iter().any(|(_, r, _)| *r == 2), "a never relay was asked: {:?}", sim.asked);
        assert_ne!(sim.path(0, 1), relay(&sim, 4), "the last resort is not used while another works");
        // The failure-only relay fails too: the last resort takes over.
        sim.crash(3);
        sim.run_until(Duration::from_secs(4), |s| s.path(0, 1) == relay(s, 4)).expect("through the last resort");
        assert!(sim.asked.iter().any(|(a, r, _)| *a == 0 && *r == 4));
        assert!(!sim.asked.iter().any(|(_, r, _)| *r == 2), "{:?}", sim.asked);
    }

    #[test]
    fn a_relay_refuses_by_its_own_policy_whatever_the_requester_thinks() {
        // n2 relays on failure only: a request for performance traffic is refused and
        // counted, one for failover accepted.
        let mut sim = Sim::new(3, 5, |i| if i == 2 { "commitment = \"failure\"".to_string() } else { String::new() });
        sim.run(Duration::from_secs(3));
        let (a, b) = (sim.id(0), sim.id(1));
        for purpose in [crate::node::policy::Purpose::Performance, crate::node::policy::Purpose::Failover] {
            let (now, p) = (sim.now, sim.peer(2, 0).unwrap());
            let node = &mut sim.nodes[2];
            node.state.handle_message(now, 0, &node.model, p, Message::RelayRequest { a, b, purpose });
        }
        let mut answers = Vec::new();
        while let Some(act) = sim.nodes[2].state.poll_action() {
            if let NodeAction::Send { message: Message::RelayResponse { accepted, .. }, .. } = act {
                answers.push(accepted);
            }
        }
        assert_eq!(answers, vec![false, true]);
        let refused: u64 = sim.nodes[2].state.refusals().iter().map(|(_, n)| n).sum();
        assert_eq!(refused, 1);
    }

    #[test]
    fn a_management_message_crosses_a_silent_cut_through_another_neighbour() {
        // The node state finds the direct path down and tells the overlay, which routes
        // around it long before the session between the two times out.
        let mut sim = triangle(6);
        let before = sim.send_message(0, 1, b"before");
        sim.run(Duration::from_secs(1));
        assert!(sim.acked.contains(&(0, before)), "delivered on a healthy overlay");
        sim.cut(0, 1, true);
        sim.run_until(Duration::from_secs(2), |s| s.path(0, 1) == relay(s, 2)).expect("path control saw the cut");
        let id = sim.send_message(0, 1, b"across the cut");
        let took = sim.run_until(Duration::from_secs(3), |s| s.acked.contains(&(0, id))).expect("acknowledged end to end");
        assert!(took < Duration::from_secs(1), "{took:?}");
        assert!(sim.delivered.iter().any(|(n, src, p)| *n == 1 && *src == sim.id(0) && p == b"across the cut"));
        assert!(sim.failed.is_empty());
        let id1 = sim.id(1);
        assert!(sim.nodes[0].state.overlay().sessions().any(|(id, _, usable)| *id == id1 && !usable), "the overlay was told the session is unusable: {:#?}", sim.nodes[0].state.failover().paths(0));
    }

    #[test]
    fn a_node_joins_through_one_contact_and_is_reached_through_the_directory() {
        // n0..n4 know each other; n5 knows only n0 (and n0 it): the others learn n5 from
        // the directory, sessions follow the overlays' neighbour choice, and a program on n3
        // reaches n5.
        let n = 6;
        let configured = |i: usize, j: usize| (i < 5 && j < 5) || (i, j) == (0, 5) || (i, j) == (5, 0);
        let mut sim = Sim::with(n, 8, |_| String::new(), configured);
        assert!(sim.peer(3, 5).is_none() && sim.peer(5, 3).is_none());
        sim.run_until(Duration::from_secs(20), |s| (0..n).all(|i| (0..n).all(|j| i == j || s.peer(i, j).is_some()))).expect("every node knows every other");
        assert!(sim.trace.iter().any(|t| t.contains(&format!("n3 learned {}", sim.id(5).short()))));
        let id = sim.send_message(3, 5, b"welcome");
        sim.run_until(Duration::from_secs(5), |s| s.acked.contains(&(3, id))).expect("acknowledged end to end");
        assert!(sim.delivered.iter().any(|(node, src, p)| *node == 5 && *src == sim.id(3) && p == b"welcome"));
        // The path control takes the learned peers in at its next event or timeout.
        sim.run(Duration::from_secs(2));
        let rows = sim.nodes[5].state.routes(sim.now, 0, &sim.nodes[5].model);
        assert_eq!(rows.len(), n - 1, "the joined node's state has a peer for every node");
        // Sessions beyond its one contact, chosen by the overlays.
        assert!(sim.sessions.iter().any(|&(a, b)| (a == 5 || b == 5) && a != 0), "{:?}", sim.sessions);
    }

    #[test]
    fn thirty_nodes_from_one_bootstrap_contact_deliver_every_message_after_ten_percent_fail() {
        // Every node is configured with n0 only; the rest comes from the directory. Three
        // nodes crash; messages between every live node and five others are all
        // acknowledged end to end.
        let n = 30;
        let mut sim = Sim::with(n, 9, |_| String::new(), |i, j| i == 0 || j == 0);
        sim.run_until(Duration::from_secs(30), |s| (0..n).all(|i| (0..n).all(|j| i == j || s.peer(i, j).is_some()))).expect("directories complete");
        sim.run(Duration::from_secs(5));
        for i in [7, 17, 27] {
            sim.crash(i);
        }
        sim.run(Duration::from_secs(8));
        let live: Vec<usize> = (0..n).filter(|i| sim.nodes[*i].alive).collect();
        let mut rng = Rng::new(99);
        let mut sent = Vec::new();
        for &a in &live {
            for _ in 0..5 {
                let b = loop {
                    let b = live[rng.below(live.len() as u64) as usize];
                    if b != a {
                        break b;
                    }
                };
                sent.push((a, sim.send_message(a, b, b"m")));
            }
        }
        sim.run(Duration::from_secs(10));
        let acked = sent.iter().filter(|k| sim.acked.contains(k)).count();
        let ratio = acked as f64 / sent.len() as f64;
        assert!(ratio >= 0.999, "{acked} of {} acknowledged; failed {:?}", sent.len(), sim.failed.len());
    }

    /// `n` nodes, each configured with one contact (a random earlier node, which is
    /// configured with it in turn); the rest they learn from the directory. Once every
    /// directory is complete, a tenth of the nodes crash; after the sessions to them time
    /// out, every live node sends `per_node` messages to random live nodes. Returns
    /// (acknowledged, sent).
    fn overlay_after_failures(n: usize, seed: u64, per_node: usize) -> (usize, usize) {
        let mut rng = Rng::new(seed);
        let contact: Vec<usize> = (0..n).map(|i| if i == 0 { 0 } else { rng.below(i as u64) as usize }).collect();
        let wall = std::time::Instant::now();
        let mut sim = Sim::with(n, seed, |_| String::new(), |i, j| i != j && (contact[i] == j || contact[j] == i));
        sim.tracing = false;
        eprintln!("{n} nodes: set up in {:.1} s", wall.elapsed().as_secs_f64());
        let complete = |s: &Sim| s.nodes.iter().all(|x| x.state.overlay().directory().len() >= n);
        // Checked every 100 ms of simulated time (a check reads 1,000 directories).
        let t0 = sim.now;
        while !complete(&sim) {
            assert!(sim.now < t0 + Duration::from_secs(60), "directories still incomplete after 60 s");
            sim.run(Duration::from_millis(100));
        }
        let took = sim.now - t0;
        eprintln!("{n} nodes: every directory complete after {:.1} s simulated ({:.1} s wall)", took.as_secs_f64(), wall.elapsed().as_secs_f64());
        sim.run(Duration::from_secs(1));
        let mut crashed = BTreeSet::new();
        while crashed.len() < n / 10 {
            crashed.insert(rng.below(n as u64) as usize);
        }
        for &i in &crashed {
            sim.crash(i);
        }
        // The sessions to them time out; the overlays choose other neighbours.
        sim.run(SESSION_TIMEOUT + Duration::from_secs(2));
        let live: Vec<usize> = (0..n).filter(|i| sim.nodes[*i].alive).collect();
        let mut sent = Vec::new();
        for &a in &live {
            for _ in 0..per_node {
                let b = loop {
                    let b = live[rng.below(live.len() as u64) as usize];
                    if b != a {
                        break b;
                    }
                };
                sent.push((a, sim.send_message(a, b, b"m")));
            }
        }
        // Every message is acknowledged or given up within this long.
        let t1 = sim.now;
        while sim.now < t1 + Duration::from_secs(10) && !sent.iter().all(|k| sim.acked.contains(k) || sim.failed.contains(k)) {
            sim.run(Duration::from_millis(100));
        }
        eprintln!("{n} nodes: messages sent and run ({:.1} s wall)", wall.elapsed().as_secs_f64());
        (sent.iter().filter(|k| sim.acked.contains(k)).count(), sent.len())
    }

    /// `SIM_N` in the environment changes the number of nodes (to profile smaller runs).
    #[test]
    fn a_thousand_nodes_from_one_contact_each_deliver_every_message_after_ten_percent_crash() {
        let started = std::time::Instant::now();
        let (acked, sent) = overlay_after_failures(std::env::var("SIM_N").ok().and_then(|v| v.parse().ok()).unwrap_or(1000), 11, 2);
        let ratio = acked as f64 / sent as f64;
        assert!(ratio >= 0.999, "{acked} of {sent} acknowledged");
        eprintln!("1,000 nodes: {acked} of {sent} messages acknowledged; {:.1} s wall", started.elapsed().as_secs_f64());
    }

    #[test]
    fn replex_splits_over_the_direct_path_and_a_relay_and_the_failover_takes_the_direct_share_away() {
        // n0 runs REPLEX with equal shares towards n1: the data plane gets a split over the
        // direct path and the relay n2, the kernel a weighted group; when the direct path
        // dies, failover protects the destinations and the split keeps only the relay.
        let mut sim = Sim::with(3, 10, |i| if i == 0 { "[replex]\nenabled = true\nmode = \"equal\"\n".into() } else { String::new() }, |_, _| true);
        sim.flows = vec![(0, 1), (1, 0)];
        sim.run(Duration::from_secs(10));
        let p = sim.peer(0, 1).unwrap();
        let last_split = |s: &Sim| s.trace.iter().rev().find(|t| t.contains(&format!(" n0 data split {p} "))).and_then(|t| t.rsplit(' ').next()).and_then(|n| n.parse::<usize>().ok());
        assert_eq!(last_split(&sim), Some(2), "direct and via n2");
        let pr = sim.nodes[0].state.protect()[p].clone().expect("REPLEX weights for the kernel");
        let (direct, overlay) = pr.split.expect("a split");
        assert!(direct > 0 && overlay > 0 && u32::from(direct) + u32::from(overlay) == 256, "{direct} {overlay}");
        sim.cut(0, 1, true);
        sim.run_until(Duration::from_secs(3), |s| s.path(0, 1) == relay(s, 2)).expect("failover");
        sim.run(Duration::from_millis(200));
        assert_eq!(last_split(&sim), Some(1), "only the relay is live");
        let pr = sim.nodes[0].state.protect()[p].clone().expect("protected");
        assert_eq!(pr.split, None, "the whole destination goes through the overlay");
    }

    #[test]
    fn the_same_seed_gives_the_same_trace() {
        let run = |seed| {
            let mut sim = triangle(seed);
            sim.cut(0, 1, true);
            sim.run(Duration::from_secs(3));
            sim.heal(0, 1);
            sim.run(Duration::from_secs(5));
            sim.trace
        };
        let (a, b) = (run(7), run(7));
        assert!(a.len() > 20, "{a:?}");
        assert_eq!(a, b);
        // And with the directory and the overlays' random choices at work: ten nodes that
        // know only n0 at first, a crash, messages.
        let join = |seed| {
            let mut sim = Sim::with(10, seed, |_| String::new(), |i, j| i == 0 || j == 0);
            sim.run(Duration::from_secs(10));
            sim.crash(4);
            sim.run(Duration::from_secs(8));
            let id = sim.send_message(3, 7, b"m");
            sim.run(Duration::from_secs(3));
            assert!(sim.acked.contains(&(3, id)));
            sim.trace
        };
        let (a, b) = (join(8), join(8));
        assert!(a.iter().any(|t| t.contains("learned")) && a.len() > 100, "{}", a.len());
        assert_eq!(a, b);
    }
}
