//! `detourctl`: keys, node IDs, the daemon's status, and the local management API (send,
//! listen, resolve, register). See `detourctl --help`.

use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use detour::cli::detourctl::{ApiArgs, Args, Cmd, Query};
use detour::config::{DEFAULT_CONFIG_DIR, DEFAULT_CONFIG_PATH, DEFAULT_CONTROL_SOCKET, DEFAULT_DATA_PORT};
use detour::ctl::{render_nodes, render_paths, render_status, Request, Response};
use detour::identity::{Identity, NodeId, PublicKey};
use detour::overlay::api::{self, flag, kind, op, Address, Reply};

fn read_identity(file: Option<PathBuf>) -> Result<Identity, String> {
    match file {
        Some(p) if p.as_os_str() != "-" => detour::shell::files::read_key(&p).map_err(|e| e.to_string()),
        _ => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map_err(|e| format!("reading standard input: {e}"))?;
            Identity::from_pem(&s).ok_or_else(|| "standard input: not an Ed25519 private key in PKCS#8 PEM form".to_string())
        }
    }
}

fn socket_path(socket: Option<PathBuf>, config: Option<PathBuf>) -> Result<PathBuf, String> {
    if let Some(s) = socket {
        return Ok(s);
    }
    let explicit = config.is_some();
    let path = config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    match detour::shell::files::load_config(&path) {
        Ok(c) => Ok(c.node.control_socket),
        Err(e) if explicit => Err(e.to_string()),
        Err(_) => Ok(PathBuf::from(DEFAULT_CONTROL_SOCKET)),
    }
}

fn ask(socket: Option<PathBuf>, config: Option<PathBuf>, req: Request) -> Result<Response, String> {
    let path = socket_path(socket, config)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(detour::shell::control::request(&path, &req)).map_err(|e| format!("{e:#}"))
}

fn unexpected(r: Response) -> String {
    match r {
        Response::Error { message } => format!("detourd: {message}"),
        other => format!("unexpected answer from detourd: {other:?}"),
    }
}

fn api_addr(a: &ApiArgs) -> Result<SocketAddr, String> {
    if let Some(p) = a.port {
        return Ok(SocketAddr::from(([127, 0, 0, 1], p)));
    }
    let explicit = a.config.is_some();
    let path = a.config.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
    match detour::shell::files::load_config(&path) {
        Ok(c) => match c.management.api_port {
            Some(p) => Ok(SocketAddr::from(([127, 0, 0, 1], p))),
            None => Err(format!("{}: the local API is off (management.api_port = 0)", path.display())),
        },
        Err(e) if explicit => Err(e.to_string()),
        Err(_) => Ok(SocketAddr::from(([127, 0, 0, 1], DEFAULT_DATA_PORT + 2))),
    }
}

fn address(s: &str) -> Address {
    if s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        if let Ok(id) = s.parse::<NodeId>() {
            return Address::Node(id);
        }
    }
    Address::Name(s.to_string())
}

fn explain(r: &Reply) -> String {
    let code = api::ErrorCode::from_u8(r.code).map(|c| c.as_str()).unwrap_or("unknown");
    format!("{code}: {}", String::from_utf8_lossy(&r.body))
}

/// A client of the local API.
struct ApiClient {
    sock: UdpSocket,
    tag: u32,
}

impl ApiClient {
    fn connect(to: SocketAddr) -> Result<ApiClient, String> {
        let sock = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        sock.connect(to).map_err(|e| e.to_string())?;
        Ok(ApiClient { sock, tag: std::process::id() })
    }

    fn send(&mut self, op: u8, flags: u8, channel: u16, address: Address, payload: Vec<u8>) -> Result<u32, String> {
        self.tag = self.tag.wrapping_add(1);
        let req = api::Request { op, flags, channel, tag: self.tag, address, payload };
        self.sock.send(&api::encode_request(&req)).map_err(|e| format!("sending to detourd's API: {e}"))?;
        Ok(self.tag)
    }

