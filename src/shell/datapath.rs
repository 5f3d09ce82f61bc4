//! The data path: the pure [`TxState`] and [`RxState`] on one data thread.
//!
//! * **Send**: every TUN (per-peer TUNs and the aggregate) is read with virtio-net offload,
//!   so the kernel hands over 64 KiB TCP super-packets that tun-rs splits into segments;
//!   each segment is sealed by [`TxState`], and consecutive datagrams to the same address go
//!   out as one UDP GSO `sendmsg` (quinn-udp).
//! * **Receive**: UDP GRO and `recvmmsg` (quinn-udp); [`RxState`] opens each datagram and
//!   the inner packets are written per TUN in one GRO-coalescing batch. Probe packets go to
//!   the control plane as [`DataEvent`]s; packets for other nodes (relaying) go back out,
//!   batched the same way as sending.
//!
//! The thread runs a single-threaded tokio runtime, so a packet is never handed between
//! threads. The control plane talks to it through [`DataCommand`]s, which also add peers
//! learned from the directory and attach or detach their TUNs while the daemon runs.

use std::cell::RefCell;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr, UdpSocket as StdUdpSocket};
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tun_rs::{AsyncDevice, DeviceBuilder, GROTable, SyncDevice, VIRTIO_NET_HDR_LEN};

use crate::dataplane::{DataCommand, DataPlaneSpec, DropReason, NodeCounters, Rx, RxState, Tun, TxAction, TxState};
use crate::shell::capture;
use crate::shell::supervise::{self, Health, Part};
use crate::wire::{HEADER_LEN, OVERHEAD, TAG_LEN};

/// Largest UDP payload in one GSO send (bytes), below the 64 KiB IP limit.
const GSO_MAX_BYTES: usize = 65_000;
/// Most TUN reads drained before a batch is flushed.
const MAX_DRAIN: usize = 32;
/// Segments one TUN read can produce.
const TUN_BATCH: usize = 128;
/// Receive buffer per datagram slot: one GRO train is at most 64 KiB.
const RX_SLOT: usize = 65_536;
/// Capacity of a TUN write buffer: tun-rs coalesces TCP segments (GRO) only into buffers
/// that can hold the whole 64 KiB super-packet plus the virtio header twice.
const RX_OUT_CAP: usize = 65_535 + 4 * VIRTIO_NET_HDR_LEN;
/// Packets queued for one TUN before they are written (one GRO batch).
const RX_TUN_BATCH: usize = 64;
/// Write buffers kept for reuse.
const RX_POOL_MAX: usize = 2 * RX_TUN_BATCH;
/// How often the control plane is told that a peer without a session has traffic waiting.
const NEED_SESSION_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
/// Control packets waiting for the control plane before new ones are dropped.
pub const EVENT_QUEUE: usize = 4096;

/// A data socket with its quinn-udp state.
pub struct DataSocket {
    /// The bound socket.
    pub socket: StdUdpSocket,
    /// Offload state (GSO/GRO capability), shared by both threads.
    pub state: Arc<UdpSocketState>,
    /// Whether the socket also carries IPv4 (IPv4 socket or dual-stack IPv6 socket).
    pub carries_v4: bool,
    /// Whether the socket carries IPv6.
    pub carries_v6: bool,
}

/// What the data path tells the control plane.
#[derive(Debug)]
pub enum DataEvent {
    /// An authenticated probe-type packet from a peer.
    Control {
        /// Peer index.
        peer: usize,
        /// The underlay address it came from (the peer or a relay).
        from: SocketAddr,
        /// The probe payload.
        payload: Vec<u8>,
        /// When it was received.
        at: Instant,
    },
    /// Inner packets went out to a peer through the overlay (sent at most once a second
    /// per peer while packets keep going): its paths are probed at the fast rate.
    Traffic {
        /// Peer index.
        peer: usize,
    },
    /// Traffic for a peer that has no session: open one (sent at most once a second per
    /// peer while packets keep coming).
    NeedSession {
        /// Peer index.
        peer: usize,
    },
}

