//! The data path: the pure [`TxState`] and [`RxState`] on one data thread (the default) or
//! on two.
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
//! Each thread runs its own single-threaded tokio runtime, so a packet is never handed
//! between threads. The control plane talks to the data path through [`DataCommand`]s.

use std::cell::RefCell;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr, UdpSocket as StdUdpSocket};
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tun_rs::{AsyncDevice, GROTable, SyncDevice, VIRTIO_NET_HDR_LEN};

use crate::dataplane::{DataCommand, DataPlaneSpec, DropReason, NodeCounters, Rx, RxState, Tun, TxAction, TxState};
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
}

/// What the data path needs to start.
pub struct DataPathSetup {
    /// Peers, addresses and counters.
    pub spec: DataPlaneSpec,
    /// TUN devices opened with offload: per-peer TUNs in peer order, then the aggregate.
    pub tuns: Vec<SyncDevice>,
    /// MTU of each TUN (same order), to size buffers.
    pub mtus: Vec<usize>,
    /// Data sockets.
    pub sockets: Vec<DataSocket>,
    /// The daemon's clock origin (`now_ms` = milliseconds since this instant).
    pub start: Instant,
    /// Data threads: 1 (TX and RX together) or 2 (one per direction).
    pub threads: usize,
    /// Where probe packets go.
    pub events: mpsc::Sender<DataEvent>,
}

/// Handle to the running data path.
pub struct DataPath {
    cmds: Vec<mpsc::UnboundedSender<DataCommand>>,
    threads: Vec<JoinHandle<()>>,
}

type Ready = std::sync::mpsc::Sender<Result<Vec<Arc<AsyncDevice>>, String>>;

impl DataPath {
    /// Starts the data path on `setup.threads` threads: 1 runs TX and RX on one thread (the
    /// lowest latency, and the best throughput on small machines), 2 gives each direction
    /// its own thread.
    ///
    /// # Errors
    /// If a runtime cannot be built or a device or socket cannot be registered.
    pub fn start(setup: DataPathSetup) -> Result<DataPath> {
        let DataPathSetup { spec, tuns, mtus, sockets, start, threads, events } = setup;
        let n_peers = spec.peers.len();
        if tuns.len() != n_peers + 1 || mtus.len() != tuns.len() {
            return Err(anyhow!("internal: {} TUNs for {} peers", tuns.len(), n_peers));
        }
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let wait_ready = |rx: &std::sync::mpsc::Receiver<Result<Vec<Arc<AsyncDevice>>, String>>| match rx.recv() {
            Ok(Ok(d)) => Ok(d),
            Ok(Err(e)) => Err(anyhow!(e)),
            Err(_) => Err(anyhow!("a data thread died during start")),
        };
        if threads <= 1 {
            let (cmd, cmds) = mpsc::unbounded_channel();
            let rx = Some((start, events));
            let t = std::thread::Builder::new()
                .name("detour-data".into())
                .spawn(move || tun_thread(spec, tuns, mtus, sockets, cmds, ready_tx, rx))
                .context("starting the data thread")?;
            wait_ready(&ready_rx)?;
            return Ok(DataPath { cmds: vec![cmd], threads: vec![t] });
        }
        let (tx_cmd, tx_rx) = mpsc::unbounded_channel();
        let (rx_cmd, rx_rx) = mpsc::unbounded_channel();
        let tx_socks: Vec<DataSocket> = sockets.iter().map(dup).collect::<io::Result<_>>().context("duplicating the data socket")?;
        let tx_spec = spec.clone();
        let tx_thread = std::thread::Builder::new()
            .name("detour-tx".into())
            .spawn(move || tun_thread(tx_spec, tuns, mtus, tx_socks, tx_rx, ready_tx, None))
            .context("starting the TX thread")?;
        let devices = wait_ready(&ready_rx)?;
        let rx_thread = std::thread::Builder::new()
            .name("detour-rx".into())
            .spawn(move || rx_thread(spec, devices, sockets, rx_rx, start, events))
            .context("starting the RX thread")?;
        Ok(DataPath { cmds: vec![tx_cmd, rx_cmd], threads: vec![tx_thread, rx_thread] })
    }

