// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * xlb-bench's reference programs for the load balancer's ingress interface:
 *   xb_redirect  the machine's ceiling: rewrite the MACs, XDP_REDIRECT out of another
 *                interface (no lookup, no NAT);
 *   xb_cpu       hand every frame to the kernel's stack on another CPU (cpumap), so
 *                nftables runs on the core the other systems under test get;
 *   xb_xsk       every IPv4 frame into the AF_XDP socket of its rx queue (the bare
 *                forwarder's steering), anything else to the kernel;
 *   xb_natfast   a model of the XDP fast path xlb lacks: look the 5-tuple up in a hash
 *                map of established flows, apply the flow's rewrite (addresses, ports,
 *                checksums, TTL, MACs) and redirect; a miss goes to the kernel. The
 *                harness fills the map with the generator's flows, so this measures
 *                what executing the workers' per-flow rewrite in XDP would cost.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "csum.h"

volatile const __u32 out_ifindex = 0;
/* MACs as 48-bit big-endian numbers in the low bits. */
volatile const __u64 dst_mac = 0;
volatile const __u64 src_mac = 0;
volatile const __u32 target_cpu = 1;

struct {
	__uint(type, BPF_MAP_TYPE_CPUMAP);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, struct bpf_cpumap_val);
} cpus SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

static __always_inline void put_mac(unsigned char *p, __u64 mac)
{
	p[0] = mac >> 40;
	p[1] = mac >> 32;
	p[2] = mac >> 24;
	p[3] = mac >> 16;
	p[4] = mac >> 8;
	p[5] = mac;
}

SEC("xdp")
int xb_redirect(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	put_mac(eth->h_dest, dst_mac);
	put_mac(eth->h_source, src_mac);
	return bpf_redirect(out_ifindex, 0);
}

SEC("xdp")
int xb_cpu(struct xdp_md *ctx)
{
	return bpf_redirect_map(&cpus, target_cpu, XDP_PASS);
}

SEC("xdp")
int xb_xsk(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	return bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS);
}

struct nat_key {
	__be32 saddr, daddr;
	__be16 sport, dport;
	__u8 proto, pad[3];
};

struct nat_val {
	__be32 saddr, daddr;
	__be16 sport, dport;
	__u8 dmac[6], smac[6];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 20);
	__type(key, struct nat_key);
	__type(value, struct nat_val);
} nat_flows SEC(".maps");

SEC("xdp")
int xb_natfast(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct udphdr *l4 = (void *)(ip + 1);
	struct nat_key k = {};
	struct nat_val *v;
	__u32 s, old_ports, new_ports;
	__u16 old_ttl, new_ttl;
	__u16 *check;

	if ((void *)(l4 + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP) || ip->ihl != 5)
		return XDP_PASS;
	if (ip->protocol == IPPROTO_UDP)
		check = &l4->check;
	else if (ip->protocol == IPPROTO_TCP && (void *)l4 + 20 <= end)
		check = (void *)l4 + 16;
	else
		return XDP_PASS;
	if (ip->ttl <= 1)
		return XDP_PASS;
	k.saddr = ip->saddr;
	k.daddr = ip->daddr;
	k.sport = l4->source;
	k.dport = l4->dest;
	k.proto = ip->protocol;
	v = bpf_map_lookup_elem(&nat_flows, &k);
	if (!v)
		return XDP_PASS;
	old_ttl = *(__u16 *)&ip->ttl;
	ip->ttl--;
	new_ttl = *(__u16 *)&ip->ttl;
	s = add32(~ip->check & 0xffff, ip->saddr, v->saddr);
	s = add32(s, ip->daddr, v->daddr);
	s = add32(s, old_ttl, new_ttl);
	ip->check = fold(s);
	old_ports = ((__u32)l4->source << 16) | l4->dest;
	new_ports = ((__u32)v->sport << 16) | v->dport;
	if (!(ip->protocol == IPPROTO_UDP && *check == 0)) {
		s = add32(~*check & 0xffff, ip->saddr, v->saddr);
		s = add32(s, ip->daddr, v->daddr);
		s = add32(s, old_ports, new_ports);
		*check = fold(s);
		if (ip->protocol == IPPROTO_UDP && *check == 0)
			*check = 0xffff;
	}
	ip->saddr = v->saddr;
	ip->daddr = v->daddr;
	l4->source = v->sport;
	l4->dest = v->dport;
	__builtin_memcpy(eth->h_dest, v->dmac, 6);
	__builtin_memcpy(eth->h_source, v->smac, 6);
	return bpf_redirect(out_ifindex, 0);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