/// What the data path needs to start.
pub struct DataPathSetup {
    /// Peers, addresses and counters.
    pub spec: DataPlaneSpec,
    /// TUN devices opened with offload: per-peer TUNs of the first peers, in peer order, then
    /// the aggregate.
    pub tuns: Vec<SyncDevice>,
    /// MTU of each TUN (same order), to size buffers.
    pub mtus: Vec<usize>,
    /// Data sockets.
    pub sockets: Vec<DataSocket>,
    /// The daemon's clock origin (`now_ms` = milliseconds since this instant).
    pub start: Instant,
    /// Where probe packets and session requests go.
    pub events: mpsc::Sender<DataEvent>,
    /// Where the data thread reports its progress (at least once a second).
    pub health: Arc<Health>,
}

/// What the data thread is told: the core's commands, and devices (which the core never
/// holds).
enum Cmd {
    Core(DataCommand),
    AttachTun { peer: usize, dev: SyncDevice, mtu: usize },
}

/// Handle to the running data path.
pub struct DataPath {
    cmds: mpsc::UnboundedSender<Cmd>,
    thread: JoinHandle<()>,
}

impl DataPath {
    /// Starts the data thread (TX and RX on one thread: the lowest latency, and the best
    /// throughput on small machines; see `docs/performance.md`).
    ///
    /// # Errors
    /// If the runtime cannot be built or a device or socket cannot be registered.
    pub fn start(setup: DataPathSetup) -> Result<DataPath> {
        let DataPathSetup { spec, tuns, mtus, sockets, start, events, health } = setup;
        if tuns.is_empty() || tuns.len() > spec.peers.len() + 1 || mtus.len() != tuns.len() {
            return Err(anyhow!("internal: {} TUNs for {} peers", tuns.len(), spec.peers.len()));
        }
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (cmd, cmds) = mpsc::unbounded_channel();
        let thread =
            std::thread::Builder::new().name("detour-data".into()).spawn(move || data_thread(spec, tuns, mtus, sockets, cmds, ready_tx, start, events, health)).context("starting the data thread")?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(DataPath { cmds: cmd, thread }),
            Ok(Err(e)) => Err(anyhow!(e)),
            Err(_) => Err(anyhow!("the data thread died during start")),
        }
    }

    /// Sends a command to the data thread (applied in order).
    pub fn command(&self, cmd: DataCommand) {
        let _ = self.cmds.send(Cmd::Core(cmd));
    }

    /// Gives peer `peer` its own TUN `dev` (MTU `mtu` bytes): packets from its host
    /// addresses are written there, and everything read from it goes to the peer.
    pub fn attach_tun(&self, peer: usize, dev: SyncDevice, mtu: usize) {
        let _ = self.cmds.send(Cmd::AttachTun { peer, dev, mtu });
    }

    /// Stops the thread and closes the TUNs (which removes the interfaces).
    pub fn stop(self) {
        drop(self.cmds);
        let _ = self.thread.join();
    }
}

fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// A data socket registered with this thread's runtime.
struct Socket {
    sock: UdpSocket,
    state: Arc<UdpSocketState>,
    v4: bool,
    v6: bool,
}

/// Picks the socket for a destination and the address form it needs (a v4 destination on a
/// dual-stack socket is written v4-mapped).
fn pick(socks: &[Socket], to: SocketAddr) -> Option<(usize, SocketAddr)> {
    match to {
        SocketAddr::V4(v4) => {
            if let Some(i) = socks.iter().position(|s| s.v4 && !s.v6) {
                return Some((i, to));
            }
            socks.iter().position(|s| s.v4 && s.v6).map(|i| (i, SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())))
        }
        SocketAddr::V6(_) => socks.iter().position(|s| s.v6).map(|i| (i, to)),
    }
}

