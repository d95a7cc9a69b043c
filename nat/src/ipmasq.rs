//! Masquerading policy with ip-masq-agent's semantics, read from its own config format.
//!
//! ip-masq-agent (kubernetes-sigs/ip-masq-agent) reads a YAML file, usually a ConfigMap:
//!
//! ```yaml
//! nonMasqueradeCIDRs:
//!   - 10.0.0.0/8
//! masqLinkLocal: false
//! resyncInterval: 60s
//! ```
//!
//! Traffic from the masquerade sources to a destination in a non-masquerade CIDR keeps its
//! source address; everything else leaves with the egress address. As in ip-masq-agent, a
//! list in the file *replaces* the defaults; with no file or an empty list the defaults
//! apply ([`DEFAULT_NON_MASQUERADE`]); unless `masqLinkLocal` is true, 169.254.0.0/16 is
//! added. Unlike ip-masq-agent, an unknown key is an error, not ignored: a misspelt
//! option that silently flips masquerading is how pods end up reaching a database with
//! the node's address instead of their own.
//!
//! Every decision carries its reason ([`Decision`]), so `lbctl ipmasq check` can say why.

use crate::prefix::{Cidr, CidrError, PrefixMap};
use core::fmt;
use serde::Deserialize;
use std::net::Ipv4Addr;

/// ip-masq-agent's default non-masquerade CIDRs (RFC 1918, RFC 6598, and the IANA
/// special-purpose ranges it lists).
pub const DEFAULT_NON_MASQUERADE: [&str; 11] = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "240.0.0.0/4",
];

/// Link-local (RFC 3927), kept unmasqueraded unless `masqLinkLocal: true`.
pub const LINK_LOCAL: &str = "169.254.0.0/16";

/// Where a non-masquerade rule comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleSource {
    /// ip-masq-agent's defaults (no file, or no list in it).
    Default,
    /// The file's `nonMasqueradeCIDRs`.
    File,
    /// 169.254.0.0/16, because `masqLinkLocal` is false.
    LinkLocal,
}

impl fmt::Display for RuleSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RuleSource::Default => "default",
            RuleSource::File => "nonMasqueradeCIDRs",
            RuleSource::LinkLocal => "masqLinkLocal: false",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MasqConfigError {
    #[error("ip-masq-agent config is not valid YAML for this format: {0}")]
    Yaml(String),
    #[error("ip-masq-agent config: nonMasqueradeCIDRs entry {index}: {source}")]
    Cidr { index: usize, source: CidrError },
    #[error("ip-masq-agent config: resyncInterval {0:?} is not a duration like 60s or 1m30s")]
    Interval(String),
}

/// The file as ip-masq-agent defines it (field names are its JSON tags).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(rename = "nonMasqueradeCIDRs", default)]
    non_masquerade_cidrs: Option<Vec<String>>,
    #[serde(rename = "masqLinkLocal", default)]
    masq_link_local: bool,
    /// IPv6 link-local masquerading; accepted for compatibility, IPv6 comes later.
    #[serde(rename = "masqLinkLocalIPv6", default)]
    _masq_link_local_ipv6: bool,
    /// How often ip-masq-agent re-reads the file; lbd watches it instead, so the value is
    /// only checked.
    #[serde(rename = "resyncInterval", default)]
    resync_interval: Option<String>,
}

/// The effective non-masquerade list.
#[derive(Debug, Clone)]
pub struct MasqPolicy {
    rules: Vec<(Cidr, RuleSource)>,
    lpm: PrefixMap<RuleSource>,
    masq_link_local: bool,
}

fn parse_duration(s: &str) -> bool {
    // Go's time.ParseDuration forms ip-masq-agent accepts: "60s", "1m30s", "500ms", "1h".
    let mut rest = s.trim();
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        let unit = ["ns", "us", "µs", "ms", "s", "m", "h"]
            .into_iter()
            .find(|u| rest.starts_with(u));
        match unit {
            Some(u) => rest = &rest[u.len()..],
            None => return false,
        }
    }
    true
}

impl MasqPolicy {
    fn build(list: &[Cidr], source: RuleSource, masq_link_local: bool) -> MasqPolicy {
        let mut p = MasqPolicy {
            rules: Vec::new(),
            lpm: PrefixMap::new(),
            masq_link_local,
        };
        for c in list {
            if p.lpm.insert(*c, source) {
                p.rules.push((*c, source));
            }
        }
        if !masq_link_local {
            let ll: Cidr = LINK_LOCAL.parse().expect("constant is a valid CIDR");
            if p.lpm.insert(ll, RuleSource::LinkLocal) {
                p.rules.push((ll, RuleSource::LinkLocal));
            }
        }
        p
    }

