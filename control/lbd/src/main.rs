//! `lbd`: xlb's daemon. Attaches the steering program to the given interfaces, starts
//! one pinned AF_XDP worker per rx queue, and serves the control socket until SIGINT or
//! SIGTERM, then stops the workers and detaches.

use anyhow::Context;
use clap::Parser;
use control::server::{serve, ControlSocket, SocketOptions};
use lb::Timeouts;
use lbd::daemon::{Daemon, DaemonConfig, MasqOptions};
use nat::PortRange;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use xdp::sys::IoConfig;

const SEC: u64 = 1_000_000_000;

/// A default timeout (ns) as the flag's seconds.
fn secs(ns: u64) -> u64 {
    ns / SEC
}
/// Longest idle timeout a flag takes (30 days): longer is a configuration mistake, and
/// seconds × 10⁹ must fit the datapath's nanosecond clock.
const MAX_TIMEOUT_S: u64 = 30 * 24 * 3600;
/// Most flows per worker (2²⁴ ≈ 16.7 M, about 2.4 GiB a worker).
const MAX_FLOWS_PER_WORKER: u64 = 1 << 24;

fn timeout_s(s: &str) -> Result<u64, String> {
    let v: u64 = s.parse().map_err(|e| format!("{e}"))?;
    if v == 0 || v > MAX_TIMEOUT_S {
        return Err(format!("{v} s is outside 1..={MAX_TIMEOUT_S} (30 days)"));
    }
    Ok(v)
}

/// The seed in a `--hash-seed-file`: 16 hex digits (whitespace and a 0x prefix allowed).
fn seed_file(path: &str) -> Result<u64, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    let hex: String = text.split_whitespace().collect();
    let hex = hex.trim_start_matches("0x");
    if hex.len() != 16 {
        return Err(format!(
            "{path}: want 16 hex digits (e.g. od -An -tx8 -N8 /dev/urandom > {path}), found {:?}",
            text.trim()
        ));
    }
    u64::from_str_radix(hex, 16).map_err(|e| format!("{path}: {e}"))
}

fn ring_size(s: &str) -> Result<u32, String> {
    let v: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if !v.is_power_of_two() || !(64..=16384).contains(&v) {
        return Err(format!("{v} is not a power of two in 64..=16384"));
    }
    Ok(v)
}

fn mode(s: &str) -> Result<u32, String> {
    let v = u32::from_str_radix(s, 8).map_err(|e| format!("{s}: not an octal mode: {e}"))?;
    if v > 0o777 || v & 0o600 != 0o600 {
        return Err(format!(
            "{s}: give permission bits up to 777 that let the owner read and write (e.g. 660)"
        ));
    }
    Ok(v)
}

