//! Running `iptables`/`ip6tables`, and removing one of detour's chains with every jump to
//! it. Shared by the modules that own chains: `intercept` (DETOUR-ICMP), `priority`
//! (DETOUR-MGMT), `acct` (DETOUR-ACCT, DETOUR-PIN) and `classes` (DETOUR-CLASS …).

use std::process::{Command, Output};

use anyhow::{Context, Result};

/// How long (s) an iptables program waits for the xtables lock that another program
/// (docker, kube-proxy, firewalld) holds before it gives up (`-w`). The legacy backend
/// serializes every change on that lock; without a bound, a program that held it stalled
/// detour. Only the start, the stop and the accounting thread run iptables: never the
/// control loop.
pub const XTABLES_WAIT_S: u32 = 20;

/// Runs `iptables -w XTABLES_WAIT_S ARGS` (`ip6tables` when `v6`).
///
/// # Errors
/// If the program cannot be started; a refused rule (or the lock not got in time) is a
/// non-zero exit in the output.
pub fn run(v6: bool, args: &[&str]) -> Result<Output> {
    let bin = if v6 { "ip6tables" } else { "iptables" };
    Command::new(bin).args(["-w", &XTABLES_WAIT_S.to_string()]).args(args).output().with_context(|| format!("running {bin}"))
}

/// The rules of `table` with their counters (`iptables-save -c -t TABLE`), the
/// machine-readable listing (`[packets:bytes] -A CHAIN …`): it needs no lock and does not
/// depend on the column layout of `iptables -L`.
///
/// # Errors
/// If the program cannot be started or fails.
pub fn save_counters(v6: bool, table: &str) -> Result<String> {
    let bin = if v6 { "ip6tables-save" } else { "iptables-save" };
    let out = Command::new(bin).args(["-c", "-t", table]).output().with_context(|| format!("running {bin}"))?;
    if !out.status.success() {
        anyhow::bail!("{bin}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// [`run`], reduced to whether iptables accepted the command.
///
/// # Errors
/// If the program cannot be started.
pub fn ok(v6: bool, args: &[&str]) -> Result<bool> {
    Ok(run(v6, args)?.status.success())
}

/// The overlay instance (`node.instance`) this process runs; its netfilter chains carry it
/// ([`named`]). Set once at start.
static INSTANCE: std::sync::OnceLock<u8> = std::sync::OnceLock::new();

/// Names this process's netfilter objects after its overlay instance (`node.instance`), so
/// that the overlays of one host never touch each other's chains: instance 0 keeps the
/// plain names (`DETOUR-ICMP`), instance N > 0 gets `DETOUR-ICMP-N`. Called once at start;
/// a second call is ignored.
pub fn set_instance(instance: u8) {
    let _ = INSTANCE.set(instance);
}

/// This process's overlay instance ([`set_instance`]; 0 until set).
pub fn instance() -> u8 {
    INSTANCE.get().copied().unwrap_or(0)
}

/// The name of chain `base` for this process's overlay instance ([`set_instance`]).
pub fn named(base: &str) -> String {
    match instance() {
        0 => base.to_string(),
        n => format!("{base}-{n}"),
    }
}

/// Removes the chains `chains` ((table, chain) pairs) that exist, for both families, with
/// every rule elsewhere that jumps to them (however many an earlier crash left): one
/// `iptables-save` per family, and one `iptables-restore --noflush` only when something is
/// there to remove. Idempotent; errors are ignored. A clean host costs two program runs,
/// not one per chain and hook: `iptables` serializes on one lock for every namespace of
/// the host, so at 100 nodes on one machine the per-rule runs of each start added up to
/// tens of seconds (issue 11).
pub fn remove_chains(chains: &[(&str, String)]) {
    let chains: Vec<(&str, &str)> = chains.iter().map(|(t, c)| (*t, c.as_str())).collect();
    let chains = &chains[..];
    for v6 in [false, true] {
        let save = if v6 { "ip6tables-save" } else { "iptables-save" };
        let Ok(out) = Command::new(save).output() else { continue };
        if let Some(script) = removal_script(&String::from_utf8_lossy(&out.stdout), chains) {
            if let Err(e) = restore(v6, &script) {
                tracing::warn!("removing detour's netfilter chains: {e:#}");
            }
        }
    }
}

/// The `iptables-restore --noflush` input that removes those of `chains` present in the
/// `iptables-save` output `save`: per table, the jumps to them from other chains (`-D` with
/// the saved rule), then their rules (`-F`), then the chains (`-X`). `None` when none is
/// present.
pub fn removal_script(save: &str, chains: &[(&str, &str)]) -> Option<String> {
    let ours = |table: &str, chain: &str| chains.iter().any(|(t, c)| *t == table && *c == chain);
    // table -> (jump rules to delete, chains present)
    let mut tables: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    let mut table = String::new();
    for line in save.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim().to_string();
        } else if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split_whitespace().next().unwrap_or("");
            if ours(&table, chain) {
                entry(&mut tables, &table).2.push(chain.to_string());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let mut words = rule.split_whitespace();
            let from = words.next().unwrap_or("");
            let words: Vec<&str> = words.collect();
            let jumps = words.windows(2).any(|w| (w[0] == "-j" || w[0] == "-g") && ours(&table, w[1]));
            if jumps && !ours(&table, from) {
                entry(&mut tables, &table).1.push(format!("-D {rule}"));
            }
        }
    }
    if tables.is_empty() {
        return None;
    }
    let mut s = String::new();
    for (t, jumps, present) in tables {
        s += &format!("*{t}\n");
        for j in jumps {
            s += &j;
            s.push('\n');
        }
        for c in &present {
            s += &format!("-F {c}\n");
        }
        for c in &present {
            s += &format!("-X {c}\n");
        }
        s += "COMMIT\n";
    }
    Some(s)
}

fn entry<'a>(tables: &'a mut Vec<(String, Vec<String>, Vec<String>)>, table: &str) -> &'a mut (String, Vec<String>, Vec<String>) {
    if let Some(i) = tables.iter().position(|(t, _, _)| t == table) {
        &mut tables[i]
    } else {
        tables.push((table.to_string(), Vec::new(), Vec::new()));
        tables.last_mut().expect("just pushed")
    }
}

