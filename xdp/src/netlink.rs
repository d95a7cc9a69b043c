//! The kernel's view of interfaces, routes and neighbours, over rtnetlink.
//!
//! xlb never takes next hops from configuration: [`dump`] reads the served interfaces
//! (index, MAC, primary IPv4), the main IPv4 routing table and the neighbour table, and
//! builds the [`NetView`] the workers resolve next hops in. [`resolve`] asks the kernel to
//! resolve a neighbour it does not know yet (RTM_NEWNEIGH with NTF_USE creates the entry
//! and starts ARP, the way Cilium triggers resolution); the next dump shows the answer.
//! Runs on the control thread only; allocation here is fine.

use lb::netview::{IfaceInfo, NeighbourEntry, NetView, Route};
use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, Nla, NlasIterator, Parseable, ParseableParametrized,
};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{
    protocols::{NETLINK_GENERIC, NETLINK_ROUTE},
    Socket, SocketAddr,
};
use std::net::{IpAddr, Ipv4Addr};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("netlink reply could not be decoded: {0}")]
    Decode(String),
    #[error("interface {0:?} does not exist")]
    NoSuchInterface(String),
    #[error("interface {0:?} has no MAC address (xlb needs an Ethernet device)")]
    NoMac(String),
}

const RT_TABLE_MAIN: u32 = 254;

pub struct Netlink {
    sock: Socket,
    seq: u32,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Netlink")
    }
}

