//! A lab of network namespaces for end-to-end tests: a router namespace and hosts joined to
//! it by veth pairs, each host able to run `detourd`. Everything is removed on drop, also
//! when a test panics.
//!
//! Host `i` (1-based): underlay `10.0.i.2/24`, `fd00:0:i::2/64` behind router `10.0.i.1`;
//! a LAN on veth `lan0` with `10.(100+i).0.1/24`, `fd10:i::1/64`; overlay `10.77.0.i/24`,
//! `fd77::i/64`.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Path of a built binary of this package.
pub fn bin(name: &str) -> String {
    match name {
        "detourd" => env!("CARGO_BIN_EXE_detourd").to_string(),
        "detourctl" => env!("CARGO_BIN_EXE_detourctl").to_string(),
        other => panic!("unknown binary {other}"),
    }
}

/// Result of a command.
pub struct Out {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

fn out(o: Output) -> Out {
    Out { ok: o.status.success(), stdout: String::from_utf8_lossy(&o.stdout).into(), stderr: String::from_utf8_lossy(&o.stderr).into() }
}

/// Runs a bash script on the host (root namespace).
pub fn host_sh(script: &str) -> Out {
    out(Command::new("bash").arg("-c").arg(script).output().expect("running bash"))
}

pub struct Host {
    pub name: String,
    pub ns: String,
    pub index: usize,
    pub key: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Host {
    pub fn overlay_v4(&self) -> String {
        format!("10.77.0.{}", self.index)
    }
    pub fn overlay_v6(&self) -> String {
        format!("fd77::{}", self.index)
    }
    pub fn lan_v4(&self) -> String {
        format!("10.{}.0.1", 100 + self.index)
    }
    pub fn lan_v6(&self) -> String {
        format!("fd10:{}::1", self.index)
    }
    pub fn underlay_v4(&self) -> String {
        format!("10.0.{}.2", self.index)
    }
    pub fn underlay_v6(&self) -> String {
        format!("fd00:0:{}::2", self.index)
    }
}

pub struct Lab {
    pub prefix: String,
    pub router: String,
    pub dir: tempfile::TempDir,
    pub hosts: Vec<Host>,
    daemons: Vec<Option<Child>>,
}

impl Lab {
    /// Creates the router and one host per name.
    pub fn new(names: &[&str]) -> Lab {
        assert!(nix::unistd::Uid::effective().is_root(), "the netns tests need root: run scripts/test.sh as root");
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("dtt{}x{}", std::process::id() % 100_000, n);
        let dir = tempfile::Builder::new().prefix("detour-test").tempdir().expect("tempdir");
        let router = format!("{prefix}-r");
        let mut lab = Lab { prefix: prefix.clone(), router: router.clone(), dir, hosts: Vec::new(), daemons: Vec::new() };
        let mut script = format!("set -e\nip netns add {router}\nip -n {router} link set lo up\nip netns exec {router} sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1\n");
        for (k, name) in names.iter().enumerate() {
            let i = k + 1;
            let ns = format!("{prefix}-{name}");
            script += &format!(
                "ip netns add {ns}
ip -n {ns} link set lo up
ip link add r{i} netns {router} type veth peer name eth0 netns {ns}
ip -n {router} addr add 10.0.{i}.1/24 dev r{i}
ip -n {router} addr add fd00:0:{i}::1/64 dev r{i} nodad
ip -n {router} link set r{i} up
ip -n {ns} addr add 10.0.{i}.2/24 dev eth0
ip -n {ns} addr add fd00:0:{i}::2/64 dev eth0 nodad
ip -n {ns} link set eth0 up
ip -n {ns} route add default via 10.0.{i}.1
ip -n {ns} -6 route add default via fd00:0:{i}::1
ip -n {ns} link add lan0 type veth peer name lan0p
ip -n {ns} addr add 10.{lan}.0.1/24 dev lan0
ip -n {ns} addr add fd10:{i}::1/64 dev lan0 nodad
ip -n {ns} link set lan0p up
ip -n {ns} link set lan0 up
",
                lan = 100 + i
            );
            let d = lab.dir.path();
            lab.hosts.push(Host {
                name: name.to_string(),
                ns,
                index: i,
                key: d.join(format!("{name}.key")),
                config: d.join(format!("{name}.toml")),
                socket: d.join(format!("{name}.sock")),
                log: d.join(format!("{name}.log")),
            });
            lab.daemons.push(None);
        }
        let r = host_sh(&script);
        assert!(r.ok, "creating the lab failed: {}", r.stderr);
        // Let the links settle (carrier, IPv6 link-local routes) so that later snapshots of
        // kernel state only show what detour changed.
        let mut settle = String::from("for t in $(seq 1 60); do ok=1\n");
        for h in &lab.hosts {
            settle += &format!("ip -n {} -6 route show dev eth0 | grep -q fe80 || ok=0\n", h.ns);
        }
        settle += "[ $ok = 1 ] && exit 0; sleep 0.05; done; exit 1\n";
        assert!(host_sh(&settle).ok, "the lab's links did not come up");
        for h in &lab.hosts {
            let o = Command::new(bin("detourctl")).arg("genkey").arg(&h.key).output().expect("genkey");
            assert!(o.status.success(), "genkey: {}", String::from_utf8_lossy(&o.stderr));
        }
        lab
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).unwrap_or_else(|| panic!("no host {name}"))
    }

