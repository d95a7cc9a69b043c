//! xlb-bench: the pps and latency harness (`run`) and the pieces it starts in the
//! benchmark namespaces, which also work alone on real hardware (docs/benchmarks.md):
//! `gen`, `sink`, `reference`, `xsk-fwd`, `echo`, `ping`; plus the engine's costs
//! (`cost`, run under callgrind by `run`, and `engine`).

use anyhow::{bail, Context, Result};
use bench::cost::{self, Case};
use bench::harness::{self, RunOptions};
use bench::progs::{self, Fwd, GenSpec, Generator, Reference, Sink};
use clap::{Parser, Subcommand};
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{BufRead, Write};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Counts live heap bytes, for `engine`'s bytes per flow.
struct Counting;
static BYTES: AtomicUsize = AtomicUsize::new(0);
// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        BYTES.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        BYTES.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
}
#[global_allocator]
static A: Counting = Counting;

#[derive(Parser)]
#[command(name = "xlb-bench", version, about = "xlb's pps/latency benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the namespaces, run every scenario, write JSON, plots and the report.
    Run(RunOptions),
    /// Send generated traffic out of an interface (BPF_PROG_TEST_RUN, live frames).
    Gen(GenArgs),
    /// Count (per CPU) and drop TCP/UDP to a port range at XDP on the given interfaces.
    Sink {
        #[arg(long = "iface", required = true)]
        ifaces: Vec<String>,
        /// Destination ports counted and dropped, LO-HI.
        #[arg(long, default_value = "9-24", value_parser = parse_ports)]
        ports: (u16, u16),
        /// Answer each line on stdin with "packets bytes" (for the harness) instead of
        /// printing rates every second.
        #[arg(long)]
        stdin: bool,
        /// Answer each UDP flow's first datagram (swapped back) instead of counting it,
        /// so that flows are established both ways (what a fast path waits for).
        #[arg(long)]
        answer_first: bool,
    },
    /// Attach a reference program to the ingress interface until stdin closes.
    Reference {
        #[arg(long)]
        iface: String,
        #[command(subcommand)]
        mode: RefMode,
    },
    /// The bare forwarder: xlb's AF_XDP I/O layer (xdp::sys::WorkerIo) rewriting MACs
    /// from one interface to another, no engine. Runs until stdin closes.
    XskFwd {
        #[arg(long = "in")]
        input: String,
        #[arg(long)]
        out: String,
        /// MAC of the next hop on `out`.
        #[arg(long, value_parser = progs::parse_mac)]
        next_hop: [u8; 6],
        #[arg(long, default_value_t = 1)]
        cpu: usize,
        /// Never park in poll() (lbd's --busy-poll-us without limit).
        #[arg(long)]
        busy: bool,
    },
    /// UDP echo server; one socket per address, so each reply leaves from the address
    /// its request went to (a wildcard socket would answer from the primary address).
    Echo {
        #[arg(long, default_value_t = 7)]
        port: u16,
        #[arg(long = "addr", default_value = "0.0.0.0")]
        addrs: Vec<Ipv4Addr>,
    },
    /// Request/response latency at a fixed rate (UDP), as JSON percentiles.
    Ping {
        #[arg(long)]
        target: SocketAddr,
        /// Requests per second.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
    },
    /// Run one engine case for N packets (the harness runs this under callgrind).
    Cost {
        #[arg(long, value_enum)]
        case: Case,
        #[arg(long)]
        packets: u32,
    },
    /// Maglev build time (M = 65537, 100 backends) and bytes per flow at 1 M flows.
    Engine,
}

#[derive(Subcommand, Clone)]
enum RefMode {
    /// Rewrite MACs and XDP_REDIRECT out of OUT (the machine's forwarding ceiling).
    Redirect {
        #[arg(long)]
        out: String,
        #[arg(long, value_parser = progs::parse_mac)]
        next_hop: [u8; 6],
    },
    /// Every frame to the kernel's stack on CPU (cpumap), e.g. for nftables.
    Cpu {
        #[arg(long, default_value_t = 1)]
        cpu: u32,
    },
}

