//! Maglev consistent hashing (Eisenbud et al., NSDI'16, §3.4, Pseudocode 1).
//!
//! Each backend `i` has a permutation of the table slots given by
//! `offset_i = h1(name_i) mod M`, `skip_i = h2(name_i) mod (M−1) + 1`, and
//! `permutation_i[j] = (offset_i + j·skip_i) mod M`; backends take turns claiming their
//! next unclaimed preferred slot until the table is full. Weights (§3.4, "we can adjust
//! the relative frequency of the backends' turns") are ratios: a backend with weight `w`
//! earns `w / w_max` of a turn every round and takes at most one turn a round (stride
//! scheduling with integer credits, starting so that every backend takes a turn in the
//! first round), so its share of the table is `w / Σw` within a slot or two, whatever
//! the weights' scale; with equal weights every backend takes one turn a round, exactly
//! the paper's table. Weight 0 takes none (drained).
//!
//! Determinism: backends are ordered by their name (address and port) and hashed with a
//! fixed function ([`crate::hash`]), so two nodes given the same (backends, M, seed) build
//! byte-identical tables whatever order the backends were added in. Permutations are
//! generated on the fly (never stored), so a build costs O(M · rounds) time and O(N) extra
//! memory. Builds run on the control thread; workers only read the finished table.

use crate::hash::hash_bytes;

/// Default table size: the prime the paper evaluates (65537), giving < 1 % imbalance
/// for up to a few hundred backends.
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;

/// Largest table size accepted (a prime just above 2^20 would still fit u32 slots; we
/// bound memory at 4 MiB of u16 entries per service).
pub const MAX_TABLE_SIZE: u32 = 2_000_003;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    #[error("Maglev table size {0} is not prime (the permutation needs a prime M; 65537 is the default)")]
    NotPrime(u32),
    #[error("Maglev table size {0} is outside 3..={max}", max = MAX_TABLE_SIZE)]
    OutOfRange(u32),
    #[error("{0} backends exceed the Maglev limit of 65535")]
    TooManyBackends(usize),
}

/// A backend as Maglev sees it: a stable name (bytes) and an integer weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaglevBackend {
    pub name: Vec<u8>,
    pub weight: u32,
}

/// A built lookup table: slot → index into the backend list passed to [`Maglev::build`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Maglev {
    table: Vec<u16>,
    /// Index of the backend in the caller's order, per slot; `EMPTY` when no backend has
    /// weight (then every lookup misses).
    has_backends: bool,
}

const EMPTY: u16 = u16::MAX;

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// How many of `m` slots each of `weights` (all > 0) gets: its share `m·w/W` rounded by
/// largest remainders (Hamilton), so each is within one slot of its share and they sum to
/// `m`; ties go in turn order, so equal weights give the first `m mod N` backends one
/// slot more, as the paper's round robin does. A backend whose share rounds to 0 gets
/// one slot from the backend furthest above its share: every backend with weight is in
/// the table.
fn quotas(weights: &[u64], m: u64) -> Vec<u64> {
    let total: u64 = weights.iter().sum::<u64>().max(1);
    let mut q: Vec<u64> = weights.iter().map(|&w| m * w / total).collect();
    let rest = m.saturating_sub(q.iter().sum());
    let mut by_rest: Vec<usize> = (0..weights.len()).collect();
    by_rest.sort_by_key(|&k| (std::cmp::Reverse(m * weights[k] % total), k));
    for &k in by_rest.iter().take(rest as usize) {
        q[k] += 1;
    }
    // Surplus over the share, in units of 1/total slot.
    let surplus = |q: &[u64], k: usize| (q[k] * total) as i128 - i128::from(m * weights[k]);
    for k in 0..q.len() {
        if q[k] == 0 {
            let donor = (0..q.len())
                .filter(|&d| q[d] > 1)
                .max_by_key(|&d| (surplus(&q, d), std::cmp::Reverse(d)));
            if let Some(d) = donor {
                q[d] -= 1;
                q[k] = 1;
            }
        }
    }
    q
}