impl Netlink {
    pub fn open() -> Result<Netlink, NetlinkError> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Netlink { sock, seq: 1 })
    }

    /// Send one request and collect its replies until DONE (dumps) or the ACK.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        req.finalize();
        let mut buf = vec![0u8; req.buffer_len()];
        req.serialize(&mut buf);
        self.sock.send(&buf, 0)?;
        let mut out = Vec::new();
        loop {
            let (data, _) = self.sock.recv_from_full()?;
            let mut off = 0;
            while off < data.len() {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[off..])
                    .map_err(|e| NetlinkError::Decode(e.to_string()))?;
                let len = msg.header.length as usize;
                if msg.header.sequence_number == self.seq {
                    match msg.payload {
                        NetlinkPayload::Done(_) => return Ok(out),
                        NetlinkPayload::Error(e) => {
                            return match e.code {
                                None => Ok(out),
                                Some(_) => Err(NetlinkError::Io(e.to_io())),
                            }
                        }
                        NetlinkPayload::InnerMessage(m) => {
                            out.push(m);
                            if flags & NLM_F_DUMP != NLM_F_DUMP && flags & NLM_F_ACK == 0 {
                                return Ok(out);
                            }
                        }
                        _ => {}
                    }
                }
                if len == 0 {
                    break;
                }
                off += len;
            }
        }
    }

    /// Index, MAC and primary IPv4 address of `name`.
    pub fn iface(&mut self, name: &str) -> Result<IfaceInfo, NetlinkError> {
        let links = self.request(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_REQUEST | NLM_F_DUMP,
        )?;
        let link = links
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .find(|l| {
                l.attributes
                    .iter()
                    .any(|a| matches!(a, LinkAttribute::IfName(n) if n == name))
            })
            .ok_or_else(|| NetlinkError::NoSuchInterface(name.to_string()))?;
        let mac = link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(m) if m.len() == 6 => {
                    Some([m[0], m[1], m[2], m[3], m[4], m[5]])
                }
                _ => None,
            })
            .ok_or_else(|| NetlinkError::NoMac(name.to_string()))?;
        let ifindex = link.header.index;
        let addr = self.ipv4_addrs(Some(ifindex))?.into_iter().next();
        // IPv4 packets are at most 65535 bytes whatever the link takes.
        let mtu = link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some((*m).min(u32::from(u16::MAX)) as u16),
                _ => None,
            })
            .unwrap_or(1500);
        // Unknown (a kernel before 6.3 does not report it) counts as taking redirects:
        // not checked there (docs/operations.md).
        let redirect = xdp_features(ifindex)
            .ok()
            .flatten()
            .is_none_or(|f| f & XDP_ACT_NDO_XMIT != 0);
        Ok(IfaceInfo {
            ifindex,
            name: name.to_string(),
            mac,
            addr: addr.map(|a| a.octets()),
            mtu,
            redirect,
        })
    }

    /// IPv4 addresses of interface `ifindex` (primary first), or of every interface.
    pub fn ipv4_addrs(&mut self, ifindex: Option<u32>) -> Result<Vec<Ipv4Addr>, NetlinkError> {
        let mut m = AddressMessage::default();
        m.header.family = AddressFamily::Inet;
        let addrs = self.request(
            RouteNetlinkMessage::GetAddress(m),
            NLM_F_REQUEST | NLM_F_DUMP,
        )?;
        Ok(addrs
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a)
                    if ifindex.is_none_or(|i| a.header.index == i) =>
                {
                    Some(a)
                }
                _ => None,
            })
            .filter_map(|a| {
                a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Local(IpAddr::V4(v))
                    | AddressAttribute::Address(IpAddr::V4(v)) => Some(*v),
                    _ => None,
                })
            })
            .collect())
    }

    /// Unicast IPv4 routes of the main table.
    pub fn routes(&mut self) -> Result<Vec<Route>, NetlinkError> {
        let mut m = RouteMessage::default();
        m.header.address_family = AddressFamily::Inet;
        let msgs = self.request(RouteNetlinkMessage::GetRoute(m), NLM_F_REQUEST | NLM_F_DUMP)?;
        let mut out = Vec::new();
        for msg in msgs {
            let RouteNetlinkMessage::NewRoute(r) = msg else {
                continue;
            };
            if r.header.kind != RouteType::Unicast {
                continue;
            }
            let mut table = u32::from(r.header.table);
            let (mut dst, mut oif, mut gw) = ([0u8; 4], None, None);
            for a in &r.attributes {
                match a {
                    RouteAttribute::Table(t) => table = *t,
                    RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = d.octets(),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(g.octets()),
                    _ => {}
                }
            }
            if table != RT_TABLE_MAIN {
                continue;
            }
            if let Some(ifindex) = oif {
                out.push(Route {
                    dst,
                    prefix_len: r.header.destination_prefix_length,
                    ifindex,
                    gateway: gw,
                });
            }
        }
        Ok(out)
    }

    /// Resolved IPv4 neighbours: (ifindex, address, MAC).
    pub fn neighbours(&mut self) -> Result<Vec<NeighbourEntry>, NetlinkError> {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet;
        let msgs = self.request(
            RouteNetlinkMessage::GetNeighbour(m),
            NLM_F_REQUEST | NLM_F_DUMP,
        )?;
        let mut out = Vec::new();
        for msg in msgs {
            let RouteNetlinkMessage::NewNeighbour(n) = msg else {
                continue;
            };
            // Any state with a valid link-layer address (RFC 4861 §7.3.2 states; STALE
            // is still correct to send to: the kernel re-verifies it on its own use).
            if matches!(
                n.header.state,
                NeighbourState::Incomplete | NeighbourState::Failed | NeighbourState::None
            ) {
                continue;
            }
            let (mut ip, mut mac) = (None, None);
            for a in &n.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => {
                        ip = Some(v.octets())
                    }
                    NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                        mac = Some([l[0], l[1], l[2], l[3], l[4], l[5]])
                    }
                    _ => {}
                }
            }
            if let (Some(ip), Some(mac)) = (ip, mac) {
                out.push((n.header.ifindex, ip, mac));
            }
        }
        Ok(out)
    }

    /// Ask the kernel to resolve `addr` on `ifindex` (ARP); the answer shows in a later
    /// [`Netlink::neighbours`] dump.
    pub fn resolve(&mut self, ifindex: u32, addr: [u8; 4]) -> Result<(), NetlinkError> {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.ifindex = ifindex;
        m.header.state = NeighbourState::None;
        m.header.flags = NeighbourFlags::Use;
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                Ipv4Addr::from(addr),
            )));
        self.request(
            RouteNetlinkMessage::NewNeighbour(m),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )?;
        Ok(())
    }

    /// The whole view for the served interfaces `ifaces`.
    pub fn dump(&mut self, ifaces: &[String]) -> Result<NetView, NetlinkError> {
        let infos = ifaces
            .iter()
            .map(|n| self.iface(n))
            .collect::<Result<Vec<_>, _>>()?;
        let routes = self.routes()?;
        let neigh = self.neighbours()?;
        Ok(NetView::new(infos, routes, neigh))
    }
}

