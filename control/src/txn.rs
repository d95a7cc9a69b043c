//! One ordered apply with a real rollback, for every change of the datapath.
//!
//! A change moves the XDP program's tables (the steering maps) from what they hold to
//! what the change needs, and the workers to a new snapshot, in three steps: stale
//! entries out, the new snapshot published, new entries in. A packet the program steers
//! is then always one the workers handle the same way before and after (they never see
//! a frontend their snapshot lacks, or lose the replies of one they have).
//!
//! Any failure restores exactly the previous state: every map operation done is
//! journaled with its inverse, and undone in reverse order, mirroring the steps (new
//! entries out, the previous snapshot published again, stale entries back). The caller
//! learns what the maps hold afterwards in every case — also when an undo itself fails,
//! so the next change starts from the truth.
//!
//! Pure: the datapath is a trait ([`Datapath`]); the tests inject a failure at every
//! step. lbd's service changes and masquerading-policy changes both go through
//! [`apply`].

use std::collections::BTreeMap;
use std::fmt::{Debug, Display};

/// What a change acts on: keyed entries (the steering maps; the key's order is the
/// order new entries go in, stale ones go out in reverse) and the snapshot the workers
/// run on.
pub trait Datapath {
    type Key: Ord + Clone + Debug;
    type Value: Clone + PartialEq + Debug;
    type Snapshot;
    type Error: Display;
    /// Insert or replace one entry.
    fn put(&mut self, key: &Self::Key, value: &Self::Value) -> Result<(), Self::Error>;
    /// Remove one entry.
    fn del(&mut self, key: &Self::Key) -> Result<(), Self::Error>;
    /// Hand the workers a snapshot (cannot fail: it is queued).
    fn publish(&mut self, snap: Self::Snapshot);
}

/// Why a change did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failed<E: Display> {
    /// A step failed and everything done was undone: the datapath is as before.
    #[error("nothing changed: {0}")]
    RolledBack(E),
    /// A step failed and so did undoing one: the maps hold what the returned state
    /// says (a mix of before and after); the previous snapshot is in force.
    #[error("{error}; undoing it failed too ({undo}): the XDP maps hold part of the change")]
    Inconsistent { error: E, undo: E },
}

/// What the maps hold after a change, and whether it happened.
pub type Outcome<D> = (
    BTreeMap<<D as Datapath>::Key, <D as Datapath>::Value>,
    Result<(), Failed<<D as Datapath>::Error>>,
);

/// One map operation done, with what it replaced (for its undo).
#[derive(Debug, Clone)]
enum Done<K, V> {
    Removed(K, V),
    Put(K, Option<V>),
}

/// Where the change stood when a step failed.
struct Journal<'a, D: Datapath> {
    dp: &'a mut D,
    /// What the maps hold now.
    held: BTreeMap<D::Key, D::Value>,
    stale: Vec<Done<D::Key, D::Value>>,
    fresh: Vec<Done<D::Key, D::Value>>,
    /// The first undo that failed.
    undo_error: Option<D::Error>,
}

impl<D: Datapath> Journal<'_, D> {
    fn del(&mut self, k: &D::Key) -> Result<Done<D::Key, D::Value>, D::Error> {
        self.dp.del(k)?;
        let old = self.held.remove(k);
        Ok(match old {
            Some(v) => Done::Removed(k.clone(), v),
            None => Done::Put(k.clone(), None),
        })
    }

    fn put(&mut self, k: &D::Key, v: &D::Value) -> Result<Done<D::Key, D::Value>, D::Error> {
        self.dp.put(k, v)?;
        let old = self.held.insert(k.clone(), v.clone());
        Ok(Done::Put(k.clone(), old))
    }

    /// Undo `done`, last first; the first failure is kept, the rest still tried.
    fn undo(&mut self, done: Vec<Done<D::Key, D::Value>>) {
        for d in done.into_iter().rev() {
            let r = match &d {
                Done::Removed(k, v) | Done::Put(k, Some(v)) => self.dp.put(k, v).map(|()| {
                    self.held.insert(k.clone(), v.clone());
                }),
                Done::Put(k, None) => self.dp.del(k).map(|()| {
                    self.held.remove(k);
                }),
            };
            if let Err(e) = r {
                self.undo_error.get_or_insert(e);
            }
        }
    }

    fn failed(self, error: D::Error) -> Outcome<D> {
        let out = match self.undo_error {
            None => Failed::RolledBack(error),
            Some(undo) => Failed::Inconsistent { error, undo },
        };
        (self.held, Err(out))
    }
}