impl Maglev {
    /// Build the table for `backends` (in the caller's order; the returned indices refer
    /// to it) with table size `m` and hash seed `seed`.
    pub fn build(backends: &[MaglevBackend], m: u32, seed: u64) -> Result<Maglev, MaglevError> {
        if !(3..=MAX_TABLE_SIZE).contains(&m) {
            return Err(MaglevError::OutOfRange(m));
        }
        if !is_prime(m) {
            return Err(MaglevError::NotPrime(m));
        }
        if backends.len() >= usize::from(EMPTY) {
            return Err(MaglevError::TooManyBackends(backends.len()));
        }
        let m64 = u64::from(m);
        // Turn order is by name, not by the caller's order: determinism across nodes.
        let mut order: Vec<usize> = (0..backends.len())
            .filter(|&i| backends[i].weight > 0)
            .collect();
        order.sort_by(|&a, &b| backends[a].name.cmp(&backends[b].name));
        let mut table = vec![EMPTY; m as usize];
        if order.is_empty() {
            return Ok(Maglev {
                table,
                has_backends: false,
            });
        }
        // u32 arithmetic: M ≤ MAX_TABLE_SIZE < 2^31, so position + skip < 2^32.
        let m32 = m;
        let perm: Vec<(u32, u32)> = order
            .iter()
            .map(|&i| {
                let name = &backends[i].name;
                let offset = hash_bytes(seed ^ 0x6f66_6673_6574, name) % m64;
                let skip = hash_bytes(seed ^ 0x0000_736b_6970, name) % (m64 - 1) + 1;
                // Both are below M.
                (offset as u32, skip as u32)
            })
            .collect();
        let weights: Vec<u64> = order
            .iter()
            .map(|&i| u64::from(backends[i].weight))
            .collect();
        let wmax = weights.iter().copied().max().unwrap_or(1);
        // Credits start at wmax − w: every backend earns its first turn in round one.
        let mut credit: Vec<u64> = weights.iter().map(|&w| wmax - w).collect();
        // Turns interleave by weight, and each backend's number of turns is its quota:
        // its weight's share of M, within one slot (see `quotas`). Without the quota the
        // last, partial round favoured the backends first in turn order.
        let mut quota = quotas(&weights, m64);
        // `pos[k]` is permutation_k[next_k], advanced by `+ skip mod M` with a conditional
        // subtraction instead of a division per step (same sequence as the paper's
        // `(offset + j·skip) mod M`, so the table is unchanged).
        let mut pos: Vec<u32> = perm.iter().map(|&(offset, _)| offset).collect();
        let mut filled = 0u32;
        'fill: loop {
            let mut took = false;
            for (k, &i) in order.iter().enumerate() {
                credit[k] += weights[k];
                if credit[k] < wmax || quota[k] == 0 {
                    continue;
                }
                took = true;
                credit[k] -= wmax;
                quota[k] -= 1;
                let skip = perm[k].1;
                let mut c = pos[k];
                while table[c as usize] != EMPTY {
                    c += skip;
                    if c >= m32 {
                        c -= m32;
                    }
                }
                table[c as usize] = i as u16;
                c += skip;
                if c >= m32 {
                    c -= m32;
                }
                pos[k] = c;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
            if !took {
                // Only backends short of credit have turns left (light ones, once the
                // heavy ones met their quota): skip the rounds in which nobody would
                // take one. The same turns, in the same order, without the empty rounds.
                let empty = (0..order.len())
                    .filter(|&k| quota[k] > 0)
                    .map(|k| (wmax - credit[k]).div_ceil(weights[k]))
                    .min()
                    .unwrap_or(1)
                    .saturating_sub(1);
                for (c, w) in credit.iter_mut().zip(&weights) {
                    *c += empty * w;
                }
            }
        }
        Ok(Maglev {
            table,
            has_backends: true,
        })
    }