#[derive(clap::Args)]
struct GenArgs {
    /// Interface to send from (its peer receives).
    #[arg(long)]
    iface: String,
    /// Destination MAC (the receiving interface's).
    #[arg(long, value_parser = progs::parse_mac)]
    dst_mac: [u8; 6],
    /// First source address; flows beyond --ports-per-addr use the following addresses.
    #[arg(long)]
    src: Ipv4Addr,
    #[arg(long)]
    dst: Ipv4Addr,
    #[arg(long, default_value_t = 1024)]
    sport: u16,
    #[arg(long, default_value_t = 9)]
    dport: u16,
    /// Destination ports used, from --dport (flow i goes to dport + i % dst_ports).
    #[arg(long, default_value_t = 1)]
    dst_ports: u32,
    #[arg(long, default_value_t = 50_000)]
    ports_per_addr: u32,
    #[arg(long, default_value_t = 1000)]
    flows: u32,
    /// Frame size on the wire including FCS (64..=1518).
    #[arg(long, default_value_t = 64)]
    size: usize,
    #[arg(long, value_parser = ["udp", "tcp"], default_value = "udp")]
    proto: String,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// CPU to run on.
    #[arg(long, default_value_t = 0)]
    cpu: usize,
}

fn parse_ports(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let a: u16 = a.parse().map_err(|_| format!("bad port {a:?}"))?;
    let b: u16 = b.parse().map_err(|_| format!("bad port {b:?}"))?;
    if a > b {
        return Err(format!("empty port range {s}"));
    }
    Ok((a, b))
}

fn pin(cpu: usize) -> Result<()> {
    if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
        bail!("cannot pin to CPU {cpu}");
    }
    Ok(())
}

/// A flag set when stdin reaches EOF (the harness closes it to stop us).
fn until_stdin_closes() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let s = Arc::clone(&stop);
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        s.store(true, Ordering::SeqCst);
    });
    stop
}

fn gen(a: GenArgs) -> Result<()> {
    pin(a.cpu)?;
    let spec = GenSpec {
        src_mac: progs::mac(&a.iface)?,
        out_iface: a.iface,
        dst_mac: a.dst_mac,
        src: a.src,
        dst: a.dst,
        sport: a.sport,
        dport: a.dport,
        dst_ports: a.dst_ports,
        ports_per_addr: a.ports_per_addr,
        flows: a.flows,
        size: a.size,
        tcp: a.proto == "tcp",
    };
    let mut g = Generator::new(&spec)?;
    let t = Instant::now();
    let mut sent = 0u64;
    while t.elapsed().as_secs_f64() < a.seconds {
        sent += g.send(1 << 15)?;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"sent": sent, "seconds": secs, "pps": sent as f64 / secs})
    );
    Ok(())
}

fn sink(ifaces: &[String], ports: (u16, u16), stdin: bool, answer_first: bool) -> Result<()> {
    let names: Vec<&str> = ifaces.iter().map(String::as_str).collect();
    let s = Sink::attach(&names, ports, answer_first)?;
    let mut out = std::io::stdout().lock();
    if stdin {
        writeln!(out, "ready")?;
        out.flush()?;
        for line in std::io::stdin().lock().lines() {
            line?;
            let (p, b) = s.read()?;
            writeln!(out, "{p} {b}")?;
            out.flush()?;
        }
        return Ok(());
    }
    let (mut p0, mut b0) = s.read()?;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let (p, b) = s.read()?;
        writeln!(
            out,
            "{:.3} Mpps  {:.3} Gbit/s",
            (p - p0) as f64 / 1e6,
            (b - b0) as f64 * 8.0 / 1e9
        )?;
        (p0, b0) = (p, b);
    }
}

