/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Incremental Internet checksum updates (RFC 1624), shared by the executors. */
#ifndef XLB_CSUM_H
#define XLB_CSUM_H

#include <linux/types.h>
#include <bpf/bpf_endian.h>

/* RFC 1624 eqn. 3: HC' = ~(~HC + delta), one's-complement, on a native-order value. */
static __always_inline __u16 csum_add_delta(__u16 field, __u16 delta)
{
	__u32 acc = (__u32)(__u16)~field + delta;

	acc = (acc & 0xffff) + (acc >> 16);
	acc = (acc & 0xffff) + (acc >> 16);
	return (__u16)~acc;
}

static __always_inline void csum_apply(__sum16 *field, __u16 delta)
{
	*field = bpf_htons(csum_add_delta(bpf_ntohs(*field), delta));
}

#endif
