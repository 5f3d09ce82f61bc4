//! `detourd`: the detour daemon. See `detourd --help` and `docs/config.md`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use detour::config::{Config, DEFAULT_CONFIG_PATH};

/// Resilient overlay daemon: per-peer and aggregate TUN interfaces, an encrypted UDP data
/// plane and QUIC management sessions.
#[derive(Parser, Debug)]
#[command(name = "detourd", version)]
struct Args {
    /// Configuration file to run with.
    #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Validate FILE (and the key it names) and exit, without touching the host.
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
}

fn load(path: &Path) -> Result<Config, String> {
    let cfg = detour::shell::files::load_config(path).map_err(|e| e.to_string())?;
    let file = path.display();
    let id = detour::shell::files::read_key(&cfg.node.private_key).map_err(|e| format!("{file}: node.private_key: {e}"))?;
    if let Some((i, _)) = cfg.peer_by_id(&id.node_id()) {
        return Err(format!("{file}: peer[{i}].public_key: this is the node's own key; a node cannot be its own peer"));
    }
    Ok(cfg)
}

fn init_logging(level: &str) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(v) if !v.is_empty() => tracing_subscriber::EnvFilter::new(v),
        _ => tracing_subscriber::EnvFilter::new(level),
    };
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false).with_target(false);
    if journald {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(path) = args.check_config {
        return match load(&path) {
            Ok(cfg) => {
                let id = detour::shell::files::read_key(&cfg.node.private_key).expect("checked above");
                println!("{}: OK: node {} (node id {}), {} peers", path.display(), cfg.node.name, id.node_id(), cfg.peers.len());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        };
    }
    let capture = detour::shell::capture::init();
    let cfg = match load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(&cfg.node.log_level);
    if let Some(dir) = capture {
        tracing::warn!(dir = %dir.display(), "capturing fuzz seeds (DETOUR_CAPTURE_SEEDS)");
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(detour::shell::daemon::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("detourd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
