/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The steering program's maps and counters: what lbd fills (frontends, backends, NAT
 * addresses, interfaces, masquerading tries, the XSKMAP), what the workers install (the
 * fast path) and the per-CPU counters (enum xlb_stat).
 */
#ifndef XLB_MAPS_H
#define XLB_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "xlb.h"
#include "flowrec.h"

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, XLB_MAX_QUEUES * XLB_MAX_IFACES);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

/* ifindex -> lbd's interface (slot, flags, MAC). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XLB_MAX_IFACES);
	__type(key, __u32);
	__type(value, struct xlb_iface);
} iface_slots SEC(".maps");

/* The same, direct-mapped by ifindex % XLB_IFACE_CACHE: an array lookup, which the
 * verifier inlines, instead of hashing for every packet (the fast path measured 5-10 %
 * faster). An interface whose slot another one took is found in iface_slots. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, XLB_IFACE_CACHE);
	__type(key, __u32);
	__type(value, struct xlb_iface_cached);
} iface_cache SEC(".maps");

/* lbd's interface `ifindex`, or NULL. */
static __always_inline struct xlb_iface *iface_of(__u32 ifindex)
{
	__u32 k = ifindex & (XLB_IFACE_CACHE - 1);
	struct xlb_iface_cached *c = bpf_map_lookup_elem(&iface_cache, &k);

	if (c && c->ifindex == ifindex)
		return &c->iface;
	return bpf_map_lookup_elem(&iface_slots, &ifindex);
}

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

/* Datagrams whose first fragment went to a worker: their later fragments follow it (the
 * NIC's RSS puts a datagram's fragments on one queue). LRU: entries of datagrams whose
 * fragments stopped coming age out. Value unused. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, XLB_MAX_FRAGS);
	__type(key, struct xlb_frag_key);
	__type(value, __u8);
} frags SEC(".maps");


/* Backends of any service (value: number of services using it). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XLB_MAX_BACKENDS);
	__type(key, struct xlb_endpoint);
	__type(value, __u32);
} backends SEC(".maps");

/* Masquerade sources (value unused). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, XLB_MAX_MASQ_SRC);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct xlb_lpm_key);
	__type(value, __u32);
} masq_src SEC(".maps");

/* Destinations never masqueraded (value: why, for debugging; unused here). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, XLB_MAX_MASQ_SKIP);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct xlb_lpm_key);
	__type(value, __u32);
} masq_skip SEC(".maps");

/* Forward 5-tuples of masqueraded flows the current policy would not masquerade. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, XLB_MAX_MASQ_KEEP);
	__type(key, struct xlb_fkey);
	__type(value, __u32);
} masq_keep SEC(".maps");

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

static __always_inline int drop(__u32 stat)
{
	count(stat);
	return XDP_DROP;
}

/* The fast path: flow directions the workers installed once their flow was established
 * (flowrec.h), keyed by the packet's 5-tuple as it arrives. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, XLB_FAST_PATH_ENTRIES);
	__type(key, struct xlb_fkey);
	__type(value, struct xlb_fp_value);
} fp_flows SEC(".maps");

/* The current snapshot generation: an entry of another is not executed. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} fp_generation SEC(".maps");

/* CLOCK_MONOTONIC in ns as lbd last stamped it (each control-loop tick, 50 ms): what
 * the fast path stamps an entry's last_seen with. Reading a clock per packet cost the
 * fast path a tenth of its rate here (bpf_ktime_get_ns orders the TSC read; even the
 * coarse clock is a helper call); idle timeouts of a minute and more need no better. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} fp_clock SEC(".maps");

#endif
