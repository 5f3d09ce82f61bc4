//! Sysctls detour changes, recorded so that a crash does not leave them changed: before a
//! value is written, the original goes to a state file under [`STATE_DIR`] (one per
//! network namespace, as the sysctls detour touches are per namespace); a clean stop puts
//! the originals back and removes the file, and the next start after a crash does the same
//! with what the file says.

use std::path::PathBuf;

use anyhow::{Context, Result};

/// Where the state files live (tmpfs: gone after a reboot, as are the sysctls' changes).
pub const STATE_DIR: &str = "/run/detour";

/// The state file of this process's network namespace
/// (`/run/detour/sysctls-net<inode>`).
pub fn state_file() -> PathBuf {
    let ns = std::fs::metadata("/proc/self/ns/net").map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap_or(0);
    PathBuf::from(STATE_DIR).join(format!("sysctls-net{ns}"))
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
/// start for what a run that did not stop cleanly left changed. The number restored.
pub fn restore() -> usize {
    let file = state_file();
    let Ok(text) = std::fs::read_to_string(&file) else { return 0 };
    let entries = parse(&text);
    let mut n = 0;
    for (path, value) in &entries {
        match std::fs::write(path, value) {
            Ok(()) => n += 1,
            Err(e) => tracing::warn!("restoring {path} to {value}: {e}"),
        }
    }
    let _ = std::fs::remove_file(&file);
    n
}

/// Writes `value` to the sysctl at `path`, recording its original value first (once per
/// path). Returns whether it changed anything.
///
/// # Errors
/// If the state file or the sysctl cannot be written.
pub fn set(path: &str, value: &str) -> Result<bool> {
    let old = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    if old.trim() == value {
        return Ok(false);
    }
    let file = state_file();
    let mut entries = std::fs::read_to_string(&file).map(|t| parse(&t)).unwrap_or_default();
    if !entries.iter().any(|(p, _)| p == path) {
        entries.push((path.to_string(), old.trim().to_string()));
        std::fs::create_dir_all(STATE_DIR).with_context(|| format!("creating {STATE_DIR}"))?;
        let tmp = file.with_extension("tmp");
        let text: String = entries.iter().map(|(p, v)| format!("{p} {v}\n")).collect();
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &file).with_context(|| format!("writing {}", file.display()))?;
    }
    std::fs::write(path, value).with_context(|| format!("writing {path}"))?;
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
