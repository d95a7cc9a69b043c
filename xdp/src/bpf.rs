//! Loading the steering program and keeping its maps in step with the service table.
//!
//! The program is compiled by build.rs and embedded. [`Steering`] owns the loaded object.
//! Without pinning, dropping it detaches the program (aya attaches through bpf_link, so
//! a crashed `lbd` also leaves no program behind). With a pin directory
//! ([`Steering::load`]), the links and the fast path's maps are pinned there: the
//! program and the flows it executes outlive lbd, and the next lbd takes them over
//! ([`Steering::take_over`]); [`unpin`] removes them.
//!
//! The steering maps change one entry at a time ([`Steering::put`], [`Steering::del`],
//! by [`Entry`], whose order is the order new entries go in); lbd orders the entries of a
//! change, publishes the workers' snapshot between removals and insertions, and undoes
//! it all on a failure (`control::txn`). [`Steering::held`] is what the maps hold.

use crate::abi::{
    Endpoint, Iface, IfaceCached, SnatRange, Stat, IFACE_CACHE, IFACE_INTERNAL, SNAT_ANY_SOURCE,
};
use crate::sys::{FpKey, FpValue};
use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, MapError, MapInfo, PerCpuArray, XskMap};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::XdpLink;
use aya::programs::{ProgramError, TestRun, TestRunOptions, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use lb::service::ServiceTable;
use std::collections::{BTreeMap, HashSet};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};

/// `XLB_MAX_QUEUES` in xlb.h.
pub const MAX_QUEUES: u32 = 64;
/// `XLB_MAX_IFACES` in xlb.h.
pub const MAX_IFACES: usize = 16;

/// The steering program's object file.
pub static XLB_BPF: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xlb.bpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("loading the XDP object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("XDP program {0}: {1}")]
    Program(&'static str, aya::programs::ProgramError),
    #[error("map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("{0} already has an XDP program attached (another lbd serving it?); `ip link show {0}` shows it")]
    Busy(String),
    #[error("attaching XDP to {iface}: {source} (native mode needs driver support; veth has it)")]
    Attach {
        iface: String,
        source: aya::programs::ProgramError,
    },
    #[error("steering entry {0}: a value of another map")]
    WrongValue(String),
    #[error("{path}: {why}")]
    Pin { path: PathBuf, why: String },
    #[error("map {map} rejected {key}: {source} (is the map full?)")]
    Insert {
        map: &'static str,
        key: String,
        source: aya::maps::MapError,
    },
}

/// `XLB_MAX_MASQ_KEEP` in xlb.h.
pub const MAX_MASQ_KEEP: usize = 65536;

/// A prefix as the LPM tries key it: (length, address).
pub type Prefix = (u8, [u8; 4]);

/// Why a destination is in `masq_skip` (the value; informational).
pub const SKIP_POLICY: u32 = 1;
pub const SKIP_NODE: u32 = 2;

/// What the maps must contain for a service table, SNAT and masquerading configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SteeringState {
    pub frontends: BTreeMap<Endpoint, u32>,
    pub vips: BTreeMap<[u8; 4], u32>,
    pub backends: BTreeMap<Endpoint, u32>,
    pub snat: BTreeMap<[u8; 4], SnatRange>,
    pub masq_src: BTreeMap<Prefix, u32>,
    pub masq_skip: BTreeMap<Prefix, u32>,
}

impl PartialOrd for Endpoint {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Endpoint {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.addr, self.port, self.proto).cmp(&(other.addr, other.port, other.proto))
    }
}

impl SteeringState {
    pub fn new(table: &ServiceTable, pool: &[lb::snapshot::NatAddr]) -> SteeringState {
        let mut s = SteeringState::default();
        for svc in table.services() {
            let f = svc.frontend;
            let proto = f.proto.number();
            s.frontends
                .insert(Endpoint::new(f.addr.octets(), f.port, proto), svc.id);
            *s.vips.entry(f.addr.octets()).or_default() += 1;
            for b in &svc.backends {
                *s.backends
                    .entry(Endpoint::new(b.addr.octets(), b.port, proto))
                    .or_default() += 1;
            }
        }
        for p in pool {
            s.snat.insert(
                p.addr,
                SnatRange {
                    first: p.ports.first,
                    last: p.ports.last,
                    flags: 0,
                },
            );
        }
        s
    }