/// Move the datapath from `cur` (what its maps hold) to `next` and `new_snap`, in the
/// order of the module doc; on a failure, back to `cur` and `old_snap` (the snapshot in
/// force). Returns what the maps hold afterwards: `next`, or `cur` after a rollback, or
/// the mix an [`Failed::Inconsistent`] leaves.
pub fn apply<D: Datapath>(
    dp: &mut D,
    cur: &BTreeMap<D::Key, D::Value>,
    next: &BTreeMap<D::Key, D::Value>,
    new_snap: D::Snapshot,
    old_snap: D::Snapshot,
) -> Outcome<D> {
    let mut j = Journal {
        dp,
        held: cur.clone(),
        stale: Vec::new(),
        fresh: Vec::new(),
        undo_error: None,
    };
    // 1. Stale entries out, in reverse key order.
    for k in cur.keys().rev().filter(|k| !next.contains_key(*k)) {
        match j.del(k) {
            Ok(d) => j.stale.push(d),
            Err(e) => {
                let done = std::mem::take(&mut j.stale);
                j.undo(done);
                return j.failed(e);
            }
        }
    }
    // 2. The workers' new snapshot.
    j.dp.publish(new_snap);
    // 3. New and changed entries in, in key order.
    for (k, v) in next.iter().filter(|(k, v)| cur.get(*k) != Some(*v)) {
        match j.put(k, v) {
            Ok(d) => j.fresh.push(d),
            Err(e) => {
                let fresh = std::mem::take(&mut j.fresh);
                j.undo(fresh);
                j.dp.publish(old_snap);
                let stale = std::mem::take(&mut j.stale);
                j.undo(stale);
                return j.failed(e);
            }
        }
    }
    (j.held, Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A datapath that records what happens and fails the operations it is told to.
    #[derive(Debug, Default)]
    struct Fake {
        maps: BTreeMap<u32, char>,
        log: Vec<String>,
        ops: usize,
        fail: Vec<usize>,
        live: Option<&'static str>,
    }

    impl Datapath for Fake {
        type Key = u32;
        type Value = char;
        type Snapshot = &'static str;
        type Error = String;
        fn put(&mut self, k: &u32, v: &char) -> Result<(), String> {
            self.ops += 1;
            if self.fail.contains(&self.ops) {
                return Err(format!("put {k} refused"));
            }
            self.maps.insert(*k, *v);
            self.log.push(format!("put {k}{v}"));
            Ok(())
        }
        fn del(&mut self, k: &u32) -> Result<(), String> {
            self.ops += 1;
            if self.fail.contains(&self.ops) {
                return Err(format!("del {k} refused"));
            }
            self.maps.remove(k);
            self.log.push(format!("del {k}"));
            Ok(())
        }
        fn publish(&mut self, s: &'static str) {
            self.live = Some(s);
            self.log.push(format!("publish {s}"));
        }
    }

    fn m(entries: &[(u32, char)]) -> BTreeMap<u32, char> {
        entries.iter().copied().collect()
    }

    fn cur() -> BTreeMap<u32, char> {
        m(&[(1, 'a'), (2, 'b'), (3, 'c'), (4, 'd')])
    }

    fn next() -> BTreeMap<u32, char> {
        m(&[(2, 'b'), (3, 'C'), (5, 'e'), (6, 'f')])
    }

    #[test]
    fn stale_out_in_reverse_then_the_snapshot_then_new_in_order() {
        let mut dp = Fake {
            maps: cur(),
            live: Some("old"),
            ..Fake::default()
        };
        let (held, r) = apply(&mut dp, &cur(), &next(), "new", "old");
        assert_eq!(r, Ok(()));
        assert_eq!(held, next());
        assert_eq!(dp.maps, next());
        assert_eq!(
            dp.log,
            [
                "del 4",
                "del 1",
                "publish new",
                "put 3C",
                "put 5e",
                "put 6f"
            ]
        );
    }

    #[test]
    fn a_failure_at_any_step_restores_exactly_the_previous_state() {
        // 2 removals and 3 puts: fail each in turn.
        for at in 1..=5 {
            let mut dp = Fake {
                maps: cur(),
                live: Some("old"),
                fail: vec![at],
                ..Fake::default()
            };
            let (held, r) = apply(&mut dp, &cur(), &next(), "new", "old");
            assert!(matches!(r, Err(Failed::RolledBack(_))), "step {at}: {r:?}");
            assert_eq!(dp.maps, cur(), "step {at}: {:?}", dp.log);
            assert_eq!(held, cur(), "step {at}");
            assert_eq!(dp.live, Some("old"), "step {at}: {:?}", dp.log);
            // The new snapshot was in force only while new entries were going in, and
            // the previous one came back before the stale entries did.
            if at > 2 {
                let new = dp.log.iter().position(|l| l == "publish new");
                let old = dp.log.iter().position(|l| l == "publish old");
                let back = dp.log.iter().rposition(|l| l == "put 1a");
                assert!(new < old && old < back, "step {at}: {:?}", dp.log);
            } else {
                assert!(!dp.log.iter().any(|l| l.starts_with("publish")));
            }
        }
    }

    #[test]
    fn a_removal_failing_part_way_puts_back_what_was_removed() {
        // The hole this replaces: a partial removal was "restored" from a state that
        // still listed the removed entries, so nothing was put back.
        let mut dp = Fake {
            maps: cur(),
            fail: vec![2],
            ..Fake::default()
        };
        let (_, r) = apply(&mut dp, &cur(), &next(), "new", "old");
        assert_eq!(r, Err(Failed::RolledBack("del 1 refused".into())));
        assert_eq!(dp.log, ["del 4", "put 4d"]);
        assert_eq!(dp.maps, cur());
    }

    #[test]
    fn an_undo_that_fails_too_is_reported_with_what_the_maps_hold() {
        // The third put fails (op 5), then undoing the second put (op 6) fails.
        let mut dp = Fake {
            maps: cur(),
            fail: vec![5, 6],
            ..Fake::default()
        };
        let (held, r) = apply(&mut dp, &cur(), &next(), "new", "old");
        assert!(matches!(r, Err(Failed::Inconsistent { .. })), "{r:?}");
        assert_eq!(held, dp.maps, "the returned state is the truth");
        assert_ne!(held, cur());
        assert_eq!(dp.live, Some("old"));
        // The next change, from that state, gets the maps where they should be.
        let mut clean = Fake {
            maps: dp.maps.clone(),
            ..Fake::default()
        };
        let (held, r) = apply(&mut clean, &held, &cur(), "old", "old");
        assert_eq!(r, Ok(()));
        assert_eq!(clean.maps, cur());
        assert_eq!(held, cur());
    }

    #[test]
    fn no_change_touches_no_entry() {
        let mut dp = Fake {
            maps: cur(),
            ..Fake::default()
        };
        let (held, r) = apply(&mut dp, &cur(), &cur(), "same", "old");
        assert_eq!(r, Ok(()));
        assert_eq!(held, cur());
        assert_eq!(dp.log, ["publish same"]);
    }
}