    fn idx(&self, name: &str) -> usize {
        self.hosts.iter().position(|h| h.name == name).unwrap_or_else(|| panic!("no host {name}"))
    }

    pub fn pubkey(&self, name: &str) -> String {
        let h = self.host(name);
        let o = Command::new(bin("detourctl")).arg("pubkey").arg(&h.key).output().expect("pubkey");
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// The `[node]` section for a host.
    pub fn node_section(&self, name: &str, extra: &str) -> String {
        let h = self.host(name);
        format!(
            "[node]\nname = \"{name}\"\nprivate_key = \"{}\"\noverlay_ipv4 = \"10.77.0.{i}/24\"\noverlay_ipv6 = \"fd77::{i}/64\"\nprefixes = [\"10.{lan}.0.0/24\", \"fd10:{i}::/64\"]\ncontrol_socket = \"{}\"\nlog_level = \"info,detour=debug\"\n{extra}\n",
            h.key.display(),
            h.socket.display(),
            i = h.index,
            lan = 100 + h.index
        )
    }

    /// A `[[peer]]` section for `peer`, reached at `endpoint` (default: its IPv4 underlay).
    pub fn peer_section(&self, peer: &str, endpoint: Option<&str>, extra: &str) -> String {
        let p = self.host(peer);
        let ep = endpoint.map(str::to_string).unwrap_or_else(|| p.underlay_v4());
        format!(
            "\n[[peer]]\nname = \"{peer}\"\npublic_key = \"{}\"\nendpoints = [\"{ep}\"]\noverlay_ipv4 = \"10.77.0.{i}\"\noverlay_ipv6 = \"fd77::{i}\"\nprefixes = [\"10.{lan}.0.0/24\", \"fd10:{i}::/64\"]\n{extra}\n",
            self.pubkey(peer),
            i = p.index,
            lan = 100 + p.index
        )
    }

    pub fn write_config(&self, name: &str, text: &str) {
        std::fs::write(&self.host(name).config, text).expect("writing config");
    }

    /// Every host has every other host as a peer, on IPv4 underlay endpoints.
    pub fn write_mesh(&self) {
        for h in &self.hosts {
            let mut text = self.node_section(&h.name, "");
            for p in &self.hosts {
                if p.name != h.name {
                    text += &self.peer_section(&p.name, None, "");
                }
            }
            self.write_config(&h.name, &text);
        }
    }

    pub fn start(&mut self, name: &str) {
        self.start_with_env(name, &[]);
    }

    /// Starts detourd with extra environment variables.
    pub fn start_with_env(&mut self, name: &str, env: &[(&str, &str)]) {
        let i = self.idx(name);
        let h = &self.hosts[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&h.log).expect("log file");
        // `exec` keeps the PID through bash and `ip netns exec`, so WATCHDOG_PID (which
        // systemd sets next to WATCHDOG_USEC) can name the daemon.
        let child = Command::new("bash")
            .arg("-c")
            .arg(format!("export WATCHDOG_PID=$$; exec ip netns exec {} {} -c {}", h.ns, bin("detourd"), h.config.display()))
            .envs(env.iter().copied())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting detourd");
        self.daemons[i] = Some(child);
    }

    pub fn start_all(&mut self) {
        let names: Vec<String> = self.hosts.iter().map(|h| h.name.clone()).collect();
        for n in names {
            self.start(&n);
        }
    }

    /// SIGTERM, then waits (10 s at most) and returns whether it exited successfully.
    pub fn stop(&mut self, name: &str) -> bool {
        let i = self.idx(name);
        let Some(mut child) = self.daemons[i].take() else { return true };
        let pid = child.id() as i32;
        // `ip netns exec` execs detourd, so the child is the daemon itself.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                return st.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (at most `timeout`) for detourd on `name` to exit by itself; its exit status.
    pub fn wait_exit(&mut self, name: &str, timeout: Duration) -> Option<std::process::ExitStatus> {
        let i = self.idx(name);
        let deadline = Instant::now() + timeout;
        let child = self.daemons[i].as_mut()?;
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                self.daemons[i] = None;
                return Some(st);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self, name: &str) {
        let i = self.idx(name);
        if let Some(mut child) = self.daemons[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Runs a bash script inside a namespace.
    pub fn sh(&self, ns: &str, script: &str) -> Out {
        out(Command::new("ip").args(["netns", "exec", ns, "bash", "-c", script]).output().expect("ip netns exec"))
    }

    /// Runs a script in a host's namespace and asserts success; returns stdout.
    pub fn ok(&self, name: &str, script: &str) -> String {
        let h = self.host(name);
        let o = self.sh(&h.ns, script);
        assert!(o.ok, "on {name}: `{script}` failed:\n{}\n{}\n--- log ---\n{}", o.stdout, o.stderr, self.log(name));
        o.stdout
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(&self.host(name).log).unwrap_or_default()
    }

    /// `detourctl status --json` of a host.
    pub fn status(&self, name: &str) -> Value {
        let h = self.host(name);
        let o = self.sh(&h.ns, &format!("{} status --json -s {}", bin("detourctl"), h.socket.display()));
        assert!(o.ok, "status of {name}: {}\n--- log ---\n{}", o.stderr, self.log(name));
        serde_json::from_str(&o.stdout).expect("status JSON")
    }

    pub fn peer<'a>(status: &'a Value, peer: &str) -> &'a Value {
        status["peers"].as_array().expect("peers").iter().find(|p| p["name"] == peer).unwrap_or_else(|| panic!("no peer {peer}"))
    }

    /// Waits until `name` has a session with data keys to each of `peers`.
    pub fn wait_up(&self, name: &str, peers: &[&str], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let h = self.host(name);
            let o = self.sh(&h.ns, &format!("{} status --json -s {}", bin("detourctl"), h.socket.display()));
            if o.ok {
                let s: Value = serde_json::from_str(&o.stdout).expect("status JSON");
                if peers.iter().all(|p| {
                    let ps = Self::peer(&s, p);
                    ps["state"] == "up" && !ps["endpoint"].is_null()
                }) {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "{name}: sessions to {peers:?} not up in {timeout:?}\n--- log ---\n{}", self.log(name));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kernel TX packet counter of an interface in a host.
    pub fn tx_packets(&self, name: &str, dev: &str) -> u64 {
        self.ok(name, &format!("cat /sys/class/net/{dev}/statistics/tx_packets")).trim().parse().expect("counter")
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in self.daemons.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let mut script = String::new();
        for h in &self.hosts {
            script += &format!("ip netns pids {ns} 2>/dev/null | xargs -r kill -9; ip netns del {ns} 2>/dev/null\n", ns = h.ns);
        }
        script += &format!("ip netns pids {r} 2>/dev/null | xargs -r kill -9; ip netns del {r} 2>/dev/null\n", r = self.router);
        let _ = host_sh(&script);
    }
}
