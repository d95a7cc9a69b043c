/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Structs and numbers shared by the XDP program and userspace. The Rust mirror is
 * xdp/src/abi.rs, which asserts the sizes below; keep both in sync.
 */
#ifndef XLB_H
#define XLB_H

#include <linux/types.h>

#define XLB_MAX_QUEUES 64
#define XLB_MAX_IFACES 16
/* Slots of the direct-mapped interface cache (iface_cache), a power of two. */
#define XLB_IFACE_CACHE 4096
#define XLB_MAX_FRONTENDS 4096
#define XLB_MAX_VIPS 4096
#define XLB_MAX_SNAT_ADDRS 16
#define XLB_MAX_BACKENDS 65536
#define XLB_MAX_MASQ_SRC 256
#define XLB_MAX_MASQ_SKIP 16384
#define XLB_MAX_MASQ_KEEP 65536
#define XLB_MAX_FRAGS 8192

/* One of lbd's interfaces (iface_slots value): its slot among lbd's interfaces (the
 * XSKMAP row), flags, and its MAC (a frame for the workers must be addressed to it). */
struct xlb_iface {
	__u32 slot;
	__u32 flags;
	__u8 mac[6];
	__u8 pad[2];
};

/* xlb_iface.flags: masquerade sources arrive here (the cluster-facing side). */
#define XLB_IFACE_INTERNAL (1u << 0)

/* A frontend (VIP:port/proto) or a backend (addr:port/proto), network byte order. */
struct xlb_endpoint {
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

/* The NAT port range of one NAT address, host byte order, inclusive. */
struct xlb_snat_range {
	__u16 first;
	__u16 last;
	__u32 flags;
};

/* A NAT address that masquerades: replies may come from any source (without it, only
 * from a configured backend). */
#define XLB_SNAT_ANY_SOURCE 1u

/* Key of the LPM tries: prefix length, then the address (network byte order). */
struct xlb_lpm_key {
	__u32 prefixlen;
	__be32 addr;
};

/* An IPv4 datagram in fragments (RFC 791: source, destination, protocol and
 * identification name it), network byte order. */
struct xlb_frag_key {
	__be32 saddr;
	__be32 daddr;
	__be16 id;
	__u8 proto;
	__u8 pad;
};

/*
 * Per-CPU counters of the steering program, indexed by this enum. The worker's own drop
 * reasons are lb::DropReason (lb/src/counters.rs); "fragment", "malformed" and "ttl"
 * mean the same thing in both lists. Keep xdp/src/abi.rs::Stat in sync.
 */
enum xlb_stat {
	XLB_STAT_RX = 0,		/* every frame the program saw */
	XLB_STAT_FRONTEND = 1,		/* to a frontend: sent to the XSK */
	XLB_STAT_REPLY = 2,		/* reply to a NATed flow: sent to the XSK */
	XLB_STAT_NO_XSK = 3,		/* meant for an XSK, none on this queue: dropped */
	XLB_STAT_PASS = 4,		/* not ours: left to the kernel */
	XLB_STAT_NOT_IPV4 = 5,		/* ARP, IPv6, ...: left to the kernel */
	XLB_STAT_MALFORMED = 6,		/* truncated/invalid headers: left to the kernel */
	XLB_STAT_TTL = 7,		/* ours but TTL <= 1: left to the kernel (ICMP time exceeded) */
	XLB_STAT_FRAGMENT = 8,		/* fragment to a VIP or SNAT address: dropped */
	XLB_STAT_MASQ = 9,		/* from a masquerade source to masquerade: sent to the XSK */
	XLB_STAT_MASQ_KEEP = 10,	/* a kept flow (policy changed under it): sent to the XSK */
	XLB_STAT_MASQ_DROP = 11,	/* from a masquerade source, untranslatable: dropped */
	XLB_STAT_ICMP_ERROR = 12,	/* ICMP error about a NATed flow: sent to the XSK */
	XLB_STAT_MARTIAN = 13,		/* for the workers, martian source or a VIP: dropped */
	XLB_STAT_FOREIGN_MAC = 14,	/* for the workers, not to the interface's MAC: dropped */
	XLB_STAT_VLAN = 15,		/* 802.1Q-tagged: left to the kernel's VLAN devices */
	XLB_STAT_LENGTH = 16,		/* for the workers, IPv4/UDP lengths disagree: dropped */
	XLB_STAT_HAIRPIN = 17,		/* a masquerade source to the egress address's NAT range: sent to the XSK */
	XLB_STAT_FRAGMENT_FOLLOWS = 18,	/* a later fragment of a datagram whose first went to the XSK: sent too */
	XLB_STAT_FAST_PATH = 19,	/* a packet of an established flow, executed here (fast path) */
	XLB_STAT_FAST_PATH_STALE = 20,	/* a fast-path entry of an older configuration: to the worker */
	XLB_STAT_MAX = 21,
};

/* An iface_cache slot: the interface whose ifindex maps to it (0: none). */
struct xlb_iface_cached {
	__u32 ifindex;
	struct xlb_iface iface;
};

_Static_assert(sizeof(struct xlb_iface) == 16, "xlb_iface: see xdp/src/abi.rs");
_Static_assert(sizeof(struct xlb_iface_cached) == 20, "xlb_iface_cached: see xdp/src/abi.rs");
_Static_assert(__builtin_offsetof(struct xlb_iface, mac) == 8, "xlb_iface.mac");
_Static_assert(sizeof(struct xlb_endpoint) == 8, "xlb_endpoint: see xdp/src/abi.rs");
_Static_assert(sizeof(struct xlb_snat_range) == 8, "xlb_snat_range: see xdp/src/abi.rs");
_Static_assert(sizeof(struct xlb_frag_key) == 12, "xlb_frag_key");

#endif
