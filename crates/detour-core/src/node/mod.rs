//! The node: its configuration and peers as one model, the policy it offers to others, and
//! the exits it uses.
//!
//! * [`model`]: configured and directory-learned peers, their addresses, and the kernel
//!   and data-plane state they imply;
//! * [`policy`]: willingness to relay or exit, priority, masquerading (spec A§3.3);
//! * [`exits`]: which exit carries traffic to destinations outside the overlay.

pub mod exits;
pub mod model;
pub mod policy;
pub mod reload;
pub mod sessions;
#[cfg(test)]
pub mod sim;
pub mod state;
