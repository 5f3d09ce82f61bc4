//! The failover engine task: drives the core's [`NodeState`] (failover, relay server,
//! REPLEX, exits, link reports) and carries out its actions: probes and endpoints through
//! the data path, management messages over the QUIC sessions, protected routes and exits
//! in the kernel, sessions wanted from the session supervisor. No decision is made here.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::node::model::{Model, Protect};
use crate::node::state::{NodeAction, NodeState, RouteStatus};
use crate::path::icmp::Filter;
use crate::shell::datapath::{DataEvent, DataPath};
use crate::shell::intercept::Alarm;
use crate::shell::mnode::{unix_now, OverlayEvent};
use crate::shell::quic;
use crate::shell::supervise::{self, Part};
use crate::wire::mgmt::{Frame, Message};

/// A session the engine needs opened (or no longer needs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Forwarding traffic waits for a session to this peer.
    Data(usize),
    /// A relay session this node serves needs a session to this peer (on), or no longer
    /// does (off).
    Relay(usize, bool),
}

/// Data-path events taken at once after the first, before the core is asked when to wake.
const DATA_BATCH: usize = 64;

/// Events for the engine from the management sessions.
#[derive(Debug)]
pub enum SessionEvent {
    /// A management session with data keys is up.
    Up {
        /// Peer index.
        peer: usize,
        /// The session.
        conn: quinn::Connection,
        /// The peer's data-port address.
        data: SocketAddr,
        /// Monitor the path (configured peers, and links that carry forwarding traffic).
        monitor: bool,
    },
    /// The session that was up closed.
    Down {
        /// Peer index.
        peer: usize,
    },
    /// The link to a peer whose session is up now carries forwarding traffic: monitor it.
    Monitor {
        /// Peer index.
        peer: usize,
    },
    /// The session to a directory node was closed on purpose (idle): stop monitoring it.
    Forget {
        /// Peer index.
        peer: usize,
    },
    /// A management message from a peer.
    Message {
        /// Peer index.
        peer: usize,
        /// The message.
        message: Message,
    },
}

/// What the engine shares with the rest of the daemon.
#[derive(Default)]
pub struct EngineShared {
    /// Routes per peer (filled when status is asked for).
    pub routes: Mutex<Vec<Option<RouteStatus>>>,
    /// Protection per peer, read by the kernel reconcile.
    pub protect: Mutex<Vec<Option<Protect>>>,
    /// Woken when protection changes, so routes change at once.
    pub kernel: Notify,
    /// Relay sessions this node serves: (a, b) node names (filled when status is asked for).
    pub relaying: Mutex<Vec<(String, String)>>,
    /// Bytes to each peer's split destinations that took the direct path in the kernel
    /// (cumulative; read by the daemon from its accounting rules).
    pub direct_bytes: Mutex<Vec<u64>>,
    /// Requests this node refused by its policy, indexed by [`crate::node::policy::Refusal`] (in
    /// the order of `Refusal::ALL`, which is declaration order; filled when status is asked for).
    pub refusals: [std::sync::atomic::AtomicU64; crate::node::policy::Refusal::ALL.len()],
    /// Outside destinations on an exit, in words.
    pub exits: Mutex<Vec<String>>,
    /// Times the engine found itself late (probe loss not judged meanwhile).
    pub late: std::sync::atomic::AtomicU64,
    /// Some peer carries traffic (set at the first sign of it, recomputed every second):
    /// the TCP monitor polls at its fast rate only then.
    pub traffic: std::sync::atomic::AtomicBool,
    /// Progress and fatal failures of the daemon's parts (the engine reports its own).
    pub health: Arc<crate::shell::supervise::Health>,
}

/// The engine task's state: the core and the handles its actions need.
pub struct Engine {
    model: Arc<RwLock<Model>>,
    needs: mpsc::UnboundedSender<Need>,
    state: NodeState,
    dp: Arc<DataPath>,
    filter: Arc<RwLock<Filter>>,
    shared: Arc<EngineShared>,
    /// To the management overlay: which sessions carry routed messages.
    overlay: mpsc::UnboundedSender<OverlayEvent>,
    /// The management session of each peer, for the messages the core sends.
    conns: Vec<Option<quinn::Connection>>,
}