/// Registers the sockets with the current runtime.
fn register_sockets(sockets: Vec<DataSocket>) -> Result<Rc<Vec<Socket>>, String> {
    let socks = sockets
        .into_iter()
        .map(|s| {
            let sock = UdpSocket::from_std(s.socket).map_err(|e| format!("registering the data socket: {e}"))?;
            Ok(Socket { sock, state: s.state, v4: s.carries_v4, v6: s.carries_v6 })
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Rc::new(socks))
}

/// The TUNs of the data thread: the aggregate and the per-peer TUNs attached now.
struct Devices {
    aggregate: Arc<AsyncDevice>,
    peers: Vec<Option<(Arc<AsyncDevice>, tokio::task::AbortHandle)>>,
}

impl Devices {
    /// Write slot of a TUN: 0 is the aggregate, `p + 1` the TUN of peer `p`; a peer without
    /// a TUN of its own gets the aggregate.
    fn slot(&self, tun: Tun) -> usize {
        match tun {
            Tun::Peer(p) if self.peers.get(p).is_some_and(|d| d.is_some()) => p + 1,
            _ => 0,
        }
    }

    fn get(&self, slot: usize) -> Option<Arc<AsyncDevice>> {
        if slot == 0 {
            Some(self.aggregate.clone())
        } else {
            self.peers.get(slot - 1).and_then(|d| d.as_ref()).map(|d| d.0.clone())
        }
    }
}

/// What the tasks of the data thread share.
struct Thread {
    start: Instant,
    tx: Rc<RefCell<TxState>>,
    rx: Rc<RefCell<RxState>>,
    devices: Rc<RefCell<Devices>>,
    socks: Rc<Vec<Socket>>,
    node: Arc<NodeCounters>,
    events: mpsc::Sender<DataEvent>,
    /// When each peer's missing session was last reported.
    wanted: Rc<RefCell<std::collections::HashMap<usize, Instant>>>,
}

impl Thread {
    fn attach(&self, peer: usize, dev: SyncDevice, mtu: usize) {
        let dev = match AsyncDevice::new(dev) {
            Ok(d) => Arc::new(d),
            Err(e) => {
                tracing::warn!("registering the TUN of peer {peer}: {e}");
                return;
            }
        };
        self.detach(peer);
        let task = TxTask::new(dev.clone(), Tun::Peer(peer), mtu, self);
        let handle = tokio::task::spawn_local(task.run()).abort_handle();
        let mut d = self.devices.borrow_mut();
        if d.peers.len() <= peer {
            d.peers.resize_with(peer + 1, || None);
        }
        d.peers[peer] = Some((dev, handle));
    }

    fn detach(&self, peer: usize) {
        if let Some((_, task)) = self.devices.borrow_mut().peers.get_mut(peer).and_then(|d| d.take()) {
            task.abort();
        }
    }
}

/// The data thread: sends and receives, and applies the control plane's commands.
#[allow(clippy::too_many_arguments)]
fn data_thread(
    spec: DataPlaneSpec,
    tuns: Vec<SyncDevice>,
    mtus: Vec<usize>,
    sockets: Vec<DataSocket>,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
    start: Instant,
    events: mpsc::Sender<DataEvent>,
    health: Arc<Health>,
) {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("data runtime: {e}")));
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let socks = match register_sockets(sockets) {
            Ok(s) => s,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let mut tuns = tuns;
        let mut mtus = mtus;
        let (Some(agg), Some(agg_mtu)) = (tuns.pop(), mtus.pop()) else {
            let _ = ready.send(Err("internal: no aggregate TUN".into()));
            return;
        };
        let aggregate = match AsyncDevice::new(agg) {
            Ok(d) => Arc::new(d),
            Err(e) => {
                let _ = ready.send(Err(format!("registering a TUN: {e}")));
                return;
            }
        };
        let th = Thread {
            start,
            tx: Rc::new(RefCell::new(TxState::new(&spec))),
            rx: Rc::new(RefCell::new(RxState::new(&spec))),
            devices: Rc::new(RefCell::new(Devices { aggregate: aggregate.clone(), peers: Vec::new() })),
            socks: socks.clone(),
            node: spec.node.clone(),
            events: events.clone(),
            wanted: Rc::default(),
        };
        tokio::task::spawn_local(TxTask::new(aggregate, Tun::Aggregate, agg_mtu, &th).run());
        for (i, (dev, mtu)) in tuns.into_iter().zip(mtus).enumerate() {
            th.attach(i, dev, mtu);
        }
        for i in 0..socks.len() {
            tokio::task::spawn_local(RxTask::new(i, &th, start).run());
        }
        let _ = ready.send(Ok(()));
        let mut out = Out::new(socks, spec.node.clone());
        let mut buf = vec![0u8; 2048];
        let mut beat = tokio::time::interval(Duration::from_secs(1));
        let test_panic = supervise::panic_after(Part::Data, supervise::test_panic_after(Part::Data));
        tokio::pin!(test_panic);
        loop {
            let cmd = tokio::select! {
                cmd = cmds.recv() => match cmd {
                    Some(Cmd::Core(cmd)) => cmd,
                    Some(Cmd::AttachTun { peer, dev, mtu }) => {
                        th.attach(peer, dev, mtu);
                        continue;
                    }
                    None => break,
                },
                _ = beat.tick() => {
                    health.beat(Part::Data);
                    continue;
                }
                _ = &mut test_panic => continue,
            };
            match &cmd {
                DataCommand::SendControl { peer, to, payload } => {
                    if buf.len() < payload.len() + OVERHEAD {
                        buf.resize(payload.len() + OVERHEAD, 0);
                    }
                    let sealed = th.tx.borrow_mut().seal_control(*peer, payload, &mut buf);
                    if let Ok(len) = sealed {
                        out.push(*to, None, &buf[..len]).await;
                        out.flush().await;
                    }
                    continue;
                }
                DataCommand::DetachTun { peer } => th.detach(*peer),
                DataCommand::RemovePeer { peer } => {
                    th.detach(*peer);
                    th.wanted.borrow_mut().remove(peer);
                }
                _ => {}
            }
            th.tx.borrow_mut().apply(&cmd);
            th.rx.borrow_mut().apply(&cmd);
            // Packets that waited for this peer's first session go out now.
            if let DataCommand::InstallSession { peer, .. } | DataCommand::SetEndpoint { peer, .. } = &cmd {
                let staged = th.tx.borrow_mut().take_staged(*peer);
                for pkt in staged {
                    let mut b = vec![0u8; pkt.len() + OVERHEAD];
                    b[HEADER_LEN..HEADER_LEN + pkt.len()].copy_from_slice(&pkt);
                    let mut reply = Vec::new();
                    let action = th.tx.borrow_mut().encapsulate(Tun::Peer(*peer), &mut b, pkt.len(), &mut reply);
                    if let TxAction::Send { to, src_ip, len, .. } = action {
                        out.push(to, src_ip, &b[..len]).await;
                    }
                }
                out.flush().await;
            }
        }
        // Close the TUNs before the runtime goes.
        let n = th.devices.borrow().peers.len();
        for p in 0..n {
            th.detach(p);
        }
    });
}