#[derive(Parser)]
#[command(
    name = "lbd",
    version,
    about = "xlb's L4 load balancer and egress NAT daemon (XDP + AF_XDP, Maglev, SNAT, masquerading)"
)]
struct Args {
    /// Settings file (TOML): each key a long flag below, e.g. `iface = ["eth0"]`,
    /// `snat-ports = "61000-65535"`, `fast-path = "on"`, `no-state = true`; a flag on
    /// the command line wins over the file's. Unknown keys are errors [default:
    /// /etc/xlb/lbd.toml when it exists].
    #[arg(long)]
    config: Option<PathBuf>,
    /// Interface to serve (repeat for two-armed: clients on one, backends on another).
    #[arg(long = "iface", required_unless_present = "unpin")]
    ifaces: Vec<String>,
    /// Source address for traffic to backends: ADDR or ADDR-ADDR (a pool; repeat for
    /// more, up to 15), optionally :FIRST-LAST ports. A client's flows all leave from
    /// the pool address its own address hashes to. An address the host uses (a served
    /// interface's primary) gets --snat-ports; a dedicated one (added for xlb, e.g. ip
    /// addr add ADDR/32 dev IFACE) gets every port, 1-65535 [default: the last
    /// --iface's primary IPv4].
    #[arg(long = "snat-addr")]
    snat_addrs: Vec<nat::NatAddrSpec>,
    /// NAT source ports on host addresses: the egress (masquerading) address and a
    /// host-used SNAT address. Must avoid the host's ip_local_port_range. Ports go to
    /// workers in pairs, round-robin.
    #[arg(long, visible_alias = "nat-ports", default_value = "61000-65535")]
    snat_ports: PortRange,
    /// Where lbd keeps its services: restored at start (before lbd answers), rewritten
    /// atomically at every change. YAML, or JSON when it ends in .json (the format of
    /// `lbctl export`).
    #[arg(long, default_value = "/var/lib/xlb/state.yaml")]
    state_file: std::path::PathBuf,
    /// Keep no state: start without services, write nothing.
    #[arg(long)]
    no_state: bool,
    /// Where lbd pins its XDP program's links and the fast path's flow maps (a directory
    /// on a bpffs). Established flows the fast path forwards then keep going while lbd
    /// is down (a crash, a SIGKILL, an upgrade, a stop), and the next lbd adopts them.
    /// Stopping lbd leaves them pinned; `lbd --unpin` removes them [default:
    /// /sys/fs/bpf/xlb when /sys/fs/bpf is a bpffs, else no pinning, with a warning].
    #[arg(long, conflicts_with = "no_pin")]
    pin_dir: Option<PathBuf>,
    /// Pin nothing: the XDP program leaves with lbd, and established flows with it.
    #[arg(long)]
    no_pin: bool,
    /// Serve Prometheus metrics (OpenMetrics text) at http://ADDR:PORT/metrics, e.g.
    /// 127.0.0.1:9567 (off by default).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Remove what lbd pinned in --pin-dir and exit: its XDP program leaves the
    /// interfaces, and the flows the fast path kept end (taking xlb out of service).
    #[arg(long)]
    unpin: bool,
    /// Outer source address of DSR tunnels (services in dsr-ipip, dsr-gue and their
    /// hybrid modes) [default: the address of the interface a tunnel leaves by].
    #[arg(long)]
    encap_source: Option<std::net::Ipv4Addr>,
    /// Masquerade traffic from this CIDR (e.g. the pod CIDR); repeat for more. Enables
    /// egress masquerading with ip-masq-agent semantics.
    #[arg(long = "masquerade-from")]
    masquerade_from: Vec<nat::Cidr>,
    /// Interface masqueraded traffic leaves by [default: the last --iface].
    #[arg(long, requires = "masquerade_from")]
    egress_iface: Option<String>,
    /// Address masqueraded traffic leaves with; repeat for a pool (up to 15): a pod's
    /// flows all leave from the one its address hashes to [default: the egress
    /// interface's primary IPv4]. Extra addresses must be this node's (ip addr add).
    #[arg(long = "egress-addr", requires = "masquerade_from")]
    egress_addrs: Vec<Ipv4Addr>,
    /// ip-masq-agent's config file (nonMasqueradeCIDRs, masqLinkLocal), watched: a
    /// change applies to new flows; a malformed file is reported and the last good list
    /// stays. Without it: ip-masq-agent's defaults.
    #[arg(long, requires = "masquerade_from")]
    ip_masq_config: Option<PathBuf>,
    /// Which unsolicited inbound packets reach a pod through its mapping:
    /// address-and-port-dependent (only remotes it sent to, as Linux conntrack) or
    /// endpoint-independent (anyone; what peer-to-peer software wants; RFC 4787 REQ-8).
    #[arg(
        long,
        default_value = "address-and-port-dependent",
        requires = "masquerade_from"
    )]
    nat_filtering: nat::Filtering,
    /// Cluster nodes' CIDR: never masqueraded (they reach pod addresses directly).
    #[arg(long = "cluster-nodes", requires = "masquerade_from")]
    cluster_nodes: Vec<nat::Cidr>,
    /// Control socket. An existing file there is replaced only if it is a socket nobody
    /// answers on (a crashed lbd's); anything else is refused.
    #[arg(long, default_value = control::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Group owning the control socket (name or number): its members may use lbctl.
    #[arg(long)]
    socket_group: Option<String>,
    /// Permission bits of the control socket, in octal.
    #[arg(long, default_value = "660", value_parser = mode)]
    socket_mode: u32,
    /// Workers (= rx queues served) [default: all queues of the interfaces]. Frames
    /// for xlb arriving on a queue no worker serves are dropped (and counted).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=64))]
    queues: Option<u32>,
    /// Cores to pin workers to, round-robin [default: all].
    #[arg(long, value_delimiter = ',')]
    cores: Vec<usize>,
    /// Flow table capacity of each worker (memory is allocated at start).
    #[arg(long, default_value_t = 262_144, value_parser = clap::value_parser!(u64).range(1..=MAX_FLOWS_PER_WORKER))]
    flows_per_worker: u64,
    /// File holding the cluster-wide secret hash seed (16 hex digits, e.g. from
    /// `od -An -tx8 -N8 /dev/urandom`): seeds the flow hash and the Maglev tables. Give
    /// every node of a tier the same file: they then build identical tables. Without
    /// it the seed is 0 and anyone who knows the backends can predict which source
    /// ports reach which backend.
    #[arg(long, value_parser = seed_file)]
    hash_seed_file: Option<u64>,
    /// Maglev table size (a prime).
    #[arg(long, default_value_t = lb::maglev::DEFAULT_TABLE_SIZE)]
    maglev_size: u32,
    /// Idle timeout of TCP flows whose handshake has not completed, in seconds (RFC
    /// 5382: at least 4 min).
    #[arg(long, default_value_t = secs(Timeouts::default().tcp_syn), value_parser = timeout_s)]
    timeout_tcp_syn: u64,
    /// Idle timeout of established TCP flows, in seconds (RFC 5382: at least 2 h 4 min).
    #[arg(long, default_value_t = secs(Timeouts::default().tcp_established), value_parser = timeout_s)]
    timeout_tcp_established: u64,
    /// Idle timeout after a FIN, in seconds. Keeps the NAT port reserved while the
    /// remote may hold TIME_WAIT (RFC 5382: at least 4 min).
    #[arg(long, default_value_t = secs(Timeouts::default().tcp_fin), value_parser = timeout_s)]
    timeout_tcp_fin: u64,
    /// Idle timeout after a RST, in seconds (RFC 7857: 4 min, as TIME_WAIT).
    #[arg(long, default_value_t = secs(Timeouts::default().tcp_rst), value_parser = timeout_s)]
    timeout_tcp_rst: u64,
    /// Idle timeout of UDP flows, in seconds (RFC 4787: at least 120 s, 300 s
    /// recommended).
    #[arg(long, default_value_t = secs(Timeouts::default().udp), value_parser = timeout_s)]
    timeout_udp: u64,
    /// Idle timeout of established TCP flows forwarded by direct server return, in
    /// seconds: xlb sees only the client's side, and an expired DSR flow's next segment
    /// still reaches its backend (Maglev), so shorter than --timeout-tcp-established.
    #[arg(long, default_value_t = secs(Timeouts::default().dsr_established), value_parser = timeout_s)]
    timeout_dsr_established: u64,
    /// Idle timeout of ICMP echo flows, in seconds (RFC 5508: at least 60 s).
    #[arg(long, default_value_t = secs(Timeouts::default().icmp), value_parser = timeout_s)]
    timeout_icmp: u64,
    /// Microseconds a worker keeps polling its rings without work before it sleeps in
    /// poll(). Only for workers on dedicated, isolated cores: a spinning worker starves
    /// the softirqs and processes that share its core (measured: 30-130 req/s instead
    /// of ~1000 on a 2-core node with clients and servers alongside).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    busy_poll_us: u64,
    /// Forward established flows in XDP without waking a worker (the workers still see
    /// every new flow, SYN, FIN and RST). `off` keeps every packet on the workers.
    /// Redirecting into a veth needs its peer to take XDP frames: an XDP program on the
    /// peer, or GRO enabled there (`ethtool -K PEER gro on`).
    #[arg(long, value_enum, default_value_t = OnOff::On)]
    fast_path: OnOff,
    /// AF_XDP ring size (fill, completion, rx, tx), a power of two.
    #[arg(long, default_value_t = 2048, value_parser = ring_size)]
    ring_size: u32,
    /// Log filter (tracing's EnvFilter syntax); RUST_LOG overrides.
    #[arg(long, default_value = "info")]
    log: String,
}