    /// A digest of the table, to compare across nodes (`lbctl service list`): two nodes
    /// with the same backends, weights, M and seed show the same one; any difference in
    /// the resulting table changes it. It names backends by their names in table order,
    /// so the caller's order does not matter. Not the seed itself: only the table it
    /// produced, which every operator can see anyway.
    pub fn fingerprint(&self, backends: &[MaglevBackend]) -> u64 {
        let mut bytes = Vec::with_capacity(self.table.len() * 8);
        bytes.extend_from_slice(&(self.table.len() as u64).to_le_bytes());
        for &s in &self.table {
            match backends.get(usize::from(s)) {
                Some(b) => {
                    bytes.extend_from_slice(&(b.name.len() as u32).to_le_bytes());
                    bytes.extend_from_slice(&b.name);
                    bytes.extend_from_slice(&b.weight.to_le_bytes());
                }
                None => bytes.push(0xff),
            }
        }
        hash_bytes(0x6669_6e67_6572, &bytes)
    }

    /// The backend index (in the build order) for a flow hash, or `None` when no backend
    /// has weight.
    #[inline]
    pub fn lookup(&self, hash: u64) -> Option<usize> {
        if !self.has_backends {
            return None;
        }
        let slot = (hash % self.table.len() as u64) as usize;
        Some(usize::from(self.table[slot]))
    }

    pub fn size(&self) -> usize {
        self.table.len()
    }