/// Datagrams waiting to go out in one GSO send: equal-size segments to one destination,
/// the last one possibly shorter.
struct Batch {
    buf: Vec<u8>,
    seg: usize,
    count: usize,
    dest: Option<Dest>,
    closed: bool,
}

/// Where a batch goes: (data socket, underlay address, source address to send from).
type Dest = (usize, SocketAddr, Option<IpAddr>);

/// How many batches to different destinations [`Out`] keeps open at once. A relay's
/// receive batch interleaves the data of one direction with the acknowledgements of the
/// other, and the aggregate TUN interleaves peers: with one open batch every change of
/// destination cost a send (about five sends per receive batch on a relay).
const OPEN_BATCHES: usize = 4;

impl Batch {
    fn new() -> Batch {
        Batch { buf: Vec::with_capacity(GSO_MAX_BYTES + 2048), seg: 0, count: 0, dest: None, closed: false }
    }

    fn try_push(&mut self, dest: Dest, data: &[u8], max_segs: usize) -> bool {
        if self.count == 0 {
            self.dest = Some(dest);
            self.seg = data.len();
            self.closed = false;
        } else if self.dest != Some(dest) || self.closed || self.count >= max_segs || data.len() > self.seg || self.buf.len() + data.len() > GSO_MAX_BYTES {
            return false;
        } else if data.len() < self.seg {
            self.closed = true;
        }
        self.buf.extend_from_slice(data);
        self.count += 1;
        true
    }
}

