//! The files `detourd` and `detourctl` read and write: the configuration file and the
//! node's key file. The core parses their text ([`Config::parse_with`],
//! [`Identity::from_pem`]) and never opens a file.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::config::{Config, ConfigError, ConfigErrors};
use crate::identity::Identity;

/// Errors reading or writing a key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// `genkey` refuses to replace an existing file.
    #[error("{path}: file exists; refusing to overwrite a private key")]
    Exists {
        /// The path given.
        path: String,
    },
    /// Any I/O error, with the path.
    #[error("{path}: {source}")]
    Io {
        /// The path given.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is not a PKCS#8 PEM Ed25519 private key.
    #[error("{path}: not an Ed25519 private key in PKCS#8 PEM form (make one with `detourctl genkey`)")]
    Format {
        /// The path given.
        path: String,
    },
}

/// Whether `directive` is a log filter `tracing-subscriber` accepts (`info`,
/// `info,detour=debug`, …): the check behind `node.log_level`.
pub fn log_level_ok(directive: &str) -> bool {
    tracing_subscriber::EnvFilter::try_new(directive).is_ok()
}

/// Reads and validates a configuration file (the log level checked against the logging
/// backend).
///
/// # Errors
/// Every problem found, each naming the file and key; a file that cannot be read is one
/// error with key `(file)`.
pub fn load_config(path: &Path) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors(vec![ConfigError { file: file.clone(), key: "(file)".into(), message: format!("cannot read: {e}") }]))?;
    super::capture::sample(super::capture::Target::Config, &[text.as_bytes()]);
    Config::parse_with(&text, &file, &log_level_ok)
}

/// Loads a configuration file and the key it names, with every check `detourd
/// --check-config` makes (the same messages at start and at a reload), the collisions with
/// the other overlays of the host in `overlays` included ([`overlay_conflicts`]).
///
/// # Errors
/// The configuration's problems (one per line, each naming the file and key), an
/// unreadable key, a peer whose key is the node's own, or collisions with another overlay.
pub fn load_checked(path: &Path, overlays: &Path) -> Result<(Config, Identity), String> {
    let cfg = load_config(path).map_err(|e| e.to_string())?;
    let file = path.display();
    let id = read_key(&cfg.node.private_key).map_err(|e| format!("{file}: node.private_key: {e}"))?;
    if let Some((i, _)) = cfg.peer_by_id(&id.node_id()) {
        return Err(format!("{file}: peer[{i}].public_key: this is the node's own key; a node cannot be its own peer"));
    }
    let clash = overlay_conflicts(&cfg, path, overlays);
    if !clash.is_empty() {
        return Err(clash.join("\n"));
    }
    Ok((cfg, id))
}

/// The collisions between `cfg` (read from `path`) and the other overlays of this host: the
/// `*.toml` files in `dir` other than `path` ([`Config::conflicts`]). A file there that does
/// not parse is its own overlay's problem and is skipped.
pub fn overlay_conflicts(cfg: &Config, path: &Path, dir: &Path) -> Vec<String> {
    let me = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut others: Vec<std::path::PathBuf> =
        entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "toml") && std::fs::canonicalize(p).map(|c| c != me).unwrap_or(true)).collect();
    others.sort();
    let file = path.display();
    others.iter().filter_map(|p| load_config(p).ok()).flat_map(|other| cfg.conflicts(&other)).map(|m| format!("{file}: {m}")).collect()
}

/// Reads a key file written by [`write_key`] (or any PKCS#8 PEM Ed25519 key).
///
/// # Errors
/// [`KeyFileError::Io`] if the file cannot be read, [`KeyFileError::Format`] if it is not
/// an Ed25519 PKCS#8 PEM key.
pub fn read_key(path: &Path) -> Result<Identity, KeyFileError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Io { path: p.clone(), source })?;
    Identity::from_pem(&text).ok_or(KeyFileError::Format { path: p })
}

/// True when the key file can be read by group or others (mode & 0o077 != 0).
pub fn key_is_exposed(path: &Path) -> bool {
    std::fs::metadata(path).map(|m| m.permissions().mode() & 0o077 != 0).unwrap_or(false)
}

/// Writes `id` to a new key file with mode 0600; never replaces an existing file.
///
/// # Errors
/// [`KeyFileError::Exists`] if the path exists, [`KeyFileError::Io`] otherwise.
pub fn write_key(id: &Identity, path: &Path) -> Result<(), KeyFileError> {
    let p = path.display().to_string();
    let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AlreadyExists {
            KeyFileError::Exists { path: p.clone() }
        } else {
            KeyFileError::Io { path: p.clone(), source }
        }
    })?;
    file.write_all(id.to_pem().as_bytes()).and_then(|_| file.sync_all()).map_err(|source| KeyFileError::Io { path: p, source })
}

/// A new identity from the OS random source.
pub fn generate_identity() -> Identity {
    Identity::generate(&mut rand::rngs::OsRng)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_is_private_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        let id = generate_identity();
        write_key(&id, &path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!key_is_exposed(&path));
        assert!(matches!(write_key(&generate_identity(), &path), Err(KeyFileError::Exists { .. })));
        assert_eq!(read_key(&path).unwrap().public_key(), id.public_key());
    }

    #[test]
    fn a_log_level_the_backend_refuses_is_a_config_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[node]\nname = \"a\"\nprivate_key = \"/k\"\nlog_level = \"info,[[[\"\n").unwrap();
        let e = load_config(&path).unwrap_err().to_string();
        assert!(e.contains("node.log_level"), "{e}");
        let e = load_config(&dir.path().join("missing.toml")).unwrap_err().to_string();
        assert!(e.contains("(file)") && e.contains("cannot read"), "{e}");
    }
}
