// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * xlb's backend decapsulator (the DSR backend role, `xlb-decap`).
 *
 * With direct server return the edge node sends a client's packet to the backend
 * encapsulated: IPIP (RFC 2003: an outer IPv4 header, protocol 4) or GUE
 * (draft-ietf-intarea-gue: outer IPv4, UDP to the GUE port, a 4-byte variant-0 header
 * without extension fields, protocol 4). When the outer destination is one of this
 * host's decapsulation addresses (map decap_addrs), this program strips the outer
 * headers in XDP and passes the client's packet to the stack, which answers the client
 * from the VIP directly. Everything else passes untouched: ARP, the host's own traffic,
 * IPIP or GUE for other addresses, outer headers with options or fragments (the
 * kernel's own tunnel modules, where loaded, may take those).
 *
 * In XDP rather than tc: the outer headers go before the kernel builds an skb, so GRO
 * and RPS see the client's packet itself (a GUE flow spread over queues by the outer
 * UDP source port stays spread).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* GUE's UDP port (host order); 0: GUE off. Set by xlb-decap at load. */
volatile const __u16 gue_port = 0;

/* Outer destination addresses to decapsulate for (value unused). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __be32);
	__type(value, __u8);
} decap_addrs SEC(".maps");

/* Counters; xdp/src/decap.rs mirrors the list (DecapStat). */
enum decap_stat {
	DECAP_RX = 0,		/* every frame the program saw */
	DECAP_IPIP = 1,		/* IPIP decapsulated, inner packet passed */
	DECAP_GUE = 2,		/* GUE decapsulated, inner packet passed */
	DECAP_PASS = 3,		/* not for decapsulation: passed untouched */
	DECAP_BAD = 4,		/* for decapsulation but unusable (inner not IPv4, GUE header
				 * of another variant or protocol): dropped */
	DECAP_MAX = 5,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, DECAP_MAX);
	__type(key, __u32);
	__type(value, __u64);
} decap_stats SEC(".maps");

/* The GUE header, variant 0 (draft-ietf-intarea-gue §3.2). */
struct guehdr {
	__u8 ver_c_hlen;	/* version (2 bits), control (1), hlen (5) */
	__u8 proto;		/* the inner protocol: 4 for IPv4 */
	__be16 flags;
};

static __always_inline void count(__u32 stat)
{
	__u64 *v = bpf_map_lookup_elem(&decap_stats, &stat);

	if (v)
		*v += 1;
}

static __always_inline int pass(void)
{
	count(DECAP_PASS);
	return XDP_PASS;
}

SEC("xdp")
int xlb_decap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data, saved;
	struct iphdr *ip = (void *)(eth + 1), *inner;
	__u32 strip, stat;

	count(DECAP_RX);
	if ((void *)(ip + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return pass();
	if (ip->version != 4 || ip->ihl != 5 || (ip->frag_off & bpf_htons(0x3fff)))
		return pass();
	if (!bpf_map_lookup_elem(&decap_addrs, &ip->daddr))
		return pass();
	if (ip->protocol == IPPROTO_IPIP) {
		strip = sizeof(*ip);
		stat = DECAP_IPIP;
	} else if (ip->protocol == IPPROTO_UDP && gue_port) {
		struct udphdr *uh = (void *)(ip + 1);
		struct guehdr *gh = (void *)(uh + 1);

		if ((void *)(gh + 1) > end || uh->dest != bpf_htons(gue_port))
			return pass();
		if (gh->ver_c_hlen != 0 || gh->proto != IPPROTO_IPIP) {
			count(DECAP_BAD);
			return XDP_DROP;
		}
		strip = sizeof(*ip) + sizeof(*uh) + sizeof(*gh);
		stat = DECAP_GUE;
	} else {
		return pass();
	}
	inner = (void *)ip + strip;
	if ((void *)(inner + 1) > end || inner->version != 4) {
		count(DECAP_BAD);
		return XDP_DROP;
	}
	/* The Ethernet header moves up over the outer headers. */
	__builtin_memcpy(&saved, eth, sizeof(saved));
	if (bpf_xdp_adjust_head(ctx, (int)strip)) {
		count(DECAP_BAD);
		return XDP_DROP;
	}
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	if ((void *)(eth + 1) > end)
		return XDP_DROP;
	__builtin_memcpy(eth, &saved, sizeof(saved));
	count(stat);
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