    /// Add masquerading: the egress address takes replies from any source (it shares the
    /// NAT port range), the sources and the never-masqueraded destinations.
    pub fn with_masq(mut self, m: &nat::Masquerade, ports: nat::PortRange) -> SteeringState {
        for a in m.egress_pool() {
            let e = self.snat.entry(a.octets()).or_insert(SnatRange {
                first: ports.first,
                last: ports.last,
                flags: 0,
            });
            e.flags |= SNAT_ANY_SOURCE;
        }
        for c in &m.from {
            self.masq_src.insert((c.len(), c.addr().octets()), 1);
        }
        for (c, _) in m.policy.rules() {
            self.masq_skip
                .insert((c.len(), c.addr().octets()), SKIP_POLICY);
        }
        for (c, _) in m.node_rules() {
            self.masq_skip
                .insert((c.len(), c.addr().octets()), SKIP_NODE);
        }
        self
    }
}

/// One entry of the steering maps, by map and key. The order of the variants is the
/// order new entries go in during a change (replies before what opens flows: NAT ranges
/// and backends before frontends; kept destinations before masquerade sources); stale
/// entries go out in the reverse order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Entry {
    Snat([u8; 4]),
    Backend(Endpoint),
    Vip([u8; 4]),
    Frontend(Endpoint),
    MasqSkip(Prefix),
    MasqSrc(Prefix),
}

/// An entry's value: a reference count (or reason), or a NAT range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryValue {
    Count(u32),
    Snat(SnatRange),
}

impl SteeringState {
    /// Every entry the maps must hold.
    pub fn entries(&self) -> BTreeMap<Entry, EntryValue> {
        let mut m = BTreeMap::new();
        let c = EntryValue::Count;
        m.extend(
            self.snat
                .iter()
                .map(|(k, v)| (Entry::Snat(*k), EntryValue::Snat(*v))),
        );
        m.extend(
            self.backends
                .iter()
                .map(|(k, v)| (Entry::Backend(*k), c(*v))),
        );
        m.extend(self.vips.iter().map(|(k, v)| (Entry::Vip(*k), c(*v))));
        m.extend(
            self.frontends
                .iter()
                .map(|(k, v)| (Entry::Frontend(*k), c(*v))),
        );
        m.extend(
            self.masq_skip
                .iter()
                .map(|(k, v)| (Entry::MasqSkip(*k), c(*v))),
        );
        m.extend(
            self.masq_src
                .iter()
                .map(|(k, v)| (Entry::MasqSrc(*k), c(*v))),
        );
        m
    }
}

fn lpm(p: &Prefix) -> LpmKey<[u8; 4]> {
    LpmKey::new(u32::from(p.0), p.1)
}

