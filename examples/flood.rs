//! Flood generator for `scripts/bench.sh flood` and the netns flood test (issue 13): what
//! an abusive or broken host on the underlay can throw at a node.
//!
//! ```text
//! flood quic HOST:PORT RATE SECONDS SRC...   QUIC connection attempts (a real Initial with
//!                                            detour's ALPN and a throwaway key) at RATE per
//!                                            second, round robin over the source addresses
//!                                            SRC; replies are never answered, so each
//!                                            attempt that is accepted stays a pending
//!                                            handshake at the target until it times out.
//! flood udp HOST:PORT SECONDS                random datagrams (1..1400 bytes) as fast as
//!                                            one core sends them.
//! ```
//!
//! Prints one JSON line: `{"sent": N, "seconds": S, "rate": N/S}`.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use detour::identity::Identity;
use detour::shell::tls::{self, NodeCert, RefusedKeys};
use quinn::crypto::rustls::QuicClientConfig;
use rand::{Rng, RngCore};

fn quic(target: SocketAddr, rate: f64, secs: f64, sources: &[IpAddr]) -> Result<u64> {
    let mut rng = rand::thread_rng();
    let me = Identity::generate(&mut rand::rngs::OsRng);
    let other = Identity::generate(&mut rand::rngs::OsRng);
    let cert = NodeCert::new(&me)?;
    let tls = tls::client_config(&cert, other.public_key(), Arc::new(RefusedKeys::default()))?;
    let client = quinn_proto::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).context("QUIC client TLS")?));
    let socks: Vec<UdpSocket> = sources.iter().map(|ip| UdpSocket::bind(SocketAddr::new(*ip, 0)).with_context(|| format!("binding {ip}"))).collect::<Result<_>>()?;
    if socks.is_empty() {
        bail!("no source address");
    }
    let start = Instant::now();
    let mut sent = 0u64;
    let mut ep = None;
    let mut buf = Vec::with_capacity(1500);
    while start.elapsed().as_secs_f64() < secs {
        let due = start + Duration::from_secs_f64(sent as f64 / rate);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        // A fresh endpoint now and then: the abandoned connections' state is dropped with it.
        if sent % 256 == 0 {
            let mut seed = [0u8; 32];
            rng.fill_bytes(&mut seed);
            ep = Some(quinn_proto::Endpoint::new(Arc::new(quinn_proto::EndpointConfig::default()), None, false, Some(seed)));
        }
        let Some(e) = ep.as_mut() else { unreachable!() };
        let now = Instant::now();
        let (_, mut conn) = e.connect(now, client.clone(), target, "detour").context("connecting")?;
        buf.clear();
        if let Some(t) = conn.poll_transmit(now, 1, &mut buf) {
            let _ = socks[sent as usize % socks.len()].send_to(&buf[..t.size], target);
        }
        sent += 1;
    }
    Ok(sent)
}

fn udp(target: SocketAddr, secs: f64) -> Result<u64> {
    let sock = UdpSocket::bind(if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    sock.connect(target)?;
    let mut rng = rand::thread_rng();
    let mut buf = [0u8; 1400];
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        for _ in 0..256 {
            let n = rng.gen_range(1..=buf.len());
            rng.fill_bytes(&mut buf[..n]);
            // Refused (ICMP port unreachable) and full buffers are part of a flood.
            let _ = sock.send(&buf[..n]);
            sent += 1;
        }
    }
    Ok(sent)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: flood quic HOST:PORT RATE SECONDS SRC... | flood udp HOST:PORT SECONDS";
    let start = Instant::now();
    let sent = match args.first().map(String::as_str) {
        Some("quic") if args.len() >= 5 => {
            let sources: Vec<IpAddr> = args[4..].iter().map(|s| s.parse().with_context(|| format!("source address {s}"))).collect::<Result<_>>()?;
            quic(args[1].parse().context("target")?, args[2].parse().context("rate")?, args[3].parse().context("seconds")?, &sources)?
        }
        Some("udp") if args.len() == 3 => udp(args[1].parse().context("target")?, args[2].parse().context("seconds")?)?,
        _ => bail!("{usage}"),
    };
    let secs = start.elapsed().as_secs_f64();
    println!("{{\"sent\": {sent}, \"seconds\": {secs:.3}, \"rate\": {:.0}}}", sent as f64 / secs);
    Ok(())
}
