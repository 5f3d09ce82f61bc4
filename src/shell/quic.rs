//! QUIC (quinn + rustls) for the management session: endpoints, dialling, the Hello
//! exchange, and the data-plane keys taken from the TLS exporter (RFC 8446 §7.5).

use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures::stream::{FuturesUnordered, StreamExt};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::identity::{Identity, NodeId, PublicKey};
use crate::shell::tls::{self, AllowedKeys, NodeCert, RefusedKeys};
use crate::wire::mgmt::{self, Frame, Message};
use crate::wire::{self, SessionSecrets};

/// Management keepalive interval: three fit in [`IDLE_TIMEOUT`]. The failover probes find
/// a dead path sooner (within a second and a half even for an idle peer); keepalives only
/// keep the session (and NAT bindings) alive, and each costs both ends a wake-up or two,
/// the largest part of an idle node's wake-ups at 1 s (issue 11). Only the side that
/// dialled sends them: the other side's acknowledgements keep the dialler's idle timer
/// running, and its pings keep the other side's. With both sides pinging, a node with 17
/// sessions at N = 100 sent 17 keepalive datagrams and acknowledgements per second, nearly
/// all it sent while idle. Pinging every 1.5 s with a 4.5 s idle timeout noticed a failed
/// management neighbour 1.5 s sooner, but a one-way cut then ended the session (and moved
/// the working direction to a relay too) before the failover had repaired the broken one.
pub const KEEPALIVE: Duration = Duration::from_secs(2);
/// A session with no traffic (keepalives included) for this long is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(6);
// The receive-silence watch of a watched session ends it at the same moment.
const _: () = assert!(IDLE_TIMEOUT.as_millis() == crate::overlay::session::WATCHED.timeout.as_millis());
/// Time an endpoint has to answer a dial (its first handshake flight to arrive), over all
/// the peer's endpoints: a dial that no endpoint answered in this long has failed.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(3);
/// Time an endpoint that answered has to complete the handshake. A peer that answers is
/// alive; on a loaded host (100 daemons starting on 2 cores, issue 11) its handshake took
/// longer than [`DIAL_TIMEOUT`], and giving up at 3 s threw away the work both sides had
/// done and started it again, on both sides, at every retry. QUIC's idle timeout still
/// ends a handshake whose peer went silent.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A dial tries the peer's next endpoint when the current one has not answered for this
/// long, and keeps the earlier attempts running (RFC 8305 happy eyeballs): a peer whose
/// first endpoint is dead costs one dial timeout, not one per endpoint.
pub const DIAL_STAGGER: Duration = Duration::from_millis(1000);
/// Time allowed for the Hello exchange after the handshake (and for reading one
/// management frame). As long as [`HANDSHAKE_TIMEOUT`] for the same reason: a loaded peer
/// is slow, not gone.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// QUIC application close codes.
pub mod close {
    /// Replaced by a newer session.
    pub const REPLACED: u32 = 1;
    /// Lost the tie-break against a simultaneous connection.
    pub const DUPLICATE: u32 = 2;
    /// Protocol violation in the Hello exchange.
    pub const PROTOCOL: u32 = 3;
    /// The daemon is stopping.
    pub const SHUTDOWN: u32 = 4;
    /// Nothing was received on the session for [`super::IDLE_TIMEOUT`]
    /// ([`crate::overlay::session::Silence`]). (Code 5 is `sessions::CLOSE_IDLE`.)
    pub const SILENT: u32 = 6;
    /// The peer was removed from the configuration (a reload).
    pub const REMOVED: u32 = 7;
}

/// QUIC transport settings; `dialler` sends the keepalives ([`KEEPALIVE`]).
fn transport(dialler: bool) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(dialler.then_some(KEEPALIVE));
    t.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().expect("idle timeout fits")));
    t.max_concurrent_bidi_streams(64u32.into());
    t.max_concurrent_uni_streams(1024u32.into());
    t.datagram_receive_buffer_size(None);
    Arc::new(t)
}

/// A connection attempt to one endpoint.
type Dialing = std::pin::Pin<Box<dyn std::future::Future<Output = (SocketAddr, Result<quinn::Connection>)> + Send>>;

