//! Execute: carry out what decide settled on ([`Step`]) on the frame, or write the
//! packet the engine originates (an ICMP error, a TCP reset, fragments) into the
//! engine's scratch buffers. Nothing here looks at flows, the snapshot or the clock: a
//! step carries every value it needs (a [`Rewrite`] is the Rust form of a
//! `flowrec::Action`, which the XDP fast path executes the same way; see [`action`]).

use super::classify::{Kind, Parsed};
use super::Verdict;
use crate::counters::DropReason;
use crate::flow::{Dir, FlowKey, Forwarding, Rewrite};
use crate::netview::NextHop;
use crate::wire::checksum::{addr_words, fold, sum, Delta, TTL_DECREMENT};
use crate::wire::ethernet::ETHERTYPE_IPV4;
use crate::wire::icmp;
use crate::wire::ipv4::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use crate::wire::write_u16;

/// Most bytes of the offending packet an originated ICMP error quotes: the error stays
/// within 576 bytes (RFC 1812 §4.3.2.3).
pub(super) const ICMP_QUOTE: usize = 576 - 20 - icmp::HEADER_LEN;
/// Room for an originated ICMP error: Ethernet, IPv4 and ICMP headers and the quote.
const GENERATED: usize = 14 + 20 + icmp::HEADER_LEN + ICMP_QUOTE;
/// Most fragments xlb cuts one packet into, and the room they take.
const SPLIT_MAX: usize = 8;
const SPLIT_BYTES: usize = 4096;
/// TCP flag bits.
const TCP_RST: u8 = 0x04;
const TCP_ACK_FLAG: u8 = 0x10;

/// What decide settled on for a frame. Every variant but `Verdict` writes the frame or
/// originates a packet.
#[derive(Debug, Clone, Copy)]
pub(super) enum Step {
    /// Rewrite with a flow direction's action; then send it out of the action's
    /// interface (cut into fragments when over its MTU), or, for the forward direction
    /// of a hairpin flow (`around`), hand it back to the engine as arriving anew.
    Nat { rw: Rewrite, around: bool },
    /// A later fragment of a datagram whose first fragment took `rw`: addresses only
    /// (the first fragment's L4 checksum update covers the whole datagram).
    Fragment(Rewrite),
    /// Forward untranslated, as a router, through `hop`.
    Route(NextHop),
    /// Translate the ICMP error (classified as `Kind::Error`) quoting a packet of a
    /// flow: `rw` is the action of the direction the error travels, `src` its new outer
    /// source.
    Error { rw: Rewrite, src: [u8; 4] },
    /// Answer the sender with ICMP destination unreachable `code` (next-hop MTU `mtu`)
    /// from `from`, back through `back`, quoting the frame.
    Unreachable {
        back: NextHop,
        from: [u8; 4],
        code: u8,
        mtu: u16,
    },
    /// Answer a segment of direction `dir` of an ended flow with a TCP reset to the
    /// client, built from the flow's reverse action `rw`.
    Reset { rw: Rewrite, dir: Dir },
    /// Nothing to write.
    Verdict(Verdict),
}

/// What executing a step led to.
pub(super) enum Done {
    Verdict(Verdict),
    /// A hairpin flow's packet after its forward rewrite, now to the egress address's
    /// port `dport`: the engine takes it again as arriving there.
    TurnAround {
        dport: u16,
    },
}

/// Where the packets the engine originates are written.
#[derive(Debug)]
pub(super) struct Scratch {
    /// The outer headers of the last [`Verdict::Encap`].
    encap: [u8; flowrec::ENCAP_MAX],
    encap_len: usize,
    /// The last ICMP error or TCP reset originated ([`Verdict::Icmp`], [`Verdict::Reset`]).
    generated: [u8; GENERATED],
    generated_len: usize,
    /// The fragments of the last [`Verdict::Fragments`]: bytes, and where each ends.
    split: [u8; SPLIT_BYTES],
    split_ends: [usize; SPLIT_MAX],
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            encap: [0; flowrec::ENCAP_MAX],
            encap_len: 0,
            generated: [0; GENERATED],
            generated_len: 0,
            split: [0; SPLIT_BYTES],
            split_ends: [0; SPLIT_MAX],
        }
    }

    pub fn generated(&self) -> &[u8] {
        &self.generated[..self.generated_len]
    }

    pub fn encap(&self) -> &[u8] {
        &self.encap[..self.encap_len]
    }

    pub fn fragment(&self, k: usize) -> &[u8] {
        let start = k.checked_sub(1).map_or(0, |j| self.split_ends[j]);
        self.split_ends
            .get(k)
            .and_then(|&end| self.split.get(start..end))
            .unwrap_or(&[])
    }
}

