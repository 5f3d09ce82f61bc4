//! detour: a resilient overlay for Linux routers and servers.
//!
//! This crate is the **I/O shell** ([`shell`]): it owns TUNs, sockets, netlink, netfilter
//! and the control socket, and drives the **sans-IO core**, the `detour-core` crate
//! (re-exported here by plane: wire formats, data plane, paths, management overlay, kernel
//! state, node, control protocol). The binaries `detourd` and `detourctl` are built on
//! both. Design notes: `docs/design.md`.

#![warn(missing_docs)]

pub use detour_core::{config, ctl, dataplane, identity, kernel, node, overlay, path, rng, wire};

pub mod cli;
pub mod shell;
