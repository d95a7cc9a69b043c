//! Rust mirror of `bpf/xlb.h`. Sizes are asserted at compile time; field order and
//! meaning must follow the header (keep in sync).

/// `struct xlb_endpoint`: a frontend or backend key, network byte order.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: [u8; 4],
    pub port: [u8; 2],
    pub proto: u8,
    pub pad: u8,
}

impl Endpoint {
    pub fn new(addr: [u8; 4], port: u16, proto: u8) -> Endpoint {
        Endpoint {
            addr,
            port: port.to_be_bytes(),
            proto,
            pad: 0,
        }
    }
}

/// `struct xlb_snat_range`, host byte order.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnatRange {
    pub first: u16,
    pub last: u16,
    /// `XLB_SNAT_ANY_SOURCE` for a masquerading address.
    pub flags: u32,
}

/// `XLB_SNAT_ANY_SOURCE`.
pub const SNAT_ANY_SOURCE: u32 = 1;
/// `struct xlb_iface`: one of lbd's interfaces as the program sees it.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Iface {
    /// Its position among lbd's interfaces (the XSKMAP row).
    pub slot: u32,
    /// `IFACE_INTERNAL` where masquerade sources arrive.
    pub flags: u32,
    /// Frames for the workers must be addressed to it.
    pub mac: [u8; 6],
    pub pad: [u8; 2],
}

/// `struct xlb_iface_cached`: a slot of the direct-mapped interface cache.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IfaceCached {
    /// The interface in this slot (0: none).
    pub ifindex: u32,
    pub iface: Iface,
}

/// `XLB_IFACE_CACHE`: slots of the interface cache (a power of two).
pub const IFACE_CACHE: u32 = 4096;

/// `XLB_IFACE_INTERNAL`: flag in `Iface::flags`.
pub const IFACE_INTERNAL: u32 = 1;

const _: () = assert!(core::mem::size_of::<Endpoint>() == 8);
const _: () = assert!(core::mem::size_of::<SnatRange>() == 8);
const _: () = assert!(core::mem::size_of::<Iface>() == 16);
const _: () = assert!(core::mem::size_of::<IfaceCached>() == 20);
const _: () = assert!(core::mem::offset_of!(Iface, mac) == 8);

/// `enum xlb_stat`: indices of the steering program's per-CPU counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Stat {
    Rx = 0,
    Frontend = 1,
    Reply = 2,
    NoXsk = 3,
    Pass = 4,
    NotIpv4 = 5,
    Malformed = 6,
    Ttl = 7,
    Fragment = 8,
    Masq = 9,
    MasqKeep = 10,
    MasqDrop = 11,
    IcmpError = 12,
    Martian = 13,
    ForeignMac = 14,
    Vlan = 15,
    Length = 16,
    Hairpin = 17,
    FragmentFollows = 18,
    FastPath = 19,
    FastPathStale = 20,
}

impl Stat {
    pub const ALL: [Stat; 21] = [
        Stat::Rx,
        Stat::Frontend,
        Stat::Reply,
        Stat::NoXsk,
        Stat::Pass,
        Stat::NotIpv4,
        Stat::Malformed,
        Stat::Ttl,
        Stat::Fragment,
        Stat::Masq,
        Stat::MasqKeep,
        Stat::MasqDrop,
        Stat::IcmpError,
        Stat::Martian,
        Stat::ForeignMac,
        Stat::Vlan,
        Stat::Length,
        Stat::Hairpin,
        Stat::FragmentFollows,
        Stat::FastPath,
        Stat::FastPathStale,
    ];
    pub const COUNT: u32 = 21;

    pub fn name(self) -> &'static str {
        match self {
            Stat::Rx => "rx",
            Stat::Frontend => "to_worker_frontend",
            Stat::Reply => "to_worker_reply",
            Stat::NoXsk => "no_xsk_dropped",
            Stat::Pass => "passed",
            Stat::NotIpv4 => "not_ipv4_passed",
            Stat::Malformed => "malformed_passed",
            Stat::Ttl => "ttl_passed",
            Stat::Fragment => "fragment_dropped",
            Stat::Masq => "to_worker_masquerade",
            Stat::MasqKeep => "to_worker_masquerade_kept",
            Stat::MasqDrop => "masquerade_untranslatable_dropped",
            Stat::IcmpError => "to_worker_icmp_error",
            Stat::Martian => "martian_source_dropped",
            Stat::ForeignMac => "foreign_mac_dropped",
            Stat::Vlan => "vlan_tagged_passed",
            Stat::Length => "length_mismatch_dropped",
            Stat::Hairpin => "to_worker_hairpin",
            Stat::FragmentFollows => "to_worker_fragment",
            Stat::FastPath => "fast_path",
            Stat::FastPathStale => "fast_path_stale_to_worker",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `enum xlb_stat` in xdp/bpf/xlb.h, as (UPPER_SNAKE name, number) pairs.
    fn c_stats() -> Vec<(String, u32)> {
        let h = include_str!("../bpf/xlb.h");
        let body = h
            .split("enum xlb_stat {")
            .nth(1)
            .and_then(|b| b.split("};").next())
            .expect("enum xlb_stat in xlb.h");
        body.lines()
            .filter_map(|l| {
                let (name, rest) = l.trim().strip_prefix("XLB_STAT_")?.split_once('=')?;
                let n = rest.trim().trim_end_matches(|c: char| !c.is_ascii_digit());
                let n = n.split(',').next()?.trim().parse().ok()?;
                Some((name.trim().to_string(), n))
            })
            .collect()
    }

    fn upper_snake(s: Stat) -> String {
        let mut out = String::new();
        for (i, c) in format!("{s:?}").chars().enumerate() {
            if c.is_ascii_uppercase() && i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_uppercase());
        }
        out
    }

    /// One list of XDP counters: the C enum and this one agree name for name and number
    /// for number, and the C side's XLB_STAT_MAX is the count.
    #[test]
    fn the_c_counter_list_is_this_one() {
        let c = c_stats();
        let mut rust: Vec<(String, u32)> = Stat::ALL
            .iter()
            .map(|&s| (upper_snake(s), s as u32))
            .collect();
        rust.push(("MAX".to_string(), Stat::COUNT));
        assert_eq!(c, rust);
        let mut names: Vec<&str> = Stat::ALL.iter().map(|s| s.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Stat::ALL.len(), "stat names are distinct");
    }
}