    /// Sends a command to every data thread (applied in order).
    pub fn command(&self, cmd: DataCommand) {
        match &cmd {
            // Sending needs the keys and counters of the thread that owns the TUNs only.
            DataCommand::SendControl { .. } => {
                let _ = self.cmds[0].send(cmd);
            }
            _ => {
                for c in &self.cmds {
                    let _ = c.send(cmd.clone());
                }
            }
        }
    }

    /// Stops the threads and closes the TUNs (which removes the interfaces).
    pub fn stop(self) {
        drop(self.cmds);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

fn dup(s: &DataSocket) -> io::Result<DataSocket> {
    Ok(DataSocket { socket: s.socket.try_clone()?, state: s.state.clone(), carries_v4: s.carries_v4, carries_v6: s.carries_v6 })
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
            socks
                .iter()
                .position(|s| s.v4 && s.v6)
                .map(|i| (i, SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())))
        }
        SocketAddr::V6(_) => socks.iter().position(|s| s.v6).map(|i| (i, to)),
    }
}

/// Registers the TUNs with the current runtime.
fn register_tuns(tuns: Vec<SyncDevice>) -> Result<Vec<Arc<AsyncDevice>>, String> {
    tuns.into_iter().map(|t| AsyncDevice::new(t).map(Arc::new).map_err(|e| format!("registering a TUN: {e}"))).collect()
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

/// Starts one receiver task per data socket on the current `LocalSet`.
fn spawn_rx(spec: &DataPlaneSpec, devices: Vec<Arc<AsyncDevice>>, socks: &Rc<Vec<Socket>>, start: Instant, events: mpsc::Sender<DataEvent>) -> Rc<RefCell<RxState>> {
    let state = Rc::new(RefCell::new(RxState::new(spec)));
    let devices = Rc::new(devices);
    for i in 0..socks.len() {
        let task = RxTask::new(i, socks.clone(), state.clone(), devices.clone(), spec.clone(), start, events.clone());
        tokio::task::spawn_local(task.run());
    }
    state
}

/// The thread that owns the TUNs: it always sends, and with `rx` it also receives (the
/// one-thread data path).
fn tun_thread(
    spec: DataPlaneSpec,
    tuns: Vec<SyncDevice>,
    mtus: Vec<usize>,
    sockets: Vec<DataSocket>,
    mut cmds: mpsc::UnboundedReceiver<DataCommand>,
    ready: Ready,
    rx: Option<(Instant, mpsc::Sender<DataEvent>)>,
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
        let setup = register_tuns(tuns).and_then(|d| register_sockets(sockets).map(|s| (d, s)));
        let (devices, socks) = match setup {
            Ok(x) => x,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let tx = Rc::new(RefCell::new(TxState::new(&spec)));
        let n = devices.len();
        for (i, dev) in devices.iter().enumerate() {
            let ingress = if i + 1 == n { Tun::Aggregate } else { Tun::Peer(i) };
            let task = TxTask::new(dev.clone(), ingress, mtus[i], tx.clone(), Out::new(socks.clone(), spec.node.clone()));
            tokio::task::spawn_local(task.run());
        }
        let rx = rx.map(|(start, events)| spawn_rx(&spec, devices.clone(), &socks, start, events));
        let _ = ready.send(Ok(devices));
        let mut out = Out::new(socks, spec.node.clone());
        let mut buf = vec![0u8; 2048];
        while let Some(cmd) = cmds.recv().await {
            if let DataCommand::SendControl { peer, to, payload } = &cmd {
                if buf.len() < payload.len() + OVERHEAD {
                    buf.resize(payload.len() + OVERHEAD, 0);
                }
                let sealed = tx.borrow_mut().seal_control(*peer, payload, &mut buf);
                if let Ok(len) = sealed {
                    out.push(*to, None, &buf[..len]).await;
                    out.flush().await;
                }
                continue;
            }
            tx.borrow_mut().apply(&cmd);
            if let Some(rx) = &rx {
                rx.borrow_mut().apply(&cmd);
            }
        }
    });
}