    /// The raw table (slot → backend index), for tests and cross-node comparison.
    pub fn slots(&self) -> &[u16] {
        &self.table
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn backends(n: usize) -> Vec<MaglevBackend> {
        (0..n)
            .map(|i| MaglevBackend {
                name: format!("10.1.{}.{}:80", i / 256, i % 256).into_bytes(),
                weight: 1,
            })
            .collect()
    }

    fn counts(m: &Maglev, n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &s in m.slots() {
            c[usize::from(s)] += 1;
        }
        c
    }

    #[test]
    fn no_holes() {
        let m = Maglev::build(&backends(7), 65_537, 0).expect("build");
        assert!(m.slots().iter().all(|&s| s != EMPTY && usize::from(s) < 7));
    }

    #[test]
    fn rejects_non_prime_and_out_of_range() {
        assert_eq!(
            Maglev::build(&backends(2), 65_536, 0),
            Err(MaglevError::NotPrime(65_536))
        );
        assert_eq!(
            Maglev::build(&backends(2), 2, 0),
            Err(MaglevError::OutOfRange(2))
        );
    }

    #[test]
    fn empty_or_all_drained_misses() {
        let m = Maglev::build(&[], 13, 0).expect("build");
        assert_eq!(m.lookup(5), None);
        let mut b = backends(3);
        for x in &mut b {
            x.weight = 0;
        }
        assert_eq!(Maglev::build(&b, 13, 0).expect("build").lookup(5), None);
    }

    #[test]
    fn even_spread_with_equal_weights() {
        let n = 10;
        let m = Maglev::build(&backends(n), 65_537, 0).expect("build");
        let c = counts(&m, n);
        let ideal = 65_537 / n;
        for x in c {
            // The paper reports < 1 % imbalance at this M; allow 2 %.
            assert!(
                x.abs_diff(ideal) * 50 < ideal,
                "slot count {x} vs ideal {ideal}"
            );
        }
    }

    #[test]
    fn higher_weight_gets_more_slots_in_proportion() {
        let mut b = backends(3);
        b[0].weight = 1;
        b[1].weight = 2;
        b[2].weight = 5;
        let m = Maglev::build(&b, 65_537, 0).expect("build");
        let c = counts(&m, 3);
        let total = 65_537f64;
        for (i, w) in [(0, 1.0), (1, 2.0), (2, 5.0)] {
            let share = c[i] as f64 / total;
            assert!((share - w / 8.0).abs() < 0.01, "backend {i}: share {share}");
        }
    }

    #[test]
    fn drained_backend_gets_no_slots() {
        let mut b = backends(4);
        b[2].weight = 0;
        let m = Maglev::build(&b, 4_099, 0).expect("build");
        assert!(m.slots().iter().all(|&s| s != 2));
    }

    /// The paper's Pseudocode 1, literally (division per step): one turn per backend
    /// (with weight) per round.
    fn reference(backends: &[MaglevBackend], m: u32, seed: u64) -> Vec<u16> {
        let m64 = u64::from(m);
        let mut order: Vec<usize> = (0..backends.len())
            .filter(|&i| backends[i].weight > 0)
            .collect();
        order.sort_by(|&a, &b| backends[a].name.cmp(&backends[b].name));
        let perm = |i: usize, j: u64| {
            let offset = hash_bytes(seed ^ 0x6f66_6673_6574, &backends[i].name) % m64;
            let skip = hash_bytes(seed ^ 0x0000_736b_6970, &backends[i].name) % (m64 - 1) + 1;
            (offset + j * skip) % m64
        };
        let mut next = vec![0u64; backends.len()];
        let mut entry = vec![EMPTY; m as usize];
        let mut n = 0;
        loop {
            for &i in &order {
                {
                    let mut c = perm(i, next[i]);
                    while entry[c as usize] != EMPTY {
                        next[i] += 1;
                        c = perm(i, next[i]);
                    }
                    entry[c as usize] = i as u16;
                    next[i] += 1;
                    n += 1;
                    if n == m {
                        return entry;
                    }
                }
            }
        }
    }

    /// The hash seed (`lbd --hash-seed-file`) decides which client ports reach which
    /// backend: the same seed gives the same choice (two nodes of a tier agree), another
    /// seed another one (clients cannot predict it without the seed).
    #[test]
    fn the_seed_decides_the_backend_of_a_port() {
        let b = backends(10);
        let choice = |seed: u64| -> Vec<Option<usize>> {
            let t = Maglev::build(&b, 4_099, seed).expect("build");
            (1024..1524u16)
                .map(|port| {
                    let h =
                        crate::hash::flow_hash(seed, [10, 0, 0, 2], [10, 96, 0, 10], port, 80, 6);
                    t.lookup(h)
                })
                .collect()
        };
        let a = choice(0x5eed_0001);
        assert_eq!(a, choice(0x5eed_0001), "same seed, same choices");
        let b2 = choice(0x5eed_0002);
        let same = a.iter().zip(&b2).filter(|(x, y)| x == y).count();
        // Independent choices among 10 backends agree about one time in ten.
        assert!(
            same < 150,
            "{same} of 500 ports reach the same backend under another seed"
        );
    }

    /// The fingerprint is the same for the same inputs in any order, and changes with the
    /// seed, M, a backend or a weight.
    #[test]
    fn fingerprint_follows_the_table() {
        let b = backends(20);
        let fp = |b: &[MaglevBackend], m: u32, seed: u64| {
            Maglev::build(b, m, seed).expect("build").fingerprint(b)
        };
        let base = fp(&b, 4_099, 1);
        let mut rev = b.clone();
        rev.reverse();
        assert_eq!(fp(&rev, 4_099, 1), base, "insertion order does not matter");
        assert_ne!(fp(&b, 4_099, 2), base, "seed");
        assert_ne!(fp(&b, 4_111, 1), base, "table size");
        let mut w = b.clone();
        w[3].weight = 2;
        assert_ne!(fp(&w, 4_099, 1), base, "weight");
        let mut gone = b.clone();
        gone.remove(7);
        assert_ne!(fp(&gone, 4_099, 1), base, "backend");
    }

    proptest! {
        /// Quotas sum to M; each is within one slot of its weight's share, except that a
        /// backend whose share rounds to 0 gets one slot (and its donor one less); every
        /// weight gets a slot when M allows.
        #[test]
        fn quotas_sum_to_m_and_follow_the_shares(weights in proptest::collection::vec(1u64..=10_000, 1..200), m in prop::sample::select(vec![251u64, 4_099, 65_537])) {
            let q = quotas(&weights, m);
            prop_assert_eq!(q.iter().sum::<u64>(), m);
            let total: u64 = weights.iter().sum();
            let forced = weights.iter().filter(|&&w| m * w < total).count() as f64;
            for (k, &w) in weights.iter().enumerate() {
                let share = m as f64 * w as f64 / total as f64;
                if weights.len() as u64 <= m {
                    prop_assert!(q[k] >= 1, "weight {} has no slot", w);
                }
                prop_assert!((q[k] as f64 - share).abs() < 1.0 + forced, "weight {}: {} slots, share {:.2}", w, q[k], share);
            }
        }

        /// Weights are ratios: every backend's share is its weight over the sum within
        /// two slots, whatever the weights' scale (up to service::MAX_WEIGHT), and no
        /// backend with weight is left without entries.
        #[test]
        fn shares_follow_the_weights(weights in proptest::collection::vec(0u32..=10_000, 1..100), seed in any::<u64>()) {
            prop_assume!(weights.iter().any(|&w| w > 0));
            let mut b = backends(weights.len());
            for (x, w) in b.iter_mut().zip(&weights) {
                x.weight = *w;
            }
            let m = 4_099u32;
            let t = Maglev::build(&b, m, seed).expect("build");
            let got = counts(&t, b.len());
            let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
            for (i, &w) in weights.iter().enumerate() {
                let ideal = f64::from(m) * f64::from(w) / total as f64;
                prop_assert!((got[i] as f64 - ideal).abs() <= 2.0, "backend {} weight {}: {} slots, ideal {:.1}", i, w, got[i], ideal);
                if w > 0 {
                    prop_assert!(got[i] > 0, "backend {} with weight {} has no slot", i, w);
                }
            }
        }

        /// With equal weights (any common value; 0 drains) the build produces exactly
        /// the paper's table.
        #[test]
        fn equals_the_papers_pseudocode(on in proptest::collection::vec(any::<bool>(), 1..30), w in 1u32..=10_000, seed in any::<u64>()) {
            prop_assume!(on.iter().any(|&x| x));
            let mut b = backends(on.len());
            for (x, on) in b.iter_mut().zip(&on) {
                x.weight = if *on { w } else { 0 };
            }
            let m = Maglev::build(&b, 4_099, seed).expect("build");
            prop_assert_eq!(m.slots(), &reference(&b, 4_099, seed)[..]);
        }

        /// Same (backends, M, seed) → identical table, whatever the input order.
        #[test]
        fn deterministic_and_order_independent(n in 1usize..40, seed in any::<u64>(), rot in 0usize..40) {
            let b = backends(n);
            let m1 = Maglev::build(&b, 4_099, seed).expect("build");
            let mut r = b.clone();
            r.rotate_left(rot % n);
            let m2 = Maglev::build(&r, 4_099, seed).expect("build");
            // Map indices back to names before comparing.
            for (s1, s2) in m1.slots().iter().zip(m2.slots()) {
                prop_assert_eq!(&b[usize::from(*s1)].name, &r[usize::from(*s2)].name);
            }
        }

        /// Removing one of N backends moves close to 1/N of the slots: those of the removed
        /// backend plus a small overshoot (the paper's Fig. 10 shows a few percent).
        #[test]
        fn minimal_disruption_on_removal(n in 5usize..60, victim in any::<prop::sample::Index>(), w in 1u32..=10_000) {
            let mut b = backends(n);
            for x in &mut b {
                x.weight = w;
            }
            let v = victim.index(n);
            let before = Maglev::build(&b, 65_537, 1).expect("build");
            let mut after_b = b.clone();
            after_b.remove(v);
            let after = Maglev::build(&after_b, 65_537, 1).expect("build");
            let mut moved = 0usize;
            for (s1, s2) in before.slots().iter().zip(after.slots()) {
                if b[usize::from(*s1)].name != after_b[usize::from(*s2)].name {
                    moved += 1;
                }
            }
            let frac = moved as f64 / 65_537.0;
            let ideal = 1.0 / n as f64;
            prop_assert!(frac >= ideal * 0.9, "moved {} < ideal {}", frac, ideal);
            prop_assert!(frac <= ideal * 1.6 + 0.01, "moved {} >> ideal {}", frac, ideal);
        }
    }
}
