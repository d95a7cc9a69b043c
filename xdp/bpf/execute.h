/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The C executor of a flow-action record (flowrec.h): what lb's pipeline does to a
 * packet of an established flow (lb/src/pipeline/execute.rs `apply`), byte for byte. Both are
 * run over the same fixture rows (xdp/tests/bpf_fixtures.rs) and must agree.
 */
#ifndef XLB_EXECUTE_H
#define XLB_EXECUTE_H

#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include "flowrec.h"
#include "icmp.h"
#include "csum.h"

/* Execute NAT action `a` on the IPv4 packet `ip` (TTL >= 2, no options checked by the
 * caller) whose L4 header is at `l4`. Nothing is written unless the whole rewrite can
 * be: 0, or -1 when the L4 header is not within the frame. */
static __always_inline int xlb_exec_nat4(struct ethhdr *eth, struct iphdr *ip, void *l4,
					 void *end, const struct xlb_action *a)
{
	struct tcphdr *th = l4;
	struct udphdr *uh = l4;
	struct icmphdr *ih = l4;

	switch (ip->protocol) {
	case IPPROTO_TCP:
		if ((void *)(th + 1) > end)
			return -1;
		break;
	case IPPROTO_UDP:
		if ((void *)(uh + 1) > end)
			return -1;
		break;
	case IPPROTO_ICMP:
		if ((void *)(ih + 1) > end)
			return -1;
		break;
	default:
		return -1;
	}
	__builtin_memcpy(eth->h_dest, a->dst_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, a->src_mac, ETH_ALEN);
	ip->ttl--;
	__builtin_memcpy(&ip->saddr, a->src, 4);
	__builtin_memcpy(&ip->daddr, a->dst, 4);
	csum_apply(&ip->check, a->ip_delta);
	switch (ip->protocol) {
	case IPPROTO_TCP:
		th->source = a->sport;
		th->dest = a->dport;
		csum_apply(&th->check, a->l4_delta);
		break;
	case IPPROTO_UDP:
		uh->source = a->sport;
		uh->dest = a->dport;
		/* 0 means no checksum (RFC 768): it stays; a computed 0 is sent as 0xffff. */
		if (uh->check) {
			__u16 c = csum_add_delta(bpf_ntohs(uh->check), a->l4_delta);

			uh->check = bpf_htons(c ? c : 0xffff);
		}
		break;
	default:
		/* ICMP echo: the identifier is whichever "port" the action sets. */
		ih->id = a->sport | a->dport;
		csum_apply(&ih->checksum, a->l4_delta);
		break;
	}
	return 0;
}

/* Execute L2 DSR action `a`: the frame goes to the backend's MAC (from the egress
 * interface's), the IP packet untouched: the backend, which holds the VIP, answers the
 * client itself. */
static __always_inline void xlb_exec_l2dsr(struct ethhdr *eth, const struct xlb_action *a)
{
	__builtin_memcpy(eth->h_dest, a->dst_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, a->src_mac, ETH_ALEN);
}

/* Execute action `a` of whichever kind on the IPv4 packet `ip` (L4 header at `l4`):
 * 0, or -1 when it cannot be executed here (the frame is then untouched and goes to a
 * worker): a kind this executor does not carry out, or a header out of the frame. */
static __always_inline int xlb_exec(struct ethhdr *eth, struct iphdr *ip, void *l4, void *end,
				    const struct xlb_action *a)
{
	switch (a->kind) {
	case XLB_ACT_NAT:
		return xlb_exec_nat4(eth, ip, l4, end, a);
	case XLB_ACT_L2DSR:
		xlb_exec_l2dsr(eth, a);
		return 0;
	default:
		return -1;
	}
}

#endif
