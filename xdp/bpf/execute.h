/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The C executor of a flow-action record (flowrec.h): what lb's pipeline does to a
 * packet of an established flow (lb/src/pipeline/execute.rs `apply`), byte for byte. Both are
 * run over the same fixture rows (xdp/tests/bpf_fixtures.rs) and must agree.
 */
#ifndef XLB_EXECUTE_H
#define XLB_EXECUTE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
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

#define XLB_IPIP_LEN 20
#define XLB_GUE_LEN 32

/* The one's-complement checksum of a 20-byte IPv4 header (its checksum field 0). */
static __always_inline __u16 ip4_csum(const struct iphdr *ip)
{
	const __u16 *w = (const __u16 *)ip;
	__u32 s = 0;

	for (int i = 0; i < 10; i++)
		s += w[i];
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

/* Execute DSR tunnel action `a` (IPIP, GUE) on the frame whose IP packet, `inner_len`
 * bytes with TOS `tos`, follows the Ethernet header: the frame grows by the template
 * (bpf_xdp_adjust_head into the headroom), which goes between a new Ethernet header
 * and the packet, completed as lb's `finish_encap` does: total length, the inner TOS,
 * header checksum, and (GUE) the UDP length. The packet is not moved. 0; -1 with the
 * frame as it was; -2 (not seen: frames have the room) with the frame as it was but the
 * packet pointers invalid. Packet pointers are invalid after 0 too. */
static __always_inline int xlb_exec_encap(struct xdp_md *ctx, const struct xlb_action *a,
					  __u16 inner_len, __u8 tos)
{
	__u32 n = a->encap_len;
	struct ethhdr *eth;
	struct iphdr *outer;
	void *data, *end;

	if (n != XLB_IPIP_LEN && n != XLB_GUE_LEN)
		return -1;
	/* No headroom (never on veth or a driver with native XDP: both keep 256 bytes):
	 * the frame is as it was, but the verifier takes the packet pointers all the same. */
	if (bpf_xdp_adjust_head(ctx, -(int)n))
		return -2;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	outer = data + sizeof(*eth);
	if ((void *)outer + XLB_GUE_LEN > end) {
		/* Cannot happen for a frame that held Ethernet + IPv4; undone, but the
		 * caller's packet pointers are gone: it aborts. */
		bpf_xdp_adjust_head(ctx, (int)n);
		return -2;
	}
	__builtin_memcpy(eth->h_dest, a->dst_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, a->src_mac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);
	if (n == XLB_GUE_LEN) {
		struct udphdr *uh = (void *)(outer + 1);

		__builtin_memcpy(outer, a->encap, XLB_GUE_LEN);
		uh->len = bpf_htons(XLB_GUE_LEN - sizeof(*outer) + inner_len);
	} else {
		__builtin_memcpy(outer, a->encap, XLB_IPIP_LEN);
	}
	outer->tos = tos;
	outer->tot_len = bpf_htons(n + inner_len);
	outer->check = 0;
	outer->check = ip4_csum(outer);
	return 0;
}

/* Execute action `a` of whichever kind on the IPv4 packet `ip` (L4 header at `l4`, the
 * packet `tot` bytes): 0, or -1 when it cannot be executed here (the frame is then
 * untouched and goes to a worker): a kind this executor does not carry out, or a header
 * out of the frame; -2 as xlb_exec_encap. After a tunnel action the packet pointers
 * are invalid. */
static __always_inline int xlb_exec(struct xdp_md *ctx, struct ethhdr *eth, struct iphdr *ip,
				    void *l4, void *end, __u16 tot, const struct xlb_action *a)
{
	switch (a->kind) {
	case XLB_ACT_NAT:
		return xlb_exec_nat4(eth, ip, l4, end, a);
	case XLB_ACT_L2DSR:
		xlb_exec_l2dsr(eth, a);
		return 0;
	case XLB_ACT_IPIP:
	case XLB_ACT_GUE:
		return xlb_exec_encap(ctx, a, tot, ip->tos);
	default:
		return -1;
	}
}

#endif
