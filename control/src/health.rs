//! Health checks, the pure part: what a check is ([`HealthSpec`], part of the desired
//! state) and what its results make of a backend ([`Tracker`]: consecutive results, rise
//! and fall). lbd's prober thread runs the probes; the control loop feeds the results
//! here and takes a backend out of new flows while it is down.

use serde::{Deserialize, Serialize};
use std::fmt;

/// How a backend is probed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Probe {
    /// A TCP connection is accepted.
    Tcp {},
    /// `GET path` over HTTP/1.0 answers with a status in `codes` (`"200-399"`).
    Http {
        path: String,
        #[serde(default = "default_codes")]
        codes: String,
    },
    /// A datagram `send` is answered with a datagram containing `expect`.
    Udp { send: String, expect: String },
}

fn default_codes() -> String {
    "200-399".into()
}

/// A service's health check: the probe, on which port (the backend's unless given), how
/// often, how long a probe may take, and how many results in a row change the state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    pub probe: Probe,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default = "default_interval")]
    pub interval_ms: u32,
    /// [default: 1000 ms, or the interval when that is shorter]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u32>,
    /// Successes in a row that make a down backend up again.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Failures in a row that make an up backend down.
    #[serde(default = "default_fall")]
    pub fall: u32,
}

fn default_interval() -> u32 {
    2000
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

impl HealthSpec {
    /// A check of `probe` with the default timing (every 2 s, 1 s timeout, rise 2, fall 3).
    pub fn new(probe: Probe) -> HealthSpec {
        HealthSpec {
            probe,
            port: None,
            interval_ms: default_interval(),
            timeout_ms: None,
            rise: default_rise(),
            fall: default_fall(),
        }
    }

    /// How long a probe may take.
    pub fn timeout(&self) -> u32 {
        self.timeout_ms.unwrap_or(self.interval_ms.min(1000))
    }

    /// The accepted status codes of an HTTP check.
    pub fn codes(&self) -> Option<(u16, u16)> {
        match &self.probe {
            Probe::Http { codes, .. } => parse_codes(codes).ok(),
            _ => None,
        }
    }

    /// Refuse what cannot work: timing out of range, a timeout longer than the interval,
    /// an HTTP path that is not a path, a status range that is not one, an empty datagram.
    pub fn validate(&self) -> Result<(), String> {
        if !(100..=3_600_000).contains(&self.interval_ms) {
            return Err(format!(
                "health interval {} ms: give 100 ms to 1 h",
                self.interval_ms
            ));
        }
        if self.timeout() < 10 || self.timeout() > self.interval_ms {
            return Err(format!(
                "health timeout {} ms: give 10 ms up to the interval ({} ms)",
                self.timeout(),
                self.interval_ms
            ));
        }
        for (what, n) in [("rise", self.rise), ("fall", self.fall)] {
            if !(1..=100).contains(&n) {
                return Err(format!("health {what} {n}: give 1 to 100"));
            }
        }
        if self.port == Some(0) {
            return Err("health port 0".into());
        }
        match &self.probe {
            Probe::Tcp {} => Ok(()),
            Probe::Http { path, codes } => {
                if !path.starts_with('/')
                    || path.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(format!(
                        "health path {path:?}: a path starting with /, no spaces"
                    ));
                }
                parse_codes(codes).map(|_| ())
            }
            Probe::Udp { send, expect } => {
                if send.is_empty() || send.len() > 1024 || expect.len() > 1024 {
                    return Err(
                        "udp health check: send 1 to 1024 bytes, expect at most 1024".into(),
                    );
                }
                Ok(())
            }
        }
    }
}

/// `"200-399"` or `"200"`.
pub fn parse_codes(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("health codes {s:?}: give a status or a range, e.g. 200-399");
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: u16 = a.trim().parse().map_err(|_| bad())?;
    let b: u16 = b.trim().parse().map_err(|_| bad())?;
    if !(100..=599).contains(&a) || !(100..=599).contains(&b) || a > b {
        return Err(bad());
    }
    Ok((a, b))
}

impl fmt::Display for HealthSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.probe {
            Probe::Tcp {} => write!(f, "tcp")?,
            Probe::Http { path, codes } => write!(f, "http {path} ({codes})")?,
            Probe::Udp { send, expect } => write!(f, "udp {send:?} -> {expect:?}")?,
        }
        if let Some(p) = self.port {
            write!(f, " port {p}")?;
        }
        write!(
            f,
            " every {} ms, timeout {} ms, rise {}, fall {}",
            self.interval_ms,
            self.timeout(),
            self.rise,
            self.fall
        )
    }
}

/// A backend's health by its probes' results. It starts up (a new check does not take
/// traffic away before it has seen anything); `fall` failures in a row take it down,
/// `rise` successes in a row bring it back. Each result resets the other run, so a
/// failure between successes starts the count again (and the other way round).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracker {
    pub up: bool,
    ok_run: u32,
    fail_run: u32,
}

impl Default for Tracker {
    fn default() -> Tracker {
        Tracker {
            up: true,
            ok_run: 0,
            fail_run: 0,
        }
    }
}

impl Tracker {
    /// Count a result; `Some(up)` when it changes the state.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok {
            self.ok_run = self.ok_run.saturating_add(1);
            self.fail_run = 0;
            if !self.up && self.ok_run >= rise {
                self.up = true;
                return Some(true);
            }
        } else {
            self.fail_run = self.fail_run.saturating_add(1);
            self.ok_run = 0;
            if self.up && self.fail_run >= fall {
                self.up = false;
                return Some(false);
            }
        }
        None
    }
}