/// Runs `iptables-restore -w XTABLES_WAIT_S --noflush` (`ip6tables-restore` when `v6`) with
/// `input`: every change in it is applied at once, or none.
///
/// # Errors
/// If the program cannot be started or refuses the input (its message is in the error).
pub fn restore(v6: bool, input: &str) -> Result<()> {
    use std::io::Write;
    let bin = if v6 { "ip6tables-restore" } else { "iptables-restore" };
    let mut child = Command::new(bin)
        .args(["-w", &XTABLES_WAIT_S.to_string(), "--noflush"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {bin}"))?;
    child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!("{bin}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// What one rule set (an `iptables-restore` input) expects to find: per table and chain of
/// its own, how many rules the chain holds at least and how many jumps lead to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expect {
    /// The table.
    pub table: String,
    /// The chain (one the rule set declares).
    pub chain: String,
    /// Rules in the chain, at least (the accounting chain gets more at run time).
    pub rules: usize,
    /// Rules of other chains that jump to it, at least.
    pub jumps: usize,
}

/// The chains a rule set declares, with their rules and the jumps to them.
pub fn expectations(script: &str) -> Vec<Expect> {
    let mut out: Vec<Expect> = Vec::new();
    let mut table = String::new();
    for line in script.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim().to_string();
        } else if let Some(decl) = line.strip_prefix(':') {
            let chain = decl.split_whitespace().next().unwrap_or("").to_string();
            out.push(Expect { table: table.clone(), chain, rules: 0, jumps: 0 });
        }
    }
    table.clear();
    for line in script.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim().to_string();
            continue;
        }
        let Some(rule) = line.strip_prefix("-A ").or_else(|| line.strip_prefix("-I ")) else { continue };
        let words: Vec<&str> = rule.split_whitespace().collect();
        let from = words.first().copied().unwrap_or("");
        let target = words.windows(2).find(|w| w[0] == "-j" || w[0] == "-g").map(|w| w[1]).unwrap_or("");
        for e in out.iter_mut().filter(|e| e.table == table) {
            if e.chain == from {
                e.rules += 1;
            } else if e.chain == target {
                e.jumps += 1;
            }
        }
    }
    out
}