    /// The policy with no config file: the defaults plus link-local.
    pub fn defaults() -> MasqPolicy {
        let list: Vec<Cidr> = DEFAULT_NON_MASQUERADE
            .iter()
            .map(|s| s.parse().expect("constants are valid CIDRs"))
            .collect();
        MasqPolicy::build(&list, RuleSource::Default, false)
    }

    /// Parse ip-masq-agent's file. An empty file, or one without a list or with an
    /// empty list, yields the defaults (with `masqLinkLocal` as given).
    pub fn from_yaml(text: &str) -> Result<MasqPolicy, MasqConfigError> {
        let file: File = if text.trim().is_empty()
            || text
                .lines()
                .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            File {
                non_masquerade_cidrs: None,
                masq_link_local: false,
                _masq_link_local_ipv6: false,
                resync_interval: None,
            }
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| MasqConfigError::Yaml(e.to_string()))?
        };
        if let Some(i) = &file.resync_interval {
            if !parse_duration(i) {
                return Err(MasqConfigError::Interval(i.clone()));
            }
        }
        let list = file.non_masquerade_cidrs.unwrap_or_default();
        if list.is_empty() {
            let mut p = MasqPolicy::defaults();
            if file.masq_link_local {
                p = MasqPolicy::build(
                    &p.cidrs_from(RuleSource::Default),
                    RuleSource::Default,
                    true,
                );
            }
            return Ok(p);
        }
        let cidrs = list
            .iter()
            .enumerate()
            .map(|(index, s)| {
                s.parse::<Cidr>()
                    .map_err(|source| MasqConfigError::Cidr { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MasqPolicy::build(
            &cidrs,
            RuleSource::File,
            file.masq_link_local,
        ))
    }

    fn cidrs_from(&self, s: RuleSource) -> Vec<Cidr> {
        self.rules
            .iter()
            .filter(|(_, r)| *r == s)
            .map(|(c, _)| *c)
            .collect()
    }

    /// The effective list, in file (or default) order, link-local last.
    pub fn rules(&self) -> &[(Cidr, RuleSource)] {
        &self.rules
    }

    pub fn masq_link_local(&self) -> bool {
        self.masq_link_local
    }

    /// The most specific non-masquerade rule covering `dst`, if any.
    pub fn non_masquerade(&self, dst: Ipv4Addr) -> Option<(Cidr, RuleSource)> {
        self.lpm.lookup(dst).map(|(c, s)| (*c, *s))
    }
}

/// Destinations that are never masqueraded whatever the policy says: the node itself,
/// the cluster's nodes (`--cluster-nodes`), multicast and broadcast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRule {
    /// An address of this node: delivered locally, never forwarded.
    ThisNode,
    /// A `--cluster-nodes` CIDR: nodes reach pod addresses directly.
    ClusterNodes,
    /// 224.0.0.0/4 and 255.255.255.255: never routed off-link.
    Multicast,
}

impl fmt::Display for NodeRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeRule::ThisNode => "this node",
            NodeRule::ClusterNodes => "--cluster-nodes",
            NodeRule::Multicast => "multicast/broadcast",
        })
    }
}

/// What happens to a packet from `src` to `dst`, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Leaves with the egress address: no non-masquerade rule covers the destination.
    Masquerade { to: Ipv4Addr },
    /// Keeps its source: the destination is in a non-masquerade CIDR.
    KeepSource { rule: Cidr, source: RuleSource },
    /// Keeps its source: the destination is a node (or multicast).
    Node { rule: Cidr, kind: NodeRule },
    /// Not from a masquerade source (`--masquerade-from`): not xlb's to translate.
    NotMasqueradeSource,
}

impl Decision {
    pub fn masquerades(&self) -> bool {
        matches!(self, Decision::Masquerade { .. })
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Masquerade { to } => write!(f, "masquerade to {to} (no rule matches)"),
            Decision::KeepSource { rule, source } => write!(f, "keep source: {rule} ({source})"),
            Decision::Node { rule, kind } => write!(f, "keep source: {rule} ({kind})"),
            Decision::NotMasqueradeSource => {
                f.write_str("not masqueraded: source is not in --masquerade-from")
            }
        }
    }
}

