//! `xlb-bench run`: every scenario on the topology of bench/netns.sh, one after another,
//! each in fresh namespaces (no conntrack or flow state carried over).
//!
//! Per measured point the generator (pinned to `--gen-cpu`) sends for warm-up +
//! measurement seconds; the sink is read at the start and the end of the measurement
//! window, and the received rate is the difference over the elapsed time. The systems
//! under test run on `--sut-cpu`: lbd's worker is pinned there, the AF_XDP forwarder
//! too, and for nftables a cpumap program on the ingress interface hands every frame to
//! the stack on that CPU.

use crate::cost::Case;
use crate::report::{self, CostResult, Latency, Meta, PpsPoint, Results, TcpPoint};
use crate::stats::Summary;
use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

const GEN_NS: &str = "xb-gen";
const LB_NS: &str = "xb-lb";
const SRV_NS: &str = "xb-srv";
const VIP: &str = "10.96.0.10";
const BACKENDS: [&str; 3] = ["10.20.0.11", "10.20.0.12", "10.20.0.13"];
/// Ports the sink counts and drops (the generator sends to 9..=24).
const SINK_PORTS: &str = "9-24";
const NAT_PORTS: &str = "1024-59999";
const ECHO_PORT: u16 = 7;
/// The TCP measurements' servers in xb-srv, on every backend address: iperf3 and nginx.
const IPERF_PORT: u16 = 5201;
const HTTP_PORT: u16 = 80;
/// wrk's keep-alive connections (one thread).
pub const WRK_CONNECTIONS: u32 = 16;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// (d) XDP MAC rewrite + redirect to the backend side: the machine's ceiling.
    XdpRedirect,
    /// (c) bare MAC-swap forwarder on xlb's AF_XDP I/O layer: the userspace ceiling.
    XskFwd,
    /// (a) lbd, SNAT mode, VIP → 3 backends (established flows in the XDP fast path).
    XlbSnat,
    /// (a) the same with `--fast-path off`: every packet through a worker.
    XlbSnatWorkers,
    /// (b) nftables DNAT (numgen over 3 backends) + masquerade, kube-proxy style.
    NftDnat,
    /// (e) lbd egress masquerading (ip-masq-agent defaults).
    XlbMasq,
    /// (e) nftables masquerade with the same non-masquerade list.
    NftMasq,
    /// (f) lbd, L2 direct server return (the backend's MAC; one direction).
    XlbDsrL2,
    /// (f) lbd, direct server return over IPIP (the frame grows by 20 bytes).
    XlbDsrIpip,
}