/// Whether the `iptables-save` output `save` still holds what `expect` says: every chain
/// declared, with at least its rules and its jumps.
pub fn holds(save: &str, expect: &[Expect]) -> bool {
    let mut table = String::new();
    let mut declared: Vec<(String, String)> = Vec::new();
    let mut rules: std::collections::HashMap<(String, String), usize> = std::collections::HashMap::new();
    let mut jumps: std::collections::HashMap<(String, String), usize> = std::collections::HashMap::new();
    for line in save.lines() {
        // `iptables-save -c` puts counters before each rule.
        let line = match line.strip_prefix('[') {
            Some(rest) => rest.split_once("] ").map(|(_, r)| r).unwrap_or(""),
            None => line,
        };
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim().to_string();
        } else if let Some(decl) = line.strip_prefix(':') {
            declared.push((table.clone(), decl.split_whitespace().next().unwrap_or("").to_string()));
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let words: Vec<&str> = rule.split_whitespace().collect();
            let from = words.first().copied().unwrap_or("").to_string();
            if let Some(w) = words.windows(2).find(|w| w[0] == "-j" || w[0] == "-g") {
                *jumps.entry((table.clone(), w[1].to_string())).or_default() += 1;
            }
            *rules.entry((table.clone(), from)).or_default() += 1;
        }
    }
    expect.iter().all(|e| {
        let k = (e.table.clone(), e.chain.clone());
        declared.contains(&k) && rules.get(&k).copied().unwrap_or(0) >= e.rules && jumps.get(&k).copied().unwrap_or(0) >= e.jumps
    })
}

/// Host state besides netfilter rules that detour sets and keeps: the management qdisc, a
/// sysctl ([`Keeper::keep`]).
pub trait Kept: Send {
    /// What it is, for the log.
    fn name(&self) -> String;
    /// Whether the host still has it.
    fn holds(&self) -> bool;
    /// Sets it again.
    ///
    /// # Errors
    /// When the host refuses.
    fn put_back(&self) -> Result<()>;
}

/// A sysctl (a file under `/proc/sys`) detour set to `value`.
pub struct Sysctl {
    /// Its path.
    pub path: &'static str,
    /// The value detour wants.
    pub value: &'static str,
}

impl Kept for Sysctl {
    fn name(&self) -> String {
        self.path.trim_start_matches("/proc/sys/").replace('/', ".")
    }
    fn holds(&self) -> bool {
        std::fs::read_to_string(self.path).is_ok_and(|v| v.trim() == self.value)
    }
    fn put_back(&self) -> Result<()> {
        std::fs::write(self.path, self.value).with_context(|| format!("writing {}", self.path))
    }
}

/// The rule sets and host settings detour installed, kept in place: what someone else
/// removes, flushes or resets (a firewall reload, `iptables -F`, `tc qdisc del`, a
/// `sysctl -w`) is put back, as kernel routes are (desired state reconciled).
/// [`Keeper::repair`] runs on its own thread, never on the daemon's loop.
#[derive(Default)]
pub struct Keeper {
    kept: std::sync::Mutex<Vec<(bool, String)>>,
    /// Other host state, and whether putting it back failed last time (logged once).
    others: std::sync::Mutex<Vec<(Box<dyn Kept>, bool)>>,
    stopped: std::sync::Mutex<bool>,
}

impl Keeper {
    /// Installs `input` ([`restore`]) and keeps it.
    ///
    /// # Errors
    /// As [`restore`]; a refused rule set is not kept.
    pub fn restore(&self, v6: bool, input: &str) -> Result<()> {
        restore(v6, input)?;
        self.kept.lock().unwrap_or_else(|e| e.into_inner()).push((v6, input.to_string()));
        Ok(())
    }

    /// Stops keeping the rule sets that declare `chain` (before they are replaced).
    pub fn release(&self, chain: &str) {
        let decl = format!(":{chain} ");
        self.kept.lock().unwrap_or_else(|e| e.into_inner()).retain(|(_, input)| !input.contains(&decl));
    }

    /// Keeps `k`, which holds now.
    pub fn keep(&self, k: Box<dyn Kept>) {
        self.others.lock().unwrap_or_else(|e| e.into_inner()).push((k, false));
    }

    /// Puts back every kept rule set that no longer holds (its chains are removed with
    /// every jump to them, then it is installed again) and every other kept setting; the
    /// number put back.
    pub fn repair(&self) -> usize {
        let stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        if *stopped {
            return 0;
        }
        let mut repaired = 0;
        for (k, failing) in self.others.lock().unwrap_or_else(|e| e.into_inner()).iter_mut() {
            if k.holds() {
                *failing = false;
                continue;
            }
            match k.put_back() {
                Ok(()) => {
                    repaired += 1;
                    *failing = false;
                    tracing::warn!("{} was changed by someone else: restored", k.name());
                }
                Err(e) if !*failing => {
                    *failing = true;
                    tracing::warn!("{} was changed by someone else and cannot be restored: {e:#}", k.name());
                }
                Err(e) => tracing::debug!("restoring {}: {e:#}", k.name()),
            }
        }
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for v6 in [false, true] {
            if !kept.iter().any(|(k, _)| *k == v6) {
                continue;
            }
            let save = if v6 { "ip6tables-save" } else { "iptables-save" };
            let Ok(out) = Command::new(save).output() else { continue };
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            for (_, script) in kept.iter().filter(|(k, _)| *k == v6) {
                let expect = expectations(script);
                if holds(&text, &expect) {
                    continue;
                }
                let chains: Vec<(&str, &str)> = expect.iter().map(|e| (e.table.as_str(), e.chain.as_str())).collect();
                if let Some(removal) = removal_script(&text, &chains) {
                    let _ = restore(v6, &removal);
                }
                match restore(v6, script) {
                    Ok(()) => {
                        repaired += 1;
                        let names: Vec<&str> = chains.iter().map(|(_, c)| *c).collect();
                        tracing::warn!("netfilter rules of {} were changed by someone else: restored", names.join(", "));
                    }
                    Err(e) => tracing::warn!("restoring netfilter rules: {e:#}"),
                }
            }
        }
        repaired
    }