/// Carry out `step` on `frame` (parsed as `p`).
#[inline(always)]
pub(super) fn execute(
    s: &mut Scratch,
    frame: &mut [u8],
    p: &Parsed,
    step: Step,
) -> Result<Done, DropReason> {
    let v = match step {
        Step::Verdict(v) => v,
        Step::Nat { rw, around } if rw.fwd == Forwarding::Nat => {
            apply(frame, p, &rw);
            if around {
                return Ok(Done::TurnAround { dport: rw.dport });
            }
            send(s, frame, p, rw.iface, rw.mtu)?
        }
        // Direct server return: the IP packet is left as the client sent it. Decide
        // answered DF packets over the MTU; the others are not fragmented here.
        Step::Nat { rw, .. } => {
            if p.ip_len() > usize::from(rw.mtu) {
                return Err(DropReason::TooBig);
            }
            frame[0..6].copy_from_slice(&rw.dst_mac);
            frame[6..12].copy_from_slice(&rw.src_mac);
            if rw.fwd == Forwarding::L2Dsr {
                Verdict::Tx { iface: rw.iface }
            } else {
                let n = encap_template(&rw, &mut s.encap);
                let tos = frame[p.l3 + 1];
                finish_encap(&mut s.encap[..n], tos, p.ip_len());
                s.encap_len = n;
                Verdict::Encap {
                    iface: rw.iface,
                    len: (frame.len() - p.l3) as u16,
                }
            }
        }
        Step::Fragment(rw) => {
            frame[0..6].copy_from_slice(&rw.dst_mac);
            frame[6..12].copy_from_slice(&rw.src_mac);
            let ip = &mut frame[p.l3..p.l4];
            ip[12..16].copy_from_slice(&rw.src);
            ip[16..20].copy_from_slice(&rw.dst);
            decrement_ttl(ip, rw.ip_delta);
            // A fragment has no DF: too big for the link, it is cut again.
            send(s, frame, p, rw.iface, rw.mtu)?
        }
        Step::Route(hop) => {
            frame[0..6].copy_from_slice(&hop.dst_mac);
            frame[6..12].copy_from_slice(&hop.src_mac);
            decrement_ttl(&mut frame[p.l3..p.l4], TTL_DECREMENT);
            send(s, frame, p, hop.iface, hop.mtu)?
        }
        Step::Error { rw, src } => {
            if let Kind::Error { il3, il4, inner } = p.kind {
                translate_error(frame, p, &rw, src, il3 as usize, il4 as usize, inner);
            }
            Verdict::Tx { iface: rw.iface }
        }
        Step::Unreachable {
            back,
            from,
            code,
            mtu,
        } => unreachable(s, frame, p, back, from, code, mtu),
        Step::Reset { rw, dir } => reset(s, frame, p, &rw, dir),
    };
    Ok(Done::Verdict(v))
}

/// Send the frame out of `iface`, or cut into fragments when over its `mtu` (decide
/// turned DF packets over the MTU into [`Step::Unreachable`]).
#[inline(always)]
fn send(
    s: &mut Scratch,
    frame: &[u8],
    p: &Parsed,
    iface: u8,
    mtu: u16,
) -> Result<Verdict, DropReason> {
    if p.ip_len() > usize::from(mtu) {
        return split(s, frame, p, iface, mtu);
    }
    Ok(Verdict::Tx { iface })
}

