// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * xlb-bench traffic generator, run by BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES:
 * the kernel hands this program copies of one template frame (UDP or TCP, correct
 * checksums, built in userspace) as fast as it can; the program gives each one the
 * addresses of the next of `nflows` flows and redirects it out of `out_ifindex` (a veth,
 * so it arrives at the peer's XDP program as a received frame).
 *
 * Flow i (i = per-CPU sequence number mod nflows):
 *   source address  = src_base + i / ports_per_addr
 *   source port     = sport_base + i % ports_per_addr
 *   destination port = dport_base + i % dst_ports
 * The kernel recycles the pages without restoring them, and whatever the system under
 * test rewrote in place (a cpumap'd skb NATed by the kernel, an XDP rewrite) comes back:
 * so the first HDR_LEN bytes are restored from the template (map `tmpl`) on every packet,
 * and checksums are derived from the template's (RFC 1624), never from the frame.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "csum.h"

/* Set by the loader (host byte order unless said otherwise). */
volatile const __u32 out_ifindex = 0;
volatile const __u32 nflows = 1;
volatile const __u32 ports_per_addr = 50000;
volatile const __u32 dst_ports = 1;
volatile const __u32 src_base = 0;
volatile const __u32 sport_base = 1024;
volatile const __u32 dport_base = 9;
/* The template's IPv4 and L4 checksums, as they sit in the frame (network order). */
volatile const __u32 ip_csum = 0;
volatile const __u32 l4_csum = 0;

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} seq SEC(".maps");

/* Ethernet + IPv4 + TCP headers fit; the smallest frame (60 bytes) is longer. */
#define HDR_LEN 56

struct hdr {
	__u64 w[HDR_LEN / 8];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct hdr);
} tmpl SEC(".maps");

SEC("xdp")
int xb_gen(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	__u32 zero = 0;
	__u64 *n = bpf_map_lookup_elem(&seq, &zero);
	struct hdr *t = bpf_map_lookup_elem(&tmpl, &zero);
	__u32 i, saddr, sport, dport, base_saddr, base_ports, ports, s;
	__u16 *l4check;
	__be16 *l4ports;

	if (!n || !t || data + HDR_LEN > end)
		return XDP_ABORTED;
	*(struct hdr *)data = *t;
	i = (__u32)(*n % nflows);
	*n += 1;
	saddr = bpf_htonl(src_base + i / ports_per_addr);
	sport = bpf_htons((__u16)(sport_base + i % ports_per_addr));
	dport = bpf_htons((__u16)(dport_base + i % dst_ports));
	base_saddr = bpf_htonl(src_base);
	base_ports = ((__u32)bpf_htons((__u16)sport_base) << 16) | bpf_htons((__u16)dport_base);
	ports = (sport << 16) | dport;

	l4ports = (void *)(ip + 1);
	if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *udp = (void *)(ip + 1);
		if ((void *)(udp + 1) > end)
			return XDP_ABORTED;
		l4check = &udp->check;
	} else {
		struct tcphdr *tcp = (void *)(ip + 1);
		if ((void *)(tcp + 1) > end)
			return XDP_ABORTED;
		l4check = &tcp->check;
	}
	ip->saddr = saddr;
	ip->check = fold(add32(~ip_csum & 0xffff, base_saddr, saddr));
	l4ports[0] = (__be16)sport;
	l4ports[1] = (__be16)dport;
	s = add32(~l4_csum & 0xffff, base_saddr, saddr);
	s = add32(s, base_ports, ports);
	*l4check = fold(s);
	if (ip->protocol == IPPROTO_UDP && *l4check == 0)
		*l4check = 0xffff;
	return bpf_redirect(out_ifindex, 0);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
