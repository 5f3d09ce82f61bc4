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
    detour::shell::files::load_checked(path).map(|(cfg, _)| cfg)
}

/// Starts logging at `level` (`RUST_LOG` overrides it); returns what sets a new level at a
/// reload (an error when `RUST_LOG` is set: it stays in force).
fn init_logging(level: &str) -> detour::shell::daemon::SetLogLevel {
    let from_env = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
    let filter = tracing_subscriber::EnvFilter::new(from_env.clone().unwrap_or_else(|| level.to_string()));
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(false).with_target(false);
    // The journal adds its own time stamps.
    let reload: Box<dyn Fn(tracing_subscriber::EnvFilter) -> Result<(), String> + Send> = if journald {
        let b = builder.without_time().with_env_filter(filter).with_filter_reloading();
        let handle = b.reload_handle();
        b.init();
        Box::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
    } else {
        let b = builder.with_env_filter(filter).with_filter_reloading();
        let handle = b.reload_handle();
        b.init();
        Box::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
    };
    Box::new(move |level: &str| {
        if from_env.is_some() {
            return Err("RUST_LOG is set and stays in force".to_string());
        }
        reload(tracing_subscriber::EnvFilter::new(level))
    })
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
    let set_log_level = init_logging(&cfg.node.log_level);
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
    match rt.block_on(detour::shell::daemon::run(cfg, args.config.clone(), set_log_level)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("detourd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
