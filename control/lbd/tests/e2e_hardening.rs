//! Findings of the adversarial probe, end to end in namespaces: each test reproduces
//! one way lbd was attacked or misused and checks what an operator must see instead.
//! Run as root, one at a time (`--test-threads=1`).

mod common;

use common::topo::{Topo, VIP};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SVC: &str = "10.96.0.10:80/tcp";
/// The TCP echo service (deploy/backend.py --tcp-echo 9000 on b1).
const ECHO_SVC: &str = "10.96.0.10:9000/tcp";

#[test]
fn masquerade_traffic_on_an_unserved_queue_is_dropped_never_leaked() {
    if !common::privileged("masquerade_traffic_on_an_unserved_queue_is_dropped_never_leaked") {
        return;
    }
    // 2-queue veths, lbd serving only queue 0: what RSS puts on queue 1 has no worker.
    let mut t = Topo::masq_up("unq", 2);
    t.start_lbd_on(
        &["int0", "ext0"],
        &["--masquerade-from", "10.244.0.0/16", "--queues", "1"],
    );
    t.nft(
        "srv",
        "table inet xlbtest {\n chain input {\n  type filter hook input priority 0;\n  \
         ip saddr 10.244.0.0/16 udp dport 5353 counter comment \"pod\"\n  \
         ip saddr 203.0.113.7 udp dport 5353 counter comment \"egress\"\n }\n}\n",
    );
    let out = t.py(
        "pod",
        "import socket\nans=0\n\
         for i in range(200):\n\
         \x20   s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
         \x20   s.bind(('10.244.1.2',0)); s.settimeout(0.3)\n\
         \x20   s.sendto(b'?peer',('20.0.0.10',5353))\n\
         \x20   try:\n\
         \x20       if b'203.0.113.7' in s.recvfrom(200)[0]: ans+=1\n\
         \x20   except OSError: pass\n\
         print(ans)",
    );
    let answered: u64 = out.trim().parse().expect("count");
    let leaked = t.nft_counter("srv", "pod");
    let translated = t.nft_counter("srv", "egress");
    let dropped = t.xdp_stat("no_xsk_dropped");
    assert_eq!(
        leaked,
        0,
        "no datagram reaches the server with the pod address\n{}",
        t.lbd_log()
    );
    assert!(
        translated < 200 && dropped > 0,
        "some datagrams hit the unserved queue (translated {translated}, dropped {dropped})"
    );
    assert!(
        translated + dropped >= 200,
        "every datagram is translated or counted: translated {translated}, dropped {dropped}"
    );
    assert!(
        answered > 0 && answered <= translated,
        "{answered} answered"
    );
    let st = t.lbctl_json(&["status"]);
    let unserved: Vec<&str> = st["unserved_queues"]
        .as_array()
        .expect("unserved_queues")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert_eq!(unserved, ["int0:1", "ext0:1"], "{st}");
    assert!(
        t.lbd_log().contains("DROPPED"),
        "lbd warns at start: {}",
        t.lbd_log()
    );
}