/// The settings file lbd reads when `--config` names none and it exists.
const DEFAULT_CONFIG: &str = "/etc/xlb/lbd.toml";

/// `argv` with the settings file's settings in front, as flags: the command line's own
/// flags come after them and replace them (a flag given on the command line drops the
/// file's value for it, repeated flags included). An unknown key, a value that is not
/// a string, number, boolean or list of those, or a file that does not parse is an
/// error naming the file (and the line).
fn with_config(argv: Vec<std::ffi::OsString>) -> anyhow::Result<Vec<std::ffi::OsString>> {
    use clap::CommandFactory;
    let flag = |a: &std::ffi::OsString| -> Option<String> {
        let a = a.to_str()?.strip_prefix("--")?;
        Some(a.split('=').next().unwrap_or(a).to_string())
    };
    let mut path = None;
    for (i, a) in argv.iter().enumerate().skip(1) {
        match a.to_str() {
            Some("--config") => path = argv.get(i + 1).map(PathBuf::from),
            Some(s) if s.starts_with("--config=") => path = Some(PathBuf::from(&s[9..])),
            _ => {}
        }
    }
    let path = match path {
        Some(p) => p,
        None if std::path::Path::new(DEFAULT_CONFIG).exists() => PathBuf::from(DEFAULT_CONFIG),
        None => return Ok(argv),
    };
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(&path).with_context(|| format!("settings file {shown}"))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| anyhow::anyhow!("settings file {shown}: {e}"))?;
    let cmd = Args::command();
    let known: Vec<&str> = cmd.get_arguments().filter_map(|a| a.get_long()).collect();
    let on_cli: Vec<String> = argv.iter().skip(1).filter_map(flag).collect();
    let scalar = |key: &str, v: &toml::Value| -> anyhow::Result<std::ffi::OsString> {
        match v {
            toml::Value::String(s) => Ok(s.into()),
            toml::Value::Integer(n) => Ok(n.to_string().into()),
            other => anyhow::bail!(
                "settings file {shown}: `{key}` takes a string or a number, not {}",
                other.type_str()
            ),
        }
    };
    let mut out = vec![argv.first().cloned().unwrap_or_else(|| "lbd".into())];
    for (key, value) in &table {
        if key == "config" || !known.contains(&key.as_str()) {
            anyhow::bail!(
                "settings file {shown}: unknown setting `{key}` (the settings are lbd's long flags, see lbd --help)"
            );
        }
        if on_cli.iter().any(|f| f == key) {
            continue;
        }
        let name = format!("--{key}");
        match value {
            toml::Value::Boolean(true) => out.push(name.into()),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for v in items {
                    out.push(name.clone().into());
                    out.push(scalar(key, v)?);
                }
            }
            v => {
                out.push(name.into());
                out.push(scalar(key, v)?);
            }
        }
    }
    out.extend(argv.into_iter().skip(1));
    Ok(out)
}