/// The whole egress decision: masquerade sources, the policy, the node rules, the
/// egress address. Built on the control thread; workers read it from their snapshot.
#[derive(Debug, Clone)]
pub struct Masquerade {
    pub from: Vec<Cidr>,
    pub policy: std::sync::Arc<MasqPolicy>,
    /// The first egress address (the pool's; see [`Masquerade::egress_for`]).
    pub egress: Ipv4Addr,
    /// Every egress address, `egress` first: a pod's flows all leave from the one its
    /// address picks ("paired" pooling, RFC 4787 REQ-2).
    egress_pool: Vec<Ipv4Addr>,
    node_rules: Vec<(Cidr, NodeRule)>,
    nodes: PrefixMap<NodeRule>,
}

impl Masquerade {
    /// `this_node`: the node's own addresses; `cluster_nodes`: `--cluster-nodes`.
    pub fn new(
        from: Vec<Cidr>,
        policy: std::sync::Arc<MasqPolicy>,
        egress: Ipv4Addr,
        this_node: &[Ipv4Addr],
        cluster_nodes: &[Cidr],
    ) -> Masquerade {
        let mut m = Masquerade {
            from,
            policy,
            egress,
            egress_pool: vec![egress],
            node_rules: Vec::new(),
            nodes: PrefixMap::new(),
        };
        let host = |a: Ipv4Addr| Cidr::new(a, 32).expect("32 is a valid length");
        let mut add = |c: Cidr, k: NodeRule| {
            if m.nodes.insert(c, k) {
                m.node_rules.push((c, k));
            }
        };
        for a in this_node {
            add(host(*a), NodeRule::ThisNode);
        }
        for c in cluster_nodes {
            add(*c, NodeRule::ClusterNodes);
        }
        add(
            Cidr::new(Ipv4Addr::new(224, 0, 0, 0), 4).expect("valid"),
            NodeRule::Multicast,
        );
        add(host(Ipv4Addr::BROADCAST), NodeRule::Multicast);
        m
    }

    /// The same, leaving from a pool of egress addresses (the first is `egress`); an
    /// empty pool keeps `egress` alone.
    pub fn with_egress_pool(mut self, pool: Vec<Ipv4Addr>) -> Masquerade {
        if let Some(first) = pool.first() {
            self.egress = *first;
            self.egress_pool = pool;
        }
        self
    }

    /// Every egress address, the first one first.
    pub fn egress_pool(&self) -> &[Ipv4Addr] {
        &self.egress_pool
    }

    /// Whether `addr` is one of the egress addresses.
    pub fn is_egress(&self, addr: Ipv4Addr) -> bool {
        self.egress_pool.contains(&addr)
    }

    /// The egress address a pod's flows leave from: a fixed hash of its address, the
    /// same on every worker and across restarts.
    pub fn egress_for(&self, src: Ipv4Addr) -> Ipv4Addr {
        let h = u32::from(src).wrapping_mul(0x9E37_79B1) >> 8;
        self.egress_pool
            .get(h as usize % self.egress_pool.len().max(1))
            .copied()
            .unwrap_or(self.egress)
    }

    /// The same sources and nodes under another policy.
    pub fn with_policy(&self, policy: std::sync::Arc<MasqPolicy>) -> Masquerade {
        Masquerade {
            policy,
            ..self.clone()
        }
    }

    /// Destinations kept unmasqueraded because they are nodes (or multicast).
    pub fn node_rules(&self) -> &[(Cidr, NodeRule)] {
        &self.node_rules
    }

    pub fn is_source(&self, src: Ipv4Addr) -> bool {
        self.from.iter().any(|c| c.contains(src))
    }

