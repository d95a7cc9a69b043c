//! `lbctl`: the operator's CLI for lbd. One request per invocation; a table (default) or
//! the protocol's JSON (`-o json`) on stdout; errors on stderr with a nonzero exit:
//! 1 lbd refused the request (nothing changed), 2 lbd could not be reached or its answer
//! read, 3 lbd did not answer in time (a change may still be applied: retry with the
//! printed `--request-id` to apply it at most once). A closed stdout (`lbctl … | head`)
//! ends lbctl quietly.

use std::io::Write;

/// `println!` that ends lbctl quietly when stdout is closed (a pager or `head` quit).
macro_rules! out {
    ($($t:tt)*) => {
        if let Err(e) = writeln!(std::io::stdout().lock(), $($t)*) {
            stdout_failed(e)
        }
    };
}

fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("lbctl: writing to stdout: {e}");
    std::process::exit(2);
}

use clap::{Parser, Subcommand, ValueEnum};
use control::client::{Client, ClientError};
use control::desired;
use control::proto::{
    CheckView, IpmasqView, NatView, Outcome, Reply, Request, ServiceStatsView, ServiceView,
    StatsView, StatusView, TrafficView,
};
use lb::service::{Affinity, BackendSpec, Frontend, Mode, OnRemove, ServiceOptions};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "lbctl",
    version,
    about = "Control xlb's lbd: services, backends, masquerading, status, stats"
)]
struct Cli {
    /// lbd's control socket.
    #[arg(long, global = true, env = "LBCTL_SOCKET", default_value = control::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Seconds to wait for lbd's answer.
    #[arg(long, global = true, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
    /// Id of a change request (default: a fresh one). lbd applies a change at most once
    /// per id, so retrying a timed-out change with the id it printed is safe.
    #[arg(long, global = true)]
    request_id: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Services (frontends) and their backends.
    Service {
        #[command(subcommand)]
        cmd: ServiceCmd,
    },
    /// Backends of a service.
    Backend {
        #[command(subcommand)]
        cmd: BackendCmd,
    },
    /// Interfaces, XDP mode, workers and queues, SNAT address and ports, flows.
    Status {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Per-worker packet counters and drops by reason, and the XDP program's counters;
    /// with --services, traffic by service and backend (as ipvsadm --stats).
    Stats {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
        /// Flows, packets and bytes by service and backend since lbd started.
        #[arg(long)]
        services: bool,
        /// With --services: rates over one second (flows/s, packets/s and bytes/s each
        /// way), from two readings (as ipvsadm --rate).
        #[arg(long, requires = "services")]
        rate: bool,
    },
    /// Capture what the workers see into a pcapng file: each frame as it arrived ("in")
    /// and as it left after translation ("out"), said in its comment. The XDP fast path's
    /// packets are not seen (an established flow's: its handshake and close are).
    /// At most 10 000 frames a second a worker.
    Capture {
        /// Only this service's flows.
        #[arg(long)]
        service: Option<Frontend>,
        /// Only flows to this backend address.
        #[arg(long)]
        backend: Option<Ipv4Addr>,
        /// Stop after this many frames (in).
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// Stop after this long.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// The pcapng file.
        #[arg(short = 'w', long = "write")]
        file: PathBuf,
    },
    /// What xlb would do with a packet SRC:PORT → DST:PORT/PROTO and why: steered or
    /// left to the kernel, the service, Maglev slot and backend (or the flow that already
    /// holds it), the translation, the next hop.
    Explain {
        /// SRC:PORT
        source: std::net::SocketAddrV4,
        /// DST:PORT/tcp|udp
        destination: Frontend,
        /// The interface it arrives on [default: any lbd serves].
        #[arg(long)]
        iface: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Egress masquerading: the effective non-masquerade list, and why a packet is (not)
    /// masqueraded.
    Ipmasq {
        #[command(subcommand)]
        cmd: IpmasqCmd,
    },
    /// Active translations.
    Nat {
        #[command(subcommand)]
        cmd: NatCmd,
    },
    /// Print the services, their backends and options as a file `lbctl apply -f` takes.
    Export {
        #[arg(short = 'o', long, value_enum, default_value = "yaml")]
        output: FileFormat,
    },
    /// Make lbd's services those of FILE, in one change (or none), and print what
    /// changed: services added, removed or with new options, backends added, removed
    /// or reweighted. Services the file leaves as they are keep their flows.
    Apply {
        /// YAML, or JSON when it ends in .json (see `lbctl export`).
        #[arg(short = 'f', long)]
        file: PathBuf,
        /// Print what would change; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// The desired-state file formats.
#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum FileFormat {
    Yaml,
    Json,
}

impl FileFormat {
    fn of(f: FileFormat) -> desired::Format {
        match f {
            FileFormat::Yaml => desired::Format::Yaml,
            FileFormat::Json => desired::Format::Json,
        }
    }
}

#[derive(Subcommand)]
enum IpmasqCmd {
    /// The effective non-masquerade list (ip-masq-agent's, defaults shown as such) and
    /// the destinations always kept.
    List {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Which source address a packet from SRC to DST leaves with, and why.
    Check {
        source: Ipv4Addr,
        destination: Ipv4Addr,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
}

#[derive(Subcommand)]
enum NatCmd {
    /// Active translations: proto, inside, outside, remote, state, idle.
    List {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
        /// At most this many flows per worker.
        #[arg(long, default_value_t = 10_000)]
        limit: usize,
    },
}

/// A service's options; on `service set`, only those given change.
#[derive(clap::Args)]
struct OptionArgs {
    /// Which connections reach the same backend: none (each connection is hashed on its
    /// 5-tuple) or client-ip (every connection from one client address, as Kubernetes'
    /// sessionAffinity: ClientIP, while the backend set is unchanged).
    #[arg(long)]
    affinity: Option<Affinity>,
    /// With client-ip: a client also keeps its backend across backend changes until it
    /// opened no connection for this long (seconds, or with s/m/h: 10800, 3h; Kubernetes'
    /// default is 3h). "none" removes it.
    #[arg(long, value_parser = parse_timeout)]
    affinity_timeout: Option<Timeout>,
    /// What clients of a removed backend's flows get: reset (a TCP reset from the VIP on
    /// the flow's next packet; the default) or drop (silence; they time out). UDP clients
    /// move to a live backend with their next datagram either way.
    #[arg(long)]
    on_remove: Option<OnRemove>,
    /// Maglev table size, one of 1021, 2039, 4093, 8191, 16381, 32749, 65537, 131071,
    /// 262139, 524287, 1048573, 2000003 (default: lbd's --maglev-size). At least 100 ×
    /// backends keeps shares within about 1 % of the weights.
    #[arg(long)]
    table_size: Option<u32>,
    /// How new flows reach the backends: snat (full NAT, the default); dsr-l2 (the
    /// backend's MAC, backends on this node's L2 segment), dsr-ipip or dsr-gue (the
    /// client's packet tunnelled to the backend; run xlb-decap there): backends answer
    /// clients directly, from the VIP; hybrid, hybrid-ipip, hybrid-gue: TCP by that DSR,
    /// UDP by SNAT. Established flows keep the mode they opened with.
    #[arg(long)]
    mode: Option<Mode>,
    /// GUE's UDP destination port (dsr-gue, hybrid-gue; default 6080): the backends'
    /// `xlb-decap --gue-port`.
    #[arg(long)]
    gue_port: Option<u16>,
}

#[derive(Clone, Copy)]
enum Timeout {
    Off,
    Seconds(u32),
}

fn parse_timeout(s: &str) -> Result<Timeout, String> {
    if s == "none" {
        return Ok(Timeout::Off);
    }
    lb::service::parse_duration_s(s).map(Timeout::Seconds)
}

impl OptionArgs {
    /// `base` with the given options changed.
    fn apply_to(&self, mut o: ServiceOptions) -> ServiceOptions {
        if let Some(a) = self.affinity {
            o.affinity = a;
            if a == Affinity::None && self.affinity_timeout.is_none() {
                o.affinity_timeout_s = None;
            }
        }
        match self.affinity_timeout {
            Some(Timeout::Off) => o.affinity_timeout_s = None,
            Some(Timeout::Seconds(t)) => o.affinity_timeout_s = Some(t),
            None => {}
        }
        if let Some(r) = self.on_remove {
            o.on_remove = r;
        }
        if let Some(m) = self.table_size {
            o.table_size = Some(m);
        }
        if let Some(m) = self.mode {
            o.mode = m;
            if !m.uses_gue() && self.gue_port.is_none() {
                o.gue_port = None;
            }
        }
        if let Some(p) = self.gue_port {
            o.gue_port = Some(p);
        }
        o
    }
}

#[derive(Subcommand)]
enum ServiceCmd {
    /// Add a service: VIP:PORT/tcp|udp, with any number of --backend IP:PORT[@WEIGHT].
    Add {
        frontend: Frontend,
        #[arg(long = "backend", short = 'b')]
        backends: Vec<BackendSpec>,
        #[command(flatten)]
        options: OptionArgs,
    },
    /// Change a service's options (those given); backends and established flows stay.
    Set {
        frontend: Frontend,
        #[command(flatten)]
        options: OptionArgs,
    },
    /// Remove a service; its flows end.
    Remove { frontend: Frontend },
    /// List services with their backends, weights and Maglev shares.
    List {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Give a service's backends a health check (one of --tcp, --http, --udp), or none
    /// (--off). A backend that fails --fall probes in a row gets no new flows (its
    /// established flows go on) until it passes --rise in a row.
    Health {
        frontend: Frontend,
        #[command(flatten)]
        check: HealthArgs,
    },
}

#[derive(clap::Args)]
#[group(required = true, multiple = false, id = "probe")]
struct ProbeArgs {
    /// A TCP connection must be accepted.
    #[arg(long)]
    tcp: bool,
    /// GET PATH over HTTP/1.0 must answer with a status in --codes.
    #[arg(long, value_name = "PATH")]
    http: Option<String>,
    /// This datagram must be answered with one containing --expect.
    #[arg(long, value_name = "PAYLOAD", requires = "expect")]
    udp: Option<String>,
    /// No health check.
    #[arg(long)]
    off: bool,
}

#[derive(clap::Args)]
struct HealthArgs {
    #[command(flatten)]
    probe: ProbeArgs,
    /// Accepted HTTP statuses.
    #[arg(long, default_value = "200-399", requires = "http")]
    codes: String,
    /// What the UDP answer must contain.
    #[arg(long, requires = "udp")]
    expect: Option<String>,
    /// Probe this port [default: the backend's].
    #[arg(long)]
    port: Option<u16>,
    /// Milliseconds between probes of a backend.
    #[arg(long, default_value_t = 2000)]
    interval_ms: u32,
    /// Milliseconds a probe may take [default: 1000, or the interval if shorter].
    #[arg(long)]
    timeout_ms: Option<u32>,
    /// Successes in a row that bring a down backend back.
    #[arg(long, default_value_t = 2)]
    rise: u32,
    /// Failures in a row that take a backend down.
    #[arg(long, default_value_t = 3)]
    fall: u32,
}

impl HealthArgs {
    fn spec(self) -> Option<control::health::HealthSpec> {
        use control::health::Probe;
        let p = self.probe;
        let probe = if p.tcp {
            Probe::Tcp {}
        } else if let Some(path) = p.http {
            Probe::Http {
                path,
                codes: self.codes,
            }
        } else if let Some(send) = p.udp {
            Probe::Udp {
                send,
                expect: self.expect.unwrap_or_default(),
            }
        } else {
            return None;
        };
        Some(control::health::HealthSpec {
            probe,
            port: self.port,
            interval_ms: self.interval_ms,
            timeout_ms: self.timeout_ms,
            rise: self.rise,
            fall: self.fall,
        })
    }
}

#[derive(Subcommand)]
enum BackendCmd {
    /// Add a backend to a service. Established flows keep their backends.
    Add {
        frontend: Frontend,
        /// IP:PORT
        backend: BackendSpec,
        #[arg(long)]
        weight: Option<u32>,
    },
    /// Remove a backend: its flows end at once (their clients get what the service's
    /// --on-remove says), other flows are untouched. To let them finish, drain first.
    Remove {
        frontend: Frontend,
        /// IP:PORT
        backend: BackendSpec,
    },
    /// Change a backend's weight (0 drains it).
    SetWeight {
        frontend: Frontend,
        /// IP:PORT
        backend: BackendSpec,
        weight: u32,
    },
    /// Drain a backend (weight 0): no new flows, established ones go on; `service list`
    /// shows its remaining flows ("drained" when none are left).
    Drain {
        frontend: Frontend,
        /// IP:PORT
        backend: BackendSpec,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut export = None;
    let (req, format) = match cli.cmd {
        Cmd::Export { output } => {
            export = Some(FileFormat::of(output));
            (Request::Export {}, Format::Table)
        }
        Cmd::Apply { ref file, dry_run } => {
            let json = file.extension().is_some_and(|e| e == "json");
            let fmt = match json {
                true => desired::Format::Json,
                false => desired::Format::Yaml,
            };
            let state = std::fs::read_to_string(file)
                .map_err(|e| e.to_string())
                .and_then(|text| desired::DesiredState::parse(&text, fmt));
            match state {
                Ok(state) => (Request::Apply { state, dry_run }, Format::Table),
                Err(e) => {
                    eprintln!("lbctl: {}: {e}", file.display());
                    return ExitCode::from(1);
                }
            }
        }
        Cmd::Service {
            cmd:
                ServiceCmd::Add {
                    frontend,
                    backends,
                    options,
                },
        } => (
            Request::ServiceAdd {
                frontend,
                backends,
                options: options.apply_to(ServiceOptions::default()),
            },
            Format::Table,
        ),
        Cmd::Service {
            cmd: ServiceCmd::Set { frontend, options },
        } => {
            let current = match current_options(&cli.socket, cli.timeout, &frontend) {
                Ok(o) => o,
                Err(code) => return code,
            };
            (
                Request::ServiceSet {
                    frontend,
                    options: options.apply_to(current),
                },
                Format::Table,
            )
        }
        Cmd::Service {
            cmd: ServiceCmd::Remove { frontend },
        } => (Request::ServiceRemove { frontend }, Format::Table),
        Cmd::Service {
            cmd: ServiceCmd::List { output },
        } => (Request::ServiceList {}, output),
        Cmd::Service {
            cmd: ServiceCmd::Health { frontend, check },
        } => (
            Request::ServiceHealth {
                frontend,
                check: check.spec(),
            },
            Format::Table,
        ),
        Cmd::Backend {
            cmd:
                BackendCmd::Add {
                    frontend,
                    mut backend,
                    weight,
                },
        } => {
            if let Some(w) = weight {
                backend.weight = w;
            }
            (Request::BackendAdd { frontend, backend }, Format::Table)
        }
        Cmd::Backend {
            cmd: BackendCmd::Remove { frontend, backend },
        } => (
            Request::BackendRemove {
                frontend,
                address: backend.addr,
                port: backend.port,
            },
            Format::Table,
        ),
        Cmd::Backend {
            cmd:
                BackendCmd::SetWeight {
                    frontend,
                    backend,
                    weight,
                },
        } => (
            Request::BackendSetWeight {
                frontend,
                address: backend.addr,
                port: backend.port,
                weight,
            },
            Format::Table,
        ),
        Cmd::Backend {
            cmd: BackendCmd::Drain { frontend, backend },
        } => (
            Request::BackendSetWeight {
                frontend,
                address: backend.addr,
                port: backend.port,
                weight: 0,
            },
            Format::Table,
        ),
        Cmd::Status { output } => (Request::Status {}, output),
        Cmd::Capture {
            service,
            backend,
            count,
            seconds,
            ref file,
        } => return capture(&cli, service, backend, count, seconds, file),
        Cmd::Explain {
            source,
            destination,
            iface,
            output,
        } => (
            Request::Explain {
                source,
                destination: std::net::SocketAddrV4::new(destination.addr, destination.port),
                proto: destination.proto.to_string(),
                iface,
            },
            output,
        ),
        Cmd::Stats {
            output,
            services: false,
            ..
        } => (Request::Stats {}, output),
        Cmd::Stats {
            output,
            rate: false,
            ..
        } => (Request::ServiceStats {}, output),
        Cmd::Stats { output, .. } => return service_rates(&cli, output),
        Cmd::Ipmasq {
            cmd: IpmasqCmd::List { output },
        } => (Request::IpmasqList {}, output),
        Cmd::Ipmasq {
            cmd:
                IpmasqCmd::Check {
                    source,
                    destination,
                    output,
                },
        } => (
            Request::IpmasqCheck {
                source,
                destination,
            },
            output,
        ),
        Cmd::Nat {
            cmd: NatCmd::List { output, limit },
        } => (Request::NatList { limit: Some(limit) }, output),
    };
    let id = cli.request_id.clone().unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("lbctl-{}-{nanos}", std::process::id())
    });
    let timeout = std::time::Duration::from_secs(cli.timeout);
    let resp = Client::connect_with_timeout(&cli.socket, timeout)
        .and_then(|mut c| c.call_with_id(&req, req.is_change().then_some(id.as_str())));
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lbctl: {e}");
            return ExitCode::from(match e {
                ClientError::TimedOut { .. } | ClientError::ReadTimedOut(_) => 3,
                _ => 2,
            });
        }
    };
    match resp.outcome {
        Outcome::Error { error } => {
            eprintln!("lbctl: {}", error.message);
            ExitCode::from(1)
        }
        Outcome::Ok {
            result: Reply::State { state },
        } if export.is_some() => match state.to_text(export.unwrap_or(desired::Format::Yaml)) {
            Ok(text) => {
                if let Err(e) = std::io::stdout().lock().write_all(text.as_bytes()) {
                    stdout_failed(e)
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("lbctl: {e}");
                ExitCode::from(1)
            }
        },
        Outcome::Ok { result } => {
            if format == Format::Json {
                match serde_json::to_string_pretty(&result) {
                    Ok(s) => out!("{s}"),
                    Err(e) => {
                        eprintln!("lbctl: {e}");
                        return ExitCode::from(1);
                    }
                }
            } else {
                print_table(&result);
            }
            ExitCode::SUCCESS
        }
    }
}

/// The options `frontend` has now (for `service set`, which changes only those given).
fn current_options(
    socket: &std::path::Path,
    timeout: u64,
    frontend: &Frontend,
) -> Result<ServiceOptions, ExitCode> {
    let timeout = std::time::Duration::from_secs(timeout);
    let resp = Client::connect_with_timeout(socket, timeout)
        .and_then(|mut c| c.call(&Request::ServiceList {}))
        .map_err(|e| {
            eprintln!("lbctl: {e}");
            ExitCode::from(2)
        })?;
    let want = frontend.to_string();
    match resp.outcome {
        Outcome::Ok {
            result: Reply::Services { services },
        } => services
            .into_iter()
            .find(|s| s.frontend == want)
            .map(|s| s.options)
            .ok_or_else(|| {
                eprintln!(
                    "lbctl: no service {want}; `lbctl service list` shows the configured ones"
                );
                ExitCode::from(1)
            }),
        Outcome::Error { error } => {
            eprintln!("lbctl: {}", error.message);
            Err(ExitCode::from(1))
        }
        Outcome::Ok { .. } => {
            eprintln!("lbctl: lbd answered the service list with something else");
            Err(ExitCode::from(2))
        }
    }
}

fn print_table(r: &Reply) {
    match r {
        Reply::Done { message } => out!("{message}"),
        Reply::Services { services } => print_services(services),
        Reply::Status(s) => print_status(s),
        Reply::Stats(s) => print_stats(s),
        Reply::Ipmasq(v) => print_ipmasq(v),
        Reply::Check(c) => print_check(c),
        Reply::Nat(n) => print_nat(n),
        Reply::ServiceStats { services } => print_service_stats(services),
        Reply::Captured { frames, .. } => out!("{} frame(s)", frames.len()),
        Reply::Explain(e) => {
            for step in &e.explained.steps {
                out!("{step}");
            }
        }
        Reply::State { state } => match state.to_text(desired::Format::Yaml) {
            Ok(t) => out!("{}", t.trim_end()),
            Err(e) => out!("{e}"),
        },
        Reply::Applied { changes, dry_run } => {
            for c in changes {
                out!("{c}");
            }
            match (changes.len(), dry_run) {
                (0, _) => out!("no changes"),
                (n, true) => out!("dry run: {n} change(s) would be made; nothing changed"),
                (n, false) => out!("{n} change(s) applied"),
            }
        }
    }
}

fn print_service_stats(services: &[ServiceStatsView]) {
    if services.is_empty() {
        out!("no services");
        return;
    }
    out!(
        "{:<28} {:>9} {:>7} {:>12} {:>12} {:>14} {:>14}",
        "SERVICE / -> BACKEND",
        "FLOWS",
        "ACTIVE",
        "INPKTS",
        "OUTPKTS",
        "INBYTES",
        "OUTBYTES"
    );
    let row = |name: &str, t: &TrafficView| {
        out!(
            "{:<28} {:>9} {:>7} {:>12} {:>12} {:>14} {:>14}",
            name,
            t.flows,
            t.active,
            t.packets_in,
            t.packets_out,
            t.bytes_in,
            t.bytes_out
        )
    };
    for s in services {
        row(&s.frontend, &s.totals);
        for b in &s.backends {
            row(&format!("  -> {}", b.backend), &b.totals);
        }
    }
}

/// Per-second rates of one service or backend between two readings.
#[derive(Debug, Clone, serde::Serialize)]
struct RateView {
    name: String,
    cps: f64,
    in_pps: f64,
    out_pps: f64,
    in_bps: f64,
    out_bps: f64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    backends: Vec<RateView>,
}

fn rate_of(name: &str, a: Option<&TrafficView>, b: &TrafficView, secs: f64) -> RateView {
    let a = a.copied().unwrap_or_default();
    let per = |x: u64, y: u64| y.saturating_sub(x) as f64 / secs;
    RateView {
        name: name.to_string(),
        cps: per(a.flows, b.flows),
        in_pps: per(a.packets_in, b.packets_in),
        out_pps: per(a.packets_out, b.packets_out),
        in_bps: per(a.bytes_in, b.bytes_in),
        out_bps: per(a.bytes_out, b.bytes_out),
        backends: Vec::new(),
    }
}

/// One request to lbd, its reply or the error's message.
fn call(cli: &Cli, req: &Request) -> Result<Reply, String> {
    let timeout = std::time::Duration::from_secs(cli.timeout);
    let resp = Client::connect_with_timeout(&cli.socket, timeout)
        .and_then(|mut c| c.call_with_id(req, None))
        .map_err(|e| e.to_string())?;
    match resp.outcome {
        Outcome::Ok { result } => Ok(result),
        Outcome::Error { error } => Err(error.message),
    }
}

/// `lbctl capture`: start, read every 100 ms into the pcapng file, stop.
fn capture(
    cli: &Cli,
    service: Option<Frontend>,
    backend: Option<Ipv4Addr>,
    count: usize,
    seconds: f64,
    path: &std::path::Path,
) -> ExitCode {
    use pcap_file::pcapng::blocks::enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption};
    use pcap_file::pcapng::blocks::interface_description::InterfaceDescriptionBlock;
    use pcap_file::pcapng::PcapNgWriter;
    use std::borrow::Cow;
    let fail = |e: String| {
        eprintln!("lbctl: {e}");
        ExitCode::from(1)
    };
    let file = match std::fs::File::create(path) {
        Ok(f) => std::io::BufWriter::new(f),
        Err(e) => return fail(format!("{}: {e}", path.display())),
    };
    let mut w = match PcapNgWriter::new(file) {
        Ok(w) => w,
        Err(e) => return fail(format!("{}: {e}", path.display())),
    };
    let idb = InterfaceDescriptionBlock {
        linktype: pcap_file::DataLink::ETHERNET,
        snaplen: 0xffff,
        options: vec![],
    };
    if let Err(e) = w.write_pcapng_block(idb) {
        return fail(format!("{}: {e}", path.display()));
    }
    if let Err(e) = call(cli, &Request::CaptureStart { service, backend }) {
        return fail(e);
    }
    let start = std::time::Instant::now();
    let (mut seen, mut written) = (0usize, 0usize);
    let mut dropped;
    loop {
        let done = seen >= count || start.elapsed().as_secs_f64() >= seconds;
        if !done {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let req = match done {
            true => Request::CaptureStop {},
            false => Request::CaptureRead {},
        };
        let (frames, d, now_ns) = match call(cli, &req) {
            Ok(Reply::Captured {
                frames,
                dropped,
                now_ns,
            }) => (frames, dropped, now_ns),
            Ok(_) => return fail("lbd answered with something else".into()),
            Err(e) => return fail(e),
        };
        dropped = d;
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        // An "out" frame follows its "in" frame: both are kept, or neither.
        let mut keep = false;
        for f in frames {
            if f.direction == "in" {
                keep = seen < count;
                seen += usize::from(keep);
            }
            if !keep {
                continue;
            }
            let age = std::time::Duration::from_nanos(now_ns.saturating_sub(f.ts_ns));
            let epb = EnhancedPacketBlock {
                interface_id: 0,
                timestamp: wall.saturating_sub(age),
                original_len: f.data.len() as u32,
                data: Cow::Borrowed(&f.data),
                options: vec![EnhancedPacketOption::Comment(Cow::Owned(format!(
                    "{} worker {}: {}",
                    f.direction, f.worker, f.verdict
                )))],
            };
            if let Err(e) = w.write_pcapng_block(epb) {
                let _ = call(cli, &Request::CaptureStop {});
                return fail(format!("{}: {e}", path.display()));
            }
            written += 1;
        }
        if done {
            break;
        }
    }
    if let Err(e) = std::io::Write::flush(w.get_mut()) {
        return fail(format!("{}: {e}", path.display()));
    }
    out!(
        "{written} frame(s) ({seen} received, with what left after translation) written to {}; {dropped} not kept (rate limit)",
        path.display()
    );
    ExitCode::SUCCESS
}

/// `lbctl stats --services --rate`: two readings a second apart.
fn service_rates(cli: &Cli, output: Format) -> ExitCode {
    let read = || -> Result<(Vec<ServiceStatsView>, std::time::Instant), String> {
        match call(cli, &Request::ServiceStats {})? {
            Reply::ServiceStats { services } => Ok((services, std::time::Instant::now())),
            _ => Err("lbd answered with something else".into()),
        }
    };
    let readings = read().and_then(|first| {
        std::thread::sleep(std::time::Duration::from_secs(1));
        read().map(|second| (first, second))
    });
    let ((before, t0), (after, t1)) = match readings {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lbctl: {e}");
            return ExitCode::from(1);
        }
    };
    let secs = t1.duration_since(t0).as_secs_f64().max(1e-3);
    let rates: Vec<RateView> = after
        .iter()
        .map(|s| {
            let prev = before.iter().find(|p| p.frontend == s.frontend);
            let mut r = rate_of(&s.frontend, prev.map(|p| &p.totals), &s.totals, secs);
            r.backends = s
                .backends
                .iter()
                .map(|b| {
                    let pb = prev
                        .and_then(|p| p.backends.iter().find(|x| x.backend == b.backend))
                        .map(|x| &x.totals);
                    rate_of(&b.backend, pb, &b.totals, secs)
                })
                .collect();
            r
        })
        .collect();
    if output == Format::Json {
        match serde_json::to_string_pretty(&serde_json::json!({ "services": rates })) {
            Ok(j) => out!("{j}"),
            Err(e) => {
                eprintln!("lbctl: {e}");
                return ExitCode::from(2);
            }
        }
        return ExitCode::SUCCESS;
    }
    out!(
        "{:<28} {:>9} {:>10} {:>10} {:>13} {:>13}",
        "SERVICE / -> BACKEND",
        "CPS",
        "INPPS",
        "OUTPPS",
        "INBPS",
        "OUTBPS"
    );
    let row = |name: &str, r: &RateView| {
        out!(
            "{:<28} {:>9.1} {:>10.1} {:>10.1} {:>13.1} {:>13.1}",
            name,
            r.cps,
            r.in_pps,
            r.out_pps,
            r.in_bps,
            r.out_bps
        )
    };
    for r in &rates {
        row(&r.name, r);
        for b in &r.backends {
            row(&format!("  -> {}", b.name), b);
        }
    }
    ExitCode::SUCCESS
}

fn print_ipmasq(v: &IpmasqView) {
    out!(
        "Masquerade from {} to {}{}",
        v.masquerade_from.join(", "),
        v.egress_address,
        match &v.config {
            Some(c) => format!(", config {c}"),
            None => ", no config file (defaults)".into(),
        }
    );
    if let Some(e) = &v.config_error {
        out!("Config error (last good list in effect): {e}");
    }
    if v.applying {
        out!("This list is being applied (the XDP maps follow in milliseconds)");
    }
    out!("masqLinkLocal: {}", v.masq_link_local);
    out!("{:<20} SOURCE", "NON-MASQUERADE CIDR");
    for r in &v.non_masquerade {
        out!("{:<20} {}", r.cidr, r.source);
    }
    for r in &v.always_kept {
        out!("{:<20} {} (always)", r.cidr, r.source);
    }
}

fn print_check(c: &CheckView) {
    out!("{}", c.decision);
}

fn print_nat(n: &NatView) {
    if n.translations.is_empty() {
        out!("no translations");
        return;
    }
    out!(
        "{:<10} {:<5} {:<21} {:<21} {:<21} {:<12} {:>8} {:>6} {:>10} {:>10}  PATH",
        "KIND",
        "PROTO",
        "INSIDE",
        "OUTSIDE",
        "REMOTE",
        "STATE",
        "IDLE",
        "WORKER",
        "PKTS OUT",
        "PKTS IN"
    );
    for t in &n.translations {
        out!(
            "{:<10} {:<5} {:<21} {:<21} {:<21} {:<12} {:>7.1}s {:>6} {:>10} {:>10}  {}",
            t.kind,
            t.proto,
            t.inside,
            t.outside,
            t.remote,
            t.state,
            t.idle_s,
            t.worker,
            t.packets_out,
            t.packets_in,
            if t.fast_path { "xdp" } else { "worker" }
        );
    }
    if n.truncated {
        out!("(truncated: raise --limit)");
    }
}

fn print_services(services: &[ServiceView]) {
    if services.is_empty() {
        out!("no services");
        return;
    }
    out!(
        "{:<4} {:<22} {:<11} {:<22} {:>6} {:<9} {:>7} {:>8}  {}",
        "ID",
        "FRONTEND",
        "MODE",
        "BACKEND",
        "WEIGHT",
        "STATE",
        "SHARE",
        "FLOWS",
        "NEXT HOP"
    );
    for s in services {
        let fewer = s.table_size < 100 * s.backends.len();
        out!(
            "{:<4} {:<22} table {} slots, fingerprint {}, worst share {:.2} % off{}",
            s.id,
            s.frontend,
            s.table_size,
            s.fingerprint,
            s.worst_share_error_pct,
            if fewer {
                " (table < 100 × backends: raise --table-size)"
            } else {
                ""
            }
        );
        let o = &s.options;
        out!(
            "{:<4} {:<22} affinity {}{}, on backend removal: {}",
            s.id,
            s.frontend,
            o.affinity,
            o.affinity_timeout_s
                .map(|t| format!(" (timeout {t} s)"))
                .unwrap_or_default(),
            o.on_remove
        );
        if let Some(h) = &s.health_check {
            out!("{:<4} {:<22} health check: {h}", s.id, s.frontend);
        }
        if s.backends.is_empty() {
            out!(
                "{:<4} {:<22} {:<11} {:<22}",
                s.id,
                s.frontend,
                s.mode,
                "(none)"
            );
        }
        for (i, b) in s.backends.iter().enumerate() {
            let (id, fe, mode) = if i == 0 {
                (s.id.to_string(), s.frontend.as_str(), s.mode.as_str())
            } else {
                (String::new(), "", "")
            };
            out!(
                "{:<4} {:<22} {:<11} {:<22} {:>6} {:<9} {:>6.1}% {:>8}  {}",
                id,
                fe,
                mode,
                format!("{}:{}", b.address, b.port),
                b.weight,
                b.state,
                b.share,
                b.flows,
                b.next_hop
            );
            if let Some(h) = &b.health {
                out!("{:<4} {:<22} {:<11} {:<22} health {h}", "", "", "", "");
            }
        }
    }
}

fn print_status(s: &StatusView) {
    out!("xlb {}", s.version);
    for i in &s.interfaces {
        out!(
            "Interface:   {} (ifindex {}, {}), XDP {}{}",
            i.name,
            i.ifindex,
            i.mac,
            i.xdp_mode,
            if i.takes_redirects {
                ""
            } else {
                "; takes no XDP redirects (a veth peer without GRO or XDP?): its flows stay on the workers"
            }
        );
    }
    for a in &s.snat_pool {
        out!(
            "SNAT:        {} ports {}, {} mapping(s)",
            a.address,
            a.ports,
            a.mappings
        );
    }
    out!(
        "NAT ports:   {}; --snat-ports {}",
        s.port_ownership,
        s.snat_ports
    );
    match &s.masquerading {
        Some(m) => {
            out!(
                "Masquerading: AF_XDP [{}] egress {}, IPv4: enabled",
                m.egress_interfaces.join(", "),
                m.egress_addresses
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            out!(
                "             from {}; {} non-masquerade rule(s) from {}; {} kept flow(s)",
                m.masquerade_from.join(", "),
                m.non_masquerade_rules,
                m.config.as_deref().unwrap_or("defaults (no config file)"),
                m.kept_flows
            );
            if let Some(e) = &m.config_error {
                out!("             config error (last good list in effect): {e}");
            }
        }
        None => out!("Masquerading: disabled"),
    }
    out!("Services:    {}", s.services);
    out!("Flows:       {}", s.flows);
    out!(
        "Fast path:   {}",
        if s.fast_path {
            format!(
                "on, {} flow directions in XDP",
                s.workers.iter().map(|w| w.fast_path_entries).sum::<u64>()
            )
        } else {
            "off (every packet through the workers)".into()
        }
    );
    out!(
        "Kernel view: {} routes, {} neighbours",
        s.routes,
        s.neighbours
    );
    out!(
        "{:<7} {:<6} {:<5} {:>12} {:>8} {:>10} {:>10}",
        "WORKER",
        "QUEUE",
        "CORE",
        "MAPPINGS",
        "FLOWS",
        "CAPACITY",
        "FAST PATH"
    );
    for w in &s.workers {
        let core = w.core.map(|c| c.to_string()).unwrap_or_else(|| "-".into());
        out!(
            "{:<7} {:<6} {:<5} {:>12} {:>8} {:>10} {:>10}",
            w.id,
            w.queue,
            core,
            w.mappings,
            w.flows,
            w.flow_capacity,
            w.fast_path_entries
        );
    }
    for (reason, n) in &s.drops {
        out!("Dropped:     {reason:<22} {n:>10}");
    }
    if !s.unserved_queues.is_empty() {
        out!(
            "WARNING:     unserved rx queues (their frames for xlb are dropped): {}",
            s.unserved_queues.join(", ")
        );
    }
}

fn print_stats(s: &StatsView) {
    out!(
        "{:<7} {:>12} {:>12} {:>12} {:>12} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>10}",
        "WORKER",
        "RX",
        "TX",
        "HANDOFF_OUT",
        "HANDOFF_IN",
        "FLOWS_NEW",
        "FLOWS_END",
        "EVICTED",
        "HELD",
        "ROUTED",
        "ICMP_ERR",
        "DROPS"
    );
    for w in &s.workers {
        let drops: u64 = w.drops.values().sum();
        out!(
            "{:<7} {:>12} {:>12} {:>12} {:>12} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8} {:>10}",
            w.id,
            w.rx,
            w.tx,
            w.handoff_out,
            w.handoff_in,
            w.flows_created,
            w.flows_expired,
            w.flows_evicted,
            w.held,
            w.routed,
            w.icmp_errors,
            drops
        );
    }
    for w in &s.workers {
        if w.dsr_flows > 0 || w.encapsulated > 0 {
            out!(
                "  worker {} dsr flows {}, packets encapsulated {}",
                w.id,
                w.dsr_flows,
                w.encapsulated
            );
        }
        if w.flows_adopted > 0 {
            out!(
                "  worker {} flows adopted from the previous lbd {}",
                w.id,
                w.flows_adopted
            );
        }
        for (reason, n) in &w.drops {
            out!("  worker {} drop {:<22} {:>10}", w.id, reason, n);
        }
    }
    for sk in &s.sockets {
        let lost: Vec<String> = sk
            .kernel
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        out!(
            "  worker {} socket {} queue {}: {}",
            sk.worker,
            sk.iface,
            sk.queue,
            if lost.is_empty() {
                "no kernel drops".to_string()
            } else {
                lost.join(", ")
            }
        );
    }
    out!("XDP program:");
    for (k, v) in &s.xdp {
        out!("  {k:<34} {v:>12}");
    }
}
