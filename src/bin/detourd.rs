//! `detourd`: the detour daemon. See `detourd --help` and `docs/config.md`.

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use detour::cli::detourd::Args;
use detour::config::Config;

/// Starts logging at `level` (`RUST_LOG` overrides it); returns what sets a new level at a
/// reload (an error when `RUST_LOG` is set: it stays in force). Under systemd (the journal
/// named in `JOURNAL_STREAM`) records go to the journal with their priority (warnings at
/// 4, errors at 3: `journalctl -p warning -u detourd` finds them); elsewhere to stderr.
fn init_logging(level: &str) -> detour::shell::daemon::SetLogLevel {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let from_env = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
    let filter = tracing_subscriber::EnvFilter::new(from_env.clone().unwrap_or_else(|| level.to_string()));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let journal = std::env::var_os("JOURNAL_STREAM").and_then(|_| match tracing_journald::layer() {
        Ok(l) => Some(l.with_syslog_identifier("detourd".into())),
        Err(e) => {
            eprintln!("detourd: the journal cannot be reached ({e}); logging to stderr");
            None
        }
    });
    let registry = tracing_subscriber::registry().with(filter);
    match journal {
        Some(j) => registry.with(j).init(),
        None => registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(false).with_target(false)).init(),
    }
    Box::new(move |level: &str| {
        if from_env.is_some() {
            return Err("RUST_LOG is set and stays in force".to_string());
        }
        handle.reload(tracing_subscriber::EnvFilter::new(level)).map_err(|e| e.to_string())
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let load = |path: &Path| -> Result<Config, String> { detour::shell::files::load_checked(path, &args.overlays).map(|(cfg, _)| cfg) };
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
    match rt.block_on(detour::shell::daemon::run(cfg, args.config.clone(), args.overlays.clone(), set_log_level)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            // Under systemd the record above is in the journal already.
            if std::env::var_os("JOURNAL_STREAM").is_none() {
                eprintln!("detourd: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}
