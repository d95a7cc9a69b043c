// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * xlb steering program.
 *
 * Decides, per frame, whether xlb's userspace workers handle it (redirect into the
 * XSKMAP entry of the frame's rx queue) or the kernel does (XDP_PASS). Workers get:
 *   (a) TCP/UDP to a configured frontend (VIP, port, proto);
 *   (b) TCP/UDP replies of NATed flows: destination is an SNAT address of this node,
 *       destination port inside its SNAT range, and the source is a configured backend
 *       (so the host's own connections to and from that address are never stolen).
 *   (c) egress masquerading, on interfaces flagged internal: packets from a masquerade
 *       source (LPM trie masq_src) to a destination not in masq_skip (the
 *       non-masquerade list, the node's addresses, --cluster-nodes, multicast: LPM trie),
 *       plus 5-tuples in masq_keep (flows masqueraded before a policy change); from a
 *       masquerade source, fragments and protocols other than TCP/UDP/ICMP are dropped
 *       (counted), never forwarded with the pod address;
 *   (d) replies to masqueraded flows: to a NAT address flagged XLB_SNAT_ANY_SOURCE,
 *       port (or echo identifier) in range, from anywhere;
 *   (e) ICMP errors (unreachable, time exceeded, parameter problem) to a NAT address
 *       quoting a packet that left from it with a port in range.
 * Everything else passes, so ARP, ssh, BGP and the host's own traffic keep working.
 * Frames that are ours but carry TTL <= 1 pass too: the kernel sends ICMP time exceeded.
 * Fragments to a VIP or SNAT address are dropped (counted): SNAT needs ports, which
 * non-first fragments lack. 802.1Q-tagged frames pass: xlb serves untagged ports, and
 * the kernel's VLAN devices (or its drop) own tagged ones.
 *
 * Before a frame goes to a worker it gets a router's checks (RFC 1812 §5.2.2, §5.3.7):
 * addressed to the interface's MAC, a source that is neither martian nor one of our
 * VIPs, IPv4 and UDP lengths that agree with the frame. A failure is a counted drop.
 *
 * One program serves every interface lbd owns, so the XSKMAP is keyed by
 * slot(ingress ifindex) * XLB_MAX_QUEUES + rx queue. If no XSK is bound there (a queue
 * lbd does not serve, or lbd starting or stopping), the frame is dropped and counted,
 * never passed: what is steered must be translated, and the kernel would route a
 * masquerade source's packet with the pod address (or answer for a VIP it does not
 * serve). Only frames the workers would take are affected; the host's traffic passes.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "xlb.h"
#include "flowrec.h"
#include "maps.h"
#include "parse.h"
#include "fastpath.h"

/* The router's checks for a frame about to go to a worker: 0 if it may, else the stat
 * it is dropped under. */
static __always_inline __u32 unfit(struct ethhdr *eth, struct iphdr *ip, void *end,
				   struct xlb_iface *ifc)
{
	__u16 tot = bpf_ntohs(ip->tot_len);

	for (int i = 0; i < ETH_ALEN; i++)
		if (eth->h_dest[i] != ifc->mac[i])
			return XLB_STAT_FOREIGN_MAC;
	if (martian(ip->saddr) || bpf_map_lookup_elem(&vips, &ip->saddr))
		return XLB_STAT_MARTIAN;
	if ((void *)ip + tot > end || tot < ip->ihl * 4)
		return XLB_STAT_LENGTH;
	/* A fragment's UDP header gives the whole datagram's length. */
	if (ip->protocol == IPPROTO_UDP && !(ip->frag_off & bpf_htons(0x3fff))) {
		struct udphdr *uh = (void *)ip + ip->ihl * 4;

		if ((void *)(uh + 1) > end || bpf_ntohs(uh->len) != tot - ip->ihl * 4)
			return XLB_STAT_LENGTH;
	}
	return 0;
}

static __always_inline int to_worker(struct xdp_md *ctx, struct iphdr *ip, __u32 stat)
{
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = (void *)(long)ctx->data;
	__u32 ifindex = ctx->ingress_ifindex;
	struct xlb_iface *ifc;
	__u32 key, bad;
	long ret;

	ifc = iface_of(ifindex);
	if (!ifc || (void *)(eth + 1) > end)
		return drop(XLB_STAT_NO_XSK);
	bad = unfit(eth, ip, end, ifc);
	if (bad)
		return drop(bad);
	count(stat);
	if (ctx->rx_queue_index >= XLB_MAX_QUEUES)
		return drop(XLB_STAT_NO_XSK);
	/* A first fragment (more fragments, offset 0): its datagram's later fragments,
	 * which carry no ports, follow it to the workers. */
	if ((ip->frag_off & bpf_htons(0x3fff)) == bpf_htons(0x2000)) {
		struct xlb_frag_key fk = frag_key(ip);
		__u8 one = 1;

		bpf_map_update_elem(&frags, &fk, &one, BPF_ANY);
	}
	key = ifc->slot * XLB_MAX_QUEUES + ctx->rx_queue_index;
	ret = bpf_redirect_map(&xsks, key, XDP_DROP);
	if (ret != XDP_REDIRECT)
		count(XLB_STAT_NO_XSK);
	return ret;
}

/* (c): a packet from a masquerade source on an internal interface (`later`: a later
 * fragment whose first fragment the workers did not get). */
static __always_inline int masq_out(struct xdp_md *ctx, struct iphdr *ip, void *end,
				    int later)
{
	struct xlb_lpm_key dk = { .prefixlen = 32, .addr = ip->daddr };
	struct xlb_fkey fk = {};
	void *l4 = (void *)ip + ip->ihl * 4;
	int bad = later ||
		  l4_ports(l4, end, ip->protocol, &fk.sport, &fk.dport) < 0;

	struct xlb_snat_range *egress = bpf_map_lookup_elem(&snat_addrs, &ip->daddr);

	/* To the egress address inside its NAT range: another inside host's outside
	 * endpoint. The workers turn it around (hairpinning, RFC 4787 REQ-9). */
	if (egress && (egress->flags & XLB_SNAT_ANY_SOURCE) && !bad &&
	    ip->protocol != IPPROTO_ICMP && in_range(egress, fk.dport)) {
		if (ip->ttl <= 1)
			return pass(XLB_STAT_TTL);
		return to_worker(ctx, ip, XLB_STAT_HAIRPIN);
	}
	if (bpf_map_lookup_elem(&masq_skip, &dk)) {
		if (bad)
			return pass(XLB_STAT_PASS);
		__builtin_memcpy(fk.src, &ip->saddr, 4);
		__builtin_memcpy(fk.dst, &ip->daddr, 4);
		fk.proto = ip->protocol;
		fk.family = XLB_FAMILY_IPV4;
		if (!bpf_map_lookup_elem(&masq_keep, &fk))
			return pass(XLB_STAT_PASS);
		if (ip->ttl <= 1)
			return pass(XLB_STAT_TTL);
		return to_worker(ctx, ip, XLB_STAT_MASQ_KEEP);
	}
	if (later)
		return drop(XLB_STAT_FRAGMENT);
	if (bad)
		return drop(XLB_STAT_MASQ_DROP);
	if (ip->ttl <= 1)
		return pass(XLB_STAT_TTL);
	return to_worker(ctx, ip, XLB_STAT_MASQ);
}

/* (e): an ICMP error to a NAT address: does it quote a packet of a NATed flow? */
static __always_inline int icmp_error_in(struct xdp_md *ctx, struct iphdr *ip,
					 struct icmphdr *ih, void *end,
					 struct xlb_snat_range *range)
{
	struct iphdr *in = (void *)(ih + 1);
	__be16 sport, dport;
	void *il4;

	if ((void *)(in + 1) > end || in->version != 4 || in->ihl < 5)
		return pass(XLB_STAT_MALFORMED);
	if (in->saddr != ip->daddr)
		return pass(XLB_STAT_PASS);
	il4 = (void *)in + in->ihl * 4;
	/* Only 8 bytes of the quoted L4 header are guaranteed. */
	if (il4 + 8 > end)
		return pass(XLB_STAT_MALFORMED);
	if (in->protocol == IPPROTO_ICMP) {
		struct icmphdr *iih = il4;

		if (iih->type != ICMP_ECHO || !(range->flags & XLB_SNAT_ANY_SOURCE))
			return pass(XLB_STAT_PASS);
		sport = iih->id;
	} else if (in->protocol == IPPROTO_TCP || in->protocol == IPPROTO_UDP) {
		struct udphdr *uh = il4; /* TCP has its ports at the same offsets */

		sport = uh->source;
		dport = uh->dest;
		if (!(range->flags & XLB_SNAT_ANY_SOURCE)) {
			struct xlb_endpoint be = {
				.addr = in->daddr,
				.port = dport,
				.proto = in->protocol,
			};

			if (!bpf_map_lookup_elem(&backends, &be))
				return pass(XLB_STAT_PASS);
		}
	} else {
		return pass(XLB_STAT_PASS);
	}
	if (!in_range(range, sport))
		return pass(XLB_STAT_PASS);
	if (ip->ttl <= 1)
		return pass(XLB_STAT_TTL);
	return to_worker(ctx, ip, XLB_STAT_ICMP_ERROR);
}

SEC("xdp")
int xlb_steer(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	__u32 ifindex = ctx->ingress_ifindex;
	struct xlb_snat_range *range;
	struct iphdr *ip;
	__be16 h_proto, sport, dport;
	struct xlb_iface *ifc;
	__be32 daddr;
	void *l3, *l4;
	int later, ports_ok;

	count(XLB_STAT_RX);
	if ((void *)(eth + 1) > end)
		return pass(XLB_STAT_MALFORMED);
	h_proto = eth->h_proto;
	l3 = eth + 1;
	if (h_proto == bpf_htons(ETH_P_8021Q) || h_proto == bpf_htons(ETH_P_8021AD))
		return pass(XLB_STAT_VLAN);
	if (h_proto != bpf_htons(ETH_P_IP))
		return pass(XLB_STAT_NOT_IPV4);

	ip = l3;
	if ((void *)(ip + 1) > end)
		return pass(XLB_STAT_MALFORMED);
	if (ip->version != 4 || ip->ihl < 5)
		return pass(XLB_STAT_MALFORMED);
	{
		int fast = fast_path(ctx, eth, ip, end);

		if (fast >= 0)
			return fast;
	}
	/* A later fragment: no L4 header, so it goes where its first fragment went. */
	later = (ip->frag_off & bpf_htons(0x1fff)) != 0;
	daddr = ip->daddr;
	l4 = (void *)ip + ip->ihl * 4;
	if (later) {
		struct xlb_frag_key fk = frag_key(ip);

		if (bpf_map_lookup_elem(&frags, &fk)) {
			if (ip->ttl <= 1)
				return pass(XLB_STAT_TTL);
			return to_worker(ctx, ip, XLB_STAT_FRAGMENT_FOLLOWS);
		}
	}

	/* (a) frontends come first: a pod talking to a VIP is load-balanced. A malformed
	 * header is judged after the masquerade check (a masquerade source's is dropped). */
	ports_ok = !later && (ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP) &&
		   l4_ports(l4, end, ip->protocol, &sport, &dport) == 0;
	if (ports_ok) {
		struct xlb_endpoint fe = {
			.addr = daddr,
			.port = dport,
			.proto = ip->protocol,
		};
		if (bpf_map_lookup_elem(&frontends, &fe)) {
			if (ip->ttl <= 1)
				return pass(XLB_STAT_TTL);
			return to_worker(ctx, ip, XLB_STAT_FRONTEND);
		}
	}

	/* (c) masquerade sources on the cluster side. */
	ifc = iface_of(ifindex);
	if (ifc && (ifc->flags & XLB_IFACE_INTERNAL)) {
		struct xlb_lpm_key sk = { .prefixlen = 32, .addr = ip->saddr };

		if (bpf_map_lookup_elem(&masq_src, &sk))
			return masq_out(ctx, ip, end, later);
	}

	if (!later && !ports_ok &&
	    (ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP))
		return pass(XLB_STAT_MALFORMED);

	range = bpf_map_lookup_elem(&snat_addrs, &daddr);
	if (later) {
		/* A later fragment whose first fragment the workers did not get (it came
		 * later, or the datagram is not a translated flow's). A masquerading address
		 * is usually the node's own: those are the kernel's to reassemble. */
		if (bpf_map_lookup_elem(&vips, &daddr) ||
		    (range && !(range->flags & XLB_SNAT_ANY_SOURCE)))
			return drop(XLB_STAT_FRAGMENT);
		return pass(XLB_STAT_PASS);
	}
	if (!range)
		return pass(XLB_STAT_PASS);

	if (ip->protocol == IPPROTO_ICMP) {
		struct icmphdr *ih = l4;

		if ((void *)(ih + 1) > end)
			return pass(XLB_STAT_MALFORMED);
		if (ih->type == ICMP_DEST_UNREACH || ih->type == ICMP_TIME_EXCEEDED ||
		    ih->type == ICMP_PARAMETERPROB)
			return icmp_error_in(ctx, ip, ih, end, range);
		/* (d) echo replies to masqueraded pings. */
		if (ih->type == ICMP_ECHOREPLY && (range->flags & XLB_SNAT_ANY_SOURCE) &&
		    in_range(range, ih->id)) {
			if (ip->ttl <= 1)
				return pass(XLB_STAT_TTL);
			return to_worker(ctx, ip, XLB_STAT_REPLY);
		}
		return pass(XLB_STAT_PASS);
	}
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return pass(XLB_STAT_PASS);

	/* (b), (d) replies of NATed flows. */
	if (in_range(range, dport)) {
		struct xlb_endpoint be = {
			.addr = ip->saddr,
			.port = sport,
			.proto = ip->protocol,
		};

		if ((range->flags & XLB_SNAT_ANY_SOURCE) ||
		    bpf_map_lookup_elem(&backends, &be)) {
			if (ip->ttl <= 1)
				return pass(XLB_STAT_TTL);
			return to_worker(ctx, ip, XLB_STAT_REPLY);
		}
	}
	return pass(XLB_STAT_PASS);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
