//! `lbd`, xlb's daemon: the application over the I/O crate (`xdp`).
//!
//! - [`daemon`]: lbd's state and its control-request handler on the control thread:
//!   start-up, the service table, desired state and persistence, every datapath change
//!   as one ordered transaction with rollback (`control::txn`), the masquerading policy,
//!   the takeover of a previous lbd's pinned datapath, and the periodic work of the
//!   control loop. The kernel is reached only through `xdp` (BPF maps and links, AF_XDP
//!   workers, netlink); the pure parts (planning, validation, the transaction) live in
//!   `lb` and `control` and are tested without root.
//! - `main.rs`: the command line (and lbd.toml) and the control loop.
#![forbid(unsafe_code)]

pub mod daemon;
pub mod metrics;
pub mod prober;