/// The management endpoint(s) and what dialling needs.
pub struct Management {
    /// One endpoint per listen socket.
    pub endpoints: Vec<quinn::Endpoint>,
    /// Datagrams on the management port that cannot be QUIC ([`not_quic`]).
    pub garbage: Arc<std::sync::atomic::AtomicU64>,
    cert: NodeCert,
    /// Record of refused handshakes.
    pub refused: Arc<RefusedKeys>,
    local: NodeId,
    name: String,
    data_port: u16,
}

impl Management {
    /// Builds endpoints on the given management sockets.
    ///
    /// The stateless-reset key and the connection-ID hash key are derived from the node key,
    /// so that after a restart the node still recognises its old connection IDs and resets
    /// its peers' stale connections at the next keepalive (RFC 9000 §10.3) instead of
    /// leaving them to time out.
    ///
    /// # Errors
    /// TLS or socket errors.
    pub fn new(identity: &Identity, name: &str, data_port: u16, allowed: Arc<AllowedKeys>, sockets: Vec<StdUdpSocket>) -> Result<Management> {
        let cert = NodeCert::new(identity)?;
        let refused = Arc::new(RefusedKeys::default());
        let server = tls::server_config(&cert, allowed, refused.clone())?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server).context("QUIC server TLS")?));
        server.transport_config(transport(false));
        let reset = Sha256::new().chain_update(b"detour stateless reset v1").chain_update(identity.pkcs8_der()).finalize();
        let cid = Sha256::new().chain_update(b"detour connection id v1").chain_update(identity.pkcs8_der()).finalize();
        let cid_key = u64::from_be_bytes(cid[..8].try_into().expect("8 bytes"));
        let mut endpoints = Vec::new();
        let garbage = Arc::new(std::sync::atomic::AtomicU64::new(0));
        for s in sockets {
            let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &reset);
            let mut ep_cfg = quinn::EndpointConfig::new(Arc::new(reset_key));
            ep_cfg.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
            // Peers keep QUIC's fixed bit set (RFC 9287 greasing off), so a datagram without
            // it is not QUIC and is counted as garbage.
            ep_cfg.grease_quic_bit(false);
            let runtime = Arc::new(quinn::TokioRuntime);
            let inner = quinn::Runtime::wrap_udp_socket(&*runtime, s).context("management socket")?;
            let screened = Arc::new(Screened { inner, garbage: garbage.clone() });
            let ep = quinn::Endpoint::new_with_abstract_socket(ep_cfg, Some(server.clone()), screened, runtime).context("starting the QUIC endpoint")?;
            endpoints.push(ep);
        }
        Ok(Management { endpoints, garbage, cert, refused, local: identity.node_id(), name: name.to_string(), data_port })
    }

    fn endpoint_for(&self, addr: &SocketAddr) -> Option<&quinn::Endpoint> {
        let wanted_v4 = addr.is_ipv4();
        // An IPv4 endpoint for IPv4; a dual-stack IPv6 endpoint handles both.
        self.endpoints
            .iter()
            .find(|e| e.local_addr().map(|a| a.is_ipv4() == wanted_v4).unwrap_or(false))
            .or_else(|| self.endpoints.iter().find(|e| e.local_addr().map(|a| a.is_ipv6()).unwrap_or(false)))
    }

    /// Dials the peer with key `peer` at its management addresses: the next one joins the
    /// race each [`DIAL_STAGGER`] the earlier ones go unanswered, the first handshake that
    /// completes wins. An endpoint must answer within [`DIAL_TIMEOUT`] of the dial's start,
    /// and then complete the handshake within [`HANDSHAKE_TIMEOUT`].
    ///
    /// # Errors
    /// The last failure when no address worked, or none answered in time.
    pub async fn dial(&self, peer: PublicKey, addrs: &[SocketAddr]) -> Result<quinn::Connection> {
        let client = tls::client_config(&self.cert, peer, self.refused.clone())?;
        let mut client = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client).context("QUIC client TLS")?));
        client.transport_config(transport(true));
        let answer_by = tokio::time::Instant::now() + DIAL_TIMEOUT;
        let mut last = anyhow!("no endpoint configured");
        let mut next = addrs.iter();
        let mut racing = FuturesUnordered::new();
        loop {
            if racing.is_empty() {
                match self.connect(&client, answer_by, &mut next, &mut last) {
                    Some(f) => racing.push(f),
                    None => return Err(last),
                }
            }
            tokio::select! {
                r = racing.next() => match r {
                    Some((_, Ok(conn))) => return Ok(conn),
                    Some((addr, Err(e))) => last = anyhow!("{addr}: {e:#}"),
                    None => {}
                },
                _ = tokio::time::sleep(DIAL_STAGGER), if tokio::time::Instant::now() < answer_by => {
                    if let Some(f) = self.connect(&client, answer_by, &mut next, &mut last) {
                        racing.push(f);
                    }
                }
            }
        }
    }

    /// Starts a connection to the next endpoint of `addrs` that a local socket can reach;
    /// the ones skipped leave their reason in `last`. The attempt fails when the endpoint
    /// has not answered by `answer_by`.
    fn connect<'a>(&self, client: &quinn::ClientConfig, answer_by: tokio::time::Instant, addrs: &mut impl Iterator<Item = &'a SocketAddr>, last: &mut anyhow::Error) -> Option<Dialing> {
        for addr in addrs {
            let Some(ep) = self.endpoint_for(addr) else {
                *last = anyhow!("no local socket can reach {addr}");
                continue;
            };
            let target = match (addr, ep.local_addr()) {
                (SocketAddr::V4(v4), Ok(SocketAddr::V6(_))) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
                _ => *addr,
            };
            match ep.connect_with(client.clone(), target, "detour") {
                Ok(mut c) => {
                    let addr = *addr;
                    return Some(Box::pin(async move {
                        // The server's first flight (its TLS handshake data) is its answer.
                        match tokio::time::timeout_at(answer_by, c.handshake_data()).await {
                            Err(_) => return (addr, Err(anyhow!("no answer within {DIAL_TIMEOUT:?}"))),
                            Ok(Err(e)) => return (addr, Err(e.into())),
                            Ok(Ok(_)) => {}
                        }
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, c).await {
                            Err(_) => (addr, Err(anyhow!("answered, but the handshake did not complete within {HANDSHAKE_TIMEOUT:?}"))),
                            Ok(r) => (addr, r.map_err(Into::into)),
                        }
                    }));
                }
                Err(e) => *last = anyhow!("{addr}: {e}"),
            }
        }
        None
    }

    /// Runs the Hello exchange on a new connection and derives the data-plane keys.
    /// The side that dialled opens the stream and speaks first.
    ///
    /// # Errors
    /// Stream errors, timeouts, or a Hello that does not match the authenticated peer.
    pub async fn hello(&self, conn: &quinn::Connection, peer: NodeId, dialled: bool) -> Result<(SessionSecrets, u16, String)> {
        let run = async {
            let (mut send, mut recv) = if dialled { conn.open_bi().await? } else { conn.accept_bi().await? };
            let ours = mgmt::encode(&Frame { src: self.local, dst: peer, hop_limit: 0, message: Message::Hello { version: 1, name: self.name.clone(), data_port: self.data_port } });
            if dialled {
                send.write_all(&ours).await?;
            }
            let frame = read_frame(&mut recv).await?;
            if !dialled {
                send.write_all(&ours).await?;
            }
            send.flush().await?;
            let _ = send.finish();
            Ok::<Frame, anyhow::Error>(frame)
        };
        let frame = tokio::time::timeout(HELLO_TIMEOUT, run).await.map_err(|_| anyhow!("hello timed out"))??;
        if frame.src != peer || frame.dst != self.local {
            bail!("hello names {} → {}, expected {} → {}", frame.src, frame.dst, peer, self.local);
        }
        let Message::Hello { version, name, data_port } = frame.message else {
            bail!("expected a hello, got {:?}", frame.message);
        };
        if version != 1 || data_port == 0 {
            bail!("unsupported hello (version {version}, data port {data_port})");
        }
        let mut material = [0u8; wire::EXPORTER_LEN];
        conn.export_keying_material(&mut material, wire::EXPORTER_LABEL, b"").map_err(|e| anyhow!("TLS exporter: {e:?}"))?;
        Ok((wire::split_exporter(&material, &self.local, &peer), data_port, name))
    }
}