/// Apply a flow direction's action: MACs, addresses, ports (an echo's identifier), TTL
/// and both checksums by their precomputed deltas.
#[inline(always)]
pub(super) fn apply(frame: &mut [u8], p: &Parsed, rw: &Rewrite) {
    frame[0..6].copy_from_slice(&rw.dst_mac);
    frame[6..12].copy_from_slice(&rw.src_mac);
    let ip = &mut frame[p.l3..p.l4];
    ip[8] -= 1; // TTL ≥ 2 was checked in classify
    ip[12..16].copy_from_slice(&rw.src);
    ip[16..20].copy_from_slice(&rw.dst);
    let c = u16::from_be_bytes([ip[10], ip[11]]);
    write_u16(ip, 10, rw.ip_delta.apply(c));
    let l4 = &mut frame[p.l4..p.l4_end];
    match p.key.proto {
        PROTO_TCP => {
            write_u16(l4, 0, rw.sport);
            write_u16(l4, 2, rw.dport);
            let c = u16::from_be_bytes([l4[16], l4[17]]);
            write_u16(l4, 16, rw.l4_delta.apply(c));
        }
        PROTO_UDP => {
            write_u16(l4, 0, rw.sport);
            write_u16(l4, 2, rw.dport);
            let c = u16::from_be_bytes([l4[6], l4[7]]);
            write_u16(l4, 6, rw.l4_delta.apply_udp(c));
        }
        _ => {
            // ICMP echo: the identifier is whichever "port" the rewrite sets.
            write_u16(l4, icmp::ECHO_ID, rw.sport | rw.dport);
            let c = u16::from_be_bytes([l4[2], l4[3]]);
            write_u16(l4, 2, rw.l4_delta.apply(c));
        }
    }
}

/// Translate an ICMP error quoting a packet of a flow. The quoted packet went out
/// translated, so `rw` (the action of the direction the error travels), mirrored,
/// restores its original addresses and ports; the outer destination follows `rw`, the
/// outer source becomes `src`. Quoted, ICMP and outer checksums are updated
/// incrementally.
fn translate_error(
    frame: &mut [u8],
    p: &Parsed,
    rw: &Rewrite,
    src: [u8; 4],
    il3: usize,
    il4: usize,
    inner: FlowKey,
) {
    let icmp_sum = fold(sum(&frame[p.l4..p.l4_end]));
    {
        let q = &mut frame[il3..p.l4_end];
        let addr_delta = Delta::between(&words(inner.src, inner.dst), &words(rw.dst, rw.src));
        let c = u16::from_be_bytes([q[10], q[11]]);
        write_u16(q, 10, addr_delta.apply(c));
        q[12..16].copy_from_slice(&rw.dst);
        q[16..20].copy_from_slice(&rw.src);
        let l4 = &mut q[il4 - il3..];
        match inner.proto {
            PROTO_ICMP => {
                // (id, 0) or (0, id): the identifier is whichever is set.
                let (old_id, new_id) = (inner.sport | inner.dport, rw.sport | rw.dport);
                write_u16(l4, icmp::ECHO_ID, new_id);
                let c = u16::from_be_bytes([l4[2], l4[3]]);
                write_u16(l4, 2, Delta::between(&[old_id], &[new_id]).apply(c));
            }
            _ => {
                write_u16(l4, 0, rw.dport);
                write_u16(l4, 2, rw.sport);
                let d = addr_delta.plus(Delta::between(
                    &[inner.sport, inner.dport],
                    &[rw.dport, rw.sport],
                ));
                if inner.proto == PROTO_UDP {
                    let c = u16::from_be_bytes([l4[6], l4[7]]);
                    write_u16(l4, 6, d.apply_udp(c));
                } else if l4.len() >= 18 {
                    // A quote of only 8 bytes lacks the TCP checksum; nothing to fix.
                    let c = u16::from_be_bytes([l4[16], l4[17]]);
                    write_u16(l4, 16, d.apply(c));
                }
            }
        }
    }
    let icmp_new = fold(sum(&frame[p.l4..p.l4_end]));
    let c = u16::from_be_bytes([frame[p.l4 + 2], frame[p.l4 + 3]]);
    write_u16(
        &mut frame[p.l4..],
        2,
        Delta::between(&[icmp_sum], &[icmp_new]).apply(c),
    );
    frame[0..6].copy_from_slice(&rw.dst_mac);
    frame[6..12].copy_from_slice(&rw.src_mac);
    let ip = &mut frame[p.l3..p.l4];
    let d = Delta::between(&words(p.key.src, p.key.dst), &words(src, rw.dst));
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&rw.dst);
    decrement_ttl(ip, d.plus(TTL_DECREMENT));
}