pub struct Steering {
    ebpf: Ebpf,
    frontends: HashMap<MapData, Endpoint, u32>,
    vips: HashMap<MapData, [u8; 4], u32>,
    backends: HashMap<MapData, Endpoint, u32>,
    snat: HashMap<MapData, [u8; 4], SnatRange>,
    xsks: XskMap<MapData>,
    iface_slots: HashMap<MapData, u32, Iface>,
    iface_cache: Array<MapData, IfaceCached>,
    masq_src: LpmTrie<MapData, [u8; 4], u32>,
    masq_skip: LpmTrie<MapData, [u8; 4], u32>,
    masq_keep: HashMap<MapData, FpKey, u32>,
    kept: HashSet<flowrec::FlowKey>,
    stats: PerCpuArray<MapData, u64>,
    fp_flows: MapData,
    fp_generation: Array<MapData, u64>,
    fp_clock: Array<MapData, u64>,
    /// What the steering maps hold.
    held: BTreeMap<Entry, EntryValue>,
    attached: Vec<(String, &'static str)>,
    /// Where the program's links and the fast path's maps are pinned (`lbd --pin-dir`).
    pins: Option<PathBuf>,
    /// Our handles on the pinned links (the pins keep them attached without us).
    links: Vec<PinnedLink>,
}

/// The maps whose contents outlive lbd when pinned, with the layout they must have to be
/// taken over: (name, key size, value size, entries). The fast path's: its flows, the
/// generation they were resolved under, and its clock.
const PINNED_MAPS: [(&str, usize, usize, u32); 3] = [
    (
        "fp_flows",
        std::mem::size_of::<flowrec::FlowKey>(),
        std::mem::size_of::<flowrec::FlowEntry>(),
        flowrec::limits::FAST_PATH_ENTRIES,
    ),
    ("fp_generation", 4, 8, 1),
    ("fp_clock", 4, 8, 1),
];

/// What a previous lbd left in the pinned fast-path maps: the generation its entries
/// execute under and the entries.
#[derive(Debug, Default)]
pub struct Inheritance {
    pub generation: u64,
    pub entries: Vec<(flowrec::FlowKey, flowrec::FlowEntry)>,
}

fn pin_error(path: &Path, why: impl std::fmt::Display) -> BpfError {
    BpfError::Pin {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

/// Is `dir` on a BPF file system (what pinning needs)? From /proc/self/mountinfo: the
/// file system of the longest mount point above it.
pub fn on_bpffs(dir: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let mut best: Option<(usize, bool)> = None;
    for line in info.lines() {
        let mut halves = line.splitn(2, " - ");
        let (Some(left), Some(right)) = (halves.next(), halves.next()) else {
            continue;
        };
        let Some(point) = left.split(' ').nth(4) else {
            continue;
        };
        let fstype = right.split(' ').next().unwrap_or("");
        if dir.starts_with(point) && best.is_none_or(|(len, _)| point.len() >= len) {
            best = Some((point.len(), fstype == "bpf"));
        }
    }
    best.is_some_and(|(_, bpf)| bpf)
}

/// Remove what lbd pinned in `dir` (its program links and the fast path's maps): the
/// program leaves the interfaces, and the flows the fast path kept end. The paths removed.
pub fn unpin(dir: &Path) -> Result<Vec<PathBuf>, BpfError> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(pin_error(dir, e)),
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let ours = name.starts_with("link_") || PINNED_MAPS.iter().any(|(m, ..)| *m == name);
        if ours {
            std::fs::remove_file(e.path()).map_err(|err| pin_error(&e.path(), err))?;
            removed.push(e.path());
        }
    }
    Ok(removed)
}

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering")
            .field("attached", &self.attached)
            .finish()
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, BpfError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf.take_map(name).ok_or(BpfError::MissingMap(name))?;
    T::try_from(m).map_err(|source| BpfError::Map { map: name, source })
}

/// The OS error code somewhere in `e`'s chain of causes.
fn os_error(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(code) = err
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
        {
            return Some(code);
        }
        cur = err.source();
    }
    None
}

fn program(ebpf: &mut Ebpf) -> Result<&mut Xdp, BpfError> {
    let p = ebpf.program_mut("xlb_steer").ok_or(BpfError::Program(
        "xlb_steer",
        aya::programs::ProgramError::NotLoaded,
    ))?;
    p.try_into().map_err(|e| BpfError::Program("xlb_steer", e))
}

