// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * xlb-bench sink: counts (per CPU) and drops IPv4 TCP/UDP frames to destination ports
 * port_lo..=port_hi; everything else passes, so ARP and the latency echo keep working.
 *
 * A packet tunnelled to a backend (IPIP, or GUE to UDP port gue_port: direct server
 * return) is judged, and counted, by the packet inside; it is never answered.
 *
 * With answer_first, the first UDP datagram of each flow is answered instead (addresses,
 * ports and MACs swapped, XDP_TX; the checksums stay valid), as a server would: the flow
 * is then established both ways, which is what a load balancer's fast path (and
 * conntrack's ASSURED) is for. The generator's warm-up covers those first datagrams.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

volatile const __u32 port_lo = 9;
volatile const __u32 port_hi = 9;
volatile const __u32 answer_first = 0;
volatile const __u32 gue_port = 6080;

struct flow {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u32 proto;
};

/* Flows already answered. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct flow);
	__type(value, __u8);
} seen SEC(".maps");

/* 0: packets, 1: bytes. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} counts SEC(".maps");

SEC("xdp")
int xb_sink(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *l4;
	__u32 key = 0, dport;
	__u64 *c;

	int tunnelled = 0;

	if ((void *)(ip + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	if (ip->protocol == IPPROTO_IPIP) {
		ip = (void *)(ip + 1);
		tunnelled = 1;
	} else if (ip->protocol == IPPROTO_UDP) {
		l4 = (void *)(ip + 1);
		if ((void *)(l4 + 1) > end)
			return XDP_PASS;
		if (bpf_ntohs(l4->dest) == gue_port) {
			/* UDP, then GUE's 4-byte header. */
			ip = (void *)(l4 + 1) + 4;
			tunnelled = 1;
		}
	}
	if ((void *)(ip + 1) > end)
		return XDP_PASS;
	if (ip->protocol != IPPROTO_UDP && ip->protocol != IPPROTO_TCP)
		return XDP_PASS;
	l4 = (void *)ip + ip->ihl * 4;
	if ((void *)(l4 + 1) > end)
		return XDP_PASS;
	dport = bpf_ntohs(l4->dest);
	if (dport < port_lo || dport > port_hi)
		return XDP_PASS;
	if (answer_first && !tunnelled && ip->protocol == IPPROTO_UDP) {
		struct flow f = {
			.saddr = ip->saddr,
			.daddr = ip->daddr,
			.sport = l4->source,
			.dport = l4->dest,
			.proto = ip->protocol,
		};

		if (!bpf_map_lookup_elem(&seen, &f)) {
			__u8 one = 1, mac[ETH_ALEN];
			__be32 a = ip->saddr;
			__be16 p = l4->source;

			bpf_map_update_elem(&seen, &f, &one, BPF_ANY);
			__builtin_memcpy(mac, eth->h_source, ETH_ALEN);
			__builtin_memcpy(eth->h_source, eth->h_dest, ETH_ALEN);
			__builtin_memcpy(eth->h_dest, mac, ETH_ALEN);
			ip->saddr = ip->daddr;
			ip->daddr = a;
			l4->source = l4->dest;
			l4->dest = p;
			return XDP_TX;
		}
	}
	c = bpf_map_lookup_elem(&counts, &key);
	if (c)
		*c += 1;
	key = 1;
	c = bpf_map_lookup_elem(&counts, &key);
	if (c)
		*c += (__u64)(end - data);
	return XDP_DROP;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