/// Sends datagrams on the data sockets, batching the ones to one address into one GSO
/// send; up to [`OPEN_BATCHES`] destinations at once, each in its own order (datagrams
/// to one destination never overtake each other; to different ones they may).
struct Out {
    socks: Rc<Vec<Socket>>,
    /// Open batches, made when first needed (a peer's TUN usually needs one).
    batches: Vec<Batch>,
    node: Arc<NodeCounters>,
    /// Send calls made (one per batch).
    sends: u64,
}

impl Out {
    fn new(socks: Rc<Vec<Socket>>, node: Arc<NodeCounters>) -> Out {
        Out { socks, batches: Vec::new(), node, sends: 0 }
    }

    /// Queues one datagram; sends a batch first when none can take it.
    async fn push(&mut self, to: SocketAddr, src_ip: Option<IpAddr>, data: &[u8]) {
        let Some((sock, to)) = pick(&self.socks, to) else {
            self.node.drops.add(DropReason::SendError);
            return;
        };
        let max_segs = self.socks[sock].state.max_gso_segments().max(1);
        let dest = (sock, to, src_ip);
        let i = match self.batches.iter().position(|b| b.count > 0 && b.dest == Some(dest)) {
            Some(i) => {
                if self.batches[i].try_push(dest, data, max_segs) {
                    return;
                }
                self.send(i).await;
                i
            }
            None => match self.batches.iter().position(|b| b.count == 0) {
                Some(i) => i,
                None if self.batches.len() < OPEN_BATCHES => {
                    self.batches.push(Batch::new());
                    self.batches.len() - 1
                }
                None => {
                    // All open for other destinations: send the fullest.
                    let i = (0..self.batches.len()).max_by_key(|&i| self.batches[i].buf.len()).unwrap_or(0);
                    self.send(i).await;
                    i
                }
            },
        };
        self.batches[i].try_push(dest, data, max_segs);
    }

    /// Sends every open batch.
    async fn flush(&mut self) {
        for i in 0..self.batches.len() {
            self.send(i).await;
        }
    }

    /// Sends batch `i` (if it holds anything) and empties it.
    async fn send(&mut self, i: usize) {
        let b = &mut self.batches[i];
        let Some((sock_i, to, src_ip)) = b.dest else { return };
        if b.count == 0 {
            return;
        }
        let s = &self.socks[sock_i];
        let transmit = Transmit { destination: to, ecn: None, contents: &b.buf, segment_size: if b.count > 1 { Some(b.seg) } else { None }, src_ip };
        self.sends += 1;
        loop {
            if s.sock.writable().await.is_err() {
                break;
            }
            match s.sock.try_io(Interest::WRITABLE, || s.state.try_send((&s.sock).into(), &transmit)) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    tracing::debug!("data send to {to}: {e}");
                    self.node.drops.add(DropReason::SendError);
                    break;
                }
            }
        }
        b.buf.clear();
        b.count = 0;
        b.dest = None;
    }
}

struct TxTask {
    dev: Arc<AsyncDevice>,
    ingress: Tun,
    start: Instant,
    state: Rc<RefCell<TxState>>,
    out: Out,
    events: mpsc::Sender<DataEvent>,
    wanted: Rc<RefCell<std::collections::HashMap<usize, Instant>>>,
    original: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    reply: Vec<u8>,
    /// For writing the rare ICMP error back into the TUN; made at the first one. tun-rs's
    /// table holds about 1.3 MB of flow slots, and one per TUN made a hub with 99 peers
    /// 130 MB larger and slower to start (issue 11).
    gro: Option<GROTable>,
}