impl Steering {
    /// Load and verify the program; attach nothing yet. With `pins`, the fast path's maps
    /// are pinned there: taken over when a previous lbd left them (with the layout this
    /// lbd's has), and what they hold is returned, for its workers to adopt.
    pub fn load(pins: Option<&Path>) -> Result<(Steering, Option<Inheritance>), BpfError> {
        let mut loader = EbpfLoader::new();
        let mut inherited = false;
        if let Some(dir) = pins {
            std::fs::create_dir_all(dir).map_err(|e| pin_error(dir, e))?;
            for (name, key, value, max) in PINNED_MAPS {
                let path = dir.join(name);
                if path.exists() {
                    let fits = MapInfo::from_pin(&path).is_ok_and(|i| {
                        (
                            i.key_size() as usize,
                            i.value_size() as usize,
                            i.max_entries(),
                        ) == (key, value, max)
                    });
                    if fits {
                        inherited |= name == "fp_flows";
                    } else {
                        tracing::warn!(path = %path.display(), "a pinned map with another layout (an older xlb?) is replaced: the flows it held are not adopted");
                        std::fs::remove_file(&path).map_err(|e| pin_error(&path, e))?;
                    }
                }
                loader.map_pin_path(name, path);
            }
        }
        let mut ebpf = loader.load(XLB_BPF)?;
        program(&mut ebpf)?
            .load()
            .map_err(|e| BpfError::Program("xlb_steer", e))?;
        let steering = Steering {
            frontends: take(&mut ebpf, "frontends")?,
            vips: take(&mut ebpf, "vips")?,
            backends: take(&mut ebpf, "backends")?,
            snat: take(&mut ebpf, "snat_addrs")?,
            xsks: take(&mut ebpf, "xsks")?,
            iface_slots: take(&mut ebpf, "iface_slots")?,
            iface_cache: take(&mut ebpf, "iface_cache")?,
            masq_src: take(&mut ebpf, "masq_src")?,
            masq_skip: take(&mut ebpf, "masq_skip")?,
            masq_keep: take(&mut ebpf, "masq_keep")?,
            kept: HashSet::new(),
            stats: take(&mut ebpf, "stats")?,
            fp_flows: match ebpf.take_map("fp_flows") {
                Some(Map::HashMap(m)) => m,
                _ => return Err(BpfError::MissingMap("fp_flows")),
            },
            fp_generation: take(&mut ebpf, "fp_generation")?,
            fp_clock: take(&mut ebpf, "fp_clock")?,
            ebpf,
            held: BTreeMap::new(),
            attached: Vec::new(),
            pins: pins.map(Path::to_path_buf),
            links: Vec::new(),
        };
        let inheritance = match inherited {
            false => None,
            true => Some(Inheritance {
                generation: steering.fp_generation.get(&0, 0).unwrap_or(0),
                entries: steering.fast_path_map()?.entries(),
            }),
        };
        Ok((steering, inheritance))
    }

    fn link_pin(&self, iface: &str) -> Option<PathBuf> {
        self.pins.as_ref().map(|d| d.join(format!("link_{iface}")))
    }

