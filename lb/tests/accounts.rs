//! Per (service, backend) accounts (`lb::pipeline::Account`): flows opened, packets and
//! IP bytes each way, by the worker, and the fast path's counts folded in when a flow's
//! entries are removed.

use lb::fixtures::{self, BACKEND, VIP};
use lb::pipeline::NO_ACCOUNT;
use lb::wire::TcpFlags;
use lb::{Engine, Event, Verdict};

const SEC: u64 = 1_000_000_000;

use fixtures::{backend_segment as backend, client_segment as client};

fn engine() -> Engine {
    fixtures::engine_at(fixtures::one_worker(1, &fixtures::table()), SEC)
}

fn run(e: &mut Engine, frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    assert!(matches!(e.process(&mut f), Verdict::Tx { .. }));
    f
}

#[test]
fn flows_packets_and_bytes_count_to_their_service_and_backend() {
    let mut e = engine();
    let mut ports = Vec::new();
    for cport in [40000, 40002] {
        let out = run(&mut e, &client(cport, TcpFlags::SYN, b""));
        let port = u16::from_be_bytes([out[34], out[35]]);
        run(&mut e, &backend(port, TcpFlags::SYN | TcpFlags::ACK, b""));
        run(&mut e, &client(cport, TcpFlags::ACK, b""));
        ports.push(port);
    }
    // 3 requests of 100 bytes and 2 answers of 1000 on the first connection.
    for _ in 0..3 {
        run(&mut e, &client(40000, TcpFlags::ACK, &[0; 100]));
    }
    for _ in 0..2 {
        run(&mut e, &backend(ports[0], TcpFlags::ACK, &[0; 1000]));
    }
    let a = e.accounts();
    assert_eq!(a.len(), 1, "one service, one backend: {a:?}");
    let a = a[0];
    assert_eq!((a.frontend.addr, a.frontend.port), (VIP, 80));
    assert_eq!(a.backend, (BACKEND, 8080));
    assert_eq!(a.flows, 2);
    // SYN, ACK and three requests per direction 0; SYN+ACK and two answers back.
    assert_eq!(a.packets, [2 * 2 + 3, 2 + 2]);
    let (syn, ack) = (40u64, 40u64);
    assert_eq!(a.bytes, [2 * (syn + ack) + 3 * 140, 2 * syn + 2 * 1040]);

    // The fast path's counts of a removed entry join the account the event names.
    let removed: Vec<u32> = e
        .take_events()
        .filter_map(|ev| match ev {
            Event::FastRemove(_, _, acct) => Some(acct),
            _ => None,
        })
        .collect();
    assert!(removed.is_empty(), "nothing removed yet");
    run(&mut e, &client(40000, TcpFlags::FIN | TcpFlags::ACK, b""));
    let acct = e
        .take_events()
        .find_map(|ev| match ev {
            Event::FastRemove(_, 2, acct) => Some(acct),
            _ => None,
        })
        .expect("the closing flow leaves the fast path");
    assert_ne!(acct, NO_ACCOUNT);
    e.account_fast(acct, 1, 10, 15_000);
    let a = e.accounts()[0];
    assert_eq!(a.packets, [2 * 2 + 3 + 1, 2 + 2 + 10]);
    assert_eq!(a.bytes[1], 2 * syn + 2 * 1040 + 15_000);
}