impl Engine {
    /// Creates the engine; `seed` drives random relay choice. Requests for sessions to
    /// peers without one (traffic waiting) go to `needs`.
    /// Changes in which management sessions may carry routed messages go to `overlay`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: Arc<RwLock<Model>>,
        dp: Arc<DataPath>,
        filter: Arc<RwLock<Filter>>,
        shared: Arc<EngineShared>,
        needs: mpsc::UnboundedSender<Need>,
        overlay: mpsc::UnboundedSender<OverlayEvent>,
        seed: u64,
        now: Instant,
    ) -> Engine {
        let state = NodeState::new(&model.read().expect("model"), seed, now, unix_now());
        let mut e = Engine { model, needs, state, dp, filter, shared, overlay, conns: Vec::new() };
        e.execute();
        e
    }

    /// Runs until `shutdown` changes.
    pub async fn run(
        mut self,
        mut sessions: mpsc::UnboundedReceiver<SessionEvent>,
        mut data: mpsc::Receiver<DataEvent>,
        mut alarms: mpsc::UnboundedReceiver<Alarm>,
        mut refresh: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let replex = self.model.read().expect("model").cfg.replex.enabled;
        let test_panic = supervise::panic_after(Part::Engine, supervise::test_panic_after(Part::Engine));
        tokio::pin!(test_panic);
        loop {
            self.shared.health.beat(Part::Engine);
            // Woken when the core asks (its next probe, deadline, upkeep or REPLEX tick);
            // never in a busy loop.
            let wake = self.state.poll_timeout().max(Instant::now() + Duration::from_millis(1));
            tokio::select! {
                _ = shutdown.changed() => {
                    self.state.release_all();
                    self.execute();
                    return;
                }
                _ = &mut test_panic => {}
                Some(ev) = sessions.recv() => self.on_session(ev),
                Some(done) = refresh.recv() => {
                    // Status is built when someone asks (detourctl, a metrics scrape), never
                    // on a timer: an idle node does no work for status.
                    self.publish();
                    let _ = done.send(());
                }
                Some(ev) = data.recv() => {
                    // A burst of probes is taken in one go: the core's next wake-up is worked
                    // out once for all of them, not once per probe.
                    self.on_data(ev);
                    for _ in 0..DATA_BATCH {
                        match data.try_recv() {
                            Ok(ev) => self.on_data(ev),
                            Err(_) => break,
                        }
                    }
                }
                Some(alarm) = alarms.recv() => {
                    let m = self.model.clone();
                    let m = m.read().expect("model");
                    match alarm {
                        Alarm::Icmp { peer, at } => self.state.handle_icmp(at, &m, peer),
                        Alarm::TcpStall { peer } => self.state.handle_tcp_stall(Instant::now(), &m, peer),
                        Alarm::Traffic { peer } => self.state.handle_traffic(Instant::now(), &m, peer),
                        Alarm::Outside { dst } => self.state.handle_outside_unreachable(Instant::now(), unix_now(), &m, dst),
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    if replex {
                        let bytes = self.shared.direct_bytes.lock().expect("direct bytes").clone();
                        self.state.set_direct_bytes(bytes);
                    }
                    let m = self.model.clone();
                    let m = m.read().expect("model");
                    self.state.handle_timeout(Instant::now(), unix_now(), &m);
                    self.shared.late.store(self.state.late_count(), Relaxed);
                }
            }
            self.shared.traffic.store(self.state.traffic(), Relaxed);
            self.execute();
        }
    }

    /// One event from the data path.
    fn on_data(&mut self, ev: DataEvent) {
        let now = Instant::now();
        let m = self.model.clone();
        let m = m.read().expect("model");
        match ev {
            DataEvent::Control { peer, from, payload, at } => self.state.handle_probe(now, &m, at, peer, from, &payload),
            DataEvent::Traffic { peer } => self.state.handle_traffic(now, &m, peer),
            DataEvent::NeedSession { peer } => self.state.handle_need_session(peer),
        }
    }

    fn on_session(&mut self, ev: SessionEvent) {
        let now = Instant::now();
        let m = self.model.clone();
        let m = m.read().expect("model");
        match ev {
            SessionEvent::Up { peer, conn, data, monitor } => {
                let local_ip = conn.local_ip().map(|a| a.to_canonical());
                if self.conns.len() <= peer {
                    self.conns.resize(peer + 1, None);
                }
                self.conns[peer] = Some(conn);
                self.state.handle_session_up(now, &m, peer, data, local_ip, monitor);
            }
            SessionEvent::Down { peer } => {
                if let Some(c) = self.conns.get_mut(peer) {
                    *c = None;
                }
                self.state.handle_session_down(now, &m, peer);
            }
            SessionEvent::Monitor { peer } => self.state.handle_monitor(now, &m, peer),
            SessionEvent::Forget { peer } => {
                if let Some(c) = self.conns.get_mut(peer) {
                    *c = None;
                }
                self.state.handle_forget(now, &m, peer);
            }
            SessionEvent::Message { peer, message } => self.state.handle_message(now, &m, peer, message),
        }
    }

    /// Carries out what the core decided.
    fn execute(&mut self) {
        while let Some(a) = self.state.poll_action() {
            match a {
                NodeAction::Data(cmd) => self.dp.command(cmd),
                NodeAction::Send { peer, to, message } => self.send(peer, to, message),
                NodeAction::NeedSession(peer) => {
                    let _ = self.needs.send(Need::Data(peer));
                }
                NodeAction::RelayLink { peer, on } => {
                    let _ = self.needs.send(Need::Relay(peer, on));
                }
                NodeAction::Usable { node, usable } => {
                    let _ = self.overlay.send(OverlayEvent::Usable { node, usable });
                }
                NodeAction::ProtectChanged => {
                    *self.shared.protect.lock().expect("protect") = self.state.protect().to_vec();
                    self.shared.kernel.notify_one();
                }
                NodeAction::Exits(plan) => {
                    self.model.write().expect("model").exits = plan;
                    let m = self.model.read().expect("model");
                    *self.shared.exits.lock().expect("exits") = self.state.exit_status(Instant::now(), &m);
                    drop(m);
                    self.shared.kernel.notify_one();
                }
                NodeAction::WatchProtected { net, peer } => {
                    let mut f = self.filter.write().expect("filter");
                    if f.protected.lookup(net.addr()) != Some(&peer) {
                        f.protected.insert(net, peer);
                    }
                }
                NodeAction::WatchOutside(net) => {
                    self.filter.write().expect("filter").outside.insert(net, ());
                }
            }
        }
    }

    fn send(&self, peer: usize, to: crate::identity::NodeId, message: Message) {
        let Some(conn) = self.conns.get(peer).and_then(|c| c.clone()) else { return };
        let frame = Frame { src: self.model.read().expect("model").local, dst: to, hop_limit: 0, message };
        tokio::spawn(async move {
            if let Err(e) = quic::send_frame(&conn, &frame).await {
                tracing::debug!("management message: {e:#}");
            }
        });
    }

    /// Fills what status shows from the core, now.
    fn publish(&self) {
        let now = Instant::now();
        let m = self.model.read().expect("model");
        let unix = unix_now();
        *self.shared.routes.lock().expect("routes") = self.state.routes(now, unix, &m);
        *self.shared.relaying.lock().expect("relaying") = self.state.relaying(&m);
        *self.shared.exits.lock().expect("exits") = self.state.exit_status(now, &m);
        for (slot, (_, n)) in self.shared.refusals.iter().zip(self.state.refusals()) {
            slot.store(n, Relaxed);
        }
    }
}