    pub fn decide(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Decision {
        if !self.is_source(src) {
            return Decision::NotMasqueradeSource;
        }
        if let Some((rule, kind)) = self.nodes.lookup(dst) {
            return Decision::Node {
                rule: *rule,
                kind: *kind,
            };
        }
        match self.policy.non_masquerade(dst) {
            Some((rule, source)) => Decision::KeepSource { rule, source },
            None => Decision::Masquerade {
                to: self.egress_for(src),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("ip")
    }

    fn masq(policy: MasqPolicy) -> Masquerade {
        Masquerade::new(
            vec!["10.244.0.0/16".parse().expect("cidr")],
            std::sync::Arc::new(policy),
            ip("203.0.113.7"),
            &[ip("192.0.2.1")],
            &["20.0.0.0/24".parse().expect("cidr")],
        )
    }

    #[test]
    fn defaults_with_no_file() {
        let p = MasqPolicy::defaults();
        assert_eq!(p.rules().len(), 12);
        assert_eq!(p.rules()[0].1, RuleSource::Default);
        assert_eq!(
            p.rules()[11],
            (LINK_LOCAL.parse().expect("cidr"), RuleSource::LinkLocal)
        );
        let m = masq(p);
        assert_eq!(
            m.decide(ip("10.244.1.5"), ip("8.8.8.8")).to_string(),
            "masquerade to 203.0.113.7 (no rule matches)"
        );
        assert_eq!(
            m.decide(ip("10.244.1.5"), ip("10.1.2.3")).to_string(),
            "keep source: 10.0.0.0/8 (default)"
        );
        assert_eq!(
            m.decide(ip("10.244.1.5"), ip("169.254.169.254"))
                .to_string(),
            "keep source: 169.254.0.0/16 (masqLinkLocal: false)"
        );
        assert_eq!(
            m.decide(ip("192.168.1.1"), ip("8.8.8.8")),
            Decision::NotMasqueradeSource
        );
    }

    #[test]
    fn nodes_and_multicast_are_never_masqueraded() {
        let m = masq(MasqPolicy::from_yaml("nonMasqueradeCIDRs: [10.0.0.0/8]\n").expect("valid"));
        let src = ip("10.244.1.5");
        assert_eq!(
            m.decide(src, ip("20.0.0.7")).to_string(),
            "keep source: 20.0.0.0/24 (--cluster-nodes)"
        );
        assert_eq!(
            m.decide(src, ip("192.0.2.1")).to_string(),
            "keep source: 192.0.2.1/32 (this node)"
        );
        assert_eq!(
            m.decide(src, ip("239.1.1.1")).to_string(),
            "keep source: 224.0.0.0/4 (multicast/broadcast)"
        );
        assert!(m.decide(src, ip("192.0.2.2")).masquerades());
        assert!(!m.decide(src, ip("255.255.255.255")).masquerades());
    }

    #[test]
    fn a_list_replaces_the_defaults() {
        let p = MasqPolicy::from_yaml(
            "nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n  - 10.20.0.0/16\nresyncInterval: 60s\n",
        )
        .expect("valid");
        assert_eq!(p.rules().len(), 3, "two from the file plus link-local");
        let m = masq(p);
        assert_eq!(
            m.decide(ip("10.244.1.5"), ip("192.168.1.1")),
            Decision::Masquerade {
                to: ip("203.0.113.7")
            }
        );
        // Longest prefix wins and is reported.
        assert_eq!(
            m.decide(ip("10.244.1.5"), ip("10.20.3.4")).to_string(),
            "keep source: 10.20.0.0/16 (nonMasqueradeCIDRs)"
        );
    }

    #[test]
    fn empty_file_or_list_gives_defaults_and_link_local_follows_the_flag() {
        for text in [
            "",
            "# nothing\n",
            "nonMasqueradeCIDRs: []\n",
            "masqLinkLocal: false\n",
        ] {
            let p = MasqPolicy::from_yaml(text).expect(text);
            assert_eq!(p.rules().len(), 12, "{text:?}");
        }
        let p = MasqPolicy::from_yaml("masqLinkLocal: true\n").expect("valid");
        assert_eq!(p.rules().len(), 11);
        assert_eq!(p.non_masquerade(ip("169.254.169.254")), None);
        let p = MasqPolicy::from_yaml("nonMasqueradeCIDRs: [10.0.0.0/8]\nmasqLinkLocal: true\n")
            .expect("valid");
        assert_eq!(p.rules().len(), 1);
    }

    #[test]
    fn malformed_files_say_what_is_wrong() {
        let cases = [
            (
                "nonMasqueradeCidrs:\n  - 10.0.0.0/8\n",
                "unknown field `nonMasqueradeCidrs`",
            ),
            ("nonMasqueradeCIDRs:\n  - 10.0.0.0/33\n", "entry 0"),
            (
                "nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n  - 10.1.2.3/16\n",
                "did you mean 10.1.0.0/16",
            ),
            ("nonMasqueradeCIDRs: 10.0.0.0/8\n", "invalid type"),
            ("masqLinkLocal: maybe\n", "masqLinkLocal"),
            ("resyncInterval: soon\n", "resyncInterval"),
            ("nonMasqueradeCIDRs: [\n", "YAML"),
        ];
        for (text, needle) in cases {
            let err = MasqPolicy::from_yaml(text).expect_err(text).to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn ip_masq_agent_durations() {
        for ok in ["60s", "1m30s", "500ms", "1h", "1.5s"] {
            assert!(parse_duration(ok), "{ok}");
        }
        for bad in ["", "60", "s", "1d", "-1s"] {
            assert!(!parse_duration(bad), "{bad}");
        }
    }
}
