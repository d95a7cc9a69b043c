// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * xlb-bench's reference programs for the load balancer's ingress interface:
 *   xb_redirect  the machine's ceiling: rewrite the MACs, XDP_REDIRECT out of another
 *                interface (no lookup, no NAT);
 *   xb_cpu       hand every frame to the kernel's stack on another CPU (cpumap), so
 *                nftables runs on the core the other systems under test get;
 *   xb_xsk       every IPv4 frame into the AF_XDP socket of its rx queue (the bare
 *                forwarder's steering), anything else to the kernel;
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

char LICENSE[] SEC("license") = "Dual BSD/GPL";
