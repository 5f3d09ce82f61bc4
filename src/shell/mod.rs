//! The I/O shell: everything that touches the host. Kept thin; decisions live in the core.

pub mod netlink;
