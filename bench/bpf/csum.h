// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* Incremental Internet checksum update (RFC 1624 eqn. 3), shared by the bench programs. */
#ifndef XB_CSUM_H
#define XB_CSUM_H

#include <linux/types.h>

/* Add ~old + new to a running sum, both as two 16-bit words of a 32-bit value. */
static __always_inline __u32 add32(__u32 s, __u32 old, __u32 new)
{
	s += (~old >> 16) & 0xffff;
	s += ~old & 0xffff;
	s += new >> 16;
	s += new & 0xffff;
	return s;
}

/* Fold and complement: the checksum field's new value. */
static __always_inline __u16 fold(__u32 s)
{
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

#endif