impl Scenario {
    pub const ALL: [Scenario; 9] = [
        Scenario::XdpRedirect,
        Scenario::XskFwd,
        Scenario::XlbSnat,
        Scenario::XlbSnatWorkers,
        Scenario::NftDnat,
        Scenario::XlbMasq,
        Scenario::NftMasq,
        Scenario::XlbDsrL2,
        Scenario::XlbDsrIpip,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Scenario::XdpRedirect => "XDP redirect (ceiling)",
            Scenario::XskFwd => "AF_XDP fwd (bare)",
            Scenario::XlbSnat => "xlb SNAT",
            Scenario::XlbSnatWorkers => "xlb SNAT, workers only",
            Scenario::NftDnat => "nftables DNAT+masq",
            Scenario::XlbMasq => "xlb egress masq",
            Scenario::NftMasq => "nftables masq",
            Scenario::XlbDsrL2 => "xlb DSR L2",
            Scenario::XlbDsrIpip => "xlb DSR IPIP",
        }
    }

    /// The service mode lbd runs the scenario's services in.
    fn mode(self) -> &'static str {
        match self {
            Scenario::XlbDsrL2 => "dsr-l2",
            Scenario::XlbDsrIpip => "dsr-ipip",
            _ => "snat",
        }
    }

    fn egress(self) -> bool {
        matches!(self, Scenario::XlbMasq | Scenario::NftMasq)
    }

    fn has_latency(self) -> bool {
        matches!(self, Scenario::XlbSnat | Scenario::NftDnat)
    }

    /// Established TCP through the VIP with real stacks (iperf3, wrk): the load
    /// balancers, with and without xlb's fast path.
    fn has_tcp(self) -> bool {
        matches!(
            self,
            Scenario::XlbSnat | Scenario::XlbSnatWorkers | Scenario::NftDnat
        )
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunOptions {
    /// A few seconds in all: one run, 1 k flows, 64 B, short windows. Proves the harness
    /// works (CI); the figures mean little.
    #[arg(long)]
    pub smoke: bool,
    /// Directory for results.json, pps.png, latency.png and logs.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// Rewrite the results section of this markdown file (docs/benchmarks.md).
    #[arg(long)]
    pub doc: Option<PathBuf>,
    #[arg(long, value_delimiter = ',', value_enum)]
    pub scenarios: Vec<Scenario>,
    /// Flow counts [default: 1,1000,100000; smoke: 1000].
    #[arg(long, value_delimiter = ',')]
    pub flows: Vec<u32>,
    /// Frame sizes on the wire incl. FCS [default: 64,1518; smoke: 64].
    #[arg(long, value_delimiter = ',')]
    pub sizes: Vec<usize>,
    /// Runs per point [default: 3; smoke: 1].
    #[arg(long)]
    pub runs: Option<usize>,
    /// Seconds measured per run [default: 2; smoke: 0.5].
    #[arg(long)]
    pub seconds: Option<f64>,
    /// Seconds of traffic before measuring [default: 1; smoke: 0.3].
    #[arg(long)]
    pub warmup: Option<f64>,
    #[arg(long, value_parser = ["udp", "tcp"], default_value = "udp")]
    pub proto: String,
    #[arg(long, default_value_t = 0)]
    pub gen_cpu: usize,
    #[arg(long, default_value_t = 1)]
    pub sut_cpu: usize,
    /// Latency: requests per second.
    #[arg(long, default_value_t = 2000)]
    pub latency_rate: u32,
    /// Latency: seconds per system [default: 10; smoke: 1].
    #[arg(long)]
    pub latency_seconds: Option<f64>,
    /// TCP (iperf3, wrk): whole seconds per run [default: 5; smoke: 1].
    #[arg(long)]
    pub tcp_seconds: Option<u32>,
    /// Skip the callgrind/engine costs.
    #[arg(long)]
    pub no_cost: bool,
}

/// The plan after defaults.
struct Plan {
    scenarios: Vec<Scenario>,
    flows: Vec<u32>,
    sizes: Vec<usize>,
    runs: usize,
    seconds: f64,
    warmup: f64,
    latency_seconds: f64,
    tcp_seconds: u32,
}

impl Plan {
    fn of(o: &RunOptions) -> Plan {
        let pick = |v: &[u32], full: &[u32], smoke: &[u32]| {
            if !v.is_empty() {
                v.to_vec()
            } else if o.smoke {
                smoke.to_vec()
            } else {
                full.to_vec()
            }
        };
        Plan {
            scenarios: if o.scenarios.is_empty() {
                Scenario::ALL.to_vec()
            } else {
                o.scenarios.clone()
            },
            flows: pick(&o.flows, &[1, 1000, 100_000], &[1000]),
            sizes: if !o.sizes.is_empty() {
                o.sizes.clone()
            } else if o.smoke {
                vec![64]
            } else {
                vec![64, 1518]
            },
            runs: o.runs.unwrap_or(if o.smoke { 1 } else { 3 }),
            seconds: o.seconds.unwrap_or(if o.smoke { 0.5 } else { 2.0 }),
            warmup: o.warmup.unwrap_or(if o.smoke { 0.3 } else { 1.0 }),
            latency_seconds: o
                .latency_seconds
                .unwrap_or(if o.smoke { 1.0 } else { 10.0 }),
            tcp_seconds: o.tcp_seconds.unwrap_or(if o.smoke { 1 } else { 5 }),
        }
    }
}

/// A child process killed (and reaped) when dropped.
struct Proc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Option<BufReader<ChildStdout>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        drop(self.stdin.take());
        // Give it a moment to leave on its own (stdin closed), then insist.
        for _ in 0..20 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Start `args` in namespace `ns`, stderr to `log`.
    fn spawn(ns: &str, args: &[String], log: &Path) -> Result<Proc> {
        let err = std::fs::File::create(log).with_context(|| format!("creating {log:?}"))?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {args:?} in {ns}"))?;
        Ok(Proc {
            name: args.first().cloned().unwrap_or_default(),
            stdin: child.stdin.take(),
            stdout: child.stdout.take().map(BufReader::new),
            child,
        })
    }

    fn line(&mut self) -> Result<String> {
        let mut s = String::new();
        let out = self
            .stdout
            .as_mut()
            .ok_or_else(|| anyhow!("{} has no stdout", self.name))?;
        if out.read_line(&mut s)? == 0 {
            bail!("{} exited (see its log)", self.name);
        }
        Ok(s.trim().to_string())
    }

    /// Wait for the child's "ready" line.
    fn ready(&mut self) -> Result<()> {
        let l = self.line()?;
        if l != "ready" {
            bail!("{} said {l:?} instead of ready", self.name);
        }
        Ok(())
    }
}