/// Cut the translated packet in `frame` into IPv4 fragments of at most `mtu` bytes
/// (RFC 791 §3.2, RFC 4787 REQ-13): each carries the header with its own length,
/// offset and MF (a packet that is itself a fragment keeps its place in the
/// datagram) and checksum. A packet with IP options, or that would take more than
/// `SPLIT_MAX` fragments, is a counted `too_big` drop.
fn split(
    s: &mut Scratch,
    frame: &[u8],
    p: &Parsed,
    iface: u8,
    mtu: u16,
) -> Result<Verdict, DropReason> {
    let ihl = p.l4 - p.l3;
    let chunk = (usize::from(mtu).saturating_sub(20) / 8) * 8;
    let payload = &frame[p.l4..p.l4_end];
    let word = u16::from_be_bytes([frame[p.l3 + 6], frame[p.l3 + 7]]);
    let (base, more) = (word & 0x1fff, word & 0x2000 != 0);
    if ihl != 20
        || chunk == 0
        || payload.len().div_ceil(chunk) > SPLIT_MAX
        || usize::from(base) + payload.len() / 8 > 0x1fff
    {
        return Err(DropReason::TooBig);
    }
    let mut at = 0;
    let pieces = payload.len().div_ceil(chunk);
    for (k, piece) in payload.chunks(chunk).enumerate() {
        let len = p.l3 + 20 + piece.len();
        let out = s.split.get_mut(at..at + len).ok_or(DropReason::TooBig)?;
        out[..p.l3 + 20].copy_from_slice(&frame[..p.l3 + 20]);
        out[p.l3 + 20..].copy_from_slice(piece);
        let ip = &mut out[p.l3..p.l3 + 20];
        write_u16(ip, 2, (20 + piece.len()) as u16);
        let mf = if k + 1 < pieces || more { 0x2000 } else { 0 };
        write_u16(ip, 6, mf | (base + (k * chunk / 8) as u16));
        write_u16(ip, 10, 0);
        let c = !fold(sum(ip));
        write_u16(ip, 10, c);
        at += len;
        s.split_ends[k] = at;
    }
    Ok(Verdict::Fragments {
        iface,
        count: pieces as u8,
    })
}

/// Write the ICMP destination unreachable (code `code`, next-hop MTU `mtu`) a router
/// sends about the received packet in `frame`: from `from`, to its source through
/// `back`, quoting it as received.
fn unreachable(
    s: &mut Scratch,
    frame: &[u8],
    p: &Parsed,
    back: NextHop,
    from: [u8; 4],
    code: u8,
    mtu: u16,
) -> Verdict {
    let quote = p.ip_len().min(ICMP_QUOTE);
    let total = 20 + icmp::HEADER_LEN + quote;
    let g = &mut s.generated;
    g[0..6].copy_from_slice(&back.dst_mac);
    g[6..12].copy_from_slice(&back.src_mac);
    write_u16(g, 12, ETHERTYPE_IPV4);
    // IPv4: no options, no fragmentation, TTL 64, ICMP.
    let ip = &mut g[14..34];
    ip.copy_from_slice(&[
        0x45, 0, 0, 0, 0, 0, 0, 0, 64, PROTO_ICMP, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]);
    write_u16(ip, 2, total as u16);
    ip[12..16].copy_from_slice(&from);
    ip[16..20].copy_from_slice(&p.key.src);
    let c = !fold(sum(ip));
    write_u16(ip, 10, c);
    // ICMP destination unreachable, the next-hop MTU in the second word (RFC 1191).
    let l4 = 34;
    g[l4..l4 + 8].copy_from_slice(&[icmp::DEST_UNREACHABLE, code, 0, 0, 0, 0, 0, 0]);
    write_u16(g, l4 + 6, mtu);
    g[l4 + 8..l4 + 8 + quote].copy_from_slice(&frame[p.l3..p.l3 + quote]);
    let c = !fold(sum(&g[l4..l4 + 8 + quote]));
    write_u16(g, l4 + 2, c);
    s.generated_len = 14 + total;
    Verdict::Icmp { iface: back.iface }
}

