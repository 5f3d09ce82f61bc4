//! detour-core: the sans-IO core of detour, a resilient overlay for Linux routers and
//! servers.
//!
//! Everything here is a pure state machine or codec: events and `now` in, actions and the
//! next timeout out, randomness from a seed. The crate depends on no runtime, socket, TUN,
//! netlink or netfilter library, so the compiler checks that it does no I/O; the `detour`
//! crate is the I/O shell that drives it. Folders by plane:
//!
//! * [`wire`]: wire formats (overlay header and seal, replay window, IP packet parsing,
//!   management frames);
//! * [`dataplane`]: the forwarding overlay's packet logic (encapsulation, decapsulation,
//!   relaying, the routing table of prefixes);
//! * [`path`]: path monitoring, failover, relay choice and REPLEX multipath;
//! * [`overlay`]: the management overlay (sessions, directory, neighbour choice, message
//!   routing, the local API codec);
//! * [`kernel`]: kernel routing state as data and the reconcile plan;
//! * [`node`]: the node's model of its peers, its policy and its exits;
//! * [`ctl`]: the control protocol between `detourctl` and `detourd`;
//! * [`config`], [`identity`]: the configuration file and the node's keys.
//!
//! Design notes: `docs/design.md`.

#![warn(missing_docs)]

pub mod config;
pub mod ctl;
pub mod dataplane;
pub mod identity;
pub mod kernel;
pub mod node;
pub mod overlay;
pub mod path;
pub mod rng;
pub mod wire;