/// The shortest datagram that can be a QUIC packet of a detour session (bytes): a
/// short header with detour's 8-byte connection IDs, one byte of packet number, one of
/// payload and the 16-byte AEAD tag is 27; long headers are longer.
pub const MIN_QUIC: usize = 21;

/// Whether datagram `d` cannot be QUIC (RFC 9000 §17): shorter than [`MIN_QUIC`], or with
/// the fixed bit (0x40 of the first byte) clear, which detour's peers never send (greasing
/// is off, RFC 9287).
pub fn not_quic(d: &[u8]) -> bool {
    d.len() < MIN_QUIC || d[0] & 0x40 == 0
}

/// The management socket with a count in front of quinn: datagrams that cannot be QUIC
/// ([`not_quic`]) are counted (quinn drops them without a trace). They still reach
/// quinn, which drops them.
#[derive(Debug)]
struct Screened {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
    garbage: Arc<std::sync::atomic::AtomicU64>,
}

impl quinn::AsyncUdpSocket for Screened {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(&self, cx: &mut std::task::Context, bufs: &mut [std::io::IoSliceMut<'_>], meta: &mut [quinn::udp::RecvMeta]) -> std::task::Poll<std::io::Result<usize>> {
        let r = self.inner.poll_recv(cx, bufs, meta);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            let mut bad = 0;
            for (buf, m) in bufs.iter().zip(meta.iter()).take(*n) {
                let len = m.len.min(buf.len());
                if len == 0 {
                    bad += 1;
                    continue;
                }
                let stride = if m.stride == 0 { len } else { m.stride };
                bad += buf[..len].chunks(stride).filter(|d| not_quic(d)).count() as u64;
            }
            if bad > 0 {
                self.garbage.fetch_add(bad, std::sync::atomic::Ordering::Relaxed);
            }
        }
        r
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// Reads one length-prefixed management frame from a stream.
///
/// # Errors
/// Stream errors and malformed frames.
pub async fn read_frame(recv: &mut quinn::RecvStream) -> Result<Frame> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await?;
    let len = mgmt::check_len(u32::from_be_bytes(len) as usize)?;
    let mut buf = vec![0u8; len];
    recv.read_exact(&mut buf).await?;
    super::capture::sample(super::capture::Target::MgmtFrame, &[&buf]);
    Ok(mgmt::decode(&buf)?)
}

/// Sends one management frame on a new unidirectional stream. Urgent frames (routed
/// messages, relay signalling) are sent before anything else queued on the session.
///
/// # Errors
/// Stream errors.
pub async fn send_frame(conn: &quinn::Connection, frame: &Frame) -> Result<()> {
    send_frame_prio(conn, frame, true).await
}

/// [`send_frame`] with a choice of priority: gossip goes after urgent frames.
///
/// # Errors
/// Stream errors.
pub async fn send_frame_prio(conn: &quinn::Connection, frame: &Frame, urgent: bool) -> Result<()> {
    let mut s = conn.open_uni().await?;
    let _ = s.set_priority(if urgent { 1 } else { 0 });
    s.write_all(&mgmt::encode(frame)).await?;
    s.finish()?;
    Ok(())
}

/// Whether the peer closed the connection because it refused this node's certificate
/// (TLS alert `access_denied`, which rustls sends for a key the verifier does not admit:
/// [`crate::shell::tls`]; QUIC carries it as CRYPTO_ERROR 0x100 + alert, RFC 9001 §4.8).
/// A TLS 1.3 client finishes its handshake before the server checks the client's
/// certificate, so the refusal arrives as a close of an established connection.
pub fn refused_by_peer(e: &quinn::ConnectionError) -> bool {
    const ACCESS_DENIED: u8 = 49;
    matches!(e, quinn::ConnectionError::ConnectionClosed(c) if c.error_code == quinn_proto::TransportErrorCode::crypto(ACCESS_DENIED))
}

/// The pinned key the peer presented on an authenticated connection.
pub fn peer_key(conn: &quinn::Connection) -> Option<PublicKey> {
    let id = conn.peer_identity()?;
    let certs = id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    certs.first().and_then(tls::cert_key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket() -> StdUdpSocket {
        StdUdpSocket::bind("127.0.0.1:0").unwrap()
    }

    /// Two in-process nodes on loopback: the pinned peer gets a session and both ends derive
    /// mirrored keys; a node with another key is refused on both sides.
    #[tokio::test]
    async fn pinned_handshake_and_refusal() {
        let a = Identity::from_seed([1; 32]);
        let b = Identity::from_seed([2; 32]);
        let mallory = Identity::from_seed([3; 32]);
        let allow = |k: PublicKey| Arc::new(AllowedKeys::new([k]));
        let ma = Management::new(&a, "a", 7000, allow(b.public_key()), vec![socket()]).unwrap();
        let mb = Management::new(&b, "b", 7100, allow(a.public_key()), vec![socket()]).unwrap();
        let mm = Management::new(&mallory, "m", 7200, allow(a.public_key()), vec![socket()]).unwrap();
        let b_addr = mb.endpoints[0].local_addr().unwrap();
        let a_addr = ma.endpoints[0].local_addr().unwrap();

        let accept = async {
            let conn = mb.endpoints[0].accept().await.unwrap().await.unwrap();
            assert_eq!(peer_key(&conn), Some(a.public_key()));
            let r = mb.hello(&conn, a.node_id(), false).await.unwrap();
            (r, conn)
        };
        let dial = async {
            let conn = ma.dial(b.public_key(), &[b_addr]).await.unwrap();
            let r = ma.hello(&conn, b.node_id(), true).await.unwrap();
            (r, conn)
        };
        let (((sb, port_a, name_a), _cb), ((sa, port_b, name_b), _ca)) = tokio::join!(accept, dial);
        assert_eq!((port_a, name_a.as_str(), port_b, name_b.as_str()), (7000, "a", 7100, "b"));
        assert_eq!(sa.tx_key, sb.rx_key);
        assert_eq!(sa.rx_key_id, sb.tx_key_id);

        // mallory dials a: a's server verifier refuses the unknown client key
        let r = async {
            let incoming = ma.endpoints[0].accept().await.unwrap();
            incoming.await.is_err()
        };
        let a_addrs = [a_addr];
        let d = mm.dial(a.public_key(), &a_addrs);
        let (refused, dialled) = tokio::join!(r, d);
        assert!(refused);
        // The client may see the handshake complete before the server's refusal arrives;
        // either way no session forms on a, which counted the refusal with mallory's key.
        // When it did, the close says the key was refused (the dialler tries the same peer
        // again instead of giving up on it).
        if let Ok(conn) = dialled {
            let reason = conn.closed().await;
            assert!(refused_by_peer(&reason), "{reason:?}");
        }
        let (n, key) = ma.refused.snapshot();
        assert_eq!(n, 1);
        assert!(key.unwrap().contains(&mallory.public_key().to_string()));
        // a's overlay is told which dialler to look up, once.
        assert_eq!(ma.refused.take_recent(), vec![mallory.node_id()]);
        assert!(ma.refused.take_recent().is_empty());
        // A connection that timed out or was closed by the application was not refused.
        assert!(!refused_by_peer(&quinn::ConnectionError::TimedOut));

        // a dials mallory while expecting b's key: a refuses the server certificate
        let m_addr = mm.endpoints[0].local_addr().unwrap();
        let accept_m = async {
            if let Some(i) = mm.endpoints[0].accept().await {
                let _ = i.await;
            }
        };
        let m_addrs = [m_addr];
        let (res, _) = tokio::join!(ma.dial(b.public_key(), &m_addrs), accept_m);
        assert!(res.is_err());
        assert_eq!(ma.refused.snapshot().0, 2);
        // A server this node refused is not a dialler to look up.
        assert!(ma.refused.take_recent().is_empty());
    }
}