/// The host's ephemeral port range (net.ipv4.ip_local_port_range): SNAT ports on a host
/// address must not overlap it, or the host's own connections would be steered to us.
pub fn local_port_range() -> Option<(u16, u16)> {
    let s = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = s.split_whitespace().filter_map(|x| x.parse().ok());
    Some((it.next()?, it.next()?))
}

/// `NETDEV_XDP_ACT_NDO_XMIT` (include/uapi/linux/netdev.h): the device takes frames other
/// devices' XDP programs redirect to it. A veth has it only while its peer runs an XDP
/// program or has GRO on (kernel commit 8267fc71, "veth: take into account peer device
/// for NETDEV_XDP_ACT_NDO_XMIT"); without it a redirect into the device is dropped
/// silently.
pub const XDP_ACT_NDO_XMIT: u64 = 1 << 2;
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;

/// A message of the kernel's `netdev` generic netlink family: `DEV_GET` by interface
/// index, answered with the device's attributes.
#[derive(Debug, Clone)]
struct NetdevDev {
    cmd: u8,
    nlas: Vec<DefaultNla>,
}

impl GenlFamily for NetdevDev {
    fn family_name() -> &'static str {
        "netdev"
    }

    fn command(&self) -> u8 {
        self.cmd
    }

    fn version(&self) -> u8 {
        1
    }
}

impl Emitable for NetdevDev {
    fn emit(&self, buffer: &mut [u8]) {
        self.nlas.as_slice().emit(buffer)
    }

    fn buffer_len(&self) -> usize {
        self.nlas.as_slice().buffer_len()
    }
}

impl ParseableParametrized<[u8], GenlHeader> for NetdevDev {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let nlas = NlasIterator::new(buf)
            .map(|nla| nla.and_then(|n| DefaultNla::parse(&n)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(NetdevDev {
            cmd: header.cmd,
            nlas,
        })
    }
}

/// One generic netlink request on `sock` and its answer; `Ok(None)` when the kernel
/// answers with an error (the family or the device is unknown).
fn genl_request<F>(
    sock: &mut Socket,
    payload: GenlMessage<F>,
) -> Result<Option<GenlMessage<F>>, NetlinkError>
where
    F: GenlFamily + Emitable + ParseableParametrized<[u8], GenlHeader> + std::fmt::Debug,
{
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    header.sequence_number = 1;
    let mut req = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
    req.finalize();
    let mut buf = vec![0u8; req.buffer_len()];
    req.serialize(&mut buf);
    sock.send(&buf, 0)?;
    let (data, _) = sock.recv_from_full()?;
    let msg = NetlinkMessage::<GenlMessage<F>>::deserialize(&data)
        .map_err(|e| NetlinkError::Decode(e.to_string()))?;
    Ok(match msg.payload {
        NetlinkPayload::InnerMessage(m) => Some(m),
        _ => None,
    })
}

/// The XDP features of interface `ifindex` (`NETDEV_XDP_ACT_*` bits), from the kernel's
/// `netdev` generic netlink family; `None` on kernels without it (before 6.3).
pub fn xdp_features(ifindex: u32) -> Result<Option<u64>, NetlinkError> {
    let mut sock = Socket::new(NETLINK_GENERIC)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    let get_family = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(NetdevDev::family_name().into())],
    });
    let Some(family) = genl_request(&mut sock, get_family)? else {
        return Ok(None);
    };
    let Some(id) = family.payload.nlas.iter().find_map(|a| match a {
        GenlCtrlAttrs::FamilyId(id) => Some(*id),
        _ => None,
    }) else {
        return Ok(None);
    };
    let mut get = GenlMessage::from_payload(NetdevDev {
        cmd: NETDEV_CMD_DEV_GET,
        nlas: vec![DefaultNla::new(
            NETDEV_A_DEV_IFINDEX,
            ifindex.to_ne_bytes().to_vec(),
        )],
    });
    get.set_resolved_family_id(id);
    let Some(dev) = genl_request(&mut sock, get)? else {
        return Ok(None);
    };
    Ok(dev.payload.nlas.iter().find_map(|a| {
        if a.kind() != NETDEV_A_DEV_XDP_FEATURES || a.value_len() != 8 {
            return None;
        }
        let mut v = [0u8; 8];
        a.emit_value(&mut v);
        Some(u64::from_ne_bytes(v))
    }))
}
