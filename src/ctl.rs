//! The local control protocol between `detourctl` and `detourd`, and its text rendering.
//!
//! Transport: a Unix stream socket (root only: mode 0600 and a peer-credential check). The
//! client writes one JSON request on one line; the daemon answers with one JSON line.
//! Anything else gets an error answer. `--json` output of `detourctl` is exactly the
//! response object.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

/// Largest request line the daemon reads (bytes).
pub const MAX_REQUEST: usize = 64 * 1024;

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The node and all peers.
    Status,
}

/// A response.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// Answer to [`Request::Status`].
    Status(Box<Status>),
    /// The request was not understood or failed.
    Error {
        /// What went wrong.
        message: String,
    },
}

/// `detourctl status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// This node.
    pub node: NodeStatus,
    /// Every configured peer.
    pub peers: Vec<PeerStatus>,
    /// Drops not attributable to a peer, by reason.
    pub drops: BTreeMap<String, u64>,
    /// Management handshakes refused because the peer presented an unknown key.
    pub refused_handshakes: u64,
    /// The last unknown key presented, if any.
    pub last_refused_key: Option<String>,
    /// Management connections that failed: TLS handshakes that did not complete (refused
    /// keys included) and sessions closed for a protocol error.
    pub management_errors: u64,
}

/// This node's identity and ports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Node name.
    pub name: String,
    /// Node ID (32 hex digits).
    pub node_id: String,
    /// Public key (base64).
    pub public_key: String,
    /// Data port.
    pub data_port: u16,
    /// Management port.
    pub management_port: u16,
    /// Overlay IPv4 address with prefix length.
    pub overlay_ipv4: Option<String>,
    /// Overlay IPv6 address with prefix length.
    pub overlay_ipv6: Option<String>,
    /// Aggregate interface name.
    pub aggregate_interface: String,
    /// Seconds since the daemon started.
    pub uptime_s: u64,
}

/// One peer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Peer name.
    pub name: String,
    /// Node ID.
    pub node_id: String,
    /// Per-peer interface.
    pub interface: String,
    /// Management session state: `up`, `connecting` or `down`.
    pub state: String,
    /// Underlay data endpoint in use.
    pub endpoint: Option<String>,
    /// Path in use: `direct`, or `none` before the first session.
    pub path: String,
    /// Seconds since the current management session was established (the handshake that
    /// produced the data keys).
    pub last_handshake_s: Option<f64>,
    /// Smoothed RTT of the management session, in milliseconds.
    pub rtt_ms: Option<f64>,
    /// Seconds since the last authenticated data packet.
    pub last_rx_s: Option<f64>,
    /// Inner packets received.
    pub rx_packets: u64,
    /// Inner bytes received.
    pub rx_bytes: u64,
    /// Inner packets sent.
    pub tx_packets: u64,
    /// Inner bytes sent.
    pub tx_bytes: u64,
    /// Drops by reason.
    pub drops: BTreeMap<String, u64>,
    /// Sessions established since start.
    pub sessions: u64,
    /// This node's addresses on the per-peer link.
    pub link_addresses: Vec<String>,
    /// The peer's overlay addresses.
    pub overlay_addresses: Vec<String>,
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

fn ago(s: Option<f64>) -> String {
    match s {
        None => "never".into(),
        Some(s) if s < 1.0 => format!("{:.0} ms ago", s * 1000.0),
        Some(s) if s < 120.0 => format!("{s:.1} s ago"),
        Some(s) => format!("{:.0} min ago", s / 60.0),
    }
}

fn drops(map: &BTreeMap<String, u64>) -> String {
    if map.is_empty() {
        return "none".into();
    }
    map.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

/// Renders status as a readable text, one block per peer (like `wg show`).
pub fn render_status(s: &Status) -> String {
    let mut o = String::new();
    let n = &s.node;
    let _ = writeln!(o, "node: {}", n.name);
    let _ = writeln!(o, "  node id: {}", n.node_id);
    let _ = writeln!(o, "  public key: {}", n.public_key);
    let _ = writeln!(o, "  ports: data {} / management {}", n.data_port, n.management_port);
    let addrs: Vec<&str> = [n.overlay_ipv4.as_deref(), n.overlay_ipv6.as_deref()].into_iter().flatten().collect();
    let _ = writeln!(o, "  overlay: {} on {}", addrs.join(", "), n.aggregate_interface);
    let _ = writeln!(o, "  uptime: {} s", n.uptime_s);
    if !s.drops.is_empty() {
        let _ = writeln!(o, "  drops: {}", drops(&s.drops));
    }
    if s.management_errors > 0 {
        let _ = writeln!(o, "  management errors: {}", s.management_errors);
    }
    if s.refused_handshakes > 0 {
        let _ = writeln!(
            o,
            "  refused handshakes: {} (last key {})",
            s.refused_handshakes,
            s.last_refused_key.as_deref().unwrap_or("?")
        );
    }
    for p in &s.peers {
        let _ = writeln!(o);
        let _ = writeln!(o, "peer: {} ({})", p.name, p.state);
        let _ = writeln!(o, "  node id: {}", p.node_id);
        let _ = writeln!(o, "  interface: {}  link: {}", p.interface, p.link_addresses.join(", "));
        let _ = writeln!(o, "  overlay: {}", p.overlay_addresses.join(", "));
        let _ = writeln!(o, "  endpoint: {}  path: {}", p.endpoint.as_deref().unwrap_or("(none)"), p.path);
        let _ = writeln!(o, "  latest handshake: {}", ago(p.last_handshake_s));
        match p.rtt_ms {
            Some(r) => {
                let _ = writeln!(o, "  rtt: {r:.2} ms");
            }
            None => {
                let _ = writeln!(o, "  rtt: -");
            }
        }
        let _ = writeln!(
            o,
            "  transfer: {} received ({} pkts), {} sent ({} pkts); last received {}",
            bytes(p.rx_bytes),
            p.rx_packets,
            bytes(p.tx_bytes),
            p.tx_packets,
            ago(p.last_rx_s)
        );
        let _ = writeln!(o, "  drops: {}", drops(&p.drops));
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        assert_eq!(serde_json::from_str::<Request>(r#"{"cmd":"status"}"#).unwrap(), Request::Status);
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
        assert!(serde_json::from_str::<Request>("\u{0}\u{1}garbage").is_err());
    }

    #[test]
    fn renders_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(ago(Some(0.25)), "250 ms ago");
        assert_eq!(ago(None), "never");
    }
}
