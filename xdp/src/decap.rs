//! The DSR backend decapsulator (`xlb-decap`): `bpf/decap.bpf.c` on a backend's
//! interface strips the IPIP or GUE headers xlb's direct-server-return modes put around
//! a client's packet and passes the packet itself to the stack, which answers the
//! client from the VIP. A backend runs it instead of the kernel's ipip/fou modules (this
//! machine's kernel has neither, and many hosts do not load them).

use aya::maps::{HashMap, Map, MapData, MapError, MapInfo, PerCpuArray};
use aya::programs::{ProgramError, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use std::net::Ipv4Addr;

pub static DECAP_BPF: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/decap.bpf.o"));

/// The program's name, as the kernel lists it.
const PROGRAM: &str = "xlb_decap";

/// `enum decap_stat` in `bpf/decap.bpf.c`: the decapsulator's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum DecapStat {
    Rx = 0,
    Ipip = 1,
    Gue = 2,
    Pass = 3,
    Bad = 4,
}

impl DecapStat {
    pub const ALL: [DecapStat; 5] = [
        DecapStat::Rx,
        DecapStat::Ipip,
        DecapStat::Gue,
        DecapStat::Pass,
        DecapStat::Bad,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DecapStat::Rx => "rx",
            DecapStat::Ipip => "ipip_decapsulated",
            DecapStat::Gue => "gue_decapsulated",
            DecapStat::Pass => "passed",
            DecapStat::Bad => "unusable_dropped",
        }
    }
}

/// Counters by [`DecapStat`], summed over CPUs.
pub type DecapCounters = [u64; DecapStat::ALL.len()];

#[derive(Debug, thiserror::Error)]
pub enum DecapError {
    #[error("loading the decapsulator: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the decapsulator program: {0}")]
    Program(#[from] ProgramError),
    #[error("the decapsulator's maps: {0}")]
    Map(#[from] MapError),
    #[error("the decapsulator object lacks {0}")]
    Missing(&'static str),
    #[error("attaching to {iface}: {source}")]
    Attach { iface: String, source: ProgramError },
}

/// A decapsulator attached to an interface; dropping it detaches it.
pub struct Decap {
    ebpf: Ebpf,
    /// "native" or "generic" XDP.
    pub mode: &'static str,
}

impl Decap {
    /// Load the decapsulator for outer destinations `addrs` (GUE on UDP port
    /// `gue_port`; 0: IPIP only) and attach it to `iface`: native XDP, else generic.
    pub fn attach(iface: &str, addrs: &[Ipv4Addr], gue_port: u16) -> Result<Decap, DecapError> {
        let mut d = Decap::load(addrs, gue_port)?;
        d.mode = d.attach_to(iface)?;
        Ok(d)
    }

    /// Load the decapsulator (not attached: for [`Decap::test_run_frame`]).
    pub fn load(addrs: &[Ipv4Addr], gue_port: u16) -> Result<Decap, DecapError> {
        let mut ebpf = EbpfLoader::new()
            .override_global("gue_port", &gue_port, true)
            .load(DECAP_BPF)?;
        {
            let map = ebpf
                .map_mut("decap_addrs")
                .ok_or(DecapError::Missing("decap_addrs"))?;
            let mut m: HashMap<&mut MapData, [u8; 4], u8> = HashMap::try_from(map)?;
            for a in addrs {
                m.insert(a.octets(), 1, 0)?;
            }
        }
        program(&mut ebpf)?.load()?;
        Ok(Decap {
            ebpf,
            mode: "detached",
        })
    }

    fn attach_to(&mut self, iface: &str) -> Result<&'static str, DecapError> {
        let prog = program(&mut self.ebpf)?;
        let attach = |prog: &mut Xdp, mode| {
            prog.attach(iface, mode)
                .map_err(|source| DecapError::Attach {
                    iface: iface.to_string(),
                    source,
                })
        };
        Ok(match attach(prog, XdpMode::Driver) {
            Ok(_) => "native",
            Err(e) => {
                tracing::debug!(error = %e, "native XDP refused; generic mode");
                attach(prog, XdpMode::Skb)?;
                "generic"
            }
        })
    }

    /// Run the program once on `frame` (BPF_PROG_TEST_RUN): the XDP action and the
    /// frame as it left.
    pub fn test_run_frame(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>), DecapError> {
        Ok(crate::bpf::test_run_xdp(program(&mut self.ebpf)?, frame)?)
    }

    /// This decapsulator's counters.
    pub fn counters(&self) -> Result<DecapCounters, DecapError> {
        let map = self
            .ebpf
            .map("decap_stats")
            .ok_or(DecapError::Missing("decap_stats"))?;
        sum(&PerCpuArray::try_from(map)?)
    }
}

fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp, DecapError> {
    Ok(ebpf
        .program_mut(PROGRAM)
        .ok_or(DecapError::Missing(PROGRAM))?
        .try_into()?)
}

fn sum<T: std::borrow::Borrow<MapData>>(
    a: &PerCpuArray<T, u64>,
) -> Result<DecapCounters, DecapError> {
    let mut out = [0u64; DecapStat::ALL.len()];
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = a.get(&(i as u32), 0)?.iter().sum();
    }
    Ok(out)
}

/// The counters of every decapsulator loaded on this host (BPF programs belong to the
/// host, not to a network namespace), by program id: what `xlb-decap status` reports.
pub fn loaded() -> Result<Vec<(u32, DecapCounters)>, DecapError> {
    let mut out = Vec::new();
    for p in aya::programs::loaded_programs() {
        let p = p?;
        if p.name_as_str() != Some(PROGRAM) {
            continue;
        }
        for id in p.map_ids()?.unwrap_or_default() {
            if MapInfo::from_id(id)?.name_as_str() != Some("decap_stats") {
                continue;
            }
            let a: PerCpuArray<MapData, u64> =
                PerCpuArray::try_from(Map::PerCpuArray(MapData::from_id(id)?))?;
            out.push((p.id(), sum(&a)?));
        }
    }
    Ok(out)
}