fn xsk_fwd(input: &str, out: &str, next_hop: [u8; 6], cpu: usize, busy: bool) -> Result<()> {
    use mio::unix::SourceFd;
    use mio::{Events, Interest, Poll, Token};
    use xdp::sys::{IoConfig, WorkerIo};

    let stop = until_stdin_closes();
    let src_mac = progs::mac(out)?;
    let mut fwd = Fwd::attach(input, &Reference::Xsk)?;
    pin(cpu)?;
    let mut io = WorkerIo::new(
        &[input.to_string(), out.to_string()],
        0,
        IoConfig::default(),
    )?;
    let fds = io.fds();
    fwd.set_xsk(0, fds[0])?;
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut SourceFd(&fds[0]), Token(0), Interest::READABLE)?;
    let mut events = Events::with_capacity(4);
    println!("ready");
    let mut dropped = 0u64;
    while !stop.load(Ordering::Relaxed) {
        io.refill();
        let got = io.receive(0);
        for i in 0..io.batch_len() {
            let f = io.frame(i);
            if f.len() >= 12 {
                f[..6].copy_from_slice(&next_hop);
                f[6..12].copy_from_slice(&src_mac);
            }
            if !io.send(i, 1) {
                dropped += 1;
            }
        }
        io.end_batch();
        io.flush();
        io.wake_fill();
        // Park like lbd's workers (--busy-poll-us 0) when there was nothing to do.
        if !busy && got == 0 && io.tx_in_flight() == 0 {
            poll.poll(&mut events, Some(Duration::from_millis(20)))?;
        }
    }
    let kernel: Vec<String> = io
        .kernel_stats()
        .next()
        .map(|st| {
            xdp::sys::XSK_STAT_NAMES
                .iter()
                .zip(st)
                .map(|(n, v)| format!("{n} {v}"))
                .collect()
        })
        .unwrap_or_default();
    eprintln!(
        "xsk-fwd: {dropped} frames dropped for a full TX ring; kernel: {}",
        kernel.join(", ")
    );
    Ok(())
}

fn reference(iface: &str, mode: RefMode) -> Result<()> {
    let r = match mode {
        RefMode::Redirect { out, next_hop } => Reference::Redirect { out, next_hop },
        RefMode::Cpu { cpu } => Reference::Cpu { cpu },
    };
    let _fwd = Fwd::attach(iface, &r)?;
    println!("ready");
    let stop = until_stdin_closes();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn echo(port: u16, addrs: &[Ipv4Addr]) -> Result<()> {
    let mut threads = Vec::new();
    for &a in addrs {
        let s = UdpSocket::bind((a, port)).with_context(|| format!("binding UDP {a}:{port}"))?;
        threads.push(std::thread::spawn(move || -> std::io::Result<()> {
            let mut buf = [0u8; 2048];
            loop {
                let (n, from) = s.recv_from(&mut buf)?;
                let _ = s.send_to(&buf[..n], from);
            }
        }));
    }
    for t in threads {
        if let Ok(Err(e)) = t.join() {
            return Err(e.into());
        }
    }
    Ok(())
}

fn ping(target: SocketAddr, rate: u32, seconds: f64) -> Result<()> {
    let r = harness::ping(target, rate, Duration::from_secs_f64(seconds))?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

fn cost_run(case: Case, packets: u32) -> Result<()> {
    let mut s = cost::Setup::new(case)?;
    let tx = s.run(packets);
    println!("{case:?}: {packets} packets, {tx} transmitted");
    Ok(())
}

fn engine() -> Result<()> {
    let maglev = cost::maglev_ms(21)?;
    let bpf = cost::bytes_per_flow(1_000_000, &|| BYTES.load(Ordering::Relaxed))?;
    let quality = cost::maglev_quality(21)?;
    println!(
        "{}",
        serde_json::json!({"maglev_build_ms": maglev, "bytes_per_flow": bpf, "maglev": quality})
    );
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Run(o) => harness::run(o),
        Cmd::Gen(a) => gen(a),
        Cmd::Sink {
            ifaces,
            ports,
            stdin,
            answer_first,
        } => sink(&ifaces, ports, stdin, answer_first),
        Cmd::Reference { iface, mode } => reference(&iface, mode),
        Cmd::XskFwd {
            input,
            out,
            next_hop,
            cpu,
            busy,
        } => xsk_fwd(&input, &out, next_hop, cpu, busy),
        Cmd::Echo { port, addrs } => echo(port, &addrs),
        Cmd::Ping {
            target,
            rate,
            seconds,
        } => ping(target, rate, seconds),
        Cmd::Cost { case, packets } => cost_run(case, packets),
        Cmd::Engine => engine(),
    }
}
