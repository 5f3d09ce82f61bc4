//! The management overlay of thousands of nodes in one process: the real sans-IO
//! [`Overlay`] core of every node (directory, gossip, neighbour choice, message routing)
//! on a simulated underlay and clock, seeded and deterministic.
//!
//! `cargo run --release --example scale_sim -- [N ...]` (default 1000): for each N, N nodes
//! join (each configured with one bootstrap peer, a random node that joined before it),
//! then: the time until every directory lists every node, the time for one more node's
//! join to reach every directory, the messages and bytes a node sends per directory change
//! and the time a node spends on it, memory per node and per record; then 10 % of the
//! nodes fail at random and acknowledged messages go between random live pairs. Prints
//! progress on stderr and one JSON line (keys `sim_<N>_...`) on stdout.
//!
//! The underlay: every pair of nodes has a fixed one-way delay of 2-20 ms; a session is up
//! from the tick after either end wants it; a failed node's sessions are noticed after the
//! management session's idle timeout (6 s). Signatures are checked once per record for the
//! whole process (a shared `CachedVerifier`: the same bytes give the same answer at every
//! node), so that 10,000 directories of 10,000 records can be simulated on one core.
//! With `SIM_COUNT` set in the environment it also prints the messages sent by kind
//! once the directories are complete.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use detour::identity::{Identity, NodeId};
use detour::overlay::directory::{CachedVerifier, Uptime};
use detour::overlay::{Out, Overlay, OverlayConfig, OwnInfo};
use detour::wire::mgmt::Message;

/// How long a failed node's sessions look alive to the other end.
const SESSION_TIMEOUT: Duration = Duration::from_secs(6);
/// The overlay's tick.
const TICK: Duration = Duration::from_millis(100);

struct Event {
    at: Duration,
    seq: u64,
    from: u32,
    to: u32,
    message: Message,
}

impl PartialEq for Event {
    fn eq(&self, o: &Event) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
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
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

/// Traffic counters.
#[derive(Default, Clone, Copy)]
struct Traffic {
    messages: u64,
    bytes: u64,
}

struct Sim {
    t0: Instant,
    now: Duration,
    nodes: Vec<Option<Overlay>>,
    ids: Vec<NodeId>,
    index: HashMap<NodeId, u32>,
    configured: Vec<Option<u32>>,
    /// What each node wants sessions with (its chosen neighbours).
    chosen: Vec<BTreeSet<u32>>,
    /// Sessions, both ends listed.
    adj: Vec<BTreeSet<u32>>,
    /// Links of failed nodes, torn down at the given time.
    dying: Vec<(Duration, u32)>,
    queue: BinaryHeap<Reverse<Event>>,
    seq: u64,
    traffic: Traffic,
    acked: BTreeSet<(u32, u64)>,
    failed: BTreeSet<(u32, u64)>,
    verifier: Arc<CachedVerifier>,
    rng: u64,
    wants_sync: BTreeSet<u32>,
    /// Messages by kind (with SIM_COUNT set).
    kinds: std::collections::BTreeMap<&'static str, u64>,
}

fn ident(i: u32) -> Identity {
    let mut seed = [3u8; 32];
    seed[..4].copy_from_slice(&i.to_be_bytes());
    Identity::from_seed(seed)
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status").ok().and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())).unwrap_or(0)
}

/// Bytes a message takes on a management session (length, header, JSON body); records are
/// counted by their signed size without encoding them again.
fn wire_size(m: &Message) -> u64 {
    let frame = 4 + 36;
    match m {
        Message::Records { records, .. } => frame + 16 + records.iter().map(|r| (r.body().len() + r.sig().len() + 20) as u64).sum::<u64>(),
        other => frame + serde_json::to_vec(other).map(|v| v.len() as u64).unwrap_or(0),
    }
}

impl Sim {
    fn new(n: u32, seed: u64) -> Sim {
        let ids: Vec<NodeId> = (0..n).map(|i| ident(i).node_id()).collect();
        Sim {
            t0: Instant::now(),
            now: Duration::ZERO,
            nodes: (0..n).map(|_| None).collect(),
            index: ids.iter().enumerate().map(|(i, id)| (*id, i as u32)).collect(),
            ids,
            configured: vec![None; n as usize],
            chosen: vec![BTreeSet::new(); n as usize],
            adj: vec![BTreeSet::new(); n as usize],
            dying: Vec::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            traffic: Traffic::default(),
            acked: BTreeSet::new(),
            failed: BTreeSet::new(),
            verifier: Arc::new(CachedVerifier::default()),
            rng: seed | 1,
            wants_sync: BTreeSet::new(),
            kinds: Default::default(),
        }
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn instant(&self) -> Instant {
        self.t0 + self.now
    }

    fn unix(&self) -> u64 {
        1_800_000_000 + self.now.as_secs()
    }

    fn latency(a: u32, b: u32) -> Duration {
        let (x, y) = (a.min(b) as u64, a.max(b) as u64);
        let h = (x.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ y.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)) >> 40;
        Duration::from_millis(2 + h % 19)
    }