/// A TCP echo client through the VIP, kept open: prints the first answer, then echoes
/// one more line each time it reads one on stdin.
fn long_lived(t: &Topo) -> std::process::Child {
    t.cmd("client", "python3")
        .args([
            "-u",
            "-c",
            &format!(
                "import socket,sys\ns=socket.create_connection(('{VIP}',9000),timeout=5)\n\
                 f=s.makefile('rwb')\nf.write(b'hello\\n'); f.flush(); print(f.readline().decode().strip())\n\
                 for line in sys.stdin:\n    f.write(line.encode()); f.flush(); print(f.readline().decode().strip())\n"
            ),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("long-lived client")
}

#[test]
fn a_spoofed_syn_flood_does_not_lock_out_real_clients() {
    if !common::privileged("a_spoofed_syn_flood_does_not_lock_out_real_clients") {
        return;
    }
    let mut t = Topo::up("syn", 2, 1);
    // 64 flows a worker: the flood below is 20 times the table.
    t.start_lbd(&["--flows-per-worker", "64"]);
    t.lbctl(&["service", "add", SVC, "-b", "10.1.0.11:8080"]);
    t.lbctl(&["service", "add", ECHO_SVC, "-b", "10.1.0.11:9000"]);
    let mut held = long_lived(&t);
    let mut lines = BufReader::new(held.stdout.take().expect("stdout")).lines();
    let first = lines.next().and_then(Result::ok).unwrap_or_default();
    assert_eq!(first, "b1:hello", "{}", t.lbd_log());
    // hping3: SYNs from random sources (the backend answers each with a SYN+ACK that no
    // client will ever ACK), ~1000 a second for ~2.5 s.
    let mut flood = t
        .cmd("client", "hping3")
        .args([
            "-q",
            "-S",
            "-p",
            "80",
            "--rand-source",
            "-i",
            "u1000",
            "-c",
            "2560",
            VIP,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("hping3");
    std::thread::sleep(Duration::from_millis(300));
    // Real clients keep connecting while the flood runs.
    let mut ok = 0;
    for _ in 0..20 {
        if t.curl_many(1) == ["backend b1"] {
            ok += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(flood.wait().expect("hping3").success(), "hping3 ran");
    let evicted = t.worker_sum("flows_evicted");
    let full = t.worker_drop("flow_table_full");
    assert_eq!(
        ok,
        20,
        "every real client got through (evicted {evicted}, table full {full})\n{}",
        t.lbd_log()
    );
    assert!(
        evicted > 128,
        "the flood filled the table and half-open flows were evicted: {evicted}"
    );
    // The established connection was never touched.
    writeln!(held.stdin.as_mut().expect("stdin"), "after").expect("write");
    let after = lines.next().and_then(Result::ok).unwrap_or_default();
    assert_eq!(after, "b1:after", "{}", t.lbd_log());
    let _ = held.kill();
    let _ = held.wait();
    // The table holds at most its capacity, and the half-open flows show as such.
    let nat = t.lbctl_json(&["nat", "list"]);
    let flows = nat["translations"].as_array().expect("translations");
    assert!(flows.len() <= 128, "{}", flows.len());
    assert!(
        flows.iter().filter(|f| f["state"] == "established").count() <= 1 + 20,
        "spoofed flows never count as established"
    );
}

/// A python program that sends the frames of `frames` (python expressions building
/// bytes from `eth`, `ip`, `tcp`, `udp`) out of c0 with an AF_PACKET socket.
fn send_raw(t: &Topo, frames: &[&str]) {
    let lb_mac = {
        let o = t
            .cmd("lb", "cat")
            .arg("/sys/class/net/lb0/address")
            .output()
            .expect("mac");
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let mut prog = format!(
        "import socket,struct\n\
         LB=bytes.fromhex('{}')\n\
         ME=open('/sys/class/net/c0/address').read().strip()\nME=bytes.fromhex(ME.replace(':',''))\n\
         def csum(b):\n\
         \x20   if len(b)%2: b+=b'\\0'\n\
         \x20   s=sum(struct.unpack('!%dH'%(len(b)//2),b)); s=(s>>16)+(s&0xffff); s+=s>>16; return (~s)&0xffff\n\
         def eth(dst=None, vlan=None):\n\
         \x20   h=(dst or LB)+ME\n\
         \x20   if vlan is not None: h+=struct.pack('!HH',0x8100,vlan)\n\
         \x20   return h+b'\\x08\\x00'\n\
         def ip(payload, proto=6, src='10.0.0.2', dst='{VIP}', bad_sum=False):\n\
         \x20   h=struct.pack('!BBHHHBBH4s4s',0x45,0,20+len(payload),1,0x4000,64,proto,0,socket.inet_aton(src),socket.inet_aton(dst))\n\
         \x20   c=csum(h) ^ (0x40 if bad_sum else 0)\n\
         \x20   return h[:10]+struct.pack('!H',c)+h[12:]+payload\n\
         def tcp(flags=0x02, sport=40000, dport=80):\n\
         \x20   return struct.pack('!HHIIBBHHH',sport,dport,1,0,0x50,flags,65535,0,0)\n\
         def udp(length=None, dport=53):\n\
         \x20   d=b'query'\n\
         \x20   return struct.pack('!HHHH',40000,dport,length if length is not None else 8+len(d),0)+d\n\
         s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\ns.bind(('c0',0))\n",
        lb_mac.replace(':', "")
    );
    for f in frames {
        prog.push_str(&format!("s.send({f})\n"));
    }
    t.client_py(&prog);
}

#[test]
fn frames_a_router_would_drop_are_dropped_and_counted() {
    let Some(t) = Topo::start("rtr", 2, 1) else {
        return;
    };
    t.lbctl(&["service", "add", SVC, "-b", "10.1.0.11:8080"]);
    t.lbctl(&[
        "service",
        "add",
        "10.96.0.10:53/udp",
        "-b",
        "10.1.0.11:5353",
    ]);
    // The real thing works, so the frames below are refused for what they are.
    assert_eq!(t.curl_many(1), ["backend b1"]);
    let flows_before = t.worker_sum("flows_created");
    send_raw(
        &t,
        &[
            "eth(dst=bytes.fromhex('020000000099'))+ip(tcp())",
            "eth(dst=b'\\xff'*6)+ip(tcp())",
            "eth(vlan=100)+ip(tcp())",
            "eth()+ip(tcp(), src='127.0.0.1')",
            "eth()+ip(tcp(), src='255.255.255.255')",
            "eth()+ip(tcp(), src='224.0.0.5')",
            "eth()+ip(tcp(), src='10.96.0.10')",
            "eth()+ip(udp(length=200), proto=17)",
            "eth()+ip(tcp(), bad_sum=True)",
            "eth()+ip(tcp(flags=0x03))",
            "eth()+ip(tcp(flags=0x06))",
            "eth()+ip(tcp(flags=0x00))",
            "eth()+ip(tcp(flags=0x29))",
        ],
    );
    std::thread::sleep(Duration::from_millis(300));
    let xdp = |s: &str| t.xdp_stat(s);
    assert_eq!(xdp("foreign_mac_dropped"), 2, "foreign and broadcast MAC");
    assert_eq!(xdp("vlan_tagged_passed"), 1);
    assert_eq!(
        xdp("martian_source_dropped"),
        4,
        "loopback, broadcast, multicast, VIP"
    );
    assert_eq!(xdp("length_mismatch_dropped"), 1);
    assert_eq!(t.worker_drop("bad_ip_checksum"), 1);
    assert_eq!(t.worker_drop("invalid_tcp_flags"), 4);
    assert_eq!(
        t.worker_sum("flows_created"),
        flows_before,
        "none of them took a flow slot"
    );
}

#[test]
fn bad_flags_are_refused_with_the_limit_and_leave_nothing_behind() {
    if !common::privileged("bad_flags_are_refused_with_the_limit_and_leave_nothing_behind") {
        return;
    }
    let t = Topo::up("flg", 1, 1);
    let sock = t.dir().join("flags.sock");
    let sock_s = sock.to_string_lossy().into_owned();
    let lbd = |args: &[&str]| {
        t.cmd("lb", env!("CARGO_BIN_EXE_lbd"))
            .args(["--no-state", "--iface", "lb0", "--socket", &sock_s])
            .args(args)
            .output()
            .expect("lbd")
    };
    let cases: &[(&[&str], &str)] = &[
        (
            &["--timeout-tcp-established", "18446744074"],
            "outside 1..=2592000",
        ),
        (&["--timeout-udp", "0"], "outside 1..=2592000"),
        (&["--flows-per-worker", "0"], "1..=16777216"),
        (&["--flows-per-worker", "100000000000"], "1..=16777216"),
        (&["--ring-size", "1000"], "power of two"),
        (&["--queues", "0"], "1..=64"),
        (&["--socket-mode", "9"], "octal"),
        (&["--snat-addr", "0.0.0.0"], "not a host's address"),
        (&["--snat-addr", "255.255.255.255"], "limited broadcast"),
        (&["--snat-addr", "239.1.1.1"], "multicast"),
        (&["--cores", "99"], "core 99 does not exist"),
        (&["--socket-group", "no-such-group-xlb"], "no such group"),
        (
            &["--hash-seed-file", "/nonexistent/xlb-seed"],
            "No such file",
        ),
        (
            &["--hash-seed-file", "/proc/self/cmdline"],
            "want 16 hex digits",
        ),
        (
            &["--snat-addr", "10.0.0.1-10.0.1.0"],
            "more than 15 addresses",
        ),
        (
            &["--encap-source", "224.0.0.5"],
            "must be a unicast address",
        ),
        (
            &["--encap-source", "nonsense"],
            "invalid IPv4 address syntax",
        ),
    ];
    for (args, needle) in cases {
        let o = lbd(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "lbd {args:?} must refuse");
        assert!(
            err.contains(needle),
            "lbd {args:?}: {err:?} lacks {needle:?}"
        );
        assert!(!sock.exists(), "lbd {args:?} left its socket behind");
        assert!(!err.contains("ready"), "lbd {args:?} said ready: {err}");
    }
    // --socket never removes what is not a stale socket.
    std::fs::write(&sock, b"operator data").expect("write");
    let o = lbd(&[]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is not a socket"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(std::fs::read(&sock).expect("still there"), b"operator data");
}

#[test]
fn the_control_thread_never_waits_for_the_network_and_retries_are_idempotent() {
    let Some(t) = Topo::start("ctl", 2, 2) else {
        return;
    };
    t.lbctl(&["service", "add", SVC, "-b", "10.1.0.11:8080"]);
    // 20 backends nobody answers ARP for, added at once, while an operator asks for
    // status: each add used to block the control thread for up to 0.5 s.
    let lbctl = std::path::PathBuf::from(env!("CARGO_BIN_EXE_lbd")).with_file_name("lbctl");
    let adds: Vec<_> = (0..20)
        .map(|i| {
            Command::new(&lbctl)
                .arg("--socket")
                .arg(&t.socket)
                .args(["backend", "add", SVC, &format!("10.1.0.{}:8080", 150 + i)])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("lbctl")
        })
        .collect();
    let start = Instant::now();
    let status = t.try_lbctl(&["status"]);
    let took = start.elapsed();
    for a in adds {
        let o = a.wait_with_output().expect("add");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert!(status.status.success());
    // Functional bound, not a speed target: 20 adds blocking 0.5 s each took ~10 s.
    assert!(
        took < Duration::from_secs(3),
        "status waited {took:?} behind the adds"
    );
    let list = t.lbctl_json(&["service", "list"]);
    let backends = list["services"][0]["backends"]
        .as_array()
        .expect("backends");
    assert_eq!(backends.len(), 21);
    assert!(
        backends
            .iter()
            .any(|b| b["next_hop"] == "resolving" || b["next_hop"] == "no route"),
        "unresolved backends are shown as such: {list}"
    );
    // A retried change with the same id is answered again, not applied twice.
    let args = [
        "--request-id",
        "op-42",
        "backend",
        "add",
        SVC,
        "10.1.0.12:8080",
    ];
    let first = t.lbctl(&args);
    let again = t.lbctl(&args);
    assert_eq!(first, again);
    let o = t.try_lbctl(&["backend", "add", SVC, "10.1.0.12:8080"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already in service"),
        "a new id is a new request"
    );
    // Changes are logged with who made them.
    assert!(
        t.lbd_log().contains("change applied") && t.lbd_log().contains("uid 0"),
        "{}",
        t.lbd_log()
    );
    // A frontend on the node's own address may not take a port a local process
    // listens on (ssh, BGP, ...).
    let mut listener = t
        .cmd("lb", "python3")
        .args([
            "-c",
            "import socket,time\ns=socket.socket(socket.AF_INET6)\n\
             s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0)\n\
             s.bind(('::',2222)); s.listen(); print('ready',flush=True); time.sleep(60)",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("listener");
    let mut ready = String::new();
    BufReader::new(listener.stdout.take().expect("stdout"))
        .read_line(&mut ready)
        .expect("ready");
    let o = t.try_lbctl(&[
        "service",
        "add",
        "10.0.0.1:2222/tcp",
        "-b",
        "10.1.0.11:8080",
    ]);
    let _ = listener.kill();
    let _ = listener.wait();
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("listens on that port"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // A second lbd on the same interface says what is wrong and leaves the first alone.
    let o = t
        .cmd("lb", env!("CARGO_BIN_EXE_lbd"))
        .args(["--no-state", "--iface", "lb0", "--socket"])
        .arg(t.dir().join("second.sock"))
        .output()
        .expect("second lbd");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("already has an XDP program attached"),
        "{err}"
    );
    assert!(!err.contains("falling back"), "{err}");
    let st = t.lbctl_json(&["status"]);
    assert_eq!(
        st["interfaces"][0]["xdp_mode"], "native",
        "the first lbd keeps its interface: {st}"
    );
    // A closed stdout (lbctl … | head) ends lbctl quietly.
    let mut c = Command::new(&lbctl)
        .arg("--socket")
        .arg(&t.socket)
        .args(["service", "list"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("lbctl");
    drop(c.stdout.take());
    let o = c.wait_with_output().expect("lbctl");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && !err.contains("panicked"), "{err}");
}

#[test]
fn lbd_stops_with_a_clear_error_when_its_interface_vanishes() {
    let Some(mut t) = Topo::start("gone", 2, 1) else {
        return;
    };
    let st = t.lbctl_json(&["status"]);
    assert!(st["interfaces"].as_array().expect("ifaces").len() == 2);
    assert!(t
        .cmd("lb", "ip")
        .args(["link", "del", "lb0"])
        .status()
        .expect("ip")
        .success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while t.lbd_alive() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!t.lbd_alive(), "lbd stopped");
    assert!(
        t.lbd_log().contains("interface lb0 disappeared"),
        "{}",
        t.lbd_log()
    );
}

#[test]
fn connections_survive_their_packets_moving_to_another_queue() {
    // The workers' way (hand-offs to the owner), without the fast path...
    moving_queues("rss", false);
}

#[test]
fn fast_path_connections_survive_their_packets_moving_to_another_queue() {
    // ...and with it, where XDP forwards established segments from any queue.
    moving_queues("rsf", true);
}

fn moving_queues(tag: &str, fast_path: bool) {
    if !common::privileged(tag) {
        return;
    }
    let mut t = Topo::up(tag, 2, 1);
    t.start_lbd(if fast_path {
        &[]
    } else {
        &["--fast-path", "off"]
    });
    t.lbctl(&["service", "add", ECHO_SVC, "-b", "10.1.0.11:9000"]);
    // Sixteen connections: the client's veth spreads them over both queues by flow hash
    // (all on one queue: 1 in 65536).
    let mut conns: Vec<_> = (0..16).map(|_| long_lived(&t)).collect();
    let mut readers: Vec<_> = conns
        .iter_mut()
        .map(|c| BufReader::new(c.stdout.take().expect("stdout")).lines())
        .collect();
    for r in &mut readers {
        assert_eq!(
            r.next().and_then(Result::ok).as_deref(),
            Some("b1:hello"),
            "{}",
            t.lbd_log()
        );
    }
    let nat = t.lbctl_json(&["nat", "list"]);
    let on_worker_1 = nat["translations"]
        .as_array()
        .expect("translations")
        .iter()
        .filter(|f| f["worker"] == 1)
        .count();
    assert!(
        on_worker_1 > 0,
        "some connections opened on queue 1 (16 connections, {on_worker_1} there): {nat}"
    );
    let handed = |t: &Topo| {
        t.lbctl_json(&["stats"])["workers"][0]["handoff_out"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = handed(&t);
    // An RSS change: from now on every client segment arrives on queue 0, whichever
    // worker owns its connection.
    assert!(t
        .cmd("client", "ethtool")
        .args(["-L", "c0", "tx", "1"])
        .status()
        .expect("ethtool")
        .success());
    for (i, (c, r)) in conns.iter_mut().zip(&mut readers).enumerate() {
        writeln!(c.stdin.as_mut().expect("stdin"), "moved {i}").expect("write");
        assert_eq!(
            r.next().and_then(Result::ok).as_deref(),
            Some(format!("b1:moved {i}").as_str()),
            "connection {i} after the queue change\n{}",
            t.lbd_log()
        );
    }
    if fast_path {
        // Established segments never climbed to a worker: nothing to hand on.
        assert!(t.xdp_stat("fast_path") >= 32, "{}", t.lbctl(&["stats"]));
    } else {
        // Each of worker 1's connections sent at least one segment through worker 0,
        // which handed it to its home.
        assert!(
            handed(&t) - before >= on_worker_1 as u64,
            "segments of worker 1's connections arrived on worker 0 and were handed on"
        );
    }
    assert_eq!(t.worker_drop("no_flow"), 0);
    for mut c in conns {
        let _ = c.kill();
        let _ = c.wait();
    }
}