impl TxTask {
    fn new(dev: Arc<AsyncDevice>, ingress: Tun, mtu: usize, th: &Thread) -> TxTask {
        TxTask {
            dev,
            ingress,
            start: th.start,
            state: th.tx.clone(),
            out: Out::new(th.socks.clone(), th.node.clone()),
            events: th.events.clone(),
            wanted: th.wanted.clone(),
            original: vec![0u8; VIRTIO_NET_HDR_LEN + 65_535],
            bufs: vec![vec![0u8; HEADER_LEN + mtu + TAG_LEN]; TUN_BATCH],
            sizes: vec![0; TUN_BATCH],
            reply: Vec::new(),
            gro: None,
        }
    }

    async fn run(mut self) {
        loop {
            let n = match self.dev.recv_multiple(&mut self.original, &mut self.bufs, &mut self.sizes, HEADER_LEN).await {
                Ok(n) => n,
                Err(e) => {
                    if self.fatal(&e) {
                        return;
                    }
                    continue;
                }
            };
            self.process(n).await;
            for _ in 0..MAX_DRAIN {
                match self.dev.try_recv_multiple(&mut self.original, &mut self.bufs, &mut self.sizes, HEADER_LEN) {
                    Ok(n) => self.process(n).await,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        if self.fatal(&e) {
                            return;
                        }
                        break;
                    }
                }
            }
            self.out.flush().await;
        }
    }

    /// Logs a read error; true if the device is gone.
    fn fatal(&self, e: &io::Error) -> bool {
        if matches!(e.raw_os_error(), Some(libc::EBADFD) | Some(libc::EBADF) | Some(libc::ENODEV)) {
            tracing::debug!("TUN {:?} closed: {e}", self.ingress);
            return true;
        }
        tracing::debug!("TUN {:?} read: {e}", self.ingress);
        false
    }

    async fn process(&mut self, n: usize) {
        for i in 0..n {
            let action = {
                let mut st = self.state.borrow_mut();
                if i == 0 {
                    st.set_now(self.start.elapsed().as_millis() as u64);
                }
                st.encapsulate(self.ingress, &mut self.bufs[i], self.sizes[i], &mut self.reply)
            };
            match action {
                TxAction::Send { peer, to, src_ip, len, traffic } => {
                    if traffic {
                        let _ = self.events.try_send(DataEvent::Traffic { peer });
                    }
                    self.out.push(to, src_ip, &self.bufs[i][..len]).await
                }
                TxAction::Reply(_) => {
                    let mut out = vec![0u8; VIRTIO_NET_HDR_LEN];
                    out.extend_from_slice(&self.reply);
                    let dev: &tun_rs::DeviceImpl = &self.dev;
                    let gro = self.gro.get_or_insert_with(GROTable::default);
                    if let Err(e) = dev.send_multiple(gro, &mut [out], VIRTIO_NET_HDR_LEN) {
                        tracing::debug!("writing an ICMP error to the TUN: {e}");
                    }
                }
                TxAction::NoSession { peer } => {
                    let now = Instant::now();
                    let mut w = self.wanted.borrow_mut();
                    if w.get(&peer).is_none_or(|t| now >= *t + NEED_SESSION_EVERY) {
                        w.insert(peer, now);
                        let _ = self.events.try_send(DataEvent::NeedSession { peer });
                    }
                }
                TxAction::Drop(_) => {}
            }
        }
    }
}

struct RxTask {
    sock: usize,
    socks: Rc<Vec<Socket>>,
    rx: Rc<RefCell<RxState>>,
    devices: Rc<RefCell<Devices>>,
    node: Arc<NodeCounters>,
    start: Instant,
    events: mpsc::Sender<DataEvent>,
    out: Out,
    slots: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
    /// Packets waiting per write slot (see [`Devices::slot`]).
    tun_out: Vec<Vec<Vec<u8>>>,
    pool: Vec<Vec<u8>>,
    gro: GROTable,
}

