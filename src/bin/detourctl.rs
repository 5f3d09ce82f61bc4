//! `detourctl`: keys, node IDs and the daemon's status. See `detourctl --help`.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use detour::config::{Config, DEFAULT_CONFIG_PATH, DEFAULT_CONTROL_SOCKET};
use detour::ctl::{render_paths, render_status, Request, Response};
use detour::identity::{Identity, PublicKey};

/// Control and inspect detour.
#[derive(Parser, Debug)]
#[command(name = "detourctl", version)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Write a new Ed25519 private key to FILE (mode 0600; never overwrites).
    Genkey {
        /// Where to write the key.
        file: PathBuf,
    },
    /// Print the public key of the private key in FILE (or standard input).
    Pubkey {
        /// Private key file; `-` or nothing reads standard input.
        file: Option<PathBuf>,
    },
    /// Print the node ID of a private key file, or of a public key given with --public-key.
    Nodeid {
        /// Private key file.
        file: Option<PathBuf>,
        /// A base64 public key instead of a key file.
        #[arg(long)]
        public_key: Option<String>,
    },
    /// List every monitored path with RTT, loss and state.
    Paths(Query),
    /// Show this node and its peers: state, handshakes, RTT, traffic, drops, path.
    Status(Query),
}

/// How to reach the daemon, and the output form.
#[derive(clap::Args, Debug)]
struct Query {
    /// Print the daemon's JSON answer instead of the table.
    #[arg(long)]
    json: bool,
    /// Control socket of the daemon.
    #[arg(short, long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Read the control socket path from this configuration file.
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
}

fn read_identity(file: Option<PathBuf>) -> Result<Identity, String> {
    match file {
        Some(p) if p.as_os_str() != "-" => Identity::read(&p).map_err(|e| e.to_string()),
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
    match Config::load(&path) {
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

fn run(args: Args) -> Result<(), String> {
    match args.cmd {
        Cmd::Genkey { file } => {
            let id = Identity::generate();
            id.write_new(&file).map_err(|e| e.to_string())?;
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
