//! detour: a resilient overlay for Linux routers and servers.
//!
//! The crate is split into a **sans-IO core** — pure state machines that take events and
//! `now` and return actions (wire codec, replay window, routing table, data plane, session
//! lifecycle, kernel reconcile plan, configuration) — and a thin **I/O shell** ([`shell`])
//! that owns TUNs, sockets, netlink and the control socket. The binaries `detourd` and
//! `detourctl` are built on both. Design notes: `docs/design.md`.

#![warn(missing_docs)]

pub mod api;
pub mod config;
pub mod ctl;
pub mod dataplane;
pub mod directory;
pub mod exits;
pub mod failover;
pub mod icmp;
pub mod identity;
pub mod kernel;
pub mod links;
pub mod mgmt;
pub mod model;
pub mod mroute;
pub mod overlay;
pub mod packet;
pub mod policy;
pub mod replay;
pub mod replex;
pub mod routing;
pub mod session;
pub mod shell;
pub mod wire;
