/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* ICMP as the steering program and the executor read it (RFC 792). */
#ifndef XLB_ICMP_H
#define XLB_ICMP_H

#include <linux/types.h>

#define ICMP_ECHOREPLY 0
#define ICMP_DEST_UNREACH 3
#define ICMP_ECHO 8
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12

/* The ICMP header (RFC 792); linux/icmp.h drags in libc headers. */
struct icmphdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	__be16 id;	/* echo; "unused" or next-hop MTU in errors */
	__be16 sequence;
};

#endif
