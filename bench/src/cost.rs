//! The worker pipeline's cost per packet, made deterministic: `xlb-bench cost` runs one
//! case for N packets, and the harness runs it under callgrind for two values of N; the
//! difference in instructions divided by the difference in packets is the per-packet
//! cost, free of start-up work (building frames and the engine happens the same way for
//! both N). Also: Maglev build time and bytes per flow.

use anyhow::{bail, Result};
use lb::fixtures::{self, BACKEND_MAC, CLIENT_MAC, LB_MAC, VIP};
use lb::maglev::{Maglev, MaglevBackend};
use lb::wire::build::FrameSpec;
use lb::wire::{EthernetFrame, Ipv4Packet, TcpFlags, L4};
use lb::{Engine, Verdict};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

/// What one packet of the run does.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Case {
    /// Only the harness's own work: copy the next frame into the buffer (the worker
    /// processes frames in place; subtract this to get the engine's cost).
    Copy,
    /// Copy the frame into the buffer and parse it (the floor every path pays).
    Parse,
    /// A load-balanced flow's next packet (1000 established flows, round robin).
    Hit,
    /// A new load-balanced flow: Maglev, next hop, SNAT port, insert.
    New,
    /// A backend's reply on an established flow, translated back to the client.
    Reply,
    /// A masqueraded flow's next packet (1000 flows).
    MasqHit,
}

impl Case {
    pub const ALL: [Case; 6] = [
        Case::Copy,
        Case::Parse,
        Case::Hit,
        Case::New,
        Case::Reply,
        Case::MasqHit,
    ];

    /// Packets for the two callgrind runs (new flows are bounded by the 64 k ports
    /// toward the one fixture backend).
    pub fn packets(self) -> (u32, u32) {
        match self {
            Case::New => (10_000, 50_000),
            _ => (20_000, 120_000),
        }
    }
}

/// An engine and the frames a case cycles through.
pub struct Setup {
    engine: Engine,
    frames: Vec<Vec<u8>>,
    case: Case,
}

fn lb_frame(sport: u16, flags: u8) -> Vec<u8> {
    FrameSpec {
        src_mac: CLIENT_MAC,
        dst_mac: LB_MAC,
        src: [10, 0, 0, 2],
        dst: VIP,
        sport,
        flags,
        ..FrameSpec::default()
    }
    .build()
}

fn lb_engine(capacity: usize) -> Result<Engine> {
    // One worker owning ports 1024-65535 toward the fixture's single backend.
    let mut cfg = fixtures::config();
    cfg.workers = 1;
    cfg.snat = lb::snapshot::SnatConfig::single(fixtures::SNAT, nat::PortRange::new(1024, 65535)?);
    let snap = lb::Snapshot::build(1, &cfg, &fixtures::table(), Arc::new(fixtures::net()), None)?;
    let mut e = Engine::new(0, capacity, Arc::new(snap));
    e.begin_batch(1);
    Ok(e)
}

fn must_tx(v: Verdict, what: &str) -> Result<()> {
    if !matches!(v, Verdict::Tx { .. }) {
        bail!("{what}: the engine answered {v:?}, not Tx");
    }
    Ok(())
}

impl Setup {
    pub fn new(case: Case) -> Result<Setup> {
        let (_, max) = case.packets();
        let mut engine = lb_engine(100_000)?;
        let frames = match case {
            Case::Copy | Case::Parse | Case::Hit => {
                let mut v = Vec::new();
                for p in 0..1000 {
                    must_tx(
                        engine.process(&mut lb_frame(1024 + p, TcpFlags::SYN)),
                        "SYN",
                    )?;
                    v.push(lb_frame(1024 + p, TcpFlags::ACK));
                }
                v
            }
            Case::New => (0..max)
                .map(|i| lb_frame(1024 + (i % 64_000) as u16, TcpFlags::SYN))
                .collect(),
            Case::Reply => {
                let mut v = Vec::new();
                for p in 0..1000 {
                    let mut f = lb_frame(1024 + p, TcpFlags::SYN);
                    must_tx(engine.process(&mut f), "SYN")?;
                    v.push(reply_to(&f)?);
                }
                v
            }
            Case::MasqHit => {
                use lb::masq_fixtures::{from_pod, snapshot_with_ports, POD_A, REMOTE};
                engine = Engine::new(0, 100_000, Arc::new(snapshot_with_ports(1024, 65535)));
                engine.begin_batch(1);
                let mut v = Vec::new();
                // Ports 4 apart from 1024: each pod port's home is worker 0 (ports go
                // to the snapshot's two workers in pairs).
                for p in 0..1000 {
                    let f = from_pod(POD_A, REMOTE, 17, 1024 + 4 * p, 53).build();
                    must_tx(engine.process(&mut f.clone()), "masquerade")?;
                    v.push(f);
                }
                v
            }
        };
        Ok(Setup {
            engine,
            frames,
            case,
        })
    }

    /// Process `packets` frames, cycling through the case's frames; returns how many the
    /// engine transmitted (so the work cannot be optimised away).
    pub fn run(&mut self, packets: u32) -> u64 {
        let mut buf = [0u8; 128];
        let mut tx = 0u64;
        for i in 0..packets as usize {
            let f = &self.frames[i % self.frames.len()];
            buf[..f.len()].copy_from_slice(f);
            let b = &mut buf[..f.len()];
            match self.case {
                Case::Copy => tx += u64::from(black_box(&*b)[0]),
                Case::Parse => tx += u64::from(parse(b)),
                _ => {
                    if let Verdict::Tx { .. } = self.engine.process(b) {
                        tx += 1;
                    }
                }
            }
        }
        black_box(tx)
    }
}