/// Write the TCP reset that ends a flow for its client, from the VIP through the flow's
/// reverse action `rw`, answering the segment in `frame` (direction `dir`). Its sequence
/// number is the one the client expects next (RFC 5961 §3.2 makes Linux take only
/// that): the client's own acknowledgment when the segment is the client's, the
/// backend's sequence number when it is the backend's. A client segment without ACK
/// gets sequence 0 and acknowledges it (RFC 9293 §3.10.7.1).
fn reset(s: &mut Scratch, frame: &[u8], p: &Parsed, rw: &Rewrite, dir: Dir) -> Verdict {
    let (seq, ack, flags) = match dir {
        Dir::Forward if p.flags.ack() => (p.ack, 0, TCP_RST),
        Dir::Forward => {
            let doff = usize::from(frame[p.l4 + 12] >> 4) * 4;
            let fl = p.flags;
            let len = p.l4_end.saturating_sub(p.l4 + doff) as u32
                + u32::from(fl.syn())
                + u32::from(fl.fin());
            (0, p.seq.wrapping_add(len), TCP_RST | TCP_ACK_FLAG)
        }
        Dir::Reverse => (p.seq, p.ack, TCP_RST | TCP_ACK_FLAG),
    };
    let g = &mut s.generated;
    g[0..6].copy_from_slice(&rw.dst_mac);
    g[6..12].copy_from_slice(&rw.src_mac);
    write_u16(g, 12, ETHERTYPE_IPV4);
    // IPv4: no options, DF, TTL 64, TCP, 40 bytes.
    g[14..34].copy_from_slice(&[
        0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, PROTO_TCP, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]);
    g[26..30].copy_from_slice(&rw.src);
    g[30..34].copy_from_slice(&rw.dst);
    let c = !fold(sum(&g[14..34]));
    write_u16(g, 24, c);
    let t = 34;
    g[t..t + 20].fill(0);
    write_u16(g, t, rw.sport);
    write_u16(g, t + 2, rw.dport);
    g[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
    g[t + 8..t + 12].copy_from_slice(&ack.to_be_bytes());
    g[t + 12] = 5 << 4;
    g[t + 13] = flags;
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&rw.src);
    pseudo[4..8].copy_from_slice(&rw.dst);
    pseudo[9] = PROTO_TCP;
    pseudo[11] = 20;
    let c = !fold(sum(&pseudo) + sum(&g[t..t + 20]));
    write_u16(g, t + 16, c);
    s.generated_len = t + 20;
    Verdict::Reset { iface: rw.iface }
}

/// The four 16-bit words of an address pair.
fn words(a: [u8; 4], b: [u8; 4]) -> [u16; 4] {
    let ([a0, a1], [b0, b1]) = (addr_words(a), addr_words(b));
    [a0, a1, b0, b1]
}

/// Decrement the TTL (≥ 2, checked in classify) and apply `delta` (which must include
/// [`TTL_DECREMENT`]) to the header checksum.
fn decrement_ttl(ip: &mut [u8], delta: Delta) {
    ip[8] -= 1;
    let c = u16::from_be_bytes([ip[10], ip[11]]);
    write_u16(ip, 10, delta.apply(c));
}

/// Point a rewrite at next hop `h` (its MTU less what the rewrite's encapsulation
/// takes).
pub(super) fn set_hop(rw: &mut Rewrite, h: NextHop) {
    rw.iface = h.iface;
    rw.src_mac = h.src_mac;
    rw.dst_mac = h.dst_mac;
    rw.mtu = h.mtu.saturating_sub(rw.fwd.overhead() as u16);
}

/// Outer IPv4 header of a DSR tunnel: version 4, 20 bytes, DF, TTL 64.
const OUTER_TTL: u8 = 64;
/// IPv4 protocol number of IPv4-in-IPv4 (RFC 2003), GUE's inner protocol too.
const PROTO_IPIP: u8 = 4;

