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
#define XLB_MAX_FRONTENDS 4096
#define XLB_MAX_VIPS 4096
#define XLB_MAX_SNAT_ADDRS 16
#define XLB_MAX_BACKENDS 65536

/* A frontend (VIP:port/proto) or a backend (addr:port/proto), network byte order. */
struct xlb_endpoint {
	__be32 addr;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

/* The SNAT port range of one SNAT address, host byte order, inclusive. */
struct xlb_snat_range {
	__u16 first;
	__u16 last;
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
	XLB_STAT_NO_XSK = 3,		/* meant for an XSK, none on this queue: passed */
	XLB_STAT_PASS = 4,		/* not ours: left to the kernel */
	XLB_STAT_NOT_IPV4 = 5,		/* ARP, IPv6, ...: left to the kernel */
	XLB_STAT_MALFORMED = 6,		/* truncated/invalid headers: left to the kernel */
	XLB_STAT_TTL = 7,		/* ours but TTL <= 1: left to the kernel (ICMP time exceeded) */
	XLB_STAT_FRAGMENT = 8,		/* fragment to a VIP or SNAT address: dropped */
	XLB_STAT_MAX = 9,
};

#endif