impl RxTask {
    fn new(sock: usize, th: &Thread, start: Instant) -> RxTask {
        let n = quinn_udp::BATCH_SIZE.max(1);
        RxTask {
            sock,
            socks: th.socks.clone(),
            rx: th.rx.clone(),
            devices: th.devices.clone(),
            node: th.node.clone(),
            start,
            events: th.events.clone(),
            out: Out::new(th.socks.clone(), th.node.clone()),
            slots: vec![vec![0u8; RX_SLOT]; n],
            meta: vec![RecvMeta::default(); n],
            tun_out: vec![Vec::new()],
            pool: Vec::new(),
            gro: GROTable::default(),
        }
    }

    async fn run(mut self) {
        loop {
            let s = &self.socks[self.sock];
            if s.sock.readable().await.is_err() {
                return;
            }
            let res = {
                let mut iovs: Vec<IoSliceMut<'_>> = self.slots.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                let meta = &mut self.meta;
                s.sock.try_io(Interest::READABLE, || s.state.recv((&s.sock).into(), &mut iovs, meta))
            };
            let n = match res {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    tracing::debug!("data socket receive: {e}");
                    continue;
                }
            };
            self.handle(n).await;
        }
    }

    async fn handle(&mut self, n: usize) {
        let now_ms = self.start.elapsed().as_millis() as u64;
        for i in 0..n {
            let m = self.meta[i];
            let from = m.addr;
            let stride = if m.stride == 0 { m.len } else { m.stride };
            let len = m.len.min(RX_SLOT);
            if len == 0 {
                // An empty datagram: counted like any other that cannot be ours.
                self.node.drops.add(DropReason::Malformed);
                continue;
            }
            let mut at = 0;
            while at < len {
                let start = at;
                let end = (at + stride.max(1)).min(len);
                at = end;
                let dgram = &mut self.slots[i][start..end];
                if dgram.len() < OVERHEAD {
                    self.node.drops.add(DropReason::Malformed);
                    continue;
                }
                capture::sample(capture::Target::Decapsulate, &[&[0], dgram]);
                let outcome = self.rx.borrow_mut().decapsulate(dgram, from, now_ms);
                match outcome {
                    Ok(Rx::Deliver(d)) => {
                        let t = self.devices.borrow().slot(d.tun);
                        if self.tun_out.len() <= t {
                            self.tun_out.resize_with(t + 1, Vec::new);
                        }
                        let mut b = self.pool.pop().unwrap_or_else(|| Vec::with_capacity(RX_OUT_CAP));
                        b.clear();
                        b.resize(VIRTIO_NET_HDR_LEN, 0);
                        b.extend_from_slice(&dgram[d.inner]);
                        self.tun_out[t].push(b);
                        if self.tun_out[t].len() >= RX_TUN_BATCH {
                            self.write_tun(t);
                        }
                    }
                    Ok(Rx::Control { peer, payload }) => {
                        capture::sample(capture::Target::Probe, &[&dgram[payload.clone()]]);
                        let ev = DataEvent::Control { peer, from, payload: dgram[payload].to_vec(), at: Instant::now() };
                        if self.events.try_send(ev).is_err() {
                            self.node.drops.add(DropReason::SendError);
                        }
                    }
                    Ok(Rx::Forward { to }) => self.out.push(to, None, &self.slots[i][start..end]).await,
                    Err(_) => {}
                }
            }
        }
        self.out.flush().await;
        for t in 0..self.tun_out.len() {
            if !self.tun_out[t].is_empty() {
                self.write_tun(t);
            }
        }
    }

    /// Writes the packets queued for one write slot; tun-rs coalesces consecutive TCP
    /// segments of a flow into one super-packet (GRO), so the kernel's TCP sees one write
    /// per train.
    fn write_tun(&mut self, t: usize) {
        let out = &mut self.tun_out[t];
        match self.devices.borrow().get(t) {
            Some(dev) => {
                let dev: &tun_rs::DeviceImpl = &dev;
                if let Err(e) = dev.send_multiple(&mut self.gro, out, VIRTIO_NET_HDR_LEN) {
                    tracing::debug!("TUN write: {e}");
                    self.node.drops.add_n(DropReason::TunWriteError, out.len() as u64);
                }
            }
            None => self.node.drops.add_n(DropReason::TunWriteError, out.len() as u64),
        }
        for b in out.drain(..) {
            if self.pool.len() < RX_POOL_MAX && b.capacity() >= RX_OUT_CAP {
                self.pool.push(b);
            }
        }
    }
}

