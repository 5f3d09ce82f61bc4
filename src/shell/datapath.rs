//! The data path: two threads around the pure [`TxState`] and [`RxState`].
//!
//! * **TX thread**: reads every TUN (per-peer TUNs and the aggregate) with virtio-net
//!   offload, so the kernel hands over 64 KiB TCP super-packets that tun-rs splits into
//!   segments; each segment is sealed by [`TxState`], and consecutive datagrams to the same
//!   peer go out as one UDP GSO `sendmsg` (quinn-udp).
//! * **RX thread**: receives with UDP GRO and `recvmmsg` (quinn-udp), opens each datagram
//!   with [`RxState`] and writes the inner packets per TUN in one GRO-coalescing batch.
//!
//! Each thread runs its own single-threaded tokio runtime, so a packet is never handed
//! between threads. The control plane talks to both through [`DataCommand`] channels.

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

use crate::dataplane::{DataCommand, DataPlaneSpec, DropReason, RxState, Tun, TxAction, TxState};
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
        let DataPathSetup { spec, tuns, mtus, sockets, start, threads } = setup;
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
            let t = std::thread::Builder::new()
                .name("detour-data".into())
                .spawn(move || tun_thread(spec, tuns, mtus, sockets, cmds, ready_tx, Some(start)))
                .context("starting the data thread")?;
            wait_ready(&ready_rx)?;
            return Ok(DataPath { cmds: vec![cmd], threads: vec![t] });
        }
        let (tx_cmd, tx_rx) = mpsc::unbounded_channel();
        let (rx_cmd, rx_rx) = mpsc::unbounded_channel();
        let tx_socks: Vec<DataSocket> = sockets
            .iter()
            .map(|s| Ok(DataSocket { socket: s.socket.try_clone()?, state: s.state.clone(), carries_v4: s.carries_v4, carries_v6: s.carries_v6 }))
            .collect::<io::Result<_>>()
            .context("duplicating the data socket")?;
        let tx_spec = spec.clone();
        let tx_thread = std::thread::Builder::new()
            .name("detour-tx".into())
            .spawn(move || tun_thread(tx_spec, tuns, mtus, tx_socks, tx_rx, ready_tx, None))
            .context("starting the TX thread")?;
        let devices = wait_ready(&ready_rx)?;
        let rx_thread = std::thread::Builder::new()
            .name("detour-rx".into())
            .spawn(move || rx_thread(spec, devices, sockets, rx_rx, start))
            .context("starting the RX thread")?;
        Ok(DataPath { cmds: vec![tx_cmd, rx_cmd], threads: vec![tx_thread, rx_thread] })
    }

    /// Sends a command to every data thread (applied in order).
    pub fn command(&self, cmd: DataCommand) {
        for c in &self.cmds {
            let _ = c.send(cmd.clone());
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

fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

struct TxSocket {
    sock: Rc<UdpSocket>,
    state: Arc<UdpSocketState>,
    v4: bool,
    v6: bool,
}

/// Picks the socket for a destination and the address form it needs (a v4 destination on a
/// dual-stack socket is written v4-mapped).
fn pick(socks: &[TxSocket], to: SocketAddr) -> Option<(usize, SocketAddr)> {
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
fn register_sockets(sockets: Vec<DataSocket>) -> Result<Vec<(Rc<UdpSocket>, DataSocket)>, String> {
    sockets
        .into_iter()
        .map(|s| {
            let sock = UdpSocket::from_std(s.socket.try_clone().map_err(|e| format!("data socket: {e}"))?)
                .map_err(|e| format!("registering the data socket: {e}"))?;
            Ok((Rc::new(sock), s))
        })
        .collect()
}

/// Starts one TUN reader task per TUN on the current `LocalSet`.
fn spawn_tx(spec: &DataPlaneSpec, devices: &[Arc<AsyncDevice>], mtus: &[usize], socks: Vec<TxSocket>) -> Rc<RefCell<TxState>> {
    let state = Rc::new(RefCell::new(TxState::new(spec)));
    let socks = Rc::new(socks);
    let n = devices.len();
    for (i, dev) in devices.iter().enumerate() {
        let ingress = if i + 1 == n { Tun::Aggregate } else { Tun::Peer(i) };
        let task = TxTask::new(dev.clone(), ingress, mtus[i], state.clone(), socks.clone(), spec.node_drops.clone());
        tokio::task::spawn_local(task.run());
    }
    state
}

/// Starts one receiver task per data socket on the current `LocalSet`.
fn spawn_rx(spec: &DataPlaneSpec, devices: Vec<Arc<AsyncDevice>>, socks: Vec<(Rc<UdpSocket>, Arc<UdpSocketState>)>, start: Instant) -> Rc<RefCell<RxState>> {
    let state = Rc::new(RefCell::new(RxState::new(spec)));
    let devices = Rc::new(devices);
    for (sock, sstate) in socks {
        let task = RxTask::new(sock, sstate, state.clone(), devices.clone(), spec.clone(), start);
        tokio::task::spawn_local(task.run());
    }
    state
}

/// The thread that owns the TUNs: it always sends, and with `rx_start` it also receives
/// (the one-thread data path).
fn tun_thread(
    spec: DataPlaneSpec,
    tuns: Vec<SyncDevice>,
    mtus: Vec<usize>,
    sockets: Vec<DataSocket>,
    mut cmds: mpsc::UnboundedReceiver<DataCommand>,
    ready: Ready,
    rx_start: Option<Instant>,
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
        let tx_socks = socks.iter().map(|(sock, s)| TxSocket { sock: sock.clone(), state: s.state.clone(), v4: s.carries_v4, v6: s.carries_v6 }).collect();
        let tx = spawn_tx(&spec, &devices, &mtus, tx_socks);
        let rx = rx_start.map(|start| spawn_rx(&spec, devices.clone(), socks.into_iter().map(|(sock, s)| (sock, s.state)).collect(), start));
        let _ = ready.send(Ok(devices));
        while let Some(cmd) = cmds.recv().await {
            tx.borrow_mut().apply(&cmd);
            if let Some(rx) = &rx {
                rx.borrow_mut().apply(&cmd);
            }
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

struct TxTask {
    dev: Arc<AsyncDevice>,
    ingress: Tun,
    state: Rc<RefCell<TxState>>,
    socks: Rc<Vec<TxSocket>>,
    node_drops: Arc<crate::dataplane::DropCounters>,
    original: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    reply: Vec<u8>,
    batch: Batch,
    gro: GROTable,
}

impl TxTask {
    fn new(dev: Arc<AsyncDevice>, ingress: Tun, mtu: usize, state: Rc<RefCell<TxState>>, socks: Rc<Vec<TxSocket>>, node_drops: Arc<crate::dataplane::DropCounters>) -> TxTask {
        TxTask {
            dev,
            ingress,
            state,
            socks,
            node_drops,
            original: vec![0u8; VIRTIO_NET_HDR_LEN + 65_535],
            bufs: vec![vec![0u8; HEADER_LEN + mtu + TAG_LEN]; TUN_BATCH],
            sizes: vec![0; TUN_BATCH],
            reply: Vec::new(),
            batch: Batch { buf: Vec::with_capacity(GSO_MAX_BYTES + 2048), seg: 0, count: 0, dest: None, closed: false },
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
            self.flush().await;
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
                TxAction::Send { to, src_ip, len, .. } => {
                    let Some((sock, to)) = pick(&self.socks, to) else {
                        self.node_drops.add(DropReason::SendError);
                        continue;
                    };
                    let max_segs = self.socks[sock].state.max_gso_segments().max(1);
                    let dest = (sock, to, src_ip);
                    if !self.batch.try_push(dest, &self.bufs[i][..len], max_segs) {
                        self.flush().await;
                        self.batch.try_push(dest, &self.bufs[i][..len], max_segs);
                    }
                }
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
            let sock: &UdpSocket = &s.sock;
            match sock.try_io(Interest::WRITABLE, || s.state.try_send(sock.into(), &transmit)) {
                Ok(()) => break,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    tracing::debug!("data send to {to}: {e}");
                    self.node_drops.add(DropReason::SendError);
                    break;
                }
            }
        }
        self.batch.buf.clear();
        self.batch.count = 0;
        self.batch.dest = None;
    }
}

fn rx_thread(spec: DataPlaneSpec, devices: Vec<Arc<AsyncDevice>>, sockets: Vec<DataSocket>, mut cmds: mpsc::UnboundedReceiver<DataCommand>, start: Instant) {
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
            Ok(s) => s.into_iter().map(|(sock, s)| (sock, s.state)).collect(),
            Err(e) => {
                tracing::error!("{e}");
                return;
            }
        };
        let state = spawn_rx(&spec, devices, socks, start);
        while let Some(cmd) = cmds.recv().await {
            state.borrow_mut().apply(&cmd);
        }
    });
}

struct RxTask {
    sock: Rc<UdpSocket>,
    state: Arc<UdpSocketState>,
    rx: Rc<RefCell<RxState>>,
    devices: Rc<Vec<Arc<AsyncDevice>>>,
    spec: DataPlaneSpec,
    start: Instant,
    slots: Vec<Vec<u8>>,
    meta: Vec<RecvMeta>,
    out: Vec<Vec<Vec<u8>>>,
    pool: Vec<Vec<u8>>,
    gro: GROTable,
}

impl RxTask {
    fn new(sock: Rc<UdpSocket>, state: Arc<UdpSocketState>, rx: Rc<RefCell<RxState>>, devices: Rc<Vec<Arc<AsyncDevice>>>, spec: DataPlaneSpec, start: Instant) -> RxTask {
        let n = quinn_udp::BATCH_SIZE.max(1);
        let tuns = devices.len();
        RxTask {
            sock,
            state,
            rx,
            devices,
            spec,
            start,
            slots: vec![vec![0u8; RX_SLOT]; n],
            meta: vec![RecvMeta::default(); n],
            out: vec![Vec::new(); tuns],
            pool: Vec::new(),
            gro: GROTable::default(),
        }
    }

    async fn run(mut self) {
        loop {
            if self.sock.readable().await.is_err() {
                return;
            }
            let res = {
                let mut iovs: Vec<IoSliceMut<'_>> = self.slots.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                let state = &self.state;
                let sock: &UdpSocket = &self.sock;
                let meta = &mut self.meta;
                sock.try_io(Interest::READABLE, || state.recv(sock.into(), &mut iovs, meta))
            };
            let n = match res {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    tracing::debug!("data socket receive: {e}");
                    continue;
                }
            };
            self.handle(n);
        }
    }

    fn handle(&mut self, n: usize) {
        let now_ms = self.start.elapsed().as_millis() as u64;
        let aggregate = self.devices.len() - 1;
        {
            let mut rx = self.rx.borrow_mut();
            for i in 0..n {
                let m = self.meta[i];
                let stride = if m.stride == 0 { m.len } else { m.stride };
                let data = &mut self.slots[i][..m.len.min(RX_SLOT)];
                for dgram in data.chunks_mut(stride.max(1)) {
                    if dgram.len() < OVERHEAD {
                        self.spec.node_drops.add(DropReason::Malformed);
                        continue;
                    }
                    let Ok(d) = rx.decapsulate(dgram, now_ms) else { continue };
                    let t = match d.tun {
                        Tun::Peer(p) => p,
                        Tun::Aggregate => aggregate,
                    };
                    let mut b = self.pool.pop().unwrap_or_else(|| Vec::with_capacity(RX_OUT_CAP));
                    b.clear();
                    b.resize(VIRTIO_NET_HDR_LEN, 0);
                    b.extend_from_slice(&dgram[d.inner]);
                    self.out[t].push(b);
                    if self.out[t].len() >= RX_TUN_BATCH {
                        Self::write_tun(&self.devices[t], &mut self.gro, &mut self.out[t], &mut self.pool, &self.spec, t);
                    }
                }
            }
        }
        for t in 0..self.out.len() {
            if !self.out[t].is_empty() {
                Self::write_tun(&self.devices[t], &mut self.gro, &mut self.out[t], &mut self.pool, &self.spec, t);
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
                None => spec.node_drops.add_n(DropReason::TunWriteError, n),
            }
        }
        for b in out.drain(..) {
            if pool.len() < RX_POOL_MAX && b.capacity() >= RX_OUT_CAP {
                pool.push(b);
            }
        }
    }
}