    /// The next datagram, or `None` at the deadline.
    fn recv(&self, deadline: Instant) -> Result<Option<Reply>, String> {
        let mut buf = vec![0u8; 65_536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.sock.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    if let Some(r) = Reply::decode(&buf[..n]) {
                        return Ok(Some(r));
                    }
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Err("detourd's local API does not answer (is detourd running?)".into()),
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Sends a request and waits for its first answer.
    fn call(&mut self, op: u8, channel: u16, address: Address) -> Result<Reply, String> {
        let tag = self.send(op, 0, channel, address, Vec::new())?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.recv(deadline)? {
                Some(r) if r.tag == tag && r.kind != kind::MESSAGE => return Ok(r),
                Some(_) => continue,
                None => return Err("no answer from detourd's local API (is detourd running?)".into()),
            }
        }
    }
}

/// What detourd says of a destination: the address to ping, a name for it, and the path
/// in use.
fn path_of(query: &Query, destination: &str) -> Result<(std::net::IpAddr, String, String), String> {
    match ask(query.socket.clone(), query.config.clone(), Request::Why { destination: destination.to_string() })? {
        Response::Why(w) => {
            let addr = w.address.as_deref().and_then(|a| a.parse().ok()).ok_or_else(|| format!("{destination}: no address"))?;
            let (name, path) = match &w.peer {
                Some(p) => (p.name.clone(), if w.through_overlay { p.path.clone() } else { "underlay (direct route, not through detour)".into() }),
                None => (destination.to_string(), "not routed by detour".into()),
            };
            Ok((addr, name, path))
        }
        other => Err(unexpected(other)),
    }
}

/// An ICMP echo socket for `addr`'s family (raw: detourctl runs as root, as the control
/// socket needs).
fn icmp_socket(addr: std::net::IpAddr) -> Result<socket2::Socket, String> {
    use socket2::{Domain, Protocol, Socket, Type};
    let (d, p) = if addr.is_ipv6() { (Domain::IPV6, Protocol::ICMPV6) } else { (Domain::IPV4, Protocol::ICMPV4) };
    Socket::new(d, Type::RAW, Some(p)).map_err(|e| format!("opening an ICMP socket (root needed): {e}"))
}

/// An ICMP echo request with identifier `id`, sequence number `seq` and 8 bytes of payload
/// (etherparse; the kernel fills in an ICMPv6 checksum on a raw socket).
fn echo_request(v6: bool, id: u16, seq: u16) -> Vec<u8> {
    use etherparse::{IcmpEchoHeader, Icmpv4Header, Icmpv4Type, Icmpv6Header, Icmpv6Type};
    let payload = b"detour!\0";
    let echo = IcmpEchoHeader { id, seq };
    let mut b = if v6 { Icmpv6Header::new(Icmpv6Type::EchoRequest(echo)).to_bytes().to_vec() } else { Icmpv4Header::with_checksum(Icmpv4Type::EchoRequest(echo), payload).to_bytes().to_vec() };
    b.extend_from_slice(payload);
    b
}

/// The sequence number of an echo reply with identifier `id` in a datagram of the raw
/// socket (IPv4: with its IP header).
fn echo_reply_seq(v6: bool, id: u16, pkt: &[u8]) -> Option<u16> {
    use etherparse::{Icmpv4Slice, Icmpv4Type, Icmpv6Slice, Icmpv6Type, Ipv4Slice};
    let echo = if v6 {
        match Icmpv6Slice::from_slice(pkt).ok()?.icmp_type() {
            Icmpv6Type::EchoReply(e) => e,
            _ => return None,
        }
    } else {
        let ip = Ipv4Slice::from_slice(pkt).ok()?;
        match Icmpv4Slice::from_slice(ip.payload().payload).ok()?.icmp_type() {
            Icmpv4Type::EchoReply(e) => e,
            _ => return None,
        }
    };
    (echo.id == id).then_some(echo.seq)
}

/// `detourctl ping`.
fn ping(destination: &str, count: u32, interval_ms: u64, timeout_ms: u64, query: Query) -> Result<(), String> {
    let (addr, name, mut path) = path_of(&query, destination)?;
    let v6 = addr.is_ipv6();
    let sock = icmp_socket(addr)?;
    let to = socket2::SockAddr::from(SocketAddr::new(addr, 0));
    let id = (std::process::id() & 0xffff) as u16;
    if !query.json {
        println!("pinging {name} at {addr} through detour: path {path}");
    }
    let (mut received, mut changes) = (0u32, 0u32);
    for seq in 1..=count {
        let t0 = Instant::now();
        sock.send_to(&echo_request(v6, id, seq as u16), &to).map_err(|e| format!("sending to {addr}: {e}"))?;
        let deadline = t0 + Duration::from_millis(timeout_ms);
        let mut rtt = None;
        let mut buf = [0u8; 2048];
        while rtt.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            sock.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
            match (&sock).read(&mut buf) {
                Ok(n) => {
                    if echo_reply_seq(v6, id, &buf[..n]) == Some(seq as u16) {
                        rtt = Some(t0.elapsed());
                    }
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
                Err(e) => return Err(format!("receiving: {e}")),
            }
        }
        let (_, _, now) = path_of(&query, destination)?;
        let change = (now != path).then(|| format!("{path} -> {now}"));
        if change.is_some() {
            changes += 1;
        }
        path = now;
        if rtt.is_some() {
            received += 1;
        }
        if query.json {
            println!("{}", serde_json::json!({ "seq": seq, "address": addr.to_string(), "rtt_ms": rtt.map(|r| r.as_secs_f64() * 1000.0), "path": path, "path_change": change }));
        } else {
            let what = rtt.map(|r| format!("reply from {addr} in {:.2} ms", r.as_secs_f64() * 1000.0)).unwrap_or_else(|| format!("no reply from {addr} within {timeout_ms} ms"));
            let change = change.map(|c| format!("  [path changed: {c}]")).unwrap_or_default();
            println!("seq {seq}: {what}, path {path}{change}");
        }
        if seq < count {
            std::thread::sleep(Duration::from_millis(interval_ms).saturating_sub(t0.elapsed()));
        }
    }
    if !query.json {
        println!("{count} sent, {received} received, {changes} path changes");
    }
    if received == 0 {
        return Err(format!("no reply from {name} ({addr})"));
    }
    Ok(())
}

fn read_message(m: Option<String>) -> Result<Vec<u8>, String> {
    match m {
        Some(s) if s != "-" => Ok(s.into_bytes()),
        _ => {
            let mut v = Vec::new();
            std::io::stdin().read_to_end(&mut v).map_err(|e| format!("reading standard input: {e}"))?;
            Ok(v)
        }
    }
}

/// The configuration file of overlay `name` (`--overlay`): `/etc/detour/NAME.toml`.
fn overlay_config(name: &str) -> Result<PathBuf, String> {
    let ok = !name.is_empty() && name.len() <= 32 && !name.starts_with('.') && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        return Err(format!("--overlay {name:?}: a name of 1-32 characters of A-Z a-z 0-9 . _ -"));
    }
    Ok(std::path::Path::new(DEFAULT_CONFIG_DIR).join(format!("{name}.toml")))
}

