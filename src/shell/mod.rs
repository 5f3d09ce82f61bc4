//! The I/O shell: everything that touches the host. Kept thin; decisions live in the core.

pub mod netlink;
pub mod datapath;
pub mod tls;
pub mod quic;
pub mod control;
pub mod daemon;
pub mod sockets;
pub mod sockdiag;
pub mod engine;
pub mod intercept;
pub mod mnode;
pub mod peers;
pub mod priority;
pub mod nexthop;
pub mod acct;
pub mod classes;
pub mod netfilter;
pub mod metrics;