/// The table the datapath runs: `table` with every weighted backend `down` says is down
/// at weight 0 (no new flows; established ones go on, as draining). When every weighted
/// backend of a service is down, the service keeps them all (fail open: a probe failing
/// everywhere is more likely wrong than every backend dead, and dropping every new flow
/// helps no one).
pub fn effective(
    table: &lb::service::ServiceTable,
    down: impl Fn(&lb::service::Frontend, &lb::service::BackendSpec) -> bool,
) -> lb::service::ServiceTable {
    let mut t = table.clone();
    for svc in table.services() {
        let weighted = svc.backends.iter().filter(|b| b.weight > 0).count();
        let out: Vec<_> = svc
            .backends
            .iter()
            .filter(|b| b.weight > 0 && down(&svc.frontend, b))
            .collect();
        if out.is_empty() || out.len() == weighted {
            continue;
        }
        for b in out {
            let op = lb::service::Op::SetWeight {
                frontend: svc.frontend,
                addr: b.addr,
                port: b.port,
                weight: 0,
            };
            if let Ok(n) = t.apply(&op) {
                t = n;
            }
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb::service::{BackendSpec, Frontend, Op, Proto, ServiceTable};

    fn table() -> ServiceTable {
        let frontend = Frontend {
            addr: [10, 96, 0, 10].into(),
            port: 80,
            proto: Proto::Tcp,
        };
        ServiceTable::default()
            .apply(&Op::AddService {
                frontend,
                backends: (1..=3)
                    .map(|i| BackendSpec {
                        addr: [10, 1, 0, 10 + i].into(),
                        port: 8080,
                        weight: if i == 3 { 0 } else { 2 },
                    })
                    .collect(),
                options: Default::default(),
            })
            .expect("valid")
    }

    fn weights(t: &ServiceTable) -> Vec<u32> {
        t.services()
            .flat_map(|s| s.backends.iter().map(|b| b.weight))
            .collect()
    }

    #[test]
    fn a_down_backend_gets_weight_0_unless_every_weighted_one_is_down() {
        let t = table();
        assert_eq!(weights(&effective(&t, |_, _| false)), [2, 2, 0]);
        let one = |_: &Frontend, b: &BackendSpec| b.addr.octets()[3] == 11;
        assert_eq!(weights(&effective(&t, one)), [0, 2, 0]);
        // The drained backend (weight 0) does not count: both weighted ones down is all.
        let two = |_: &Frontend, b: &BackendSpec| b.addr.octets()[3] != 13;
        assert_eq!(weights(&effective(&t, two)), [2, 2, 0], "fail open");
        assert_eq!(weights(&effective(&t, |_, _| true)), [2, 2, 0], "fail open");
    }

    #[test]
    fn rise_and_fall_count_consecutive_results_and_reset_each_other() {
        let mut t = Tracker::default();
        assert!(t.up);
        // Two failures, a success, two failures: never three in a row.
        for ok in [false, false, true, false, false] {
            assert_eq!(t.record(ok, 2, 3), None);
        }
        assert_eq!(t.record(false, 2, 3), Some(false), "the third in a row");
        assert!(!t.up);
        assert_eq!(t.record(false, 2, 3), None, "said once");
        // A success, a failure, a success: not two in a row.
        for ok in [true, false, true] {
            assert_eq!(t.record(ok, 2, 3), None);
        }
        assert_eq!(t.record(true, 2, 3), Some(true));
        assert_eq!(t.record(true, 2, 3), None);
        // fall 1: the first failure.
        assert_eq!(t.record(false, 1, 1), Some(false));
        assert_eq!(t.record(true, 1, 1), Some(true));
    }

    #[test]
    fn specs_parse_with_defaults_and_bad_ones_are_refused() {
        let s: HealthSpec =
            serde_json::from_str(r#"{"probe": {"type": "http", "path": "/healthz"}}"#)
                .expect("parse");
        assert_eq!(s.codes(), Some((200, 399)));
        assert_eq!(
            (s.interval_ms, s.timeout(), s.rise, s.fall),
            (2000, 1000, 2, 3)
        );
        assert_eq!(s.validate(), Ok(()));
        assert_eq!(
            s.to_string(),
            "http /healthz (200-399) every 2000 ms, timeout 1000 ms, rise 2, fall 3"
        );
        assert!(serde_json::from_str::<HealthSpec>(
            r#"{"probe": {"type": "tcp"}, "intervall_ms": 5}"#
        )
        .is_err());
        let bad = |f: fn(&mut HealthSpec)| {
            let mut s = HealthSpec::new(Probe::Tcp {});
            f(&mut s);
            s.validate()
        };
        assert!(bad(|s| s.interval_ms = 50).is_err());
        assert!(bad(|s| s.timeout_ms = Some(5000)).is_err());
        assert_eq!(
            bad(|s| s.interval_ms = 500),
            Ok(()),
            "the timeout follows a short interval"
        );
        assert!(bad(|s| s.rise = 0).is_err());
        assert!(bad(|s| s.port = Some(0)).is_err());
        assert!(bad(|s| s.probe = Probe::Http {
            path: "healthz".into(),
            codes: default_codes()
        })
        .is_err());
        assert!(bad(|s| s.probe = Probe::Http {
            path: "/".into(),
            codes: "300-200".into()
        })
        .is_err());
        assert!(bad(|s| s.probe = Probe::Udp {
            send: String::new(),
            expect: "x".into()
        })
        .is_err());
        assert_eq!(parse_codes("204"), Ok((204, 204)));
    }
}