/// Where lbd pins (see `--pin-dir`): a directory given must be on a bpffs; the default
/// is used only where /sys/fs/bpf is one (not inside `ip netns exec`, which remounts
/// /sys).
fn pin_dir(a: &Args) -> anyhow::Result<Option<PathBuf>> {
    const DEFAULT: &str = "/sys/fs/bpf/xlb";
    if a.no_pin {
        return Ok(None);
    }
    if let Some(dir) = &a.pin_dir {
        if !xdp::bpf::on_bpffs(dir) {
            anyhow::bail!(
                "--pin-dir {}: not on a bpffs (mount one: mount -t bpf bpf DIR)",
                dir.display()
            );
        }
        return Ok(Some(dir.clone()));
    }
    if xdp::bpf::on_bpffs(Path::new(DEFAULT)) {
        return Ok(Some(DEFAULT.into()));
    }
    tracing::warn!(
        "/sys/fs/bpf is not a bpffs: nothing is pinned, so established flows end with lbd \
         (mount one, or give --pin-dir; --no-pin says this is intended)"
    );
    Ok(None)
}

/// Hold the pin directory for this lbd's lifetime: a second lbd given the same directory
/// (another socket, by mistake) would take the running one's program and flows over.
fn lock_pins(dir: &Path) -> anyhow::Result<nix::fcntl::Flock<std::fs::File>> {
    std::fs::create_dir_all(dir).with_context(|| format!("--pin-dir {}", dir.display()))?;
    let f = std::fs::File::open(dir).with_context(|| format!("--pin-dir {}", dir.display()))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        anyhow::anyhow!(
            "--pin-dir {}: {e}: another lbd is using it (stop it first)",
            dir.display()
        )
    })
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse_from(with_config(std::env::args_os().collect())?);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&a.log))
        .context("--log")?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let pins = pin_dir(&a)?;
    let _pins_held = pins.as_deref().map(lock_pins).transpose()?;
    if a.unpin {
        let Some(dir) = pins else {
            anyhow::bail!("--unpin: no pin directory (give --pin-dir)");
        };
        let removed = xdp::bpf::unpin(&dir)?;
        println!(
            "removed {} pinned object(s) from {}",
            removed.len(),
            dir.display()
        );
        return Ok(());
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .context("installing signal handlers")?;
    }
    let cfg = DaemonConfig {
        ifaces: a.ifaces,
        snat_addrs: a.snat_addrs,
        hash_seed: a.hash_seed_file.unwrap_or_else(|| {
            tracing::warn!(
                "no --hash-seed-file: the hash seed is 0, so which backend a client port reaches is \
                 predictable; give every node of the tier the same secret seed file"
            );
            0
        }),
        snat_ports: a.snat_ports,
        encap_source: a.encap_source,
        queues: a.queues,
        cores: a.cores,
        flows_per_worker: a.flows_per_worker as usize,
        maglev_size: a.maglev_size,
        timeouts: Timeouts {
            tcp_syn: a.timeout_tcp_syn * SEC,
            tcp_established: a.timeout_tcp_established * SEC,
            tcp_fin: a.timeout_tcp_fin * SEC,
            tcp_rst: a.timeout_tcp_rst * SEC,
            udp: a.timeout_udp * SEC,
            icmp: a.timeout_icmp * SEC,
            dsr_established: a.timeout_dsr_established * SEC,
        },
        io: IoConfig {
            ring_size: a.ring_size,
            ..IoConfig::default()
        },
        busy_poll_ns: a.busy_poll_us * 1000,
        fast_path: a.fast_path == OnOff::On,
        pin_dir: pins,
        masq: (!a.masquerade_from.is_empty()).then_some(MasqOptions {
            from: a.masquerade_from,
            egress_iface: a.egress_iface,
            egress_addrs: a.egress_addrs,
            config: a.ip_masq_config,
            cluster_nodes: a.cluster_nodes,
            filtering: a.nat_filtering,
        }),
    };
    match xdp::sys::raise_nofile_limit() {
        Ok(n) => tracing::debug!(limit = n, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open files limit"),
    }
    let opts = SocketOptions {
        mode: a.socket_mode,
        group: a.socket_group,
    };
    // The state file is read before anything is set up: one that does not parse stops
    // lbd here, naming the file and line.
    let state = match a.no_state {
        true => None,
        false => Some(control::desired::load(&a.state_file).map_err(anyhow::Error::msg)?),
    };
    let mut sock = ControlSocket::bind(&a.socket, &opts).context("binding the control socket")?;
    // A failure from here on drops `sock`, which removes the socket it created.
    let mut daemon = Daemon::start(cfg, Arc::clone(&stop)).context("starting lbd")?;
    if let Some(state) = state {
        match daemon.restore(a.state_file.clone(), state) {
            Ok(n) => tracing::info!(services = n, file = %a.state_file.display(), "state restored"),
            Err(e) => {
                daemon.shutdown();
                return Err(anyhow::Error::msg(e));
            }
        }
    }
    // The services are back: take over the previous lbd's flows and program, if any.
    if let Err(e) = daemon.resume() {
        daemon.shutdown();
        return Err(e).context("taking over the previous lbd's datapath");
    }
    if let Some(addr) = a.metrics_addr {
        match lbd::metrics::serve(addr) {
            Ok(rx) => daemon.serve_metrics(rx),
            Err(e) => {
                daemon.shutdown();
                return Err(anyhow::Error::msg(e));
            }
        }
        tracing::info!(%addr, "metrics at /metrics");
    }
    tracing::info!(socket = %sock.path().display(), "lbd ready");
    // systemd's Type=notify: ready once the workers run and the state is restored (a
    // no-op without NOTIFY_SOCKET).
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "could not tell systemd lbd is ready");
    }
    let served = serve(&mut sock, &mut daemon, &stop, Duration::from_millis(50));
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let fatal = daemon.fatal();
    daemon.shutdown();
    tracing::info!("lbd stopped");
    served.context("control socket")?;
    match fatal {
        Some(why) => Err(anyhow::anyhow!(why)),
        None => Ok(()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}