/// Opens a TUN with offload (without, if the kernel refuses).
///
/// # Errors
/// If the interface is in use or cannot be created.
pub fn open_tun(name: &str) -> Result<SyncDevice> {
    let build = |offload: bool| DeviceBuilder::new().name(name).offload(offload).tx_queue_len(1000).build_sync();
    match build(true) {
        Ok(d) => Ok(d),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(anyhow!("interface {name} is in use by another process (is another detourd running?)")),
        Err(e) => {
            tracing::warn!("TUN {name}: offload unavailable ({e}); continuing without it");
            build(false).with_context(|| format!("creating TUN interface {name}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(addr: &str) -> Socket {
        let std = StdUdpSocket::bind(addr).unwrap();
        std.set_nonblocking(true).unwrap();
        let state = Arc::new(UdpSocketState::new((&std).into()).unwrap());
        Socket { sock: UdpSocket::from_std(std).unwrap(), state, v4: true, v6: false }
    }

    /// Datagrams to two destinations, interleaved as a relay sees data one way and
    /// acknowledgements the other, go out in one GSO send per destination, each
    /// destination's in order.
    #[test]
    fn interleaved_destinations_are_batched_each_in_order() {
        runtime().unwrap().block_on(async {
            let socks = Rc::new(vec![socket("127.0.0.1:0")]);
            let rx: Vec<StdUdpSocket> = (0..2).map(|_| StdUdpSocket::bind("127.0.0.1:0").unwrap()).collect();
            let to: Vec<SocketAddr> = rx.iter().map(|r| r.local_addr().unwrap()).collect();
            let mut out = Out::new(socks.clone(), Arc::new(NodeCounters::default()));
            for i in 0..8u8 {
                out.push(to[0], None, &[i; 1200]).await;
                out.push(to[1], None, &[100 + i; 80]).await;
            }
            out.flush().await;
            let gso = socks[0].state.max_gso_segments() > 1;
            assert_eq!(out.sends, if gso { 2 } else { 16 }, "gso {gso}");
            for (r, (size, first)) in rx.iter().zip([(1200, 0u8), (80, 100)]) {
                r.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
                let mut buf = [0u8; 2048];
                for i in 0..8u8 {
                    let n = r.recv(&mut buf).unwrap();
                    assert_eq!((n, buf[0]), (size, first + i));
                }
            }
        });
    }

    /// More destinations than open batches: the fullest is sent to make room, and nothing
    /// is lost or reordered per destination.
    #[test]
    fn more_destinations_than_open_batches_lose_nothing() {
        runtime().unwrap().block_on(async {
            let socks = Rc::new(vec![socket("127.0.0.1:0")]);
            let n = OPEN_BATCHES + 2;
            let rx: Vec<StdUdpSocket> = (0..n).map(|_| StdUdpSocket::bind("127.0.0.1:0").unwrap()).collect();
            let mut out = Out::new(socks, Arc::new(NodeCounters::default()));
            for i in 0..5u8 {
                for r in &rx {
                    out.push(r.local_addr().unwrap(), None, &[i; 500]).await;
                }
            }
            out.flush().await;
            assert!(out.batches.len() <= OPEN_BATCHES);
            for r in &rx {
                r.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
                let mut buf = [0u8; 2048];
                for i in 0..5u8 {
                    let got = r.recv(&mut buf).unwrap();
                    assert_eq!((got, buf[0]), (500, i));
                }
            }
        });
    }
}
