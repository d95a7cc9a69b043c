/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Reading a frame's headers the way the workers key flows (lb/src/pipeline/classify.rs):
 * fragment keys, L4 "ports" (an echo's identifier), the martian-source rule, NAT ranges.
 */
#ifndef XLB_PARSE_H
#define XLB_PARSE_H

#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include "xlb.h"
#include "icmp.h"

static __always_inline struct xlb_frag_key frag_key(struct iphdr *ip)
{
	struct xlb_frag_key k = {
		.saddr = ip->saddr,
		.daddr = ip->daddr,
		.id = ip->id,
		.proto = ip->protocol,
	};
	return k;
}

/* A source no router accepts (RFC 1812 §5.3.7, RFC 6890): 0/8, 127/8, multicast,
 * 240/4 and the limited broadcast. The same rule as the worker's is_martian
 * (lb/src/pipeline/decide.rs); the fixture rows "source ..." check both. */
static __always_inline int martian(__be32 saddr)
{
	__u8 first = bpf_ntohl(saddr) >> 24;

	return first == 0 || first == 127 || first >= 224;
}

/* The "ports" of the L4 header at l4 as lb::flow::FlowKey keys them: TCP/UDP ports, ICMP
 * echo request (id, 0), echo reply (0, id), other ICMP (0, 0). Network byte order.
 * Returns -1 when the header is truncated or invalid. */
static __always_inline int l4_ports(void *l4, void *end, __u8 proto, __be16 *sport,
				    __be16 *dport)
{
	if (proto == IPPROTO_TCP) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > end || th->doff < 5)
			return -1;
		*sport = th->source;
		*dport = th->dest;
		return 0;
	}
	if (proto == IPPROTO_UDP) {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > end)
			return -1;
		*sport = uh->source;
		*dport = uh->dest;
		return 0;
	}
	if (proto == IPPROTO_ICMP) {
		struct icmphdr *ih = l4;

		if ((void *)(ih + 1) > end)
			return -1;
		*sport = 0;
		*dport = 0;
		if (ih->type == ICMP_ECHO)
			*sport = ih->id;
		else if (ih->type == ICMP_ECHOREPLY)
			*dport = ih->id;
		return 0;
	}
	return -1;
}

static __always_inline int in_range(struct xlb_snat_range *r, __be16 port)
{
	__u16 p = bpf_ntohs(port);

	return p >= r->first && p <= r->last;
}

#endif
