//! Sysctls detour changes, recorded so that a crash does not leave them changed: before a
//! value is written, the original goes to a state file under [`STATE_DIR`] (one per
//! network namespace, as the sysctls detour touches are per namespace); a clean stop puts
//! the originals back and removes the file, and the next start after a crash does the same
//! with what the file says.

use std::path::PathBuf;

use anyhow::{Context, Result};

/// Where the state files live (tmpfs: gone after a reboot, as are the sysctls' changes).
pub const STATE_DIR: &str = "/run/detour";

/// The state file of this process's network namespace and overlay instance
/// (`/run/detour/sysctls-net<inode>`, `-<instance>` for instances above 0).
pub fn state_file() -> PathBuf {
    let (prefix, instance) = (namespace_prefix(), crate::shell::netfilter::instance());
    PathBuf::from(STATE_DIR).join(if instance == 0 { prefix } else { format!("{prefix}-{instance}") })
}

/// `sysctls-net<inode>`: the start of the names of every state file of this namespace.
fn namespace_prefix() -> String {
    let ns = std::fs::metadata("/proc/self/ns/net").map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap_or(0);
    format!("sysctls-net{ns}")
}

/// The original value of `path` as another overlay instance in this namespace recorded it
/// (it changed the sysctl and still depends on it, or crashed without putting it back).
fn recorded_by_others(path: &str) -> Option<String> {
    let (prefix, own) = (namespace_prefix(), state_file());
    let dir = std::fs::read_dir(STATE_DIR).ok()?;
    dir.flatten()
        .filter(|e| e.path() != own)
        .filter(|e| e.file_name().to_str().is_some_and(|n| n == prefix || n.strip_prefix(&prefix).is_some_and(|r| r.starts_with('-') && r[1..].bytes().all(|b| b.is_ascii_digit()))))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .find_map(|t| parse(&t).into_iter().find(|(p, _)| p == path).map(|(_, v)| v))
}

/// Parses a state file: one `path value` per line; lines that are not that are skipped.
pub fn parse(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let (p, v) = l.trim().split_once(' ')?;
            (p.starts_with("/proc/sys/") && !p.contains("..") && !v.trim().is_empty()).then(|| (p.to_string(), v.trim().to_string()))
        })
        .collect()
}

/// Puts every recorded sysctl back and removes the state file: at a clean stop, and at
/// start for what a run that did not stop cleanly left changed. A sysctl another overlay
/// instance of this namespace has recorded too is left as it is: that instance still
/// depends on it and puts it back itself. The number restored.
pub fn restore() -> usize {
    let file = state_file();
    let Ok(text) = std::fs::read_to_string(&file) else { return 0 };
    let entries = parse(&text);
    let mut n = 0;
    for (path, value) in &entries {
        if recorded_by_others(path).is_some() {
            continue;
        }
        match std::fs::write(path, value) {
            Ok(()) => n += 1,
            Err(e) => tracing::warn!("restoring {path} to {value}: {e}"),
        }
    }
    let _ = std::fs::remove_file(&file);
    n
}

/// Writes `value` to the sysctl at `path`, recording its original value first (once per
/// path). When the sysctl holds `value` already because another overlay instance of this
/// namespace set it, this instance records the same original and shares it (the last
/// instance to stop puts it back). Returns whether this instance now holds a record of
/// `path` (it changed it or shares it).
///
/// # Errors
/// If the state file or the sysctl cannot be written.
pub fn set(path: &str, value: &str) -> Result<bool> {
    let old = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let file = state_file();
    let mut entries = std::fs::read_to_string(&file).map(|t| parse(&t)).unwrap_or_default();
    let mine = entries.iter().any(|(p, _)| p == path);
    let others = recorded_by_others(path);
    if old.trim() == value && (mine || others.is_none()) {
        return Ok(mine);
    }
    if !mine {
        entries.push((path.to_string(), others.unwrap_or_else(|| old.trim().to_string())));
        std::fs::create_dir_all(STATE_DIR).with_context(|| format!("creating {STATE_DIR}"))?;
        let tmp = file.with_extension("tmp");
        let text: String = entries.iter().map(|(p, v)| format!("{p} {v}\n")).collect();
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &file).with_context(|| format!("writing {}", file.display()))?;
    }
    if old.trim() != value {
        std::fs::write(path, value).with_context(|| format!("writing {path}"))?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_file_gives_paths_under_proc_sys_and_their_values_only() {
        let text = "/proc/sys/net/ipv4/fib_multipath_hash_policy 0\n/etc/passwd x\n/proc/sys/../../etc/shadow 1\ngarbage\n/proc/sys/net/ipv6/fib_multipath_hash_policy 0 \n\n";
        assert_eq!(parse(text), vec![("/proc/sys/net/ipv4/fib_multipath_hash_policy".to_string(), "0".to_string()), ("/proc/sys/net/ipv6/fib_multipath_hash_policy".to_string(), "0".to_string())]);
    }
}
