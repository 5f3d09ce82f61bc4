//! Running `iptables`/`ip6tables`, and removing one of detour's chains with every jump to
//! it. Shared by the modules that own chains: `intercept` (DETOUR-ICMP), `priority`
//! (DETOUR-MGMT), `acct` (DETOUR-ACCT, DETOUR-PIN) and `classes` (DETOUR-CLASS …).

use std::process::{Command, Output};

use anyhow::{Context, Result};

/// Runs `iptables -w ARGS` (`ip6tables` when `v6`).
///
/// # Errors
/// If the program cannot be started; a refused rule is a non-zero exit in the output.
pub fn run(v6: bool, args: &[&str]) -> Result<Output> {
    let bin = if v6 { "ip6tables" } else { "iptables" };
    Command::new(bin).arg("-w").args(args).output().with_context(|| format!("running {bin}"))
}

/// [`run`], reduced to whether iptables accepted the command.
///
/// # Errors
/// If the program cannot be started.
pub fn ok(v6: bool, args: &[&str]) -> Result<bool> {
    Ok(run(v6, args)?.status.success())
}

/// Removes chain `chain` of `table` for one family: every jump to it from `hooks` (however
/// many an earlier crash left), then its rules and the chain. Idempotent; errors are
/// ignored (the chain may not exist).
pub fn remove_chain(v6: bool, table: &str, chain: &str, hooks: &[&str]) {
    for hook in hooks {
        for _ in 0..16 {
            if !ok(v6, &["-t", table, "-D", hook, "-j", chain]).unwrap_or(false) {
                break;
            }
        }
    }
    let _ = run(v6, &["-t", table, "-F", chain]);
    let _ = run(v6, &["-t", table, "-X", chain]);
}