fn parse(b: &[u8]) -> bool {
    let Ok(e) = EthernetFrame::new_checked(b) else {
        return false;
    };
    let Ok(ip) = Ipv4Packet::new_checked(&b[e.payload_offset()..]) else {
        return false;
    };
    let Ok(l4) = L4::new_checked(ip.payload(), ip.protocol()) else {
        return false;
    };
    black_box((ip.src(), ip.dst(), l4.src_port(), l4.dst_port()));
    true
}

/// The backend's answer to a frame the engine sent toward it.
fn reply_to(sent: &[u8]) -> Result<Vec<u8>> {
    let bad = |e| anyhow::anyhow!("the engine sent a frame that does not parse: {e:?}");
    let e = EthernetFrame::new_checked(sent).map_err(bad)?;
    let ip = Ipv4Packet::new_checked(&sent[e.payload_offset()..]).map_err(bad)?;
    let l4 = L4::new_checked(ip.payload(), ip.protocol()).map_err(bad)?;
    Ok(FrameSpec {
        src_mac: BACKEND_MAC,
        dst_mac: LB_MAC,
        src: ip.dst(),
        dst: ip.src(),
        sport: l4.dst_port(),
        dport: l4.src_port(),
        flags: TcpFlags::SYN | TcpFlags::ACK,
        ..FrameSpec::default()
    }
    .build())
}

/// Median Maglev build time in ms (M = 65537, 100 backends) over `builds` builds.
pub fn maglev_ms(builds: usize) -> Result<f64> {
    let backends: Vec<MaglevBackend> = (0..100)
        .map(|i| MaglevBackend {
            name: format!("10.1.{}.{}:8080", i / 250, i % 250 + 1).into_bytes(),
            weight: 1,
        })
        .collect();
    let mut v = Vec::with_capacity(builds);
    for _ in 0..builds {
        let t = Instant::now();
        black_box(Maglev::build(&backends, 65_537, 0)?);
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(crate::stats::Summary::of(&v).median)
}

/// How well Maglev tables follow their weights and how little they move (M = 65537).
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct MaglevQuality {
    /// 100 backends at weight 100: the largest gap between a backend's slots and its
    /// ideal share, in percent of that share.
    pub worst_share_pct_100: f64,
    /// 1000 backends at weight 100 (M < 100·N): the same.
    pub worst_share_pct_1000: f64,
    /// Slots that change backend when one of 100 equal backends is removed, in percent
    /// of the table (ideal: 1 %).
    pub disruption_pct: f64,
    /// Median build time of a skewed table (99 backends at weight 1, one at 10 000), ms.
    pub skewed_build_ms: f64,
}

fn named(n: usize, weight: impl Fn(usize) -> u32) -> Vec<MaglevBackend> {
    (0..n)
        .map(|i| MaglevBackend {
            name: format!("10.1.{}.{}:8080", i / 250, i % 250 + 1).into_bytes(),
            weight: weight(i),
        })
        .collect()
}

/// Worst share error of `t` built from `b`, in percent of the ideal share.
fn worst_share(t: &Maglev, b: &[MaglevBackend]) -> f64 {
    let mut slots = vec![0usize; b.len()];
    for &s in t.slots() {
        if let Some(c) = slots.get_mut(usize::from(s)) {
            *c += 1;
        }
    }
    let total: f64 = b.iter().map(|x| f64::from(x.weight)).sum();
    b.iter()
        .zip(&slots)
        .map(|(x, &n)| {
            let ideal = t.size() as f64 * f64::from(x.weight) / total;
            (n as f64 - ideal).abs() / ideal * 100.0
        })
        .fold(0.0, f64::max)
}

/// Measure [`MaglevQuality`].
pub fn maglev_quality(builds: usize) -> Result<MaglevQuality> {
    const M: u32 = 65_537;
    let hundred = named(100, |_| 100);
    let t100 = Maglev::build(&hundred, M, 0)?;
    let thousand = named(1000, |_| 100);
    let t1000 = Maglev::build(&thousand, M, 0)?;
    // Remove the backend in the middle; compare slot owners by name.
    let fewer: Vec<MaglevBackend> = hundred
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 50)
        .map(|(_, b)| b.clone())
        .collect();
    let t99 = Maglev::build(&fewer, M, 0)?;
    let moved = t100
        .slots()
        .iter()
        .zip(t99.slots())
        .filter(|(a, b)| {
            let a = hundred.get(usize::from(**a)).map(|x| &x.name);
            let b = fewer.get(usize::from(**b)).map(|x| &x.name);
            a != b
        })
        .count();
    let skewed = named(100, |i| if i == 0 { 10_000 } else { 1 });
    let mut v = Vec::with_capacity(builds);
    for _ in 0..builds {
        let t = Instant::now();
        black_box(Maglev::build(&skewed, M, 0)?);
        v.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(MaglevQuality {
        worst_share_pct_100: worst_share(&t100, &hundred),
        worst_share_pct_1000: worst_share(&t1000, &thousand),
        disruption_pct: moved as f64 * 100.0 / f64::from(M),
        skewed_build_ms: crate::stats::Summary::of(&v).median,
    })
}

/// Bytes allocated per flow slot by an engine of `capacity` flows, as counted by
/// `allocated` (the caller's global allocator).
pub fn bytes_per_flow(capacity: usize, allocated: &dyn Fn() -> usize) -> Result<f64> {
    let before = allocated();
    let e = lb_engine(capacity)?;
    let used = allocated().saturating_sub(before);
    drop(e);
    Ok(used as f64 / capacity as f64)
}
