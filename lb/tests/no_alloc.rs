//! `Engine::process` allocates nothing: new flows, flow hits, replies, hand-offs, drops
//! and expiry all run with a counting global allocator watching.

use lb::fixtures::{self, BACKEND, CLIENT, CLIENT_MAC, LB_MAC, SNAT, VIP};
use lb::wire::build::FrameSpec;
use lb::wire::TcpFlags;
use lb::{Engine, Event, Verdict};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);
thread_local! {
    /// Only the test thread's allocations count (libtest's own threads allocate too).
    static WATCH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn watch(on: bool) {
    WATCH.with(|w| w.set(on));
}

fn watching() -> bool {
    WATCH.with(|w| w.get())
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if watching() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if watching() {
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

/// The counter is global: tests that watch it run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn process_allocates_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut e = Engine::new(0, 4096, Arc::new(fixtures::snapshot()));
    // Frames are built before watching (the builder allocates). Client ports 4 apart:
    // each keeps a port of worker 0 (ports go to workers in pairs).
    let syns: Vec<Vec<u8>> = (0..1000u16)
        .map(|p| {
            FrameSpec {
                src_mac: CLIENT_MAC,
                dst_mac: LB_MAC,
                src: CLIENT,
                dst: VIP,
                sport: 10_000 + 4 * p,
                ..FrameSpec::default()
            }
            .build()
        })
        .collect();
    let acks: Vec<Vec<u8>> = syns
        .iter()
        .map(|f| {
            let mut a = f.clone();
            a[47] = TcpFlags::ACK;
            a
        })
        .collect();
    let foreign = FrameSpec {
        dst_mac: LB_MAC,
        src: BACKEND,
        dst: SNAT,
        sport: 8080,
        dport: 65002, // worker 1's
        flags: TcpFlags::ACK,
        ..FrameSpec::default()
    }
    .build();
    let junk = vec![0u8; 30];
    let mut work: Vec<Vec<u8>> = syns.iter().chain(&acks).cloned().collect();
    let mut replies = Vec::with_capacity(1000);
    let mut scratch = foreign.clone();
    let mut junk_buf = junk.clone();

    watch(true);
    e.begin_batch(1);
    for (i, f) in work.iter_mut().enumerate() {
        assert!(matches!(e.process(f), Verdict::Tx { .. }));
        if i < 1000 {
            replies.push(u16::from_be_bytes([f[34], f[35]])); // capacity reserved above
        }
    }
    scratch.copy_from_slice(&foreign);
    assert_eq!(e.process(&mut scratch), Verdict::ToWorker(1));
    junk_buf.copy_from_slice(&junk);
    assert!(matches!(e.process(&mut junk_buf), Verdict::Drop(_)));
    for _ in 0..100 {
        e.begin_batch(u64::MAX / 2); // everything idles out, swept step by step
    }
    watch(false);

    assert_eq!(
        ALLOCS.load(Ordering::Relaxed),
        0,
        "allocations on the packet path"
    );
    assert_eq!(replies.len(), 1000);
    assert!(e.counters().flows_expired > 0);
}

#[test]
fn masquerading_allocates_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    use lb::masq_fixtures::{self as mf, answer, from_pod, icmp_error, masqueraded};
    use lb::wire::icmp;
    use lb::wire::ipv4::{PROTO_ICMP, PROTO_UDP};
    let mut e = Engine::new(0, 4096, Arc::new(mf::snapshot()));
    // Answered UDP and echo flows qualify for the fast path: their install and removal
    // events must not allocate either.
    e.enable_fast_path();
    let mut frames: Vec<Vec<u8>> = Vec::new();
    // Inside ports 4 apart from 20000: each maps to its own port of worker 0.
    for i in 0..500u16 {
        let sport = 20_000 + 4 * i;
        let out = from_pod(mf::POD_A, mf::REMOTE, PROTO_UDP, sport, 53);
        let sent = masqueraded(&out, mf::mapped(sport));
        frames.push(out.build());
        frames.push(answer(&sent).build());
        frames.push(
            icmp_error(
                mf::ROUTER,
                mf::EGRESS,
                icmp::TIME_EXCEEDED,
                0,
                0,
                &sent.build(),
            )
            .build(),
        );
    }
    for i in 0..100u16 {
        let ping = from_pod(mf::POD_B, mf::REMOTE, PROTO_ICMP, 4 * i, 1);
        frames.push(ping.build());
        frames.push(answer(&masqueraded(&ping, mf::mapped(4 * i))).build());
    }
    // Routed untranslated (non-masquerade destination).
    frames.push(from_pod(mf::POD_A, mf::PRIVATE, PROTO_UDP, 1, 2).build());
    watch(true);
    let before = ALLOCS.load(Ordering::Relaxed);
    e.begin_batch(1);
    for f in frames.iter_mut() {
        assert!(matches!(e.process(f), Verdict::Tx { .. }));
    }
    let installed = e
        .take_events()
        .filter(|ev| matches!(ev, Event::FastInstall(..)))
        .count();
    for _ in 0..100 {
        e.begin_batch(u64::MAX / 2);
    }
    let removed = e
        .take_events()
        .filter(|ev| matches!(ev, Event::FastRemove(..)))
        .count();
    watch(false);
    assert_eq!(
        ALLOCS.load(Ordering::Relaxed) - before,
        0,
        "allocations on the masquerade path"
    );
    assert_eq!(
        (installed, removed),
        (600, 600),
        "the UDP and echo flows came and went"
    );
    assert_eq!(e.counters().icmp_errors, 500);
    assert_eq!(e.counters().routed, 1);
}
