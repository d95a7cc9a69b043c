//! `lbctl`: the operator's CLI for lbd. One request per invocation; a table (default) or
//! the protocol's JSON (`-o json`) on stdout; errors on stderr with a nonzero exit.

use clap::{Parser, Subcommand, ValueEnum};
use control::client::Client;
use control::proto::{
    CheckView, IpmasqView, NatView, Outcome, Reply, Request, ServiceView, StatsView, StatusView,
};
use lb::service::{BackendSpec, Frontend};
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
    /// Per-worker packet counters and drops by reason, and the XDP program's counters.
    Stats {
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

#[derive(Subcommand)]
enum ServiceCmd {
    /// Add a service: VIP:PORT/tcp|udp, with any number of --backend IP:PORT[@WEIGHT].
    Add {
        frontend: Frontend,
        #[arg(long = "backend", short = 'b')]
        backends: Vec<BackendSpec>,
    },
    /// Remove a service; its flows end.
    Remove { frontend: Frontend },
    /// List services with their backends, weights and Maglev shares.
    List {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
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
    /// Remove a backend; its flows end, other flows are untouched.
    Remove {
        frontend: Frontend,
        /// IP:PORT
        backend: BackendSpec,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (req, format) = match cli.cmd {
        Cmd::Service {
            cmd: ServiceCmd::Add { frontend, backends },
        } => (Request::ServiceAdd { frontend, backends }, Format::Table),
        Cmd::Service {
            cmd: ServiceCmd::Remove { frontend },
        } => (Request::ServiceRemove { frontend }, Format::Table),
        Cmd::Service {
            cmd: ServiceCmd::List { output },
        } => (Request::ServiceList {}, output),
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
        Cmd::Status { output } => (Request::Status {}, output),
        Cmd::Stats { output } => (Request::Stats {}, output),
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
    let resp = Client::connect(&cli.socket).and_then(|mut c| c.call(&req));
    let resp = match resp {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lbctl: {e}");
            return ExitCode::from(1);
        }
    };
    match resp.outcome {
        Outcome::Error { error } => {
            eprintln!("lbctl: {}", error.message);
            ExitCode::from(1)
        }
        Outcome::Ok { result } => {
            if format == Format::Json {
                match serde_json::to_string_pretty(&result) {
                    Ok(s) => println!("{s}"),
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

fn print_table(r: &Reply) {
    match r {
        Reply::Done { message } => println!("{message}"),
        Reply::Services { services } => print_services(services),
        Reply::Status(s) => print_status(s),
        Reply::Stats(s) => print_stats(s),
        Reply::Ipmasq(v) => print_ipmasq(v),
        Reply::Check(c) => print_check(c),
        Reply::Nat(n) => print_nat(n),
    }
}

fn print_ipmasq(v: &IpmasqView) {
    println!(
        "Masquerade from {} to {}{}",
        v.masquerade_from.join(", "),
        v.egress_address,
        match &v.config {
            Some(c) => format!(", config {c}"),
            None => ", no config file (defaults)".into(),
        }
    );
    if let Some(e) = &v.config_error {
        println!("Config error (last good list in effect): {e}");
    }
    println!("masqLinkLocal: {}", v.masq_link_local);
    println!("{:<20} SOURCE", "NON-MASQUERADE CIDR");
    for r in &v.non_masquerade {
        println!("{:<20} {}", r.cidr, r.source);
    }
    for r in &v.always_kept {
        println!("{:<20} {} (always)", r.cidr, r.source);
    }
}

fn print_check(c: &CheckView) {
    println!("{}", c.decision);
}

fn print_nat(n: &NatView) {
    if n.translations.is_empty() {
        println!("no translations");
        return;
    }
    println!(
        "{:<10} {:<5} {:<21} {:<21} {:<21} {:<12} {:>8} {:>6}",
        "KIND", "PROTO", "INSIDE", "OUTSIDE", "REMOTE", "STATE", "IDLE", "WORKER"
    );
    for t in &n.translations {
        println!(
            "{:<10} {:<5} {:<21} {:<21} {:<21} {:<12} {:>7.1}s {:>6}",
            t.kind, t.proto, t.inside, t.outside, t.remote, t.state, t.idle_s, t.worker
        );
    }
    if n.truncated {
        println!("(truncated: raise --limit)");
    }
}

fn print_services(services: &[ServiceView]) {
    if services.is_empty() {
        println!("no services");
        return;
    }
    println!(
        "{:<4} {:<22} {:<5} {:<22} {:>6} {:<8} {:>7}",
        "ID", "FRONTEND", "MODE", "BACKEND", "WEIGHT", "STATE", "SHARE"
    );
    for s in services {
        if s.backends.is_empty() {
            println!(
                "{:<4} {:<22} {:<5} {:<22}",
                s.id, s.frontend, s.mode, "(none)"
            );
        }
        for (i, b) in s.backends.iter().enumerate() {
            let (id, fe, mode) = if i == 0 {
                (s.id.to_string(), s.frontend.as_str(), s.mode.as_str())
            } else {
                (String::new(), "", "")
            };
            println!(
                "{:<4} {:<22} {:<5} {:<22} {:>6} {:<8} {:>6.1}%",
                id,
                fe,
                mode,
                format!("{}:{}", b.address, b.port),
                b.weight,
                b.state,
                b.share
            );
        }
    }
}

fn print_status(s: &StatusView) {
    println!("xlb {}", s.version);
    for i in &s.interfaces {
        println!(
            "Interface:   {} (ifindex {}, {}), XDP {}",
            i.name, i.ifindex, i.mac, i.xdp_mode
        );
    }
    println!("SNAT:        {} ports {}", s.snat_address, s.snat_ports);
    match &s.masquerading {
        Some(m) => {
            println!(
                "Masquerading: AF_XDP [{}] egress {}, IPv4: enabled",
                m.egress_interfaces.join(", "),
                m.egress_address
            );
            println!(
                "             from {}; {} non-masquerade rule(s) from {}; {} kept flow(s)",
                m.masquerade_from.join(", "),
                m.non_masquerade_rules,
                m.config.as_deref().unwrap_or("defaults (no config file)"),
                m.kept_flows
            );
            if let Some(e) = &m.config_error {
                println!("             config error (last good list in effect): {e}");
            }
        }
        None => println!("Masquerading: disabled"),
    }
    println!("Services:    {}", s.services);
    println!("Flows:       {}", s.flows);
    println!(
        "Kernel view: {} routes, {} neighbours",
        s.routes, s.neighbours
    );
    println!(
        "{:<7} {:<6} {:<5} {:<12} {:>8} {:>10}",
        "WORKER", "QUEUE", "CORE", "SNAT PORTS", "FLOWS", "CAPACITY"
    );
    for w in &s.workers {
        let core = w.core.map(|c| c.to_string()).unwrap_or_else(|| "-".into());
        println!(
            "{:<7} {:<6} {:<5} {:<12} {:>8} {:>10}",
            w.id, w.queue, core, w.snat_ports, w.flows, w.flow_capacity
        );
    }
    for (reason, n) in &s.drops {
        println!("Dropped:     {reason:<22} {n:>10}");
    }
}

fn print_stats(s: &StatsView) {
    println!(
        "{:<7} {:>12} {:>12} {:>12} {:>12} {:>10} {:>10} {:>8} {:>8} {:>8} {:>10}",
        "WORKER",
        "RX",
        "TX",
        "HANDOFF_OUT",
        "HANDOFF_IN",
        "FLOWS_NEW",
        "FLOWS_END",
        "HELD",
        "ROUTED",
        "ICMP_ERR",
        "DROPS"
    );
    for w in &s.workers {
        let drops: u64 = w.drops.values().sum();
        println!(
            "{:<7} {:>12} {:>12} {:>12} {:>12} {:>10} {:>10} {:>8} {:>8} {:>8} {:>10}",
            w.id,
            w.rx,
            w.tx,
            w.handoff_out,
            w.handoff_in,
            w.flows_created,
            w.flows_expired,
            w.held,
            w.routed,
            w.icmp_errors,
            drops
        );
    }
    for w in &s.workers {
        for (reason, n) in &w.drops {
            println!("  worker {} drop {:<22} {:>10}", w.id, reason, n);
        }
    }
    println!("XDP program:");
    for (k, v) in &s.xdp {
        println!("  {k:<34} {v:>12}");
    }
}