fn rx_thread(spec: DataPlaneSpec, devices: Vec<Arc<AsyncDevice>>, sockets: Vec<DataSocket>, mut cmds: mpsc::UnboundedReceiver<DataCommand>, start: Instant, events: mpsc::Sender<DataEvent>) {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("RX runtime: {e}");
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let socks = match register_sockets(sockets) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("{e}");
                return;
            }
        };
        let state = spawn_rx(&spec, devices, &socks, start, events);
        while let Some(cmd) = cmds.recv().await {
            state.borrow_mut().apply(&cmd);
        }
    });
}

/// Datagrams waiting to go out in one GSO send: equal-size segments to one destination,
/// the last one possibly shorter.
struct Batch {
    buf: Vec<u8>,
    seg: usize,
    count: usize,
    dest: Option<(usize, SocketAddr, Option<IpAddr>)>,
    closed: bool,
}

impl Batch {
    fn try_push(&mut self, dest: (usize, SocketAddr, Option<IpAddr>), data: &[u8], max_segs: usize) -> bool {
        if self.count == 0 {
            self.dest = Some(dest);
            self.seg = data.len();
            self.closed = false;
        } else if self.dest != Some(dest)
            || self.closed
            || self.count >= max_segs
            || data.len() > self.seg
            || self.buf.len() + data.len() > GSO_MAX_BYTES
        {
            return false;
        } else if data.len() < self.seg {
            self.closed = true;
        }
        self.buf.extend_from_slice(data);
        self.count += 1;
        true
    }
}

/// Sends datagrams on the data sockets, batching consecutive ones to one address into one
/// GSO send.
struct Out {
    socks: Rc<Vec<Socket>>,
    batch: Batch,
    node: Arc<NodeCounters>,
}

impl Out {
    fn new(socks: Rc<Vec<Socket>>, node: Arc<NodeCounters>) -> Out {
        Out { socks, batch: Batch { buf: Vec::with_capacity(GSO_MAX_BYTES + 2048), seg: 0, count: 0, dest: None, closed: false }, node }
    }

    /// Queues one datagram; sends the batch first when it cannot take it.
    async fn push(&mut self, to: SocketAddr, src_ip: Option<IpAddr>, data: &[u8]) {
        let Some((sock, to)) = pick(&self.socks, to) else {
            self.node.drops.add(DropReason::SendError);
            return;
        };
        let max_segs = self.socks[sock].state.max_gso_segments().max(1);
        let dest = (sock, to, src_ip);
        if !self.batch.try_push(dest, data, max_segs) {
            self.flush().await;
            self.batch.try_push(dest, data, max_segs);
        }
    }

    async fn flush(&mut self) {
        let Some((sock_i, to, src_ip)) = self.batch.dest else { return };
        if self.batch.count == 0 {
            return;
        }
        let s = &self.socks[sock_i];
        let transmit = Transmit {
            destination: to,
            ecn: None,
            contents: &self.batch.buf,
            segment_size: if self.batch.count > 1 { Some(self.batch.seg) } else { None },
            src_ip,
        };
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
        self.batch.buf.clear();
        self.batch.count = 0;
        self.batch.dest = None;
    }
}

struct TxTask {
    dev: Arc<AsyncDevice>,
    ingress: Tun,
    state: Rc<RefCell<TxState>>,
    out: Out,
    original: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    reply: Vec<u8>,
    gro: GROTable,
}