fn run(mut args: Args) -> Result<(), String> {
    if let Some(name) = &args.overlay {
        let path = overlay_config(name)?;
        match &mut args.cmd {
            Cmd::Paths(q) | Cmd::Status(q) | Cmd::Nodes(q) | Cmd::Reload(q) | Cmd::Why { query: q, .. } | Cmd::Ping { query: q, .. } => {
                if q.config.is_none() && q.socket.is_none() {
                    q.config = Some(path);
                }
            }
            Cmd::Send { api, .. } | Cmd::Listen { api, .. } | Cmd::Resolve { api, .. } | Cmd::Register { api, .. } => {
                if api.config.is_none() && api.port.is_none() {
                    api.config = Some(path);
                }
            }
            Cmd::Genkey { .. } | Cmd::Pubkey { .. } | Cmd::Nodeid { .. } => {}
        }
    }
    match args.cmd {
        Cmd::Genkey { file } => {
            let id = detour::shell::files::generate_identity();
            detour::shell::files::write_key(&id, &file).map_err(|e| e.to_string())?;
            eprintln!("wrote {} (node id {})", file.display(), id.node_id());
            println!("{}", id.public_key());
        }
        Cmd::Pubkey { file } => println!("{}", read_identity(file)?.public_key()),
        Cmd::Nodeid { file, public_key } => match public_key {
            Some(k) => println!("{}", k.parse::<PublicKey>().map_err(|e| format!("--public-key: {e}"))?.node_id()),
            None => println!("{}", read_identity(file)?.node_id()),
        },
        Cmd::Status(q) => match ask(q.socket, q.config, Request::Status)? {
            Response::Status(s) if q.json => println!("{}", serde_json::to_string_pretty(&s).map_err(|e| e.to_string())?),
            Response::Status(s) => print!("{}", render_status(&s)),
            other => return Err(unexpected(other)),
        },
        Cmd::Why { destination, query: q } => match ask(q.socket, q.config, Request::Why { destination })? {
            Response::Why(w) if q.json => println!("{}", serde_json::to_string_pretty(&w).map_err(|e| e.to_string())?),
            Response::Why(w) => print!("{}", detour::ctl::render_why(&w)),
            other => return Err(unexpected(other)),
        },
        Cmd::Ping { destination, count, interval_ms, timeout_ms, query } => ping(&destination, count, interval_ms, timeout_ms, query)?,
        Cmd::Reload(q) => match ask(q.socket, q.config, Request::Reload)? {
            Response::Reloaded { changes } if q.json => println!("{}", serde_json::json!({ "changes": changes })),
            Response::Reloaded { changes } if changes.is_empty() => println!("configuration unchanged"),
            Response::Reloaded { changes } => {
                for c in changes {
                    println!("{c}");
                }
            }
            other => return Err(unexpected(other)),
        },
        Cmd::Nodes(q) => match ask(q.socket, q.config, Request::Nodes)? {
            Response::Nodes { nodes } if q.json => println!("{}", serde_json::to_string_pretty(&nodes).map_err(|e| e.to_string())?),
            Response::Nodes { nodes } => print!("{}", render_nodes(&nodes)),
            other => return Err(unexpected(other)),
        },
        Cmd::Send { dest, message, channel, critical, no_wait, timeout, api } => {
            let payload = read_message(message)?;
            let mut c = ApiClient::connect(api_addr(&api)?)?;
            let flags = if critical { flag::CRITICAL } else { 0 } | if no_wait { flag::NO_REPORT } else { 0 };
            let t0 = Instant::now();
            let tag = c.send(op::SEND, flags, channel, address(&dest), payload)?;
            let deadline = t0 + Duration::from_secs(timeout);
            let mut id = None;
            loop {
                let Some(r) = c.recv(deadline)? else {
                    return Err(match id {
                        None => "no answer from detourd's local API (is detourd running?)".into(),
                        Some(id) => format!("message {id:016x}: no acknowledgement within {timeout} s"),
                    });
                };
                if r.tag != tag {
                    continue;
                }
                match r.kind {
                    kind::ACCEPTED => {
                        id = Some(r.message_id);
                        if no_wait {
                            println!("accepted: message {:016x} to {}", r.message_id, r.node);
                            return Ok(());
                        }
                    }
                    kind::DELIVERED => {
                        println!("delivered: message {:016x} to {} in {:.1} ms", r.message_id, r.node, t0.elapsed().as_secs_f64() * 1000.0);
                        return Ok(());
                    }
                    kind::FAILED => return Err(format!("message {:016x} to {} could not be delivered", r.message_id, r.node)),
                    kind::ERROR => return Err(explain(&r)),
                    _ => {}
                }
            }
        }
        Cmd::Listen { channel, count, json, timeout, api } => {
            let mut c = ApiClient::connect(api_addr(&api)?)?;
            let r = c.call(op::SUBSCRIBE, channel, Address::None)?;
            if r.kind != kind::OK {
                return Err(explain(&r));
            }
            let end = timeout.map(|t| Instant::now() + Duration::from_secs(t));
            let mut renew = Instant::now() + Duration::from_secs(30);
            let mut seen = 0u64;
            let stdout = std::io::stdout();
            while count.is_none_or(|n| seen < n) {
                let deadline = [Some(renew), end].into_iter().flatten().min().expect("renew is set");
                match c.recv(deadline)? {
                    Some(m) if m.kind == kind::MESSAGE => {
                        seen += 1;
                        let mut out = stdout.lock();
                        if json {
                            let text = String::from_utf8(m.body.clone()).ok();
                            let hex: String = m.body.iter().map(|b| format!("{b:02x}")).collect();
                            let v = serde_json::json!({ "from": m.node.to_string(), "channel": m.channel, "text": text, "hex": hex });
                            let _ = writeln!(out, "{v}");
                        } else {
                            let _ = writeln!(out, "from {} channel {}: {}", m.node, m.channel, String::from_utf8_lossy(&m.body));
                        }
                        let _ = out.flush();
                    }
                    Some(_) => {}
                    None => {
                        if end.is_some_and(|e| Instant::now() >= e) {
                            break;
                        }
                        c.send(op::SUBSCRIBE, 0, channel, Address::None, Vec::new())?;
                        renew = Instant::now() + Duration::from_secs(30);
                    }
                }
            }
            let _ = c.send(op::UNSUBSCRIBE, 0, channel, Address::None, Vec::new());
        }
        Cmd::Resolve { key, api } => {
            let mut c = ApiClient::connect(api_addr(&api)?)?;
            let r = c.call(op::RESOLVE, 0, address(&key))?;
            if r.kind != kind::RESOLVED {
                return Err(explain(&r));
            }
            let v: serde_json::Value = serde_json::from_slice(&r.body).map_err(|e| format!("bad answer: {e}"))?;
            println!("{}", serde_json::to_string_pretty(&v).map_err(|e| e.to_string())?);
        }
        Cmd::Register { name, api } => {
            let mut c = ApiClient::connect(api_addr(&api)?)?;
            let r = c.call(op::REGISTER, 0, Address::Name(name.clone()))?;
            if r.kind != kind::OK {
                return Err(explain(&r));
            }
            println!("registered {name} for node {}", r.node);
        }
        Cmd::Paths(q) => match ask(q.socket, q.config, Request::Paths)? {
            Response::Paths { peers } if q.json => println!("{}", serde_json::to_string_pretty(&peers).map_err(|e| e.to_string())?),
            Response::Paths { peers } => print!("{}", render_paths(&peers)),
            other => return Err(unexpected(other)),
        },
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("detourctl: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_requests_are_well_formed_and_only_our_replies_are_taken() {
        use etherparse::{IcmpEchoHeader, Icmpv4Slice, Icmpv4Type, Icmpv6Slice, Icmpv6Type, PacketBuilder};
        let req = echo_request(false, 7, 3);
        let s = Icmpv4Slice::from_slice(&req).unwrap();
        assert_eq!(s.icmp_type(), Icmpv4Type::EchoRequest(IcmpEchoHeader { id: 7, seq: 3 }));
        assert_eq!(etherparse::Icmpv4Header::with_checksum(s.icmp_type(), s.payload()).checksum, s.checksum());
        assert!(matches!(Icmpv6Slice::from_slice(&echo_request(true, 7, 3)).unwrap().icmp_type(), Icmpv6Type::EchoRequest(IcmpEchoHeader { id: 7, seq: 3 })));
        // a reply as the raw IPv4 socket delivers it: with its IP header
        let reply = |id: u16| {
            let mut v = Vec::new();
            PacketBuilder::ipv4([10, 77, 0, 2], [10, 77, 0, 1], 64).icmpv4_echo_reply(id, 3).write(&mut v, b"detour!\0").unwrap();
            v
        };
        assert_eq!(echo_reply_seq(false, 7, &reply(7)), Some(3));
        assert_eq!(echo_reply_seq(false, 7, &reply(8)), None, "another program's reply");
        assert_eq!(echo_reply_seq(false, 7, &req), None, "not IPv4");
        assert_eq!(echo_reply_seq(true, 7, &echo_request(true, 7, 3)), None, "a request is no reply");
    }
}
