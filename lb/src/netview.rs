//! The kernel's routing and neighbour tables as the workers see them.
//!
//! Next hops are never configured: the daemon dumps the kernel's main IPv4 routing table,
//! its neighbour table and the interfaces xlb serves (over netlink, in the `xdp` crate),
//! and hands the workers this immutable copy inside each snapshot. A worker resolves a
//! flow's next hop once, at flow creation (and again when the snapshot changes), so the
//! linear longest-prefix scan here is off the per-packet path.
//!
//! An unresolved neighbour is reported, not guessed: the worker drops the packet (counted)
//! and asks the daemon to have the kernel resolve it (ARP), which the next snapshot shows.

use hashbrown::HashMap;

/// An interface xlb has an XSK on. Its position in [`NetView::ifaces`] is the interface
/// index the datapath uses in verdicts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfaceInfo {
    pub ifindex: u32,
    pub name: String,
    pub mac: [u8; 6],
    /// The interface's primary IPv4 address, if any.
    pub addr: Option<[u8; 4]>,
    /// The link's MTU: larger IPv4 packets do not leave by it (see the pipeline).
    pub mtu: u16,
    /// It takes frames XDP redirects to it (the kernel's `ndo_xdp_xmit` feature; a veth
    /// only while its peer runs XDP or has GRO on): the fast path sends no flow out of
    /// an interface without it.
    pub redirect: bool,
}

/// A unicast route from the main table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub dst: [u8; 4],
    pub prefix_len: u8,
    pub ifindex: u32,
    pub gateway: Option<[u8; 4]>,
}

impl Route {
    fn matches(&self, addr: [u8; 4]) -> bool {
        if self.prefix_len == 0 {
            return true;
        }
        let mask = u32::MAX << (32 - u32::from(self.prefix_len.min(32)));
        u32::from_be_bytes(addr) & mask == u32::from_be_bytes(self.dst) & mask
    }
}

/// A resolved neighbour: (ifindex, IPv4 address, MAC).
pub type NeighbourEntry = (u32, [u8; 4], [u8; 6]);

