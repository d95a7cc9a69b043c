//! Per-worker counters and the one numbered list of drop reasons.
//!
//! Counters are plain `u64`s owned by one worker (no atomics on the hot path); the I/O
//! layer publishes a copy after each batch and readers sum across workers.
//! The reasons the XDP program counts live in `xdp/bpf/xlb.h` (`enum xlb_stat`); keep the
//! names of shared meanings (fragment, malformed, ttl) in sync with it.

use serde::{Deserialize, Serialize};

macro_rules! drop_reasons {
    ($($(#[$m:meta])* $v:ident = $n:literal => $name:literal,)*) => {
        /// Why a worker dropped a frame. Numbers are stable (they index counters).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[repr(u8)]
        pub enum DropReason { $($(#[$m])* $v = $n,)* }

        impl DropReason {
            pub const ALL: &'static [DropReason] = &[$(DropReason::$v,)*];
            pub const COUNT: usize = Self::ALL.len();
            /// Stable snake_case name for stats output.
            pub fn name(self) -> &'static str {
                match self { $(DropReason::$v => $name,)* }
            }
        }
    };
}

drop_reasons! {
    /// Truncated or invalid Ethernet/IPv4/TCP/UDP header.
    Malformed = 0 => "malformed",
    /// Not IPv4 (the XDP program should not have sent it).
    NotIpv4 = 1 => "not_ipv4",
    /// An IPv4 fragment: ports are not in every fragment, so SNAT cannot translate it.
    Fragment = 2 => "fragment",
    /// TTL ≤ 1: the kernel answers those (the XDP program passes them); defensive.
    TtlExceeded = 3 => "ttl_exceeded",
    /// Neither TCP, UDP nor (for masquerading) ICMP echo or a translatable ICMP error.
    UnsupportedProtocol = 4 => "unsupported_protocol",
    /// Not to a frontend nor to the SNAT address (stale steering map).
    NotForUs = 5 => "not_for_us",
    /// A reply or a mid-stream TCP segment with no flow.
    NoFlow = 6 => "no_flow",
    /// The service has no backend with weight.
    NoBackend = 7 => "no_backend",
    /// No route to the destination in the main table, or via an interface xlb lacks.
    NoRoute = 8 => "no_route",
    /// The next hop's MAC was still unknown when the held frame's deadline passed, or
    /// the hold queue was full (I/O layer).
    NoNeighbour = 9 => "no_neighbour",
    /// Every NAT port of this worker's slice is in use toward this remote endpoint
    /// (backend, or masqueraded destination and port). Nothing leaves untranslated.
    PortsExhausted = 10 => "ports_exhausted",
    /// The flow table is at capacity.
    FlowTableFull = 11 => "flow_table_full",
    /// The flow's backend or service was removed.
    BackendRemoved = 12 => "backend_removed",
    /// The TX ring was full (I/O layer).
    TxRingFull = 13 => "tx_ring_full",
    /// The ring to the owning worker was full (I/O layer).
    HandoffRingFull = 14 => "handoff_ring_full",
    /// The frame does not fit a UMEM frame (I/O layer).
    Oversize = 15 => "oversize",
    /// No free UMEM frame to take a handed-off frame (I/O layer).
    NoFreeFrame = 16 => "no_free_frame",
    /// A TCP flag combination no valid TCP sends (SYN+FIN, SYN+RST, null, FIN without
    /// ACK, ...; see `TcpFlags::is_valid`): scans and attacks, never a flow.
    InvalidTcpFlags = 17 => "invalid_tcp_flags",
    /// A source no router accepts (0/8, 127/8, multicast, 240/4 and broadcast, as the
    /// kernel's martian rules), or a source that is one of our VIPs.
    MartianSource = 18 => "martian_source",
    /// IPv4 header checksum does not verify (RFC 1812 §5.2.2: a router drops it).
    BadIpChecksum = 19 => "bad_ip_checksum",
    /// The UDP length field disagrees with the IPv4 payload length.
    LengthMismatch = 20 => "length_mismatch",
    /// An 802.1Q-tagged frame: xlb serves untagged ports (the XDP program leaves tagged
    /// frames to the kernel's VLAN devices); defensive.
    VlanTagged = 21 => "vlan_tagged",
    /// The destination MAC is not one of xlb's interfaces (a broadcast, multicast or
    /// another host's frame: a router does not forward those); defensive, XDP drops them.
    ForeignMac = 22 => "foreign_mac",
    /// Larger than the egress link's MTU and neither answered nor fragmented: with DF
    /// while the ICMP rate limit was exhausted, or without DF but with IP options or
    /// needing more fragments than xlb cuts a packet into.
    TooBig = 23 => "too_big",
}

/// One worker's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub rx: u64,
    pub tx: u64,
    /// Frames handed to another worker (their owner).
    pub handoff_out: u64,
    /// Frames received from other workers.
    pub handoff_in: u64,
    pub flows_created: u64,
    pub flows_expired: u64,
    /// Frames held for a neighbour resolution (each pass counts).
    pub held: u64,
    /// Frames forwarded without translation: the masquerade policy keeps their source
    /// (only while the XDP maps catch up with a policy change).
    pub routed: u64,
    /// ICMP errors about a NATed flow, translated back to its inside host.
    pub icmp_errors: u64,
    /// Not-yet-established flows evicted to make room for a new flow when the table was
    /// full (conntrack's early drop).
    pub flows_evicted: u64,
    /// Frames handed to the next worker to look for their flow there (their packets
    /// moved queues); also counted in `handoff_out`.
    pub flow_probes: u64,
    /// Closed TCP flows reopened by a new SYN on their 5-tuple (with their translation).
    pub flows_reopened: u64,
    /// Packets from an inside host to another inside host's outside endpoint, turned
    /// around inside xlb (hairpinning, RFC 4787 REQ-9).
    pub hairpinned: u64,
    /// ICMP errors xlb originated as a router: fragmentation needed (a DF packet larger
    /// than the egress link) and communication administratively prohibited (no NAT port).
    pub icmp_sent: u64,
    /// TCP resets xlb sent to clients of a removed backend (`on_remove: reset`).
    pub resets_sent: u64,
    /// Load-balanced flows opened by direct server return (also in `flows_created`).
    pub dsr_flows: u64,
    /// Packets sent to a backend inside an outer header (DSR over IPIP or GUE).
    pub encapsulated: u64,
    /// Flows taken over from the fast path a previous lbd left (see `pipeline::adopt`).
    pub flows_adopted: u64,
    pub drops: [u64; DropReason::COUNT],
}

impl Counters {
    pub fn drop(&mut self, r: DropReason) {
        self.drops[r as usize] += 1;
    }

    pub fn total_drops(&self) -> u64 {
        self.drops.iter().sum()
    }

    /// Flatten to `(name, value)` pairs: the form stats output and the atomics mirror use.
    pub fn to_array(&self) -> [u64; COUNTER_SLOTS] {
        let mut a = [0u64; COUNTER_SLOTS];
        a[..SCALARS].copy_from_slice(&[
            self.rx,
            self.tx,
            self.handoff_out,
            self.handoff_in,
            self.flows_created,
            self.flows_expired,
            self.held,
            self.routed,
            self.icmp_errors,
            self.flows_evicted,
            self.flow_probes,
            self.flows_reopened,
            self.hairpinned,
            self.icmp_sent,
            self.resets_sent,
            self.dsr_flows,
            self.encapsulated,
            self.flows_adopted,
        ]);
        a[SCALARS..].copy_from_slice(&self.drops);
        a
    }

    pub fn from_array(a: &[u64; COUNTER_SLOTS]) -> Counters {
        let mut drops = [0u64; DropReason::COUNT];
        drops.copy_from_slice(&a[SCALARS..]);
        Counters {
            rx: a[0],
            tx: a[1],
            handoff_out: a[2],
            handoff_in: a[3],
            flows_created: a[4],
            flows_expired: a[5],
            held: a[6],
            routed: a[7],
            icmp_errors: a[8],
            flows_evicted: a[9],
            flow_probes: a[10],
            flows_reopened: a[11],
            hairpinned: a[12],
            icmp_sent: a[13],
            resets_sent: a[14],
            dsr_flows: a[15],
            encapsulated: a[16],
            flows_adopted: a[17],
            drops,
        }
    }
}

const SCALARS: usize = 18;
/// Length of [`Counters::to_array`].
pub const COUNTER_SLOTS: usize = SCALARS + DropReason::COUNT;
