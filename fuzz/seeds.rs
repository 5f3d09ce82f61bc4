//! Writes seed inputs for the fuzz targets into `fuzz/seeds/<target>/`, made by detour's
//! own encoders with the keys the `decapsulate` target installs: sealed probes and data
//! packets, management frames, local API requests, and a configuration. Run by
//! `scripts/fuzz.sh --seeds`.

use detour_core::dataplane::{DataCommand, PathEndpoint, Tun, TxAction, TxState};
use detour_core::identity::{Identity, NodeId};
use detour_core::overlay::api::{self, op, Address, Request};
use detour_core::path::failover::{PathId, Probe};
use detour_core::wire::{self, mgmt};

mod common;
use common::{A, B};

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds").join(target);
    std::fs::create_dir_all(&dir).expect("seed dir");
    std::fs::write(dir.join(name), bytes).expect("seed file");
}

fn main() {
    // Data plane: A's sending state towards B with the keys the target's B installs.
    let spec = common::spec(A);
    let mut tx = TxState::new(&spec);
    tx.apply(&common::session(A));
    tx.apply(&DataCommand::SetEndpoint { peer: 0, endpoint: Some(PathEndpoint { remote: "192.0.2.2:7720".parse().unwrap(), local_ip: None }) });
    let probe = Probe { echo: false, path: PathId::Direct, seq: 7, sent_us: 123_456, hold_us: 0, reports: vec![(PathId::Direct, 6, 0b111), (PathId::Relay(NodeId([0xc; 16])), 3, 1)] };
    let mut out = vec![0u8; 2048];
    let n = tx.seal_control(0, &probe.encode(), &mut out).expect("sealed probe");
    // The target's first byte chooses the mode: 0 keeps the bytes as they are.
    write("decapsulate", "probe", &[&[0u8][..], &out[..n]].concat());
    write("probe", "probe", &probe.encode());
    // Mode 6: the target seals the probe itself (a control payload).
    write("decapsulate", "seal-probe", &[&[6u8][..], &probe.encode()].concat());
    let echo = Probe { echo: true, hold_us: 42, ..probe };
    write("probe", "echo", &echo.encode());
    // An ICMP echo request and a UDP datagram from 10.1.0.5 to 10.2.0.9, through the peer's TUN.
    let icmp = [0x45, 0, 0, 28, 0, 1, 0, 0, 64, 1, 0, 0, 10, 1, 0, 5, 10, 2, 0, 9, 8, 0, 0xf7, 0xfe, 0, 1, 0, 0];
    let udp = [0x45, 0, 0, 32, 0, 2, 0, 0, 64, 17, 0, 0, 10, 1, 0, 5, 10, 2, 0, 9, 0x30, 0x39, 0x00, 0x35, 0, 12, 0, 0, b'h', b'i', b'!', b'!'];
    for (name, pkt) in [("icmp", &icmp[..]), ("udp", &udp[..])] {
        let mut buf = vec![0u8; 2048];
        buf[wire::HEADER_LEN..wire::HEADER_LEN + pkt.len()].copy_from_slice(pkt);
        let mut reply = Vec::new();
        if let TxAction::Send { len, .. } = tx.encapsulate(Tun::Peer(0), &mut buf, pkt.len(), &mut reply) {
            write("decapsulate", name, &[&[0u8][..], &buf[..len]].concat());
        }
        write("icmp", name, pkt);
        // Mode 2: the target seals the inner packet itself.
        write("decapsulate", &format!("seal-{name}"), &[&[2u8][..], pkt].concat());
    }
    // Management frames.
    let id = Identity::from_seed([3; 32]);
    let frames = [("ping", mgmt::Message::Ping), ("relay_request", mgmt::Message::RelayRequest { a: A, b: B, purpose: detour_core::node::policy::Purpose::Failover })];
    for (name, message) in frames {
        write("mgmt_frame", name, &mgmt::encode(&mgmt::Frame { src: id.node_id(), dst: B, hop_limit: 4, message }));
    }
    // Local API requests.
    let reqs = [
        ("subscribe", Request { op: op::SUBSCRIBE, flags: 0, channel: 1, tag: 0, address: Address::None, payload: Vec::new() }),
        ("send", Request { op: op::SEND, flags: 0, channel: 1, tag: 7, address: Address::Node(B), payload: b"hello".to_vec() }),
    ];
    for (name, r) in reqs {
        write("api", name, &api::encode_request(&r));
    }
    // A configuration with every section.
    let cfg = format!(
        "[node]\nname = \"alice\"\nprivate_key = \"/etc/detour/key\"\noverlay_ipv4 = \"10.77.0.1/24\"\nprefixes = [\"10.1.0.0/24\"]\n\n[policy]\ncommitment = \"failure\"\npriority = 10\n\n[failover]\nprobe_interval_ms = 100\n\n[replex]\nenabled = true\nmode = \"equal\"\n\n[management]\nidle_timeout_s = 60\n\n[[peer]]\nname = \"bob\"\npublic_key = \"{}\"\nendpoints = [\"192.0.2.2\"]\noverlay_ipv4 = \"10.77.0.2\"\n",
        Identity::from_seed([4; 32]).public_key()
    );
    write("config", "full", cfg.as_bytes());
    println!("seeds written to fuzz/seeds/");
}
