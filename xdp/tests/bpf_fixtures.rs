//! The steering program against the shared fixture table (lb::fixtures), through
//! BPF_PROG_TEST_RUN: the same frames the Rust pipeline tests run.

mod common;

use lb::fixtures::{self, Steer};
use xdp::abi::Stat;
use xdp::bpf::{Steering, SteeringState};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const ETH_HLEN: usize = 14;

fn loaded() -> Steering {
    let _ = xdp::sys::raise_memlock_limit(); // best effort, as in lbd
    let mut s = Steering::load().expect("the program loads and verifies");
    let cfg = fixtures::config();
    let state = SteeringState::new(&fixtures::table(), fixtures::SNAT, cfg.snat.ports);
    s.add_new(&state)
        .expect("maps accept the fixture configuration");
    s
}

#[test]
fn fixture_table_through_prog_test_run() {
    if !common::privileged("fixture_table_through_prog_test_run") {
        return;
    }
    let mut s = loaded();
    for fx in fixtures::fixtures() {
        if fx.frame.len() < ETH_HLEN {
            // The kernel never runs XDP on less than an Ethernet header (test_run says
            // EINVAL; a device cannot deliver one).
            assert!(
                s.test_run(&fx.frame).is_err(),
                "{}: refused by the kernel",
                fx.name
            );
            continue;
        }
        let before = s.stats();
        let ret = s.test_run(&fx.frame).expect("test run");
        let after = s.stats();
        let delta = |st: Stat| after[st as usize] - before[st as usize];
        assert_eq!(delta(Stat::Rx), 1, "{}: counted once", fx.name);
        let got = if delta(Stat::Frontend) == 1 {
            // No XSK is bound in a test run, so the redirect falls back to XDP_PASS.
            assert_eq!(ret, XDP_PASS, "{}: redirect falls back to pass", fx.name);
            assert_eq!(delta(Stat::NoXsk), 1, "{}: fallback counted", fx.name);
            Steer::Frontend
        } else if delta(Stat::Reply) == 1 {
            assert_eq!(ret, XDP_PASS, "{}: redirect falls back to pass", fx.name);
            assert_eq!(delta(Stat::NoXsk), 1, "{}: fallback counted", fx.name);
            Steer::Reply
        } else if ret == XDP_DROP {
            Steer::Drop
        } else {
            assert_eq!(ret, XDP_PASS, "{}: unexpected action {ret}", fx.name);
            Steer::Pass
        };
        assert_eq!(got, fx.steer, "{}", fx.name);
    }
}

#[test]
fn reasons_are_counted() {
    if !common::privileged("reasons_are_counted") {
        return;
    }
    let mut s = loaded();
    let before = s.stats();
    let runnable: Vec<_> = fixtures::fixtures()
        .into_iter()
        .filter(|f| f.frame.len() >= ETH_HLEN)
        .collect();
    for fx in &runnable {
        s.test_run(&fx.frame).expect("test run");
    }
    let after = s.stats();
    let d = |st: Stat| after[st as usize] - before[st as usize];
    let n = runnable.len() as u64;
    assert_eq!(d(Stat::Rx), n);
    assert_eq!(d(Stat::Fragment), 2);
    assert_eq!(d(Stat::Ttl), 1);
    assert_eq!(d(Stat::NotIpv4), 2);
    assert_eq!(d(Stat::Malformed), 3);
    // Every frame ends in exactly one final class.
    let classes = d(Stat::Frontend)
        + d(Stat::Reply)
        + d(Stat::Pass)
        + d(Stat::NotIpv4)
        + d(Stat::Malformed)
        + d(Stat::Ttl)
        + d(Stat::Fragment);
    assert_eq!(classes, n);
}

#[test]
fn removing_a_service_stops_steering_it() {
    if !common::privileged("removing_a_service_stops_steering_it") {
        return;
    }
    let mut s = loaded();
    let syn = &fixtures::fixtures()[0];
    let before = s.stats()[Stat::Frontend as usize];
    s.test_run(&syn.frame).expect("run");
    assert_eq!(s.stats()[Stat::Frontend as usize], before + 1);
    let empty = SteeringState::new(
        &Default::default(),
        fixtures::SNAT,
        fixtures::config().snat.ports,
    );
    s.remove_stale(&empty).expect("remove");
    s.add_new(&empty).expect("add");
    s.test_run(&syn.frame).expect("run");
    assert_eq!(
        s.stats()[Stat::Frontend as usize],
        before + 1,
        "no longer steered"
    );
}
