//! The I/O shell: everything that touches the host. Kept thin; decisions live in the core.

pub mod acct;
pub mod capture;
pub mod classes;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod engine;
pub mod files;
pub mod intercept;
pub mod kfwd;
pub mod metrics;
pub mod mnode;
pub mod netfilter;
pub mod netlink;
pub mod nexthop;
pub mod priority;
pub mod quic;
pub mod sessions;
pub mod sockdiag;
pub mod sockets;
pub mod supervise;
pub mod sysctl;
pub mod tls;
pub mod traffic;