    /// Unpin the links a previous lbd left on interfaces this one does not serve: its
    /// program leaves them (it would otherwise steer there for ever, unserved). The
    /// interfaces unpinned.
    pub fn unpin_links_except(&mut self, ifaces: &[String]) -> Result<Vec<String>, BpfError> {
        let Some(dir) = self.pins.clone() else {
            return Ok(Vec::new());
        };
        let mut gone = Vec::new();
        let entries = std::fs::read_dir(&dir).map_err(|e| pin_error(&dir, e))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(iface) = name.strip_prefix("link_") else {
                continue;
            };
            if !ifaces.iter().any(|i| i == iface) {
                std::fs::remove_file(e.path()).map_err(|err| pin_error(&e.path(), err))?;
                gone.push(iface.to_string());
            }
        }
        Ok(gone)
    }

    /// A previous lbd's program is attached to `iface` through a pinned link (see
    /// [`Steering::take_over`]).
    pub fn has_pinned_link(&self, iface: &str) -> bool {
        self.link_pin(iface).is_some_and(|p| p.exists())
    }

    /// Put this program in place of the previous lbd's on `iface`, atomically (the
    /// pinned link's program is replaced: no packet meets no program). A link that no
    /// longer works (its interface was replaced) is unpinned and the program attached
    /// anew.
    pub fn take_over(&mut self, iface: &str) -> Result<&'static str, BpfError> {
        let Some(path) = self.link_pin(iface) else {
            return self.attach(iface);
        };
        let swapped = PinnedLink::from_pin(&path)
            .map_err(|e| e.to_string())
            .and_then(|p| XdpLink::try_from(FdLink::from(p)).map_err(|e| e.to_string()))
            .and_then(|link| {
                program(&mut self.ebpf)
                    .map_err(|e| e.to_string())?
                    .attach_to_link(link)
                    .map_err(|e| e.to_string())
            });
        match swapped {
            Ok(_) => {
                self.attached.push((iface.to_string(), "taken over"));
                Ok("taken over")
            }
            Err(why) => {
                tracing::warn!(iface, %why, "the pinned XDP link cannot be taken over; attaching anew");
                std::fs::remove_file(&path).map_err(|e| pin_error(&path, e))?;
                self.attach(iface)
            }
        }
    }

    /// Attach to `iface` in native (driver) mode, falling back to generic mode with a
    /// warning. Returns the mode used.
    pub fn attach(&mut self, iface: &str) -> Result<&'static str, BpfError> {
        let pin = self.link_pin(iface);
        let prog = program(&mut self.ebpf)?;
        let (mode, id) = match prog.attach(iface, XdpMode::Driver) {
            Ok(id) => ("native", id),
            // Another program (another lbd) holds the interface: generic mode would fail
            // the same way, so say what is wrong instead of "falling back".
            Err(e) if os_error(&e).is_some_and(|c| c == libc::EBUSY || c == libc::EEXIST) => {
                return Err(BpfError::Busy(iface.to_string()));
            }
            Err(e) => {
                tracing::warn!(iface, error = %e, "native XDP attach failed; falling back to generic (slow) mode");
                let id = prog
                    .attach(iface, XdpMode::Skb)
                    .map_err(|source| BpfError::Attach {
                        iface: iface.to_string(),
                        source,
                    })?;
                ("generic", id)
            }
        };
        // Pinned, the link outlives lbd: the program keeps forwarding the fast path's
        // flows while lbd is down, and the next lbd takes it over.
        if let Some(path) = pin {
            let link = prog
                .take_link(id)
                .map_err(|e| BpfError::Program("xlb_steer", e))?;
            let pinned = FdLink::try_from(link)
                .map_err(|e| {
                    pin_error(
                        &path,
                        format!("{e} (the kernel attached XDP without a bpf_link)"),
                    )
                })?
                .pin(&path)
                .map_err(|e| pin_error(&path, e))?;
            self.links.push(pinned);
        }
        self.attached.push((iface.to_string(), mode));
        Ok(mode)
    }

    pub fn attached(&self) -> &[(String, &'static str)] {
        &self.attached
    }

    /// Number the interface `ifindex` as `slot` (its position in lbd's interface list);
    /// `internal`: masquerade sources arrive on it; `mac`: its address (frames for the
    /// workers must be sent to it).
    pub fn set_iface_slot(
        &mut self,
        ifindex: u32,
        slot: u32,
        internal: bool,
        mac: [u8; 6],
    ) -> Result<(), BpfError> {
        let v = Iface {
            slot,
            flags: if internal { IFACE_INTERNAL } else { 0 },
            mac,
            pad: [0; 2],
        };
        self.iface_slots
            .insert(ifindex, v, 0)
            .map_err(|source| BpfError::Insert {
                map: "iface_slots",
                key: format!("ifindex {ifindex}"),
                source,
            })?;
        // Also in its cache slot, unless another interface holds it (the program then
        // finds this one in iface_slots).
        let at = ifindex & (IFACE_CACHE - 1);
        let held = self.iface_cache.get(&at, 0).map(|c| c.ifindex).unwrap_or(0);
        if held == 0 || held == ifindex {
            let c = IfaceCached { ifindex, iface: v };
            self.iface_cache
                .set(at, c, 0)
                .map_err(|source| BpfError::Insert {
                    map: "iface_cache",
                    key: format!("slot {at}"),
                    source,
                })?;
        }
        Ok(())
    }

    /// Register the AF_XDP socket `fd` for rx queue `queue` of the interface in `slot`.
    pub fn set_xsk(&mut self, slot: u32, queue: u32, fd: RawFd) -> Result<(), BpfError> {
        let key = slot * MAX_QUEUES + queue;
        self.xsks
            .set(key, fd, 0)
            .map_err(|source| BpfError::Insert {
                map: "xsks",
                key: format!("slot {slot} queue {queue}"),
                source,
            })
    }

    /// What the steering maps hold (every change goes from here: see control::txn).
    pub fn held(&self) -> &BTreeMap<Entry, EntryValue> {
        &self.held
    }

    /// Record what the maps hold after a change (what the transaction reports).
    pub fn set_held(&mut self, held: BTreeMap<Entry, EntryValue>) {
        self.held = held;
    }

    /// Insert or replace one entry (one map update).
    pub fn put(&mut self, e: &Entry, v: &EntryValue) -> Result<(), BpfError> {
        let (map, r) = match (e, v) {
            (Entry::Snat(k), EntryValue::Snat(r)) => ("snat_addrs", self.snat.insert(k, r, 0)),
            (Entry::Backend(k), EntryValue::Count(n)) => {
                ("backends", self.backends.insert(k, n, 0))
            }
            (Entry::Vip(k), EntryValue::Count(n)) => ("vips", self.vips.insert(k, n, 0)),
            (Entry::Frontend(k), EntryValue::Count(n)) => {
                ("frontends", self.frontends.insert(k, n, 0))
            }
            (Entry::MasqSkip(p), EntryValue::Count(n)) => {
                ("masq_skip", self.masq_skip.insert(&lpm(p), n, 0))
            }
            (Entry::MasqSrc(p), EntryValue::Count(n)) => {
                ("masq_src", self.masq_src.insert(&lpm(p), n, 0))
            }
            _ => return Err(BpfError::WrongValue(format!("{e:?}: {v:?}"))),
        };
        r.map_err(|source| BpfError::Insert {
            map,
            key: format!("{e:?}"),
            source,
        })
    }

    /// Remove one entry (one map update).
    pub fn del(&mut self, e: &Entry) -> Result<(), BpfError> {
        let (map, r) = match e {
            Entry::Snat(k) => ("snat_addrs", self.snat.remove(k)),
            Entry::Backend(k) => ("backends", self.backends.remove(k)),
            Entry::Vip(k) => ("vips", self.vips.remove(k)),
            Entry::Frontend(k) => ("frontends", self.frontends.remove(k)),
            Entry::MasqSkip(p) => ("masq_skip", self.masq_skip.remove(&lpm(p))),
            Entry::MasqSrc(p) => ("masq_src", self.masq_src.remove(&lpm(p))),
        };
        r.map_err(|source| BpfError::Map { map, source })
    }

    /// Make the maps hold `next`, without a transaction (start-up, tests): removals, then
    /// insertions, each recorded as it is done; the first failure stops it.
    pub fn sync(&mut self, next: &SteeringState) -> Result<(), BpfError> {
        let next = next.entries();
        let stale: Vec<Entry> = self
            .held
            .keys()
            .rev()
            .filter(|k| !next.contains_key(*k))
            .copied()
            .collect();
        for k in stale {
            self.del(&k)?;
            self.held.remove(&k);
        }
        for (k, v) in &next {
            if self.held.get(k) != Some(v) {
                self.put(k, v)?;
                self.held.insert(*k, *v);
            }
        }
        Ok(())
    }

    /// Steer the 5-tuple `k` (a masqueraded flow's forward key) to the workers even if
    /// the policy now keeps its destination's source.
    pub fn keep(&mut self, k: &lb::flow::FlowKey) -> Result<(), BpfError> {
        let key = flowrec::FlowKey::v4(k.src, k.dst, k.sport, k.dport, k.proto);
        if self.kept.contains(&key) {
            return Ok(());
        }
        self.masq_keep
            .insert(FpKey(key), 1, 0)
            .map_err(|source| BpfError::Insert {
                map: "masq_keep",
                key: format!("{k:?}"),
                source,
            })?;
        self.kept.insert(key);
        Ok(())
    }

    /// The flow of `k` has ended: stop steering its 5-tuple.
    pub fn unkeep(&mut self, k: &lb::flow::FlowKey) {
        let key = flowrec::FlowKey::v4(k.src, k.dst, k.sport, k.dport, k.proto);
        if self.kept.remove(&key) {
            let _ = self.masq_keep.remove(&FpKey(key));
        }
    }

    /// Entries in the keep map.
    pub fn kept(&self) -> usize {
        self.kept.len()
    }

    /// The program's counters, summed over CPUs, indexed by [`Stat`].
    pub fn stats(&self) -> [u64; Stat::COUNT as usize] {
        let mut out = [0u64; Stat::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(v) = self.stats.get(&(i as u32), 0) {
                *slot = v.iter().sum();
            }
        }
        out
    }

    /// A handle on the fast-path flow map for one worker (its own file descriptor).
    pub fn fast_path_map(&self) -> Result<FastPathMap, BpfError> {
        let err = |source| BpfError::Map {
            map: "fp_flows",
            source,
        };
        let fd = std::os::fd::AsFd::as_fd(self.fp_flows.fd())
            .try_clone_to_owned()
            .map_err(|e| {
                err(MapError::SyscallError(aya::sys::SyscallError {
                    call: "dup",
                    io_error: e,
                }))
            })?;
        let data = MapData::from_fd(fd).map_err(err)?;
        HashMap::try_from(Map::HashMap(data))
            .map(FastPathMap)
            .map_err(err)
    }

    /// Make `generation` the only one whose fast-path entries execute (before workers
    /// get that snapshot: entries resolved under an older one stop at once).
    pub fn set_fast_path_generation(&mut self, generation: u64) -> Result<(), BpfError> {
        self.fp_generation
            .set(0, generation, 0)
            .map_err(|source| BpfError::Map {
                map: "fp_generation",
                source,
            })
    }

    /// Stamp the fast path's clock (`fp_clock`, what it stamps entries' last_seen with)
    /// with `now`, CLOCK_MONOTONIC in ns ([`crate::sys::monotonic_ns`]).
    pub fn set_fast_path_clock(&mut self, now: u64) -> Result<(), BpfError> {
        self.fp_clock
            .set(0, now, 0)
            .map_err(|source| BpfError::Map {
                map: "fp_clock",
                source,
            })
    }

    /// Run the program once on `frame` (BPF_PROG_TEST_RUN); the XDP action and the frame
    /// as the program left it.
    pub fn test_run_frame(&mut self, frame: &[u8]) -> Result<(u32, Vec<u8>), BpfError> {
        test_run_xdp(program(&mut self.ebpf)?, frame).map_err(|e| BpfError::Program("xlb_steer", e))
    }

    /// Run the program once on `frame` (BPF_PROG_TEST_RUN); returns the XDP action.
    pub fn test_run(&mut self, frame: &[u8]) -> Result<u32, BpfError> {
        self.test_run_frame(frame).map(|(ret, _)| ret)
    }
}

