/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The fast path: a packet of an established flow whose worker installed the flow's
 * actions (flowrec.h) is executed here (execute.h) and redirected, without a worker.
 */
#ifndef XLB_FASTPATH_H
#define XLB_FASTPATH_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <bpf/bpf_helpers.h>
#include "maps.h"
#include "parse.h"
#include "execute.h"

/* Execute the packet's fast-path entry (TCP, UDP, ICMP echo), if it has a current one
 * and nothing about it needs a worker: a TCP segment with SYN, FIN or RST (the worker
 * tracks the connection's state), an ICMP error, a fragment, IP options, TTL <= 1, a packet larger than the
 * egress MTU, lengths that disagree, a frame not addressed to us. -1: not executed
 * (the frame is untouched); else the XDP verdict. */
static __always_inline int fast_path(struct xdp_md *ctx, struct ethhdr *eth, struct iphdr *ip,
				     void *end)
{
	__u32 ifindex = ctx->ingress_ifindex, zero = 0;
	void *l4 = (void *)(ip + 1);
	struct xlb_fkey k = {};
	struct xlb_fp_value *v;
	struct xlb_iface *ifc;
	__u64 *gen, *clock;
	__u16 tot;
	int ret;

	if (ip->ihl != 5 || (ip->frag_off & bpf_htons(0x3fff)))
		return -1;
	tot = bpf_ntohs(ip->tot_len);
	if ((void *)ip + tot > end || tot < sizeof(*ip))
		return -1;
	if (l4_ports(l4, end, ip->protocol, &k.sport, &k.dport))
		return -1;
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > end || th->syn || th->fin || th->rst)
			return -1;
	} else if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > end || bpf_ntohs(uh->len) != tot - sizeof(*ip))
			return -1;
	} else {
		struct icmphdr *ih = l4;

		/* Echo only: an error quotes another packet, the workers translate it. */
		if ((void *)(ih + 1) > end || (ih->type != ICMP_ECHO && ih->type != ICMP_ECHOREPLY))
			return -1;
	}
	__builtin_memcpy(k.src, &ip->saddr, 4);
	__builtin_memcpy(k.dst, &ip->daddr, 4);
	k.proto = ip->protocol;
	k.family = XLB_FAMILY_IPV4;
	v = bpf_map_lookup_elem(&fp_flows, &k);
	if (!v)
		return -1;
	gen = bpf_map_lookup_elem(&fp_generation, &zero);
	if (!gen || v->generation != *gen) {
		count(XLB_STAT_FAST_PATH_STALE);
		return -1;
	}
	if (ip->ttl <= 1 || tot > v->action.mtu)
		return -1;
	ifc = iface_of(ifindex);
	if (!ifc)
		return -1;
	for (int i = 0; i < ETH_ALEN; i++)
		if (eth->h_dest[i] != ifc->mac[i])
			return -1;
	ret = xlb_exec(ctx, eth, ip, l4, end, tot, &v->action);
	if (ret == -1)
		return -1;
	if (ret)
		return XDP_ABORTED;
	/* No clock read and no locked instruction per packet (measured: together they cost
	 * the fast path about a tenth of its rate): lbd's clock (fp_clock, 50 ms steps), and
	 * plain increments. RSS hashes a flow direction to one queue, so one CPU updates an
	 * entry at a time; should two ever race, a packet goes uncounted in `lbctl nat
	 * list`, nothing else depends on the counts. */
	clock = bpf_map_lookup_elem(&fp_clock, &zero);
	if (clock)
		v->last_seen = *clock;
	v->packets += 1;
	v->bytes += tot;
	count(XLB_STAT_FAST_PATH);
	/* A redirect also when the egress is the ingress interface (one-armed): XDP_TX into
	 * a veth whose peer has GRO but no XDP program lost about half the frames in the
	 * one-armed end-to-end test; the redirect delivered them all. */
	ret = bpf_redirect(v->action.ifindex, 0);
	/* Never negative (XDP_REDIRECT with flags 0); said so the verifier knows the
	 * caller, whose packet pointers a tunnel action invalidated, does not go on. */
	return ret < 0 ? XDP_ABORTED : ret;
}

#endif
