//! The flow-action record: what every executor of a flow agrees on.
//!
//! A flow is a [`FlowKey`] (the packet's addresses, ports and protocol as they arrive)
//! and an [`Action`] (what to do with such a packet: rewrite it and send it out of an
//! interface). The Rust workers build actions, the XDP fast path executes them
//! (`xdp/bpf/flowrec.h`, `xdp/bpf/execute.h`), and later hot restart persists them. Both
//! sides assert every size and offset, with the same numbers (a test in `xdp` reads the
//! header's asserts and compares them with [`LAYOUT`]).
//!
//! Everything is in network byte order as it appears on the wire (addresses, ports),
//! except the counters, which are native. Addresses are 16 bytes whatever the family;
//! an IPv4 address takes the first four, the rest are zero.
#![no_std]
#![forbid(unsafe_code)]

use core::mem::{offset_of, size_of};

/// `family` values.
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

/// Bytes of encapsulation an action may prepend (outer IPv4 + UDP + GUE, with room).
pub const ENCAP_MAX: usize = 64;

/// A packet's flow as it arrives: `struct xlb_fkey`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Network byte order; ICMP echo: the identifier as the source "port" of a request
    /// and the destination "port" of a reply.
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub family: u8,
    pub pad: [u8; 2],
}

impl FlowKey {
    /// An IPv4 flow; ports in host order.
    pub fn v4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8) -> FlowKey {
        FlowKey {
            src: v4(src),
            dst: v4(dst),
            sport: sport.to_be_bytes(),
            dport: dport.to_be_bytes(),
            proto,
            family: FAMILY_IPV4,
            pad: [0; 2],
        }
    }
}

/// A 16-byte address field holding an IPv4 address.
pub fn v4(a: [u8; 4]) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&a);
    b
}

/// What an action does (`enum xlb_action_kind`). `Nat` and the direct server return
/// kinds are executed; `Route` is reserved.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionKind {
    /// Rewrite addresses and ports (full NAT), MACs, TTL and checksums; send.
    Nat = 1,
    /// Rewrite the MACs only, the IP packet untouched (L2 direct server return: the
    /// backend holds the VIP and answers the client itself).
    L2Dsr = 2,
    /// Prepend `encap` (an outer IPv4 header) and send (IPIP direct server return).
    /// The template's total length, TOS and checksum are zero: the executor sets the
    /// total length, copies the inner TOS and computes the checksum.
    Ipip = 3,
    /// Prepend `encap` (outer IPv4, UDP and GUE headers) and send: as `Ipip`, and the
    /// UDP length is set (the UDP checksum stays 0).
    Gue = 4,
    /// Forward untranslated (new MACs, TTL).
    Route = 5,
}

/// `Action::flags`: the egress interface is the ingress one (reserved: the executor
/// redirects either way, see xdp/bpf/xlb.bpf.c).
pub const ACTION_SAME_IFACE: u8 = 1;

/// What to do with a packet of a flow: `struct xlb_action`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Action {
    /// An [`ActionKind`].
    pub kind: u8,
    pub family: u8,
    /// `ACTION_*` bits.
    pub flags: u8,
    /// Bytes of `encap` used (encapsulating kinds).
    pub encap_len: u8,
    /// Egress interface.
    pub ifindex: u32,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// The egress link's MTU: a larger packet is not executed here (the worker answers
    /// or fragments it).
    pub mtu: u16,
    /// One's-complement deltas to add to the IPv4 header checksum (TTL decrement
    /// included) and to the L4 checksum (RFC 1624), native order.
    pub ip_delta: u16,
    pub l4_delta: u16,
    /// New ports, network byte order.
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub pad: [u8; 2],
    /// New addresses.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Encapsulation template (IPIP, GUE): the outer headers, `encap_len` bytes.
    pub encap: [u8; ENCAP_MAX],
}

impl Default for Action {
    fn default() -> Self {
        Action {
            kind: 0,
            family: 0,
            flags: 0,
            encap_len: 0,
            ifindex: 0,
            src_mac: [0; 6],
            dst_mac: [0; 6],
            mtu: 0,
            ip_delta: 0,
            l4_delta: 0,
            sport: [0; 2],
            dport: [0; 2],
            pad: [0; 2],
            src: [0; 16],
            dst: [0; 16],
            encap: [0; ENCAP_MAX],
        }
    }
}

/// What the fast path keeps per installed flow direction, by key: `struct xlb_fp_value`.
/// The executor updates `last_seen` (CLOCK_MONOTONIC ns), `packets` and `bytes` in
/// place; the worker owning the flow reads them when its own view says the flow idled.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowEntry {
    /// Snapshot generation the action was resolved under: the executor uses it only
    /// while it equals the current one (`fp_generation`), so nothing a newer
    /// configuration would change is executed.
    pub generation: u64,
    pub last_seen: u64,
    pub packets: u64,
    pub bytes: u64,
    /// The owning worker and its flow slot (for hot restart and diagnostics).
    pub worker: u32,
    pub slot: u32,
    pub action: Action,
}

