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
 * Everything else passes, so ARP, ssh, BGP and the host's own traffic keep working.
 * Frames that are ours but carry TTL <= 1 pass too: the kernel sends ICMP time exceeded.
 * Fragments to a VIP or SNAT address are dropped (counted): SNAT needs ports, which
 * non-first fragments lack.
 *
 * One program serves every interface lbd owns, so the XSKMAP is keyed by
 * slot(ingress ifindex) * XLB_MAX_QUEUES + rx queue. If no XSK is bound there,
 * bpf_redirect_map falls back to XDP_PASS (counted).
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

struct vlan_hdr {
	__be16 tci;
	__be16 encapsulated_proto;
};

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, XLB_MAX_QUEUES * XLB_MAX_IFACES);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

/* ifindex -> slot of the interface among lbd's interfaces. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XLB_MAX_IFACES);
	__type(key, __u32);
	__type(value, __u32);
} iface_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XLB_MAX_FRONTENDS);
	__type(key, struct xlb_endpoint);
	__type(value, __u32); /* service id */
} frontends SEC(".maps");

/* VIP addresses with any frontend (value: number of frontends), for fragments. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XLB_MAX_VIPS);
	__type(key, __be32);
	__type(value, __u32);
} vips SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XLB_MAX_SNAT_ADDRS);
	__type(key, __be32);
	__type(value, struct xlb_snat_range);
} snat_addrs SEC(".maps");

/* Backends of any service (value: number of services using it). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XLB_MAX_BACKENDS);
	__type(key, struct xlb_endpoint);
	__type(value, __u32);
} backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, XLB_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline void count(__u32 stat)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &stat);

	if (v)
		*v += 1;
}

static __always_inline int pass(__u32 stat)
{
	count(stat);
	return XDP_PASS;
}

static __always_inline int to_worker(struct xdp_md *ctx, __u32 stat)
{
	__u32 ifindex = ctx->ingress_ifindex;
	__u32 *slot, key;
	long ret;

	count(stat);
	slot = bpf_map_lookup_elem(&iface_slots, &ifindex);
	if (!slot || ctx->rx_queue_index >= XLB_MAX_QUEUES) {
		count(XLB_STAT_NO_XSK);
		return XDP_PASS;
	}
	key = *slot * XLB_MAX_QUEUES + ctx->rx_queue_index;
	ret = bpf_redirect_map(&xsks, key, XDP_PASS);
	if (ret != XDP_REDIRECT)
		count(XLB_STAT_NO_XSK);
	return ret;
}

SEC("xdp")
int xlb_steer(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	__be16 h_proto;
	void *l3, *l4;
	__u16 sport, dport;

	count(XLB_STAT_RX);
	if ((void *)(eth + 1) > end)
		return pass(XLB_STAT_MALFORMED);
	h_proto = eth->h_proto;
	l3 = eth + 1;
	if (h_proto == bpf_htons(ETH_P_8021Q)) {
		struct vlan_hdr *vh = l3;

		if ((void *)(vh + 1) > end)
			return pass(XLB_STAT_MALFORMED);
		h_proto = vh->encapsulated_proto;
		l3 = vh + 1;
	}
	if (h_proto != bpf_htons(ETH_P_IP))
		return pass(XLB_STAT_NOT_IPV4);

	ip = l3;
	if ((void *)(ip + 1) > end)
		return pass(XLB_STAT_MALFORMED);
	if (ip->version != 4 || ip->ihl < 5)
		return pass(XLB_STAT_MALFORMED);
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return pass(XLB_STAT_PASS);

	if (ip->frag_off & bpf_htons(0x3fff)) {
		__be32 daddr = ip->daddr;

		if (bpf_map_lookup_elem(&vips, &daddr) ||
		    bpf_map_lookup_elem(&snat_addrs, &daddr)) {
			count(XLB_STAT_FRAGMENT);
			return XDP_DROP;
		}
		return pass(XLB_STAT_PASS);
	}

	l4 = (void *)ip + ip->ihl * 4;
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *th = l4;

		if ((void *)(th + 1) > end || th->doff < 5)
			return pass(XLB_STAT_MALFORMED);
		sport = th->source;
		dport = th->dest;
	} else {
		struct udphdr *uh = l4;

		if ((void *)(uh + 1) > end)
			return pass(XLB_STAT_MALFORMED);
		sport = uh->source;
		dport = uh->dest;
	}

	struct xlb_endpoint fe = {
		.addr = ip->daddr,
		.port = dport,
		.proto = ip->protocol,
	};
	if (bpf_map_lookup_elem(&frontends, &fe)) {
		if (ip->ttl <= 1)
			return pass(XLB_STAT_TTL);
		return to_worker(ctx, XLB_STAT_FRONTEND);
	}

	__be32 daddr = ip->daddr;
	struct xlb_snat_range *range = bpf_map_lookup_elem(&snat_addrs, &daddr);

	if (range) {
		__u16 port = bpf_ntohs(dport);
		struct xlb_endpoint be = {
			.addr = ip->saddr,
			.port = sport,
			.proto = ip->protocol,
		};

		if (port >= range->first && port <= range->last &&
		    bpf_map_lookup_elem(&backends, &be)) {
			if (ip->ttl <= 1)
				return pass(XLB_STAT_TTL);
			return to_worker(ctx, XLB_STAT_REPLY);
		}
	}
	return pass(XLB_STAT_PASS);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