/// Run an XDP program once on `frame` (BPF_PROG_TEST_RUN, room for the frame to grow
/// by 256 bytes): its action and the frame as it left.
pub fn test_run_xdp(prog: &mut Xdp, frame: &[u8]) -> Result<(u32, Vec<u8>), ProgramError> {
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ..TestRunOptions::new()
    };
    let r = prog.test_run(opts)?;
    out.truncate(r.data_size_out as usize);
    Ok((r.return_value, out))
}

/// A worker's handle on the fast-path flow map (`fp_flows`, see `flowrec`).
pub struct FastPathMap(HashMap<MapData, FpKey, FpValue>);

impl std::fmt::Debug for FastPathMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FastPathMap")
    }
}

impl FastPathMap {
    /// Install one flow direction, or replace its entry; true when it was not there (one
    /// syscall for a new entry, three for a replacement, which keeps the packets and
    /// bytes the entry had counted).
    pub fn install(
        &mut self,
        key: &flowrec::FlowKey,
        entry: &flowrec::FlowEntry,
    ) -> Result<bool, MapError> {
        const BPF_NOEXIST: u64 = 1;
        match self.0.insert(FpKey(*key), FpValue(*entry), BPF_NOEXIST) {
            Ok(()) => Ok(true),
            Err(_) => {
                let mut e = *entry;
                if let Some(old) = self.get(key) {
                    e.packets = old.packets;
                    e.bytes = old.bytes;
                }
                self.0.insert(FpKey(*key), FpValue(e), 0).map(|()| false)
            }
        }
    }

    /// Remove one flow direction; false if it was not there.
    pub fn remove(&mut self, key: &flowrec::FlowKey) -> bool {
        self.0.remove(&FpKey(*key)).is_ok()
    }

    /// Every entry (an operator's or a start-up's walk of the map, one lookup each).
    pub fn entries(&self) -> Vec<(flowrec::FlowKey, flowrec::FlowEntry)> {
        self.0
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k.0, v.0))
            .collect()
    }

    /// The entry of a flow direction, as the executor left it.
    pub fn get(&self, key: &flowrec::FlowKey) -> Option<flowrec::FlowEntry> {
        self.0.get(&FpKey(*key), 0).ok().map(|v| v.0)
    }
}