    fn alive(&self, i: u32) -> bool {
        self.nodes[i as usize].is_some()
    }

    fn start(&mut self, i: u32, bootstrap: Option<u32>) {
        let info = OwnInfo {
            name: format!("n{i}"),
            endpoints: vec![SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 7720))],
            relay: true,
            uptime: Some(Uptime::Stable),
            ..OwnInfo::default()
        };
        let mut o = Overlay::new(ident(i), OverlayConfig::default(), info, self.instant(), self.unix(), u64::from(i) + 1);
        o.set_verifier(self.verifier.clone());
        self.nodes[i as usize] = Some(o);
        self.configured[i as usize] = bootstrap;
        self.wants_sync.insert(i);
    }

    fn fail(&mut self, i: u32) {
        self.nodes[i as usize] = None;
        self.dying.push((self.now + SESSION_TIMEOUT, i));
    }

    fn wants(&self, a: u32, b: u32) -> bool {
        self.configured[a as usize] == Some(b) || self.configured[b as usize] == Some(a) || self.chosen[a as usize].contains(&b) || self.chosen[b as usize].contains(&a)
    }

    fn pump(&mut self, i: u32) {
        loop {
            let Some(o) = self.nodes[i as usize].as_mut().and_then(|n| n.poll()) else { return };
            match o {
                Out::Send { to, message, .. } => {
                    let j = self.index[&to];
                    if std::env::var_os("SIM_COUNT").is_some() {
                        let kind = match &message {
                            Message::Records { records, .. } => {
                                *self.kinds.entry("record copies").or_default() += records.len() as u64;
                                "records"
                            }
                            Message::Digest { entries, .. } => {
                                *self.kinds.entry("digest entries").or_default() += entries.len() as u64;
                                "digest"
                            }
                            Message::Want { .. } => "want",
                            Message::IHave { entries } => {
                                *self.kinds.entry("announced entries").or_default() += entries.len() as u64;
                                "ihave"
                            }
                            Message::Prune => "prune",
                            Message::Summary { .. } => "summary",
                            Message::Routed { .. } => "routed",
                            _ => "other",
                        };
                        *self.kinds.entry(kind).or_default() += 1;
                    }
                    self.traffic.messages += 1;
                    self.traffic.bytes += wire_size(&message);
                    self.seq += 1;
                    self.queue.push(Reverse(Event { at: self.now + Sim::latency(i, j), seq: self.seq, from: i, to: j, message }));
                }
                Out::Neighbours(set) => {
                    self.chosen[i as usize] = set.iter().filter_map(|id| self.index.get(id).copied()).collect();
                    self.wants_sync.insert(i);
                }
                Out::Delivered { id } => {
                    self.acked.insert((i, id));
                }
                Out::Failed { id } => {
                    self.failed.insert((i, id));
                }
                _ => {}
            }
        }
    }

    /// Sessions follow what the nodes that changed their wishes want.
    fn sessions(&mut self) {
        let changed = std::mem::take(&mut self.wants_sync);
        for a in changed {
            if !self.alive(a) {
                continue;
            }
            let mut want: BTreeSet<u32> = self.chosen[a as usize].clone();
            want.extend(self.configured[a as usize]);
            for b in want {
                if b != a && self.alive(b) && !self.adj[a as usize].contains(&b) {
                    self.adj[a as usize].insert(b);
                    self.adj[b as usize].insert(a);
                    let now = self.instant();
                    let conf = self.configured[a as usize] == Some(b) || self.configured[b as usize] == Some(a);
                    let (ia, ib) = (self.ids[a as usize], self.ids[b as usize]);
                    self.nodes[a as usize].as_mut().expect("alive").session_up(now, ib, conf);
                    self.nodes[b as usize].as_mut().expect("alive").session_up(now, ia, conf);
                    self.pump(a);
                    self.pump(b);
                }
            }
            // Links neither end wants any more close.
            let mine: Vec<u32> = self.adj[a as usize].iter().copied().filter(|b| !self.wants(a, *b)).collect();
            for b in mine {
                self.drop_link(a, b);
            }
        }
        let now = self.now;
        let due: Vec<u32> = self.dying.iter().filter(|(t, _)| *t <= now).map(|(_, i)| *i).collect();
        self.dying.retain(|(t, _)| *t > now);
        for i in due {
            let gone: Vec<u32> = self.adj[i as usize].iter().copied().collect();
            for b in gone {
                self.drop_link(i, b);
            }
        }
    }

    fn drop_link(&mut self, x: u32, y: u32) {
        self.adj[x as usize].remove(&y);
        self.adj[y as usize].remove(&x);
        for (a, b) in [(x, y), (y, x)] {
            let id = self.ids[b as usize];
            if let Some(n) = self.nodes[a as usize].as_mut() {
                n.session_down(id);
            }
        }
    }

    /// Runs the simulation for `d`.
    fn run(&mut self, d: Duration) {
        let end = self.now + d;
        let mut next_tick = Duration::from_millis((self.now.as_millis() as u64 / TICK.as_millis() as u64 + 1) * TICK.as_millis() as u64);
        while self.now < end {
            while self.queue.peek().is_some_and(|e| e.0.at <= next_tick) {
                let Reverse(ev) = self.queue.pop().expect("peeked");
                self.now = self.now.max(ev.at);
                // Lost when the session is gone or the receiver failed.
                if !self.adj[ev.to as usize].contains(&ev.from) || !self.alive(ev.to) {
                    continue;
                }
                let (now, unix, from) = (self.instant(), self.unix(), self.ids[ev.from as usize]);
                self.nodes[ev.to as usize].as_mut().expect("alive").handle(now, unix, from, ev.message);
                self.pump(ev.to);
            }
            self.now = next_tick;
            let (now, unix) = (self.instant(), self.unix());
            for i in 0..self.nodes.len() as u32 {
                if let Some(n) = self.nodes[i as usize].as_mut() {
                    n.tick(now, unix);
                    self.pump(i);
                }
            }
            self.sessions();
            next_tick += TICK;
        }
    }

    fn live(&self) -> Vec<u32> {
        (0..self.nodes.len() as u32).filter(|i| self.alive(*i)).collect()
    }

    /// How many live nodes list node `j`.
    fn knowing(&self, j: u32) -> usize {
        let id = self.ids[j as usize];
        self.nodes.iter().flatten().filter(|n| n.directory().get(&id).is_some()).count()
    }

    /// Whether every live node lists every one of `n` records (directory sizes suffice
    /// before anything fails: records are only added).
    fn complete(&self, n: usize) -> bool {
        self.nodes.iter().flatten().all(|o| o.directory().len() >= n)
    }
}

