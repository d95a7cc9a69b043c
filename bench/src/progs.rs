//! The bench's XDP programs (bench/bpf/*.bpf.c), loaded with aya: the generator (run by
//! BPF_PROG_TEST_RUN in live-frames mode), the counting sink and the reference
//! forwarders. Interface facts come from /sys/class/net (which `ip netns exec` remounts
//! for the namespace), so nothing here needs `unsafe`.

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{CpuMap, MapData, PerCpuArray, XskMap};
use aya::programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use std::net::Ipv4Addr;
use std::os::fd::RawFd;

static GEN: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gen.bpf.o"));
static SINK: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sink.bpf.o"));
static FWD: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fwd.bpf.o"));

/// Frames per kernel batch in live-frames mode (the kernel's maximum is 256).
const LIVE_BATCH: u32 = 64;

/// An interface's index, from sysfs.
pub fn ifindex(iface: &str) -> Result<u32> {
    let s = std::fs::read_to_string(format!("/sys/class/net/{iface}/ifindex"))
        .with_context(|| format!("no interface {iface} in this namespace"))?;
    s.trim()
        .parse()
        .with_context(|| format!("ifindex of {iface}: {s:?}"))
}

/// An interface's MAC address, from sysfs.
pub fn mac(iface: &str) -> Result<[u8; 6]> {
    let s = std::fs::read_to_string(format!("/sys/class/net/{iface}/address"))
        .with_context(|| format!("no interface {iface} in this namespace"))?;
    parse_mac(s.trim())
}

pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let mut m = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        bail!("bad MAC address {s:?} (want aa:bb:cc:dd:ee:ff)");
    }
    for (d, p) in m.iter_mut().zip(parts) {
        *d = u8::from_str_radix(p, 16).map_err(|_| anyhow!("bad MAC address {s:?}"))?;
    }
    Ok(m)
}

fn mac_u64(m: [u8; 6]) -> u64 {
    m.iter().fold(0u64, |a, &b| (a << 8) | u64::from(b))
}

fn xdp<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let p = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the object"))?;
    let p: &mut Xdp = p.try_into()?;
    Ok(p)
}

fn load_attach(ebpf: &mut Ebpf, prog: &str, ifaces: &[&str]) -> Result<()> {
    let p = xdp(ebpf, prog)?;
    p.load().with_context(|| format!("loading {prog}"))?;
    for i in ifaces {
        p.attach(i, XdpMode::Driver)
            .with_context(|| format!("attaching {prog} to {i} (native mode)"))?;
    }
    Ok(())
}

/// What the generator sends: flow `i` of `flows` leaves from
/// `src + i / ports_per_addr`, port `sport + i % ports_per_addr`, to
/// `dport + i % dst_ports`.
#[derive(Debug, Clone)]
pub struct GenSpec {
    pub out_iface: String,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub dst_ports: u32,
    pub ports_per_addr: u32,
    pub flows: u32,
    /// Frame length on the wire including the 4-byte FCS (64..=1518).
    pub size: usize,
    pub tcp: bool,
}

impl GenSpec {
    /// The template frame every generated packet starts from (correct checksums).
    pub fn template(&self) -> Result<Vec<u8>> {
        if !(64..=1518).contains(&self.size) {
            bail!("frame size {} outside 64..=1518", self.size);
        }
        let hdr = 14 + 20 + if self.tcp { 20 } else { 8 };
        let spec = lb::wire::build::FrameSpec {
            src_mac: self.src_mac,
            dst_mac: self.dst_mac,
            src: self.src.octets(),
            dst: self.dst.octets(),
            proto: if self.tcp { 6 } else { 17 },
            sport: self.sport,
            dport: self.dport,
            flags: lb::wire::TcpFlags::SYN,
            payload: vec![0x5a; self.size - 4 - hdr],
            ..Default::default()
        };
        Ok(spec.build())
    }
}

/// The live-frames generator, loaded and verified; [`Generator::send`] transmits.
pub struct Generator {
    ebpf: Ebpf,
    template: Vec<u8>,
}

impl Generator {
    pub fn new(spec: &GenSpec) -> Result<Generator> {
        if spec.flows == 0 || spec.ports_per_addr == 0 || spec.dst_ports == 0 {
            bail!("flows, ports per address and destination ports must be at least 1");
        }
        if u32::from(spec.sport) + spec.ports_per_addr.min(spec.flows) > 65536 {
            bail!(
                "source ports {}+{} exceed 65535",
                spec.sport,
                spec.ports_per_addr
            );
        }
        let template = spec.template()?;
        let ip_csum = u32::from(u16::from_ne_bytes([template[24], template[25]]));
        let at = 34 + if spec.tcp { 16 } else { 6 };
        let l4_csum = u32::from(u16::from_ne_bytes([template[at], template[at + 1]]));
        let out = ifindex(&spec.out_iface)?;
        let src = u32::from(spec.src);
        let (sport, dport) = (u32::from(spec.sport), u32::from(spec.dport));
        let mut ebpf = EbpfLoader::new()
            .override_global("out_ifindex", &out, true)
            .override_global("nflows", &spec.flows, true)
            .override_global("ports_per_addr", &spec.ports_per_addr, true)
            .override_global("dst_ports", &spec.dst_ports, true)
            .override_global("src_base", &src, true)
            .override_global("sport_base", &sport, true)
            .override_global("dport_base", &dport, true)
            .override_global("ip_csum", &ip_csum, true)
            .override_global("l4_csum", &l4_csum, true)
            .load(GEN)
            .context("loading the generator")?;
        xdp(&mut ebpf, "xb_gen")?
            .load()
            .context("verifying the generator")?;
        let m = ebpf
            .map_mut("tmpl")
            .ok_or_else(|| anyhow!("generator map tmpl missing"))?;
        let mut tmpl: aya::maps::Array<&mut MapData, [u8; 56]> = aya::maps::Array::try_from(m)?;
        let mut hdr = [0u8; 56];
        hdr.copy_from_slice(&template[..56]);
        tmpl.set(0, hdr, 0)?;
        Ok(Generator { ebpf, template })
    }