    /// Stops repairs (waits for one under way): at shutdown, before the chains go.
    pub fn stop(&self) {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner()) = true;
    }

    /// Runs [`Keeper::repair`] every `every` on a thread of its own until [`Keeper::stop`].
    ///
    /// # Errors
    /// If the thread cannot be started.
    pub fn start(self: &std::sync::Arc<Self>, every: std::time::Duration) -> Result<()> {
        let k = self.clone();
        std::thread::Builder::new()
            .name("detour-netfilter".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                if *k.stopped.lock().unwrap_or_else(|e| e.into_inner()) {
                    return;
                }
                k.repair();
            })
            .context("starting the netfilter thread")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removal_script_deletes_the_jumps_then_the_chains_that_exist() {
        let save = "# Generated\n*mangle\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:DETOUR-SEEN - [0:0]\n:OTHER - [0:0]\n\
-A POSTROUTING -m mark ! --mark 0x1234 -j DETOUR-SEEN\n-A POSTROUTING -m mark ! --mark 0x1234 -j DETOUR-SEEN\n-A POSTROUTING -j OTHER\n\
-A DETOUR-SEEN -d 10.0.0.0/24 -j RETURN\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n";
        let s = removal_script(save, &[("mangle", "DETOUR-SEEN"), ("filter", "DETOUR-ICMP")]).unwrap();
        assert_eq!(s, "*mangle\n-D POSTROUTING -m mark ! --mark 0x1234 -j DETOUR-SEEN\n-D POSTROUTING -m mark ! --mark 0x1234 -j DETOUR-SEEN\n-F DETOUR-SEEN\n-X DETOUR-SEEN\nCOMMIT\n");
        assert!(removal_script(save, &[("filter", "DETOUR-ICMP"), ("nat", "DETOUR-SEEN")]).is_none());
        assert!(removal_script("", &[("mangle", "DETOUR-SEEN")]).is_none());
    }

    #[test]
    fn a_rule_set_holds_until_its_chain_is_flushed_or_its_jump_removed() {
        let script =
            "*filter\n:DETOUR-ICMP - [0:0]\n-A DETOUR-ICMP -p icmp -j NFQUEUE --queue-num 7 --queue-bypass\n-A DETOUR-ICMP -p icmp -j NFQUEUE --queue-num 7\n-I INPUT 1 -j DETOUR-ICMP\nCOMMIT\n";
        let e = expectations(script);
        assert_eq!(e, vec![Expect { table: "filter".into(), chain: "DETOUR-ICMP".into(), rules: 2, jumps: 1 }]);
        let good = "*filter\n:INPUT ACCEPT [0:0]\n:DETOUR-ICMP - [0:0]\n[5:300] -A INPUT -j DETOUR-ICMP\n-A DETOUR-ICMP -p icmp -m icmp --icmp-type 3/0 -j NFQUEUE --queue-num 7 --queue-bypass\n-A DETOUR-ICMP -p icmp -j NFQUEUE --queue-num 7\nCOMMIT\n";
        assert!(holds(good, &e));
        let flushed = "*filter\n:INPUT ACCEPT [0:0]\n:DETOUR-ICMP - [0:0]\n-A INPUT -j DETOUR-ICMP\nCOMMIT\n";
        assert!(!holds(flushed, &e));
        let unhooked = "*filter\n:INPUT ACCEPT [0:0]\n:DETOUR-ICMP - [0:0]\n-A DETOUR-ICMP -p icmp -j NFQUEUE\n-A DETOUR-ICMP -p icmp -j NFQUEUE\nCOMMIT\n";
        assert!(!holds(unhooked, &e));
        assert!(!holds("", &e));
        // the same chain name in another table does not count
        assert!(!holds(&good.replace("*filter", "*mangle"), &e));
    }
}
