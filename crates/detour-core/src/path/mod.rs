//! Paths and multipath: how a node judges the paths to each peer and spreads traffic
//! over them (spec A§1.3.1, A§2.1; seeds-digest items 8-13, 20-28).
//!
//! * [`failover`]: probes and reception reports, the path estimator, the route decision
//!   with hold-down, relay choice (SOSR, last resort) and failure signals (ICMP, TCP stalls);
//! * [`replex`]: REPLEX traffic shares over the direct and relay paths;
//! * [`icmp`]: which intercepted ICMP errors say that a path the overlay can repair failed.

pub mod failover;
pub mod icmp;
pub mod replex;
