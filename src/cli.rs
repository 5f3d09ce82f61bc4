//! Command-line definitions of `detourd` and `detourctl` (clap), kept in the library so
//! that the man pages and shell completions are generated from them
//! (`examples/gen-docs.rs`, `scripts/package.sh`).

/// `detourd`'s arguments.
pub mod detourd {
    use std::path::PathBuf;

    use clap::Parser;

    use crate::config::{DEFAULT_CONFIG_DIR, DEFAULT_CONFIG_PATH};

    /// Resilient overlay daemon: per-peer and aggregate TUN interfaces, an encrypted UDP data
    /// plane and QUIC management sessions.
    #[derive(Parser, Debug)]
    #[command(name = "detourd", version)]
    pub struct Args {
        /// Configuration file to run with.
        #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG_PATH)]
        pub config: PathBuf,
        /// Validate FILE (and the key it names) and exit, without touching the host.
        #[arg(long, value_name = "FILE")]
        pub check_config: Option<PathBuf>,
        /// Where the configurations of every overlay on this host are (`NAME.toml`, one per
        /// `detourd@NAME.service`): a configuration that collides with another one there
        /// (instance, ports, tables, rule priorities, NFQUEUE, interfaces, control socket,
        /// overlay networks, or a different fwmark) is refused.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_CONFIG_DIR)]
        pub overlays: PathBuf,
    }
}

/// `detourctl`'s arguments.
pub mod detourctl {
    use std::path::PathBuf;

    use clap::{Parser, Subcommand};

    /// Control and inspect detour.
    #[derive(Parser, Debug)]
    #[command(name = "detourctl", version)]
    pub struct Args {
        /// What to do.
        #[command(subcommand)]
        pub cmd: Cmd,
        /// The overlay to talk to when a host runs several: its configuration is
        /// /etc/detour/NAME.toml (the instance of detourd@NAME.service).
        #[arg(long, global = true, value_name = "NAME")]
        pub overlay: Option<String>,
    }

    /// `detourctl`'s subcommands.
    #[derive(Subcommand, Debug)]
    pub enum Cmd {
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
        /// List the node directory: every node of the overlay with its endpoints and addresses.
        Nodes(Query),
        /// Explain how detour routes DESTINATION now, and why.
        ///
        /// The matched prefix and peer, the path in use with its reason and age, every path
        /// with RTT and loss, each candidate relay with its policy verdicts, REPLEX shares, and
        /// whether the kernel's route agrees.
        Why {
            /// An IP address, a peer's name or a node ID.
            destination: String,
            /// How to reach the daemon.
            #[command(flatten)]
            query: Query,
        },
        /// Ping DESTINATION through detour, showing the path of each reply.
        ///
        /// ICMP echo to its overlay address (or to any address detour routes); for each reply
        /// the path that carried it (direct, or via which relay), its round-trip time, and a
        /// path change when one happens meanwhile.
        Ping {
            /// An IP address, a peer's name or a node ID.
            destination: String,
            /// Number of echo requests.
            #[arg(short = 'n', long, default_value_t = 5)]
            count: u32,
            /// Milliseconds between requests.
            #[arg(short, long, default_value_t = 1000)]
            interval_ms: u64,
            /// Milliseconds to wait for each reply.
            #[arg(long, default_value_t = 2000)]
            timeout_ms: u64,
            /// How to reach the daemon.
            #[command(flatten)]
            query: Query,
        },
        /// Make detourd apply its configuration file again, without a restart.
        ///
        /// As `systemctl reload detourd` does; prints what changed. An invalid file, or one
        /// that changes a setting only a restart can (ports, key, table numbers), is refused
        /// and the running configuration stays.
        Reload(Query),
        /// Send a message to a node (by node ID or name) over the management overlay and wait
        /// for its end-to-end acknowledgement.
        Send {
            /// Destination: a node ID (32 hex digits) or a registered name.
            dest: String,
            /// The message; `-` or nothing reads standard input.
            message: Option<String>,
            /// Application channel at the destination.
            #[arg(long, default_value_t = 1)]
            channel: u16,
            /// Send on two disjoint paths at once.
            #[arg(long)]
            critical: bool,
            /// Return once the daemon accepted the message, without waiting for the
            /// acknowledgement.
            #[arg(long)]
            no_wait: bool,
            /// Give up waiting after this many seconds.
            #[arg(long, default_value_t = 30)]
            timeout: u64,
            /// Where the local API listens.
            #[command(flatten)]
            api: ApiArgs,
        },
        /// Print the messages that arrive for a channel (0: every channel).
        Listen {
            /// Channel to receive.
            #[arg(long, default_value_t = 0)]
            channel: u16,
            /// Exit after this many messages.
            #[arg(long)]
            count: Option<u64>,
            /// One JSON object per message.
            #[arg(long)]
            json: bool,
            /// Exit after this many seconds.
            #[arg(long)]
            timeout: Option<u64>,
            /// Where the local API listens.
            #[command(flatten)]
            api: ApiArgs,
        },
        /// Look up a node by name or node ID: its node ID and current locators.
        Resolve {
            /// A name or a node ID.
            key: String,
            /// Where the local API listens.
            #[command(flatten)]
            api: ApiArgs,
        },
        /// Register a name for this node (refused if another node holds it).
        Register {
            /// The name.
            name: String,
            /// Where the local API listens.
            #[command(flatten)]
            api: ApiArgs,
        },
    }

    /// Where the local API listens.
    #[derive(clap::Args, Debug)]
    pub struct ApiArgs {
        /// API port on 127.0.0.1 (default: from the configuration file, else 7722).
        #[arg(long)]
        pub port: Option<u16>,
        /// Read the API port from this configuration file.
        #[arg(short, long, value_name = "FILE")]
        pub config: Option<PathBuf>,
    }

    /// How to reach the daemon, and the output form.
    #[derive(clap::Args, Debug)]
    pub struct Query {
        /// Print the daemon's JSON answer instead of the table.
        #[arg(long)]
        pub json: bool,
        /// Control socket of the daemon.
        #[arg(short, long, value_name = "PATH")]
        pub socket: Option<PathBuf>,
        /// Read the control socket path from this configuration file.
        #[arg(short, long, value_name = "FILE")]
        pub config: Option<PathBuf>,
    }
}