/// Every size and offset both sides assert: (struct, field, offset); a field of `""`
/// is the struct's size. `xdp/bpf/flowrec.h` carries the same numbers.
pub const LAYOUT: &[(&str, &str, usize)] = &[
    ("xlb_fkey", "", size_of::<FlowKey>()),
    ("xlb_fkey", "dst", offset_of!(FlowKey, dst)),
    ("xlb_fkey", "sport", offset_of!(FlowKey, sport)),
    ("xlb_fkey", "dport", offset_of!(FlowKey, dport)),
    ("xlb_fkey", "proto", offset_of!(FlowKey, proto)),
    ("xlb_fkey", "family", offset_of!(FlowKey, family)),
    ("xlb_action", "", size_of::<Action>()),
    ("xlb_action", "flags", offset_of!(Action, flags)),
    ("xlb_action", "ifindex", offset_of!(Action, ifindex)),
    ("xlb_action", "src_mac", offset_of!(Action, src_mac)),
    ("xlb_action", "dst_mac", offset_of!(Action, dst_mac)),
    ("xlb_action", "mtu", offset_of!(Action, mtu)),
    ("xlb_action", "ip_delta", offset_of!(Action, ip_delta)),
    ("xlb_action", "l4_delta", offset_of!(Action, l4_delta)),
    ("xlb_action", "sport", offset_of!(Action, sport)),
    ("xlb_action", "dport", offset_of!(Action, dport)),
    ("xlb_action", "src", offset_of!(Action, src)),
    ("xlb_action", "dst", offset_of!(Action, dst)),
    ("xlb_action", "encap", offset_of!(Action, encap)),
    ("xlb_fp_value", "", size_of::<FlowEntry>()),
    (
        "xlb_fp_value",
        "last_seen",
        offset_of!(FlowEntry, last_seen),
    ),
    ("xlb_fp_value", "packets", offset_of!(FlowEntry, packets)),
    ("xlb_fp_value", "bytes", offset_of!(FlowEntry, bytes)),
    ("xlb_fp_value", "worker", offset_of!(FlowEntry, worker)),
    ("xlb_fp_value", "slot", offset_of!(FlowEntry, slot)),
    ("xlb_fp_value", "action", offset_of!(FlowEntry, action)),
];

// The same numbers as the header's `_Static_assert`s, checked at compile time here.
const _: () = assert!(size_of::<FlowKey>() == 40);
const _: () = assert!(offset_of!(FlowKey, sport) == 32);
const _: () = assert!(offset_of!(FlowKey, proto) == 36);
const _: () = assert!(size_of::<Action>() == 128);
const _: () = assert!(offset_of!(Action, ifindex) == 4);
const _: () = assert!(offset_of!(Action, mtu) == 20);
const _: () = assert!(offset_of!(Action, sport) == 26);
const _: () = assert!(offset_of!(Action, src) == 32);
const _: () = assert!(offset_of!(Action, encap) == 64);
const _: () = assert!(size_of::<FlowEntry>() == 168);
const _: () = assert!(offset_of!(FlowEntry, action) == 40);

/// Limits both sides size their maps by.
pub mod limits {
    /// Most fast-path flow directions (entries of `fp_flows`).
    pub const FAST_PATH_ENTRIES: u32 = 1 << 20;
}

/// Every number xdp/bpf/flowrec.h defines (`#define` and `enum xlb_action_kind`), by its
/// C name: a test reads the header and compares, so the numbers are one list.
pub const CONSTANTS: &[(&str, u64)] = &[
    ("XLB_FAMILY_IPV4", FAMILY_IPV4 as u64),
    ("XLB_FAMILY_IPV6", FAMILY_IPV6 as u64),
    ("XLB_ENCAP_MAX", ENCAP_MAX as u64),
    ("XLB_FAST_PATH_ENTRIES", limits::FAST_PATH_ENTRIES as u64),
    ("XLB_ACT_SAME_IFACE", ACTION_SAME_IFACE as u64),
    ("XLB_ACT_NAT", ActionKind::Nat as u64),
    ("XLB_ACT_L2DSR", ActionKind::L2Dsr as u64),
    ("XLB_ACT_IPIP", ActionKind::Ipip as u64),
    ("XLB_ACT_GUE", ActionKind::Gue as u64),
    ("XLB_ACT_ROUTE", ActionKind::Route as u64),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv4_key_is_its_wire_bytes() {
        let k = FlowKey::v4([10, 0, 0, 2], [10, 96, 0, 10], 40000, 80, 6);
        assert_eq!(&k.src[..4], &[10, 0, 0, 2]);
        assert!(k.src[4..].iter().all(|&b| b == 0));
        assert_eq!(k.sport, [0x9c, 0x40]);
        assert_eq!(k.dport, [0, 80]);
        assert_eq!((k.proto, k.family), (6, FAMILY_IPV4));
    }
}