/// Where to send a frame for a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextHop {
    /// Position of the egress interface in [`NetView::ifaces`].
    pub iface: u8,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    /// The egress link's MTU.
    pub mtu: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextHopError {
    /// No route in the main table.
    NoRoute,
    /// The route leaves through an interface xlb does not serve.
    ForeignInterface,
    /// The neighbour (gateway or on-link host) has no link-layer address yet.
    Unresolved { ifindex: u32, addr: [u8; 4] },
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetView {
    pub ifaces: Vec<IfaceInfo>,
    /// Sorted by prefix length, longest first (see [`NetView::new`]).
    routes: Vec<Route>,
    neighbours: HashMap<(u32, [u8; 4]), [u8; 6]>,
}

impl NetView {
    pub fn new(
        ifaces: Vec<IfaceInfo>,
        mut routes: Vec<Route>,
        neighbours: impl IntoIterator<Item = NeighbourEntry>,
    ) -> NetView {
        routes.sort_by(|a, b| b.prefix_len.cmp(&a.prefix_len).then(a.dst.cmp(&b.dst)));
        NetView {
            ifaces,
            routes,
            neighbours: neighbours
                .into_iter()
                .map(|(i, a, m)| ((i, a), m))
                .collect(),
        }
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn neighbour(&self, ifindex: u32, addr: [u8; 4]) -> Option<[u8; 6]> {
        self.neighbours.get(&(ifindex, addr)).copied()
    }

    pub fn neighbour_count(&self) -> usize {
        self.neighbours.len()
    }

    /// The longest-prefix route for `dst`.
    pub fn route(&self, dst: [u8; 4]) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(dst))
    }

    /// Whether `dst` is a neighbour: on a subnet directly connected to an interface xlb
    /// serves. Otherwise why not, for an operator: the gateway and interface it is
    /// reached through, or that no served interface reaches it. (L2 direct server
    /// return needs it: only the destination MAC changes.)
    pub fn on_link(&self, dst: [u8; 4]) -> Result<(), String> {
        let route = self.route(dst);
        let served = route.and_then(|r| self.ifaces.iter().find(|i| i.ifindex == r.ifindex));
        let addr = std::net::Ipv4Addr::from(dst);
        match (route, served) {
            (Some(r), Some(_)) if r.gateway.is_none() => Ok(()),
            (Some(r), Some(i)) => Err(format!(
                "{addr} is reached through gateway {} on {}, not directly",
                std::net::Ipv4Addr::from(r.gateway.unwrap_or_default()),
                i.name
            )),
            _ => Err(format!(
                "{addr} is not on a subnet directly connected to an interface xlb serves"
            )),
        }
    }

    /// Longest-prefix match, then the neighbour of the gateway (or of `dst` when on-link).
    pub fn next_hop(&self, dst: [u8; 4]) -> Result<NextHop, NextHopError> {
        let route = self.route(dst).ok_or(NextHopError::NoRoute)?;
        let iface = self
            .ifaces
            .iter()
            .position(|i| i.ifindex == route.ifindex)
            .ok_or(NextHopError::ForeignInterface)?;
        let hop = route.gateway.unwrap_or(dst);
        let mac = self
            .neighbour(route.ifindex, hop)
            .ok_or(NextHopError::Unresolved {
                ifindex: route.ifindex,
                addr: hop,
            })?;
        Ok(NextHop {
            iface: iface as u8,
            src_mac: self.ifaces[iface].mac,
            dst_mac: mac,
            mtu: self.ifaces[iface].mtu,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> NetView {
        NetView::new(
            vec![
                IfaceInfo {
                    ifindex: 5,
                    name: "lb0".into(),
                    mac: [2, 0, 0, 0, 0, 5],
                    addr: Some([10, 0, 0, 1]),
                    mtu: 1500,
                    redirect: true,
                },
                IfaceInfo {
                    ifindex: 7,
                    name: "lb1".into(),
                    mac: [2, 0, 0, 0, 0, 7],
                    addr: None,
                    mtu: 1500,
                    redirect: true,
                },
            ],
            vec![
                Route {
                    dst: [0, 0, 0, 0],
                    prefix_len: 0,
                    ifindex: 5,
                    gateway: Some([10, 0, 0, 254]),
                },
                Route {
                    dst: [10, 1, 0, 0],
                    prefix_len: 24,
                    ifindex: 7,
                    gateway: None,
                },
                Route {
                    dst: [10, 0, 0, 0],
                    prefix_len: 24,
                    ifindex: 5,
                    gateway: None,
                },
                Route {
                    dst: [192, 168, 0, 0],
                    prefix_len: 16,
                    ifindex: 99,
                    gateway: None,
                },
            ],
            [(5, [10, 0, 0, 254], [9; 6]), (7, [10, 1, 0, 2], [8; 6])],
        )
    }

    #[test]
    fn on_link_and_via_gateway() {
        let v = view();
        assert_eq!(
            v.next_hop([10, 1, 0, 2]),
            Ok(NextHop {
                iface: 1,
                src_mac: [2, 0, 0, 0, 0, 7],
                dst_mac: [8; 6],
                mtu: 1500,
            })
        );
        assert_eq!(v.next_hop([8, 8, 8, 8]).map(|h| h.dst_mac), Ok([9; 6]));
        assert_eq!(
            v.next_hop([10, 1, 0, 3]),
            Err(NextHopError::Unresolved {
                ifindex: 7,
                addr: [10, 1, 0, 3]
            })
        );
        assert_eq!(
            v.next_hop([192, 168, 1, 1]),
            Err(NextHopError::ForeignInterface)
        );
        assert_eq!(v.on_link([10, 1, 0, 9]), Ok(()), "unresolved but on-link");
        let e = v.on_link([8, 8, 8, 8]).expect_err("routed");
        assert!(e.contains("gateway 10.0.0.254 on lb0"), "{e}");
        let e = v.on_link([192, 168, 1, 1]).expect_err("foreign interface");
        assert!(e.contains("not on a subnet"), "{e}");
        let no_default = NetView::new(v.ifaces.clone(), vec![], []);
        assert!(no_default.on_link([8, 8, 8, 8]).is_err());
        assert_eq!(
            no_default.next_hop([8, 8, 8, 8]),
            Err(NextHopError::NoRoute)
        );
    }
}
