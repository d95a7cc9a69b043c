//! Fuzz harnesses: the ip-masq-agent file parser here, and the input cursor and text
//! mutator the other crates' harnesses share ([`Bytes`], [`mutate`]). One function per
//! target serves the bounded run under `cargo test` (bolero, `nat/tests/fuzz.rs`) and
//! long runs with cargo-fuzz (`nat/fuzz`). Seeds are in the code ([`IPMASQ_SEEDS`]):
//! the input picks one and mutates it, or is taken as the file itself, so the random
//! engine reaches deep into the parser instead of stopping at the first byte.
//!
//! Invariants: parsing never panics; an accepted file yields a policy with at least one
//! rule (an empty list means the defaults), every rule a strict CIDR (no host bits), and
//! lookups against it never panic and agree with a linear scan.

use crate::MasqPolicy;
use std::net::Ipv4Addr;

/// A cursor over a fuzzer's bytes; reads past the end give zeros.
#[derive(Debug)]
pub struct Bytes<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Bytes<'a> {
        Bytes { data, at: 0 }
    }

    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn more(&self) -> bool {
        self.at < self.data.len()
    }

    /// Up to `n` of the remaining bytes.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let start = self.at.min(self.data.len());
        let end = start + n.min(self.data.len() - start);
        self.at = end;
        &self.data[start..end]
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(usize::MAX)
    }
}

/// A bounded run of `harness` under `cargo test` with bolero's random engine: 5 s, or
/// `BOLERO_RANDOM_TEST_TIME_MS`; `BOLERO_RANDOM_SEED` reproduces a failure. Prints how
/// many inputs (`what`) ran without a finding, and checks the fuzzer really ran.
#[cfg(feature = "fuzz-runner")]
pub fn run(target: &str, what: &str, harness: fn(&[u8])) {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    use std::time::Duration;
    let budget = std::env::var("BOLERO_RANDOM_TEST_TIME_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(5), Duration::from_millis);
    let runs = AtomicU64::new(0);
    bolero::check!()
        .with_test_time(budget)
        .with_max_len(4096)
        .for_each(|data: &[u8]| {
            runs.fetch_add(1, Relaxed);
            harness(data);
        });
    let runs = runs.into_inner();
    eprintln!("{target}: {runs} {what} without a finding in {budget:?}");
    assert!(runs > 100, "{target}: the fuzzer ran ({runs} inputs)");
}

/// Tokens a text mutation splices in: the syntax of JSON and YAML and the values that
/// sit at the edges of their ranges.
const TOKENS: &[&str] = &[
    "\"", ":", ",", "{", "}", "[", "]", "-", "/", ".", "\n", " ", "#", "0", "255", "256", "65535",
    "65536", "-1", "/33", "/0", "null", "true", "1e9", "\\u0000", "\u{00e9}",
];

/// Either the rest of the input as it is (first byte even), or a seed picked and changed
/// by a few edits: replace, insert, delete a byte, splice in a token.
pub fn mutate(b: &mut Bytes<'_>, seeds: &[&str]) -> Vec<u8> {
    if b.u8() & 1 == 0 || seeds.is_empty() {
        return b.rest().to_vec();
    }
    let mut t = seeds[usize::from(b.u8()) % seeds.len()].as_bytes().to_vec();
    for _ in 0..(b.u8() % 6) {
        let at = usize::from(b.u16()) % (t.len() + 1);
        match b.u8() % 4 {
            0 if at < t.len() => t[at] = b.u8(),
            1 => t.insert(at, b.u8()),
            2 if at < t.len() => {
                t.remove(at);
            }
            _ => {
                let tok = TOKENS[usize::from(b.u8()) % TOKENS.len()].as_bytes();
                t.splice(at..at, tok.iter().copied());
            }
        }
    }
    t
}

/// ip-masq-agent files: the defaults, lists, link-local, comments, the ConfigMap's
/// other keys.
pub const IPMASQ_SEEDS: &[&str] = &[
    "",
    "nonMasqueradeCIDRs:\n  - 10.0.0.0/8\n  - 172.16.0.0/12\nmasqLinkLocal: false\nresyncInterval: 60s\n",
    "nonMasqueradeCIDRs: [10.0.0.0/8, 192.168.0.0/16]\nmasqLinkLocal: true\n",
    "# comment only\n",
    "nonMasqueradeCIDRs: []\n",
    "masqLinkLocal: true\n",
    "nonMasqueradeCIDRs:\n- 0.0.0.0/0\n",
    "nonMasqueradeCIDRs:\n  - 100.64.0.0/10\n  - 192.0.0.0/24\n  - 198.18.0.0/15\n",
];

pub fn ipmasq(data: &[u8]) {
    let input = mutate(&mut Bytes::new(data), IPMASQ_SEEDS);
    let Ok(text) = std::str::from_utf8(&input) else {
        return;
    };
    let Ok(p) = MasqPolicy::from_yaml(text) else {
        return;
    };
    assert!(
        !p.rules().is_empty(),
        "an accepted file has rules: {text:?}"
    );
    for (cidr, _) in p.rules() {
        assert_eq!(
            cidr.to_string().parse::<crate::Cidr>().ok().as_ref(),
            Some(cidr),
            "a rule's CIDR reads back as itself: {text:?}"
        );
    }
    // Addresses from the input's bytes, and each rule's first address.
    let mut probes: Vec<Ipv4Addr> = input
        .chunks_exact(4)
        .take(16)
        .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
        .collect();
    probes.extend(p.rules().iter().map(|(c, _)| c.addr()));
    for a in probes {
        let got = p.non_masquerade(a).map(|(c, _)| c);
        let want = p
            .rules()
            .iter()
            .filter(|(c, _)| c.contains(a))
            .map(|(c, _)| *c)
            .max_by_key(|c| c.len());
        assert_eq!(
            got.map(|c| c.len()),
            want.map(|c| c.len()),
            "longest match for {a} in {text:?}"
        );
    }
}
