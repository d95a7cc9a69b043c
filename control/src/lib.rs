//! xlb's control plane: the request/response protocol `lbd` speaks on its Unix socket
//! ([`proto`], documented in docs/protocol.md), the mio event loop that serves it
//! ([`server`]), the blocking client `lbctl` uses ([`client`]), and the desired state
//! as a file with the plan that applies it ([`desired`]), and the one ordered apply with
//! rollback every datapath change goes through ([`txn`]), and health checks' pure part
//! ([`health`]).
//!
//! This crate never touches frames or the kernel's datapath; `lbd` (`control/lbd`, over
//! the `xdp` I/O crate) implements [`server::Handler`] and [`txn::Datapath`].
#![forbid(unsafe_code)]

pub mod client;
pub mod desired;
pub mod fuzzing;
pub mod health;
pub mod proto;
pub mod server;
pub mod txn;

/// Where `lbd` listens unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/xlb/lbd.sock";
