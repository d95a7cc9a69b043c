// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * xlb-bench sink: counts (per CPU) and drops IPv4 TCP/UDP frames to destination ports
 * port_lo..=port_hi; everything else passes, so ARP and the latency echo keep working.
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

	if ((void *)(ip + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	if (ip->protocol != IPPROTO_UDP && ip->protocol != IPPROTO_TCP)
		return XDP_PASS;
	l4 = (void *)ip + ip->ihl * 4;
	if ((void *)(l4 + 1) > end)
		return XDP_PASS;
	dport = bpf_ntohs(l4->dest);
	if (dport < port_lo || dport > port_hi)
		return XDP_PASS;
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