fn sh(args: &[&str]) -> Result<String> {
    let o = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {args:?}"))?;
    if !o.status.success() {
        bail!(
            "{args:?} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

fn mac_of(ns: &str, dev: &str) -> Result<String> {
    let j: serde_json::Value =
        serde_json::from_str(&sh(&["ip", "-n", ns, "-j", "link", "show", dev])?)?;
    j[0]["address"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no MAC for {dev} in {ns}"))
}

/// Paths of our own binaries (xlb-bench, lbd, lbctl: built together).
struct Bins {
    me: String,
    lbd: String,
    lbctl: String,
}

impl Bins {
    fn find() -> Result<Bins> {
        let me = std::env::current_exe()?;
        let dir = me
            .parent()
            .ok_or_else(|| anyhow!("no directory for {me:?}"))?;
        let get = |n: &str| -> Result<String> {
            let p = dir.join(n);
            if !p.exists() {
                bail!("{p:?} missing: build the workspace (cargo build --release) first");
            }
            Ok(p.to_string_lossy().into_owned())
        };
        Ok(Bins {
            me: me.to_string_lossy().into_owned(),
            lbd: get("lbd")?,
            lbctl: get("lbctl")?,
        })
    }
}

/// The sink in xb-srv, read on demand.
struct SinkProc(Proc);

impl SinkProc {
    fn read(&mut self) -> Result<(u64, Instant)> {
        let stdin = self
            .0
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("sink stdin closed"))?;
        stdin.write_all(b"\n")?;
        stdin.flush()?;
        let l = self.0.line()?;
        let t = Instant::now();
        let p = l
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("sink said {l:?}"))?;
        Ok((p, t))
    }
}

/// What a scenario leaves running (dropped at its end).
struct Sut {
    _procs: Vec<Proc>,
    lbctl: Option<(String, PathBuf)>,
}

impl Sut {
    fn lbctl(&self, args: &[&str]) -> Result<String> {
        let (bin, sock) = self
            .lbctl
            .as_ref()
            .ok_or_else(|| anyhow!("no lbd in this scenario"))?;
        let sock = sock.to_string_lossy();
        let mut a = vec![bin.as_str(), "--socket", &sock];
        a.extend_from_slice(args);
        sh(&a)
    }
}

fn start_lbd(bins: &Bins, o: &RunOptions, dir: &Path, s: Scenario) -> Result<Sut> {
    let sock = dir.join(format!("lbd-{s:?}.sock"));
    let _ = std::fs::remove_file(&sock);
    let mut args: Vec<String> = [
        bins.lbd.as_str(),
        "--iface",
        "lbin",
        "--iface",
        "lbout",
        "--queues",
        "1",
        "--snat-ports",
        NAT_PORTS,
        "--log",
        "warn",
        "--no-state",
        "--no-pin",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(["--cores".into(), o.sut_cpu.to_string()]);
    args.extend(["--socket".into(), sock.to_string_lossy().into_owned()]);
    if s == Scenario::XlbSnatWorkers {
        args.extend(["--fast-path".into(), "off".into()]);
    }
    if s.egress() {
        args.extend(
            [
                "--masquerade-from",
                "10.244.0.0/16",
                "--egress-iface",
                "lbout",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
    }
    let p = Proc::spawn(LB_NS, &args, &dir.join(format!("lbd-{s:?}.log")))?;
    let sut = Sut {
        _procs: vec![p],
        lbctl: Some((bins.lbctl.clone(), sock)),
    };
    let t = Instant::now();
    while sut.lbctl(&["status"]).is_err() {
        if t.elapsed() > Duration::from_secs(15) {
            bail!("lbd did not answer within 15 s (log: {dir:?}/lbd-{s:?}.log)");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if !s.egress() {
        for (port, proto) in [
            (9, "udp"),
            (9, "tcp"),
            (ECHO_PORT, "udp"),
            (IPERF_PORT, "tcp"),
            (HTTP_PORT, "tcp"),
        ] {
            let fe = format!("{VIP}:{port}/{proto}");
            let mut a = vec![
                "service".to_string(),
                "add".into(),
                fe,
                "--mode".into(),
                s.mode().into(),
            ];
            for b in BACKENDS {
                a.extend(["-b".into(), format!("{b}:{port}")]);
            }
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            sut.lbctl(&a)?;
        }
    }
    Ok(sut)
}

/// ip-masq-agent's default non-masquerade list (what lbd uses without a config file).
const NON_MASQ: &str = "10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10, \
    192.0.0.0/24, 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 198.18.0.0/15, \
    240.0.0.0/4, 169.254.0.0/16";

fn nft_rules(s: Scenario) -> String {
    let backends = BACKENDS
        .iter()
        .enumerate()
        .map(|(i, b)| format!("{i} : {b}"))
        .collect::<Vec<_>>()
        .join(", ");
    if s.egress() {
        format!(
            "table ip xbench {{\n  chain post {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
             oifname \"lbout\" ip saddr 10.244.0.0/16 ip daddr != {{ {NON_MASQ} }} masquerade fully-random\n  }}\n}}\n"
        )
    } else {
        format!(
            "table ip xbench {{\n  chain pre {{\n    type nat hook prerouting priority dstnat; policy accept;\n    \
             ip daddr {VIP} meta l4proto {{ tcp, udp }} th dport {{ {ECHO_PORT}, 9, {IPERF_PORT}, {HTTP_PORT} }} dnat to numgen random mod 3 map {{ {backends} }}\n  }}\n  \
             chain post {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
             ct status dnat oifname \"lbout\" masquerade fully-random\n  }}\n}}\n"
        )
    }
}

fn start_sut(bins: &Bins, o: &RunOptions, dir: &Path, s: Scenario) -> Result<Sut> {
    let srv_mac = mac_of(SRV_NS, "srv0")?;
    let me = bins.me.clone();
    let log = dir.join(format!("{s:?}.log"));
    let cpu = o.sut_cpu.to_string();
    let reference = |args: &[&str]| -> Result<Sut> {
        let mut a = vec![
            me.clone(),
            "reference".into(),
            "--iface".into(),
            "lbin".into(),
        ];
        a.extend(args.iter().map(|s| s.to_string()));
        let mut p = Proc::spawn(LB_NS, &a, &log)?;
        p.ready()?;
        Ok(Sut {
            _procs: vec![p],
            lbctl: None,
        })
    };
    match s {
        Scenario::XdpRedirect => reference(&["redirect", "--out", "lbout", "--next-hop", &srv_mac]),
        Scenario::XskFwd => {
            let a: Vec<String> = [
                me.as_str(),
                "xsk-fwd",
                "--in",
                "lbin",
                "--out",
                "lbout",
                "--next-hop",
                &srv_mac,
                "--cpu",
                &cpu,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let mut p = Proc::spawn(LB_NS, &a, &log)?;
            p.ready()?;
            Ok(Sut {
                _procs: vec![p],
                lbctl: None,
            })
        }
        Scenario::XlbSnat
        | Scenario::XlbSnatWorkers
        | Scenario::XlbMasq
        | Scenario::XlbDsrL2
        | Scenario::XlbDsrIpip => start_lbd(bins, o, dir, s),
        Scenario::NftDnat | Scenario::NftMasq => {
            let rules = dir.join(format!("{s:?}.nft"));
            std::fs::write(&rules, nft_rules(s))?;
            sh(&[
                "ip",
                "netns",
                "exec",
                LB_NS,
                "nft",
                "-f",
                &rules.to_string_lossy(),
            ])?;
            reference(&["cpu", "--cpu", &cpu])
        }
    }
}

/// One generator run; returns (received pps at the sink, offered pps).
fn point(
    ctx: (&Bins, &RunOptions, &Plan),
    sink: &mut SinkProc,
    dst_mac: &str,
    s: Scenario,
    flows: u32,
    size: usize,
    log: &Path,
) -> Result<(f64, f64)> {
    let (bins, o, plan) = ctx;
    let (src, dst, dst_ports) = if s.egress() {
        ("10.244.0.1", "20.0.0.10", "16")
    } else {
        ("10.99.0.1", VIP, "1")
    };
    let secs = plan.warmup + plan.seconds + 0.3;
    let a: Vec<String> = [
        bins.me.as_str(),
        "gen",
        "--iface",
        "gen0",
        "--dst-mac",
        dst_mac,
        "--src",
        src,
        "--dst",
        dst,
        "--dport",
        "9",
        "--dst-ports",
        dst_ports,
        "--proto",
        &o.proto,
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "--flows".into(),
        flows.to_string(),
        "--size".into(),
        size.to_string(),
        "--seconds".into(),
        secs.to_string(),
        "--cpu".into(),
        o.gen_cpu.to_string(),
    ])
    .collect();
    let mut g = Proc::spawn(GEN_NS, &a, log)?;
    std::thread::sleep(Duration::from_secs_f64(plan.warmup));
    let (p0, t0) = sink.read()?;
    std::thread::sleep(Duration::from_secs_f64(plan.seconds));
    let (p1, t1) = sink.read()?;
    let out = g.line().context("generator result")?;
    let j: serde_json::Value = serde_json::from_str(&out)?;
    let offered = j["pps"].as_f64().unwrap_or(0.0);
    let rx = (p1 - p0) as f64 / (t1 - t0).as_secs_f64();
    Ok((rx, offered))
}

/// Request/response latency through the VIP (the `ping` subcommand's work).
pub fn ping(target: SocketAddr, rate: u32, duration: Duration) -> Result<Latency> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    sock.connect(target)?;
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1_000, 10_000_000_000, 3)?;
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let start = Instant::now();
    let skip = Duration::from_millis(100); // the first replies include flow set-up
    let mut next = start;
    let (mut sent, mut received) = (0u64, 0u64);
    let mut buf = [0u8; 64];
    let end = start + duration;
    loop {
        let now = Instant::now();
        if now >= end + Duration::from_millis(200) {
            break;
        }
        if now >= next && now < end {
            let t = now.duration_since(start).as_nanos() as u64;
            let mut msg = [0u8; 16];
            msg[..8].copy_from_slice(&sent.to_be_bytes());
            msg[8..].copy_from_slice(&t.to_be_bytes());
            if sock.send(&msg).is_ok() {
                sent += 1;
            }
            next += interval;
            continue;
        }
        let wait = if now < end {
            next.saturating_duration_since(now)
        } else {
            end + Duration::from_millis(200) - now
        };
        sock.set_read_timeout(Some(wait.max(Duration::from_micros(10))))?;
        if let Ok(n) = sock.recv(&mut buf) {
            if n >= 16 {
                let t = u64::from_be_bytes(buf[8..16].try_into()?);
                let rtt = Instant::now().duration_since(start).as_nanos() as u64 - t;
                received += 1;
                if Duration::from_nanos(t) >= skip {
                    hist.saturating_record(rtt);
                }
            }
        }
    }
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1e3;
    Ok(Latency {
        scenario: None,
        rate,
        sent,
        received,
        p50_us: us(0.5),
        p99_us: us(0.99),
        p999_us: us(0.999),
        max_us: hist.max() as f64 / 1e3,
    })
}

fn latency(bins: &Bins, o: &RunOptions, plan: &Plan, s: Scenario, dir: &Path) -> Result<Latency> {
    let mut a = vec![
        bins.me.clone(),
        "echo".into(),
        "--port".into(),
        ECHO_PORT.to_string(),
    ];
    for b in BACKENDS {
        a.extend(["--addr".into(), b.into()]);
    }
    let _echo = Proc::spawn(SRV_NS, &a, &dir.join("echo.log"))?;
    std::thread::sleep(Duration::from_millis(200));
    let a: Vec<String> = vec![
        bins.me.clone(),
        "ping".into(),
        "--target".into(),
        format!("{VIP}:{ECHO_PORT}"),
        "--rate".into(),
        o.latency_rate.to_string(),
        "--seconds".into(),
        plan.latency_seconds.to_string(),
    ];
    let mut p = Proc::spawn(GEN_NS, &a, &dir.join(format!("ping-{s:?}.log")))?;
    let mut l: Latency = serde_json::from_str(&p.line()?)?;
    l.scenario = Some(s);
    Ok(l)
}

/// Established TCP through the VIP with real stacks, `plan.runs` times: one iperf3
/// stream (Gbit/s received) and keep-alive HTTP with wrk against nginx (requests/s).
/// Clients in xb-gen, servers in xb-srv, all on the generator's CPU, as the generator
/// is; what the system under test does in its own context runs on its CPU.
fn tcp(o: &RunOptions, plan: &Plan, s: Scenario, dir: &Path) -> Result<TcpPoint> {
    let cpu = o.gen_cpu.to_string();
    let d = dir.display();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/nginx-error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d};\n\
             fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};\n\
             server {{ listen {HTTP_PORT}; keepalive_requests 1000000;\n\
             location / {{ return 200 \"ok\\n\"; }} }} }}\n"
        ),
    )?;
    let srv = |args: &[&str], log: &str| -> Result<Proc> {
        let mut a = vec!["taskset".to_string(), "-c".into(), cpu.clone()];
        a.extend(args.iter().map(|s| s.to_string()));
        Proc::spawn(SRV_NS, &a, &dir.join(log))
    };
    let _nginx = srv(&["nginx", "-c", &conf.to_string_lossy()], "nginx.log")?;
    let iperf_log = dir.join("iperf3-server.log");
    let _iperf = srv(
        &[
            "iperf3",
            "-s",
            "-p",
            &IPERF_PORT.to_string(),
            "--logfile",
            &iperf_log.to_string_lossy(),
        ],
        "iperf3-server.err",
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let client = |args: &[&str]| -> Result<String> {
        let mut a = vec!["ip", "netns", "exec", GEN_NS, "taskset", "-c", &cpu];
        a.extend_from_slice(args);
        sh(&a)
    };
    let secs = plan.tcp_seconds.max(1).to_string();
    let (mut gbps, mut rps, mut errors) = (Vec::new(), Vec::new(), 0u64);
    for _ in 0..plan.runs {
        let out = client(&[
            "iperf3",
            "-c",
            VIP,
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            &secs,
            "-J",
        ])?;
        let j: serde_json::Value = serde_json::from_str(&out).context("iperf3 -J output")?;
        let bps = j["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .ok_or_else(|| anyhow!("iperf3 reported no received rate: {out}"))?;
        gbps.push(bps / 1e9);
        let out = client(&[
            "wrk",
            "-t1",
            &format!("-c{WRK_CONNECTIONS}"),
            &format!("-d{secs}s"),
            &format!("http://{VIP}:{HTTP_PORT}/"),
        ])?;
        let (r, e) = wrk_figures(&out)?;
        rps.push(r);
        errors += e;
    }
    Ok(TcpPoint {
        scenario: s,
        iperf3: Summary::of(&gbps),
        iperf3_runs: gbps,
        wrk: Summary::of(&rps),
        wrk_runs: rps,
        wrk_errors: errors,
    })
}

/// wrk's requests/s and its errors (socket errors and non-2xx answers).
pub fn wrk_figures(out: &str) -> Result<(f64, u64)> {
    let rps = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow!("no Requests/sec in wrk's output: {out}"))?;
    let mut errors = 0;
    for l in out.lines().map(str::trim) {
        if let Some(rest) = l.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            errors += rest
                .split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(n) = l.strip_prefix("Non-2xx or 3xx responses:") {
            errors += n.trim().parse::<u64>().unwrap_or(0);
        }
    }
    Ok((rps, errors))
}

/// Instructions per packet of each engine case, from two callgrind runs.
fn costs(bins: &Bins, pb: &ProgressBar) -> Result<CostResult> {
    let collected = |case: Case, n: u32| -> Result<u64> {
        let o = Command::new("valgrind")
            .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
            .arg(&bins.me)
            .args(["cost", "--case"])
            .arg(
                format!("{case:?}")
                    .to_lowercase()
                    .replace("masqhit", "masq-hit"),
            )
            .args(["--packets", &n.to_string()])
            .output()
            .context("running valgrind (deploy/install-deps.sh installs it)")?;
        let err = String::from_utf8_lossy(&o.stderr);
        if !o.status.success() {
            bail!("callgrind run of {case:?} failed: {err}");
        }
        err.lines()
            .find_map(|l| l.split("Collected :").nth(1))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| anyhow!("no 'Collected' line from callgrind: {err}"))
    };
    let mut per_packet = Vec::new();
    for case in Case::ALL {
        pb.set_message(format!("callgrind: {case:?}"));
        let (n1, n2) = case.packets();
        let (c1, c2) = (collected(case, n1)?, collected(case, n2)?);
        per_packet.push((case, (c2.saturating_sub(c1)) as f64 / f64::from(n2 - n1)));
    }
    pb.set_message("engine: Maglev build, bytes per flow");
    let j: serde_json::Value = serde_json::from_str(sh(&[&bins.me, "engine"])?.trim())?;
    Ok(CostResult {
        instructions_per_packet: per_packet,
        maglev_build_ms: j["maglev_build_ms"].as_f64().unwrap_or(0.0),
        bytes_per_flow: j["bytes_per_flow"].as_f64().unwrap_or(0.0),
        maglev: serde_json::from_value(j["maglev"].clone()).ok(),
    })
}

/// A result line: above the progress bar, or plainly when there is no terminal.
fn say(pb: &ProgressBar, line: String) {
    if pb.is_hidden() {
        println!("{line}");
    } else {
        pb.println(line);
    }
}

fn topo(cmd: &str) -> Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("netns.sh");
    sh(&["bash", &script.to_string_lossy(), cmd]).map(|_| ())
}

pub fn run(o: RunOptions) -> Result<()> {
    let plan = Plan::of(&o);
    let bins = Bins::find()?;
    std::fs::create_dir_all(&o.out)?;
    let dir = o.out.canonicalize()?;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let points = plan.scenarios.len() * plan.flows.len() * plan.sizes.len() * plan.runs;
    let lat = plan.scenarios.iter().filter(|s| s.has_latency()).count();
    let tcps = plan.scenarios.iter().filter(|s| s.has_tcp()).count();
    let pb = ProgressBar::new((points + lat + tcps + usize::from(!o.no_cost)) as u64);
    pb.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")?
            .progress_chars("=> "),
    );
    let mut results = Results {
        meta: Meta::now(&o, plan.runs, plan.warmup, plan.seconds),
        pps: Vec::new(),
        latency: Vec::new(),
        tcp: Vec::new(),
        cost: None,
    };
    results.meta.tcp_seconds = plan.tcp_seconds;
    let outcome = (|| -> Result<()> {
        for &s in &plan.scenarios {
            pb.set_message(format!("{}: setting up", s.label()));
            topo("up")?;
            let mut sink = SinkProc(Proc::spawn(
                SRV_NS,
                &[
                    bins.me.clone(),
                    "sink".into(),
                    "--iface".into(),
                    "srv0".into(),
                    "--ports".into(),
                    SINK_PORTS.into(),
                    "--stdin".into(),
                    // Every flow answered once, in the warm-up: established both ways.
                    "--answer-first".into(),
                ],
                &logs.join("sink.log"),
            )?);
            sink.0.ready()?;
            let sut = start_sut(&bins, &o, &logs, s)?;
            let dst_mac = mac_of(LB_NS, "lbin")?;
            for &size in &plan.sizes {
                for &flows in &plan.flows {
                    let mut rx = Vec::new();
                    let mut offered = Vec::new();
                    for r in 0..plan.runs {
                        pb.set_message(format!(
                            "{}: {flows} flows, {size} B, run {}",
                            s.label(),
                            r + 1
                        ));
                        let (a, b) = point(
                            (&bins, &o, &plan),
                            &mut sink,
                            &dst_mac,
                            s,
                            flows,
                            size,
                            &logs.join("gen.log"),
                        )?;
                        rx.push(a);
                        offered.push(b);
                        pb.inc(1);
                    }
                    let p = PpsPoint {
                        scenario: s,
                        flows,
                        size,
                        summary: Summary::of(&rx),
                        runs: rx,
                        offered: Summary::of(&offered),
                    };
                    say(&pb, format!(
                        "{:<24} {:>7} flows {:>5} B  {:>6.3} Mpps (min {:.3}, max {:.3}; offered {:.3})",
                        s.label(),
                        flows,
                        size,
                        p.summary.median / 1e6,
                        p.summary.min / 1e6,
                        p.summary.max / 1e6,
                        p.offered.median / 1e6
                    ));
                    results.pps.push(p);
                }
            }
            if s.has_latency() {
                pb.set_message(format!(
                    "{}: latency at {} req/s",
                    s.label(),
                    o.latency_rate
                ));
                let l = latency(&bins, &o, &plan, s, &logs)?;
                say(
                    &pb,
                    format!(
                    "{:<24} latency p50 {:.1} µs  p99 {:.1} µs  p99.9 {:.1} µs ({} of {} answered)",
                    s.label(),
                    l.p50_us,
                    l.p99_us,
                    l.p999_us,
                    l.received,
                    l.sent
                ),
                );
                results.latency.push(l);
                pb.inc(1);
            }
            if s.has_tcp() {
                pb.set_message(format!("{}: TCP (iperf3, wrk)", s.label()));
                let t = tcp(&o, &plan, s, &logs)?;
                say(
                    &pb,
                    format!(
                        "{:<24} iperf3 {:.2} Gbit/s  wrk {:.0} requests/s ({} errors)",
                        s.label(),
                        t.iperf3.median,
                        t.wrk.median,
                        t.wrk_errors
                    ),
                );
                results.tcp.push(t);
                pb.inc(1);
            }
            if let Ok(stats) = sut.lbctl(&["stats"]) {
                std::fs::write(logs.join(format!("lbctl-stats-{s:?}.txt")), stats)?;
            }
            drop(sut);
            drop(sink);
        }
        if !o.no_cost {
            results.cost = Some(costs(&bins, &pb)?);
            pb.inc(1);
        }
        Ok(())
    })();
    let _ = topo("down");
    pb.finish_and_clear();
    outcome?;
    report::write(&results, &dir, o.doc.as_deref())?;
    println!("results: {}", dir.join("results.json").display());
    report::check(&results)
}
