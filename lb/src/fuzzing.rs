//! Fuzz harness for the engine: arbitrary frame sequences against the fixture
//! configurations, with the invariants every verdict must keep. One function serves the
//! bounded run under `cargo test` (bolero, `lb/tests/fuzz.rs`) and long runs with
//! cargo-fuzz (`lb/fuzz`), so both check the same thing.
//!
//! The seed corpus is the fixture tables themselves ([`crate::fixtures`] and
//! [`crate::masq_fixtures`]): the input's bytes pick a seed frame, mutate, truncate or
//! replace it, pick the worker (and the hop count of a handed-over frame) and advance
//! the clock. So every run starts from frames the datapath is known to handle and walks
//! away from them, through flows that exist (the engines keep their tables across the
//! sequence).
//!
//! Invariants checked on every frame (a violation panics, which is what fuzzers find):
//! - `process` never panics;
//! - a frame not sent is not modified (it may be handed over, held and retried);
//! - a hand-off names another, existing worker;
//! - a sent frame carries a valid IPv4 header checksum, and a valid L4 checksum whenever
//!   the frame came in with one (the incremental updates of RFC 1624 are exact);
//! - a table never holds more flows than its capacity.

use crate::wire::build::verify;
use crate::{fixtures, masq_fixtures, Engine, Snapshot, Verdict};
use nat::fuzzing::Bytes;
use std::sync::Arc;

/// Flows per engine: small, so eviction and exhaustion are reached.
const CAPACITY: usize = 32;

/// Run the frame sequence `data` describes through two workers.
pub fn frames(data: &[u8]) {
    let mut b = Bytes::new(data);
    let (snap, seeds): (Snapshot, Vec<Vec<u8>>) = if b.u8() & 1 == 0 {
        // The load balancer, in a forwarding mode the input picks (SNAT, or DSR of a
        // kind: one-direction flows, tunnels).
        let mode = crate::service::Mode::ALL[usize::from(b.u8()) % crate::service::Mode::ALL.len()];
        (
            dsr_snapshot(mode),
            fixtures::fixtures().into_iter().map(|f| f.frame).collect(),
        )
    } else {
        (
            masq_fixtures::snapshot(),
            masq_fixtures::fixtures()
                .into_iter()
                .map(|m| m.fx.frame)
                .collect(),
        )
    };
    let snap = Arc::new(snap);
    let workers = snap.workers;
    let mut engines: Vec<Engine> = (0..workers)
        .map(|w| Engine::new(w, CAPACITY, Arc::clone(&snap)))
        .collect();
    let mut now = 1_000_000_000u64;
    for e in &mut engines {
        e.begin_batch(now);
    }
    let mut steps = 0;
    while b.more() && steps < 256 {
        steps += 1;
        let kind = b.u8() % 5;
        if kind == 0 {
            // Time passes: up to ~65 s, so timeouts and the sweep are reached.
            now += u64::from(b.u16()) * 1_000_000;
            for e in &mut engines {
                e.begin_batch(now);
            }
            continue;
        }
        let mut frame = seeds[usize::from(b.u8()) % seeds.len()].clone();
        match kind {
            1 => {}
            2 => {
                for _ in 0..(b.u8() % 8) {
                    let at = usize::from(b.u16()) % frame.len().max(1);
                    let v = b.u8();
                    if let Some(x) = frame.get_mut(at) {
                        *x = v;
                    }
                }
            }
            3 => frame.truncate(usize::from(b.u16()) % (frame.len() + 1)),
            _ => {
                let n = usize::from(b.u8());
                frame = b.take(n).to_vec();
            }
        }
        let w = usize::from(b.u8()) % engines.len();
        let hops = b.u8() % 2;
        check_one(&mut engines[w], &mut frame, hops, workers);
    }
}

/// The fixture configuration with its two services in `mode`, their backends on the
/// frontends' ports (as DSR requires).
fn dsr_snapshot(mode: crate::service::Mode) -> Snapshot {
    use crate::service::{Op, ServiceOptions, ServiceTable};
    let mut t = ServiceTable::default();
    for (f, b) in fixtures::frontends().into_iter().zip(fixtures::backends()) {
        t = t
            .apply(&Op::AddService {
                frontend: f,
                backends: vec![crate::service::BackendSpec { port: f.port, ..b }],
                options: ServiceOptions {
                    mode,
                    ..ServiceOptions::default()
                },
            })
            .expect("the fixture services are valid in every mode");
    }
    Snapshot::build(1, &fixtures::config(), &t, Arc::new(fixtures::net()), None)
        .expect("fixture snapshot builds")
}

fn check_one(e: &mut Engine, frame: &mut [u8], hops: u8, workers: u16) {
    let before = frame.to_vec();
    let (_, l4_was_ok) = verify(&before);
    let turned = e.counters().hairpinned;
    let v = e.process_probe(frame, hops);
    if e.counters().hairpinned != turned {
        // Turned around (hairpinning): rewritten into the packet the egress address
        // receives, whatever happens to it next; it must still be a valid packet.
        assert!(
            verify(frame).0,
            "turned around with a bad IPv4 header: {before:02x?}"
        );
        return;
    }
    match v {
        Verdict::Tx { .. } => {
            let (ip_ok, l4_ok) = verify(frame);
            assert!(ip_ok, "sent with a bad IPv4 header checksum: {before:02x?}");
            // A later fragment carries no L4 header: its bytes are payload, whatever
            // they look like.
            let later_fragment =
                before.len() > 21 && u16::from_be_bytes([before[20], before[21]]) & 0x1fff != 0;
            assert!(
                later_fragment || l4_ok || !l4_was_ok,
                "a valid L4 checksum went bad: {before:02x?} → {frame:02x?}"
            );
        }
        Verdict::Encap { len, .. } => {
            // Direct server return: the client's IP packet travels unchanged behind a
            // valid outer header that counts it whole.
            let len = usize::from(len);
            assert_eq!(
                &frame[14..14 + len],
                &before[14..14 + len],
                "inner packet changed"
            );
            let hdr = e.encap_header();
            let mut out = frame[..14].to_vec();
            out.extend_from_slice(hdr);
            out.extend_from_slice(&frame[14..14 + len]);
            assert!(verify(&out).0, "an outer header with a bad checksum");
            let inner = usize::from(u16::from_be_bytes([before[16], before[17]]));
            assert_eq!(
                usize::from(u16::from_be_bytes([hdr[2], hdr[3]])),
                hdr.len() + inner
            );
        }
        Verdict::ToWorker(n) | Verdict::Probe(n) => {
            assert!(n < workers && n != e.worker(), "hand-off to {n}");
            assert_eq!(frame, &before[..], "a handed-over frame is untouched");
        }
        Verdict::Fragments { count, .. } => {
            for k in 0..usize::from(count) {
                let (ip_ok, _) = verify(e.fragment(k));
                assert!(ip_ok, "a fragment with a bad IPv4 header: {before:02x?}");
            }
        }
        Verdict::Icmp { .. } | Verdict::Reset { .. } => {
            assert_eq!(
                frame,
                &before[..],
                "a frame answered with ICMP or a reset is untouched"
            );
            assert_eq!(
                verify(e.generated()),
                (true, true),
                "an originated ICMP error or reset with bad checksums: {before:02x?}"
            );
        }
        Verdict::Hold | Verdict::Drop(_) => {
            assert_eq!(frame, &before[..], "a frame not sent is untouched");
        }
    }
    assert!(e.flows().len() <= e.flows().capacity());
}