    /// Transmit `count` frames (the kernel loops in batches); returns how many it sent.
    pub fn send(&mut self, count: u32) -> Result<u64> {
        let p = xdp(&mut self.ebpf, "xb_gen")?;
        let opts = TestRunOptions {
            data_in: Some(&self.template),
            repeat: count,
            attrs: TestRunAttrs::new().xdp_live_frames(LIVE_BATCH),
            ..TestRunOptions::new()
        };
        // In live-frames mode the kernel reports no verdict; the sink tells what arrived.
        p.test_run(opts)
            .context("BPF_PROG_TEST_RUN (live frames; kernel ≥ 5.18)")?;
        Ok(u64::from(count))
    }
}

/// The counting sink on one or more interfaces.
pub struct Sink {
    _ebpf: Ebpf,
    counts: PerCpuArray<MapData, u64>,
}

impl Sink {
    /// Count (and drop) what arrives for `ports`; with `answer_first`, answer each UDP
    /// flow's first datagram instead, so flows are established both ways.
    pub fn attach(ifaces: &[&str], ports: (u16, u16), answer_first: bool) -> Result<Sink> {
        let (lo, hi) = (u32::from(ports.0), u32::from(ports.1));
        let answer = u32::from(answer_first);
        let mut ebpf = EbpfLoader::new()
            .override_global("port_lo", &lo, true)
            .override_global("port_hi", &hi, true)
            .override_global("answer_first", &answer, true)
            .load(SINK)
            .context("loading the sink")?;
        load_attach(&mut ebpf, "xb_sink", ifaces)?;
        let m = ebpf
            .take_map("counts")
            .ok_or_else(|| anyhow!("sink map missing"))?;
        Ok(Sink {
            counts: PerCpuArray::try_from(m)?,
            _ebpf: ebpf,
        })
    }

    /// Packets and bytes counted so far, summed over CPUs.
    pub fn read(&self) -> Result<(u64, u64)> {
        let p: u64 = self.counts.get(&0, 0)?.iter().sum();
        let b: u64 = self.counts.get(&1, 0)?.iter().sum();
        Ok((p, b))
    }
}

/// A reference program attached to the load balancer's ingress interface.
pub enum Reference {
    /// Rewrite MACs and XDP_REDIRECT out of `out` to `next_hop` (the machine's ceiling).
    Redirect { out: String, next_hop: [u8; 6] },
    /// Everything to the kernel's stack on `cpu` (cpumap): nftables runs there.
    Cpu { cpu: u32 },
    /// IPv4 into the AF_XDP socket of the rx queue (the bare forwarder's steering).
    Xsk,
}

pub struct Fwd {
    ebpf: Ebpf,
}

impl Fwd {
    pub fn attach(iface: &str, r: &Reference) -> Result<Fwd> {
        let mut loader = EbpfLoader::new();
        let (prog, out, dst, src, cpu) = match r {
            Reference::Redirect { out, next_hop } => (
                "xb_redirect",
                ifindex(out)?,
                mac_u64(*next_hop),
                mac_u64(mac(out)?),
                0,
            ),
            Reference::Cpu { cpu } => ("xb_cpu", 0, 0, 0, *cpu),
            Reference::Xsk => ("xb_xsk", 0, 0, 0, 0),
        };
        loader
            .override_global("out_ifindex", &out, true)
            .override_global("dst_mac", &dst, true)
            .override_global("src_mac", &src, true)
            .override_global("target_cpu", &cpu, true);
        let mut ebpf = loader.load(FWD).context("loading the reference programs")?;
        load_attach(&mut ebpf, prog, &[iface])?;
        if let Reference::Cpu { cpu } = r {
            let m = ebpf
                .map_mut("cpus")
                .ok_or_else(|| anyhow!("cpumap missing"))?;
            let mut cpus: CpuMap<&mut MapData> = CpuMap::try_from(m)?;
            cpus.set(*cpu, 2048, None, 0)
                .with_context(|| format!("cpumap entry for CPU {cpu}"))?;
        }
        Ok(Fwd { ebpf })
    }

    /// Put an AF_XDP socket into the XSKMAP at `queue` (Reference::Xsk).
    pub fn set_xsk(&mut self, queue: u32, fd: RawFd) -> Result<()> {
        let m = self
            .ebpf
            .map_mut("xsks")
            .ok_or_else(|| anyhow!("xskmap missing"))?;
        let mut x: XskMap<&mut MapData> = XskMap::try_from(m)?;
        x.set(queue, fd, 0)?;
        Ok(())
    }
}
