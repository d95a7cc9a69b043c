//! Costs of the pure engine, measured in this process and reported (never asserted):
//! Maglev build time, per-packet time for a flow hit and a new flow as multiples of a
//! parse-only baseline run in the same process, and bytes allocated per flow slot.
//!
//!   cargo run --release -p bench --bin engine

use lb::fixtures::{self, CLIENT_MAC, LB_MAC, VIP};
use lb::maglev::{Maglev, MaglevBackend};
use lb::wire::build::FrameSpec;
use lb::wire::{EthernetFrame, Ipv4Packet, TcpFlags, L4};
use lb::{Engine, Verdict};
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

struct Counting;
static BYTES: AtomicUsize = AtomicUsize::new(0);
// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        BYTES.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        BYTES.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
}
#[global_allocator]
static A: Counting = Counting;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn frames(n: u16, flags: u8) -> Vec<Vec<u8>> {
    (0..n)
        .map(|p| {
            let src = [10, 0, 0, 2];
            FrameSpec {
                src_mac: CLIENT_MAC,
                dst_mac: LB_MAC,
                src,
                dst: VIP,
                sport: 1024 + p,
                flags,
                ..FrameSpec::default()
            }
            .build()
        })
        .collect()
}

/// The work every path does anyway: copy the frame into the buffer and parse it.
fn baseline(input: &[Vec<u8>], rounds: usize) -> f64 {
    let mut buf = [0u8; 128];
    let t = Instant::now();
    for _ in 0..rounds {
        for f in input {
            buf[..f.len()].copy_from_slice(f);
            let b = &buf[..f.len()];
            if let Ok(e) = EthernetFrame::new_checked(b) {
                if let Ok(ip) = Ipv4Packet::new_checked(&b[e.payload_offset()..]) {
                    if let Ok(l4) = L4::new_checked(ip.payload(), ip.protocol()) {
                        black_box((ip.src(), ip.dst(), l4.src_port(), l4.dst_port()));
                    }
                }
            }
        }
    }
    t.elapsed().as_nanos() as f64 / (rounds * input.len()) as f64
}

fn run(e: &mut Engine, input: &[Vec<u8>], rounds: usize) -> f64 {
    let mut buf = [0u8; 128];
    let t = Instant::now();
    for _ in 0..rounds {
        for f in input {
            buf[..f.len()].copy_from_slice(f);
            black_box(e.process(&mut buf[..f.len()]));
        }
    }
    t.elapsed().as_nanos() as f64 / (rounds * input.len()) as f64
}

fn main() {
    // Maglev: M = 65537, 100 backends.
    let backends: Vec<MaglevBackend> = (0..100)
        .map(|i| MaglevBackend {
            name: format!("10.1.{}.{}:8080", i / 250, i % 250 + 1).into_bytes(),
            weight: 1,
        })
        .collect();
    let builds: Vec<f64> = (0..21)
        .map(|_| {
            let t = Instant::now();
            black_box(Maglev::build(&backends, 65_537, 0).expect("build"));
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    println!(
        "maglev build, M=65537, 100 backends: median {:.3} ms over 21 builds",
        median(builds)
    );

    // Per-packet cost.
    // One worker owning ports 1024-65535 toward the fixture's single backend.
    let mut cfg = fixtures::config();
    cfg.workers = 1;
    cfg.snat.ports = nat::PortRange::new(1024, 65535).expect("range");
    let snap = Arc::new(
        lb::Snapshot::build(1, &cfg, &fixtures::table(), Arc::new(fixtures::net()), None)
            .expect("snapshot"),
    );
    let syns = frames(50_000, TcpFlags::SYN);
    let acks = frames(1_000, TcpFlags::ACK);
    let mut hits = Vec::new();
    let mut news = Vec::new();
    let mut bases = Vec::new();
    for _ in 0..7 {
        bases.push(baseline(&acks, 200));
        let mut e = Engine::new(0, 200_000, Arc::clone(&snap));
        e.begin_batch(1);
        for f in &acks[..] {
            let mut s = f.clone();
            s[47] = TcpFlags::SYN;
            assert!(matches!(e.process(&mut s), Verdict::Tx { .. }));
        }
        hits.push(run(&mut e, &acks, 200));
        let mut fresh = Engine::new(0, 200_000, Arc::clone(&snap));
        fresh.begin_batch(1);
        news.push(run(&mut fresh, &syns, 1));
        assert_eq!(fresh.counters.flows_created, syns.len() as u64);
    }
    let (b, h, n) = (median(bases), median(hits), median(news));
    println!("baseline (copy 54-byte frame + parse):  {b:.1} ns/packet (median of 7 runs)");
    println!(
        "flow hit (1000 flows):                  {h:.1} ns/packet = {:.1}x baseline",
        h / b
    );
    println!(
        "new flow (Maglev, next hops, port, insert): {n:.1} ns/packet = {:.1}x baseline",
        n / b
    );

    // Memory per flow slot, measured by the allocator.
    for cap in [100_000usize, 1_000_000] {
        let before = BYTES.load(Ordering::Relaxed);
        let e = Engine::new(0, cap, Arc::clone(&snap));
        let used = BYTES.load(Ordering::Relaxed) - before;
        println!(
            "flow table for {cap} flows: {} MiB allocated up front = {} bytes/flow",
            used >> 20,
            used / cap
        );
        drop(e);
    }
}