fn run(n: u32) -> serde_json::Value {
    let wall = Instant::now();
    let rss0 = rss_kb();
    let mut s = Sim::new(n + 1, 0x5eed ^ u64::from(n));
    let log = |s: &Sim, what: &str| eprintln!("[sim {n}] {:>7.1} s simulated, {:>6.1} s wall: {what}", s.now.as_secs_f64(), wall.elapsed().as_secs_f64());
    // Join: 1,000 nodes a second, each with a random earlier node as its bootstrap peer.
    let per_tick = (n / 100).clamp(1, 100);
    let mut started = 0;
    while started < n {
        for _ in 0..per_tick.min(n - started) {
            let boot = if started == 0 { None } else { Some((s.random() % u64::from(started)) as u32) };
            s.start(started, boot);
            started += 1;
        }
        s.run(TICK);
    }
    log(&s, "all nodes started");
    let join_end = s.now;
    while !s.complete(n as usize) {
        s.run(Duration::from_secs(1));
        if s.now > join_end + Duration::from_secs(600) {
            break;
        }
    }
    let converge_s = (s.now - join_end).as_secs_f64();
    log(&s, &format!("every directory lists every node, {converge_s:.1} s after the last start"));
    if !s.kinds.is_empty() {
        eprintln!("[sim {n}] messages so far: {:?}", s.kinds);
    }
    s.run(Duration::from_secs(20));
    let rss1 = rss_kb();
    // One more node joins the converged overlay: the time until every directory lists it,
    // and what the overlay sent for that change.
    let before = s.traffic;
    let cpu0 = Instant::now();
    let t_join = s.now;
    let boot = (s.random() % u64::from(n)) as u32;
    s.start(n, Some(boot));
    while s.knowing(n) < n as usize + 1 && s.now < t_join + Duration::from_secs(60) {
        s.run(TICK);
    }
    let join_s = (s.now - t_join).as_secs_f64();
    s.run(Duration::from_secs(5));
    let join_wall = cpu0.elapsed().as_secs_f64();
    let after = s.traffic;
    let per_change_msgs = (after.messages - before.messages) as f64 / f64::from(n + 1);
    let per_change_bytes = (after.bytes - before.bytes) as f64 / f64::from(n + 1);
    log(&s, &format!("a join reached every directory in {join_s:.2} s; {per_change_msgs:.1} messages, {per_change_bytes:.0} bytes per node"));
    // Idle: what a node sends per second with nothing changing.
    let before = s.traffic;
    s.run(Duration::from_secs(30));
    let idle_bytes = (s.traffic.bytes - before.bytes) as f64 / 30.0 / f64::from(n + 1);
    let idle_msgs = (s.traffic.messages - before.messages) as f64 / 30.0 / f64::from(n + 1);
    // 10 % fail at random.
    let mut victims = BTreeSet::new();
    while victims.len() < (n / 10) as usize {
        victims.insert((s.random() % u64::from(n + 1)) as u32);
    }
    for &v in &victims {
        s.fail(v);
    }
    log(&s, &format!("{} nodes failed", victims.len()));
    s.run(Duration::from_secs(30));
    // Messages between random live pairs.
    let live = s.live();
    let count = 2000usize;
    let mut sent: Vec<(u32, u64)> = Vec::new();
    for k in 0..count {
        let a = live[(s.random() % live.len() as u64) as usize];
        let mut b = a;
        while b == a {
            b = live[(s.random() % live.len() as u64) as usize];
        }
        let (now, dst) = (s.instant(), s.ids[b as usize]);
        let id = s.nodes[a as usize].as_mut().expect("live").send(now, dst, 1, &(k as u32).to_be_bytes(), false);
        sent.push((a, id));
        s.pump(a);
        if k % 100 == 99 {
            s.run(TICK);
        }
    }
    s.run(Duration::from_secs(30));
    let delivered = sent.iter().filter(|(a, id)| s.acked.contains(&(*a, *id))).count();
    let ratio = delivered as f64 / count as f64;
    log(&s, &format!("messages between live pairs: {delivered}/{count} acknowledged"));
    let records = f64::from(n + 1) * f64::from(n + 1);
    let k = format!("sim_{n}_");
    let mut r = serde_json::Map::new();
    let mut put = |key: &str, v: serde_json::Value| {
        r.insert(format!("{k}{key}"), v);
    };
    put("converge_s", serde_json::json!((converge_s * 10.0).round() / 10.0));
    put("join_s", serde_json::json!((join_s * 100.0).round() / 100.0));
    put("msgs_per_node_per_change", serde_json::json!((per_change_msgs * 10.0).round() / 10.0));
    put("bytes_per_node_per_change", serde_json::json!(per_change_bytes.round()));
    put("wall_us_per_node_per_change", serde_json::json!((join_wall * 1e6 / f64::from(n + 1) * 10.0).round() / 10.0));
    put("idle_msgs_per_node_per_s", serde_json::json!((idle_msgs * 100.0).round() / 100.0));
    put("idle_bytes_per_node_per_s", serde_json::json!(idle_bytes.round()));
    put("rss_mb", serde_json::json!(rss1 / 1024));
    put("bytes_per_record_held", serde_json::json!((((rss1.saturating_sub(rss0)) as f64 * 1024.0 / records) * 10.0).round() / 10.0));
    put("kb_per_node", serde_json::json!(((rss1.saturating_sub(rss0)) as f64 / f64::from(n + 1)).round()));
    put("failed_nodes", serde_json::json!(victims.len()));
    put("msg_delivery_ratio", serde_json::json!((ratio * 10000.0).round() / 10000.0));
    put("wall_s", serde_json::json!((wall.elapsed().as_secs_f64() * 10.0).round() / 10.0));
    serde_json::Value::Object(r)
}

fn main() {
    let sizes: Vec<u32> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let sizes = if sizes.is_empty() { vec![1000] } else { sizes };
    let mut all = serde_json::Map::new();
    for n in sizes {
        if let serde_json::Value::Object(m) = run(n) {
            all.extend(m);
        }
    }
    println!("{}", serde_json::Value::Object(all));
}

#[cfg(test)]
mod tests {
    /// The same run as the benchmark, small enough for the test suite: every directory
    /// complete, a join everywhere within a second, every message between live pairs
    /// acknowledged after 10 % of the nodes failed, and idle anti-entropy of a few hundred
    /// bytes per second per node.
    #[test]
    fn two_hundred_nodes_converge_recover_and_deliver() {
        let r = super::run(200);
        let f = |k: &str| r[format!("sim_200_{k}")].as_f64().unwrap_or_else(|| panic!("{k} missing in {r}"));
        assert!(f("converge_s") < 10.0, "{r}");
        assert!(f("join_s") < 1.0, "{r}");
        assert_eq!(f("failed_nodes"), 20.0);
        assert!(f("msg_delivery_ratio") >= 0.999, "{r}");
        assert!(f("idle_bytes_per_node_per_s") < 1000.0, "{r}");
    }
}
