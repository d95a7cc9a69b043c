/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The flow-action record, C side: what the Rust workers install and the XDP fast path
 * executes. The one Rust definition is lb/flowrec (crate flowrec); both assert the same
 * sizes and offsets, and a test (xdp/tests/bpf_fixtures.rs) reads the asserts below and
 * compares them with flowrec::LAYOUT.
 *
 * Addresses and ports are in network byte order as on the wire; an IPv4 address takes
 * the first 4 of 16 bytes. Counters and deltas are native.
 */
#ifndef XLB_FLOWREC_H
#define XLB_FLOWREC_H

#include <linux/types.h>

#define XLB_FAMILY_IPV4 4
#define XLB_FAMILY_IPV6 6
#define XLB_ENCAP_MAX 64
/* Most fast-path flow directions (flowrec::limits::FAST_PATH_ENTRIES). */
#define XLB_FAST_PATH_ENTRIES (1u << 20)

struct xlb_fkey {
	__u8 src[16];
	__u8 dst[16];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 family;
	__u8 pad[2];
};

enum xlb_action_kind {
	XLB_ACT_NAT = 1,	/* addresses, ports, MACs, TTL, checksums */
	XLB_ACT_L2DSR = 2,	/* MACs only, the IP packet untouched (direct server return) */
	XLB_ACT_IPIP = 3,	/* prepend encap (outer IPv4), direct server return */
	XLB_ACT_GUE = 4,	/* prepend encap (outer IPv4 + UDP + GUE), direct server return */
	XLB_ACT_ROUTE = 5,	/* reserved: MACs and TTL only */
};

/* xlb_action.flags: egress is the ingress interface (reserved; the executor redirects). */
#define XLB_ACT_SAME_IFACE 1

struct xlb_action {
	__u8 kind;
	__u8 family;
	__u8 flags;
	__u8 encap_len;
	__u32 ifindex;
	__u8 src_mac[6];
	__u8 dst_mac[6];
	__u16 mtu;
	__u16 ip_delta;
	__u16 l4_delta;
	__be16 sport;
	__be16 dport;
	__u8 pad[2];
	__u8 src[16];
	__u8 dst[16];
	__u8 encap[XLB_ENCAP_MAX];
};

struct xlb_fp_value {
	__u64 generation;
	__u64 last_seen;
	__u64 packets;
	__u64 bytes;
	__u32 worker;
	__u32 slot;
	struct xlb_action action;
};

_Static_assert(sizeof(struct xlb_fkey) == 40, "xlb_fkey");
_Static_assert(__builtin_offsetof(struct xlb_fkey, dst) == 16, "xlb_fkey.dst");
_Static_assert(__builtin_offsetof(struct xlb_fkey, sport) == 32, "xlb_fkey.sport");
_Static_assert(__builtin_offsetof(struct xlb_fkey, dport) == 34, "xlb_fkey.dport");
_Static_assert(__builtin_offsetof(struct xlb_fkey, proto) == 36, "xlb_fkey.proto");
_Static_assert(__builtin_offsetof(struct xlb_fkey, family) == 37, "xlb_fkey.family");
_Static_assert(sizeof(struct xlb_action) == 128, "xlb_action");
_Static_assert(__builtin_offsetof(struct xlb_action, flags) == 2, "xlb_action.flags");
_Static_assert(__builtin_offsetof(struct xlb_action, ifindex) == 4, "xlb_action.ifindex");
_Static_assert(__builtin_offsetof(struct xlb_action, src_mac) == 8, "xlb_action.src_mac");
_Static_assert(__builtin_offsetof(struct xlb_action, dst_mac) == 14, "xlb_action.dst_mac");
_Static_assert(__builtin_offsetof(struct xlb_action, mtu) == 20, "xlb_action.mtu");
_Static_assert(__builtin_offsetof(struct xlb_action, ip_delta) == 22, "xlb_action.ip_delta");
_Static_assert(__builtin_offsetof(struct xlb_action, l4_delta) == 24, "xlb_action.l4_delta");
_Static_assert(__builtin_offsetof(struct xlb_action, sport) == 26, "xlb_action.sport");
_Static_assert(__builtin_offsetof(struct xlb_action, dport) == 28, "xlb_action.dport");
_Static_assert(__builtin_offsetof(struct xlb_action, src) == 32, "xlb_action.src");
_Static_assert(__builtin_offsetof(struct xlb_action, dst) == 48, "xlb_action.dst");
_Static_assert(__builtin_offsetof(struct xlb_action, encap) == 64, "xlb_action.encap");
_Static_assert(sizeof(struct xlb_fp_value) == 168, "xlb_fp_value");
_Static_assert(__builtin_offsetof(struct xlb_fp_value, last_seen) == 8, "xlb_fp_value.last_seen");
_Static_assert(__builtin_offsetof(struct xlb_fp_value, packets) == 16, "xlb_fp_value.packets");
_Static_assert(__builtin_offsetof(struct xlb_fp_value, bytes) == 24, "xlb_fp_value.bytes");
_Static_assert(__builtin_offsetof(struct xlb_fp_value, worker) == 32, "xlb_fp_value.worker");
_Static_assert(__builtin_offsetof(struct xlb_fp_value, slot) == 36, "xlb_fp_value.slot");
_Static_assert(__builtin_offsetof(struct xlb_fp_value, action) == 40, "xlb_fp_value.action");

#endif