/// Write the outer headers of DSR tunnel direction `rw` into `out` and return their
/// length (0 for other forwardings): IPv4 from `rw.src` to `rw.dst` (DF, TTL 64,
/// identification 0) for IPIP; for GUE that header (protocol UDP), then UDP from
/// `rw.sport` to `rw.dport` with checksum 0 (RFC 768 allows it over IPv4) and a GUE
/// variant-0 header without extensions carrying protocol 4. The total length, TOS,
/// header checksum and UDP length are left 0 for [`finish_encap`]: this template is
/// what a flow-action record carries (`Action::encap`).
pub fn encap_template(rw: &Rewrite, out: &mut [u8; flowrec::ENCAP_MAX]) -> usize {
    let proto = match rw.fwd {
        Forwarding::Ipip => PROTO_IPIP,
        Forwarding::Gue => PROTO_UDP,
        Forwarding::Nat | Forwarding::L2Dsr => return 0,
    };
    out[..20].copy_from_slice(&[
        0x45, 0, 0, 0, 0, 0, 0x40, 0, OUTER_TTL, proto, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]);
    out[12..16].copy_from_slice(&rw.src);
    out[16..20].copy_from_slice(&rw.dst);
    if rw.fwd == Forwarding::Gue {
        out[20..32].fill(0);
        write_u16(out, 20, rw.sport);
        write_u16(out, 22, rw.dport);
        // GUE: version 0, C 0, no extension words; inner protocol IPv4; no flags.
        out[29] = PROTO_IPIP;
    }
    rw.fwd.overhead()
}

/// Complete an encapsulation template for an inner packet of `inner_len` bytes with
/// TOS `tos`: total length, the inner TOS (RFC 2003 §3.1), header checksum, and for
/// GUE the UDP length. The XDP executor (`xdp/bpf/execute.h`) does the same.
pub fn finish_encap(hdr: &mut [u8], tos: u8, inner_len: usize) {
    let n = hdr.len();
    hdr[1] = tos;
    write_u16(hdr, 2, (n + inner_len) as u16);
    write_u16(hdr, 10, 0);
    let c = !fold(sum(&hdr[..20]));
    write_u16(hdr, 10, c);
    if n > 20 {
        write_u16(hdr, 24, (n - 20 + inner_len) as u16);
    }
}

/// The rewrite turning packets with key `from` into `src:sport → dst:dport` via `hop`,
/// with checksum deltas computed once (RFC 1624).
pub(super) fn rewrite(
    from: &FlowKey,
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    hop: NextHop,
) -> Rewrite {
    let [os0, os1] = addr_words(from.src);
    let [od0, od1] = addr_words(from.dst);
    let [ns0, ns1] = addr_words(src);
    let [nd0, nd1] = addr_words(dst);
    let ip_delta = Delta::between(&[os0, os1, od0, od1], &[ns0, ns1, nd0, nd1]);
    let l4_delta = if from.proto == PROTO_ICMP {
        // No pseudo-header; only the identifier changes, and it is whichever of the
        // key's two "ports" is set ((id, 0) for a request, (0, id) for a reply).
        Delta::between(&[from.sport | from.dport], &[sport | dport])
    } else {
        Delta::between(
            &[os0, os1, od0, od1, from.sport, from.dport],
            &[ns0, ns1, nd0, nd1, sport, dport],
        )
    };
    Rewrite {
        src,
        dst,
        sport,
        dport,
        src_mac: hop.src_mac,
        dst_mac: hop.dst_mac,
        iface: hop.iface,
        mtu: hop.mtu,
        ip_delta: ip_delta.plus(TTL_DECREMENT),
        l4_delta,
        fwd: Forwarding::Nat,
    }
}

/// The NAT action turning packets with key `from` into `to`'s addresses and ports, sent
/// from `src_mac` to `dst_mac` out of `ifindex` (MTU `mtu`): what a worker installs for
/// a flow direction, checksum deltas included.
pub fn nat_action(
    from: &FlowKey,
    to: &FlowKey,
    (src_mac, dst_mac): ([u8; 6], [u8; 6]),
    mtu: u16,
    ifindex: u32,
) -> flowrec::Action {
    let hop = NextHop {
        iface: 0,
        src_mac,
        dst_mac,
        mtu,
    };
    action(
        &rewrite(from, to.src, to.dst, to.sport, to.dport, hop),
        ifindex,
    )
}