impl TxTask {
    fn new(dev: Arc<AsyncDevice>, ingress: Tun, mtu: usize, state: Rc<RefCell<TxState>>, out: Out) -> TxTask {
        TxTask {
            dev,
            ingress,
            state,
            out,
            original: vec![0u8; VIRTIO_NET_HDR_LEN + 65_535],
            bufs: vec![vec![0u8; HEADER_LEN + mtu + TAG_LEN]; TUN_BATCH],
            sizes: vec![0; TUN_BATCH],
            reply: Vec::new(),
            gro: GROTable::default(),
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
            let action = self.state.borrow_mut().encapsulate(self.ingress, &mut self.bufs[i], self.sizes[i], &mut self.reply);
            match action {
                TxAction::Send { to, src_ip, len, .. } => self.out.push(to, src_ip, &self.bufs[i][..len]).await,
                TxAction::Reply(_) => {
                    let mut out = vec![0u8; VIRTIO_NET_HDR_LEN];
                    out.extend_from_slice(&self.reply);
                    let dev: &tun_rs::DeviceImpl = &self.dev;
                    if let Err(e) = dev.send_multiple(&mut self.gro, &mut [out], VIRTIO_NET_HDR_LEN) {
                        tracing::debug!("writing an ICMP error to the TUN: {e}");
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
    devices: Rc<Vec<Arc<AsyncDevice>>>,
    spec: DataPlaneSpec,
    start: Instant,
    events: mpsc::Sender<DataEvent>,
    out: Out,
    slots: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
    tun_out: Vec<Vec<Vec<u8>>>,
    pool: Vec<Vec<u8>>,
    gro: GROTable,
}

impl RxTask {
    fn new(sock: usize, socks: Rc<Vec<Socket>>, rx: Rc<RefCell<RxState>>, devices: Rc<Vec<Arc<AsyncDevice>>>, spec: DataPlaneSpec, start: Instant, events: mpsc::Sender<DataEvent>) -> RxTask {
        let n = quinn_udp::BATCH_SIZE.max(1);
        let tuns = devices.len();
        let out = Out::new(socks.clone(), spec.node.clone());
        RxTask {
            sock,
            socks,
            rx,
            devices,
            spec,
            start,
            events,
            out,
            slots: vec![vec![0u8; RX_SLOT]; n],
            meta: vec![RecvMeta::default(); n],
            tun_out: vec![Vec::new(); tuns],
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
        let aggregate = self.devices.len() - 1;
        for i in 0..n {
            let m = self.meta[i];
            let from = m.addr;
            let stride = if m.stride == 0 { m.len } else { m.stride };
            let len = m.len.min(RX_SLOT);
            let mut at = 0;
            while at < len {
                let start = at;
                let end = (at + stride.max(1)).min(len);
                at = end;
                let dgram = &mut self.slots[i][start..end];
                if dgram.len() < OVERHEAD {
                    self.spec.node.drops.add(DropReason::Malformed);
                    continue;
                }
                let outcome = self.rx.borrow_mut().decapsulate(dgram, from, now_ms);
                match outcome {
                    Ok(Rx::Deliver(d)) => {
                        let t = match d.tun {
                            Tun::Peer(p) => p,
                            Tun::Aggregate => aggregate,
                        };
                        let mut b = self.pool.pop().unwrap_or_else(|| Vec::with_capacity(RX_OUT_CAP));
                        b.clear();
                        b.resize(VIRTIO_NET_HDR_LEN, 0);
                        b.extend_from_slice(&dgram[d.inner]);
                        self.tun_out[t].push(b);
                        if self.tun_out[t].len() >= RX_TUN_BATCH {
                            Self::write_tun(&self.devices[t], &mut self.gro, &mut self.tun_out[t], &mut self.pool, &self.spec, t);
                        }
                    }
                    Ok(Rx::Control { peer, payload }) => {
                        let ev = DataEvent::Control { peer, from, payload: dgram[payload].to_vec(), at: Instant::now() };
                        if self.events.try_send(ev).is_err() {
                            self.spec.node.drops.add(DropReason::SendError);
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
                Self::write_tun(&self.devices[t], &mut self.gro, &mut self.tun_out[t], &mut self.pool, &self.spec, t);
            }
        }
    }

    /// Writes queued packets to one TUN; tun-rs coalesces consecutive TCP segments of a
    /// flow into one super-packet (GRO), so the kernel's TCP sees one write per train.
    fn write_tun(dev: &AsyncDevice, gro: &mut GROTable, out: &mut Vec<Vec<u8>>, pool: &mut Vec<Vec<u8>>, spec: &DataPlaneSpec, t: usize) {
        let dev: &tun_rs::DeviceImpl = dev;
        if let Err(e) = dev.send_multiple(gro, out, VIRTIO_NET_HDR_LEN) {
            tracing::debug!("TUN write: {e}");
            let n = out.len() as u64;
            match spec.peers.get(t) {
                Some(p) => p.counters.drops.add_n(DropReason::TunWriteError, n),
                None => spec.node.drops.add_n(DropReason::TunWriteError, n),
            }
        }
        for b in out.drain(..) {
            if pool.len() < RX_POOL_MAX && b.capacity() >= RX_OUT_CAP {
                pool.push(b);
            }
        }
    }
}