/// Execute a flow-action record on the frame in `buf[..len]` as a worker applies its
/// flow's rewrite, and return the frame's new length: the Rust half of the executor
/// contract with `xdp/bpf/execute.h` (tests hold the two to the same bytes). An
/// encapsulating action grows the frame in place (`buf` needs the room); Ethernet
/// padding stays behind the packet, outside the outer header's length. An error, the
/// frame untouched, when the frame does not classify, the room is short, or the action
/// is of another kind.
pub fn execute_action(
    buf: &mut [u8],
    len: usize,
    a: &flowrec::Action,
) -> Result<usize, DropReason> {
    let frame = buf.get_mut(..len).ok_or(DropReason::Oversize)?;
    let p = super::classify::classify(frame)?;
    let kind = a.kind;
    if kind == flowrec::ActionKind::L2Dsr as u8 {
        // To the backend's MAC; the IP packet untouched.
        frame[0..6].copy_from_slice(&a.dst_mac);
        frame[6..12].copy_from_slice(&a.src_mac);
        return Ok(len);
    }
    if kind == flowrec::ActionKind::Ipip as u8 || kind == flowrec::ActionKind::Gue as u8 {
        let n = usize::from(a.encap_len);
        let inner = p.ip_len();
        let end = len + n;
        if !(20..=flowrec::ENCAP_MAX).contains(&n) || end > buf.len() {
            return Err(DropReason::Oversize);
        }
        let tos = buf[p.l3 + 1];
        buf.copy_within(p.l3..len, p.l3 + n);
        let hdr = &mut buf[p.l3..p.l3 + n];
        hdr.copy_from_slice(&a.encap[..n]);
        finish_encap(hdr, tos, inner);
        buf[0..6].copy_from_slice(&a.dst_mac);
        buf[6..12].copy_from_slice(&a.src_mac);
        return Ok(end);
    }
    if kind != flowrec::ActionKind::Nat as u8 {
        return Err(DropReason::UnsupportedProtocol);
    }
    let v4 = |b: [u8; 16]| [b[0], b[1], b[2], b[3]];
    let rw = Rewrite {
        src: v4(a.src),
        dst: v4(a.dst),
        sport: u16::from_be_bytes(a.sport),
        dport: u16::from_be_bytes(a.dport),
        src_mac: a.src_mac,
        dst_mac: a.dst_mac,
        iface: 0,
        mtu: a.mtu,
        ip_delta: Delta(a.ip_delta),
        l4_delta: Delta(a.l4_delta),
        fwd: Forwarding::Nat,
    };
    apply(frame, &p, &rw);
    Ok(len)
}

/// The flow-action record of a rewrite, sent out of `ifindex`: what the XDP fast path
/// executes (`xdp/bpf/execute.h`) to the same bytes as the engine.
pub fn action(rw: &Rewrite, ifindex: u32) -> flowrec::Action {
    let mut a = flowrec::Action {
        kind: match rw.fwd {
            Forwarding::Nat => flowrec::ActionKind::Nat,
            Forwarding::L2Dsr => flowrec::ActionKind::L2Dsr,
            Forwarding::Ipip => flowrec::ActionKind::Ipip,
            Forwarding::Gue => flowrec::ActionKind::Gue,
        } as u8,
        family: flowrec::FAMILY_IPV4,
        ifindex,
        src_mac: rw.src_mac,
        dst_mac: rw.dst_mac,
        mtu: rw.mtu,
        ip_delta: rw.ip_delta.0,
        l4_delta: rw.l4_delta.0,
        sport: rw.sport.to_be_bytes(),
        dport: rw.dport.to_be_bytes(),
        src: flowrec::v4(rw.src),
        dst: flowrec::v4(rw.dst),
        ..flowrec::Action::default()
    };
    a.encap_len = encap_template(rw, &mut a.encap) as u8;
    a
}
