//! `xlb-decap`: the backend side of xlb's direct server return. On a backend, it strips
//! the IPIP or GUE headers the edge node puts around a client's packet (when they are
//! addressed to this backend) and passes the packet itself to the stack, which answers
//! the client from the VIP directly. See docs/operations.md for the backend's set-up.
//!
//!   xlb-decap run --iface eth0 [--gue-port 6080] [--addr A]...   until SIGINT/SIGTERM
//!   xlb-decap status [-o json]                                   counters

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use xdp::decap::{Decap, DecapCounters, DecapStat};

#[derive(Parser)]
#[command(
    version,
    about = "xlb's DSR backend decapsulator (IPIP and GUE, in XDP)"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Attach to IFACE and decapsulate until SIGINT or SIGTERM, then detach (run it as a
    /// service, beside the backend's application).
    Run {
        #[arg(long)]
        iface: String,
        /// GUE's UDP port: the edge node's services' --gue-port (default 6080 on both);
        /// 0: IPIP only.
        #[arg(long, default_value_t = lb::service::DEFAULT_GUE_PORT)]
        gue_port: u16,
        /// Outer destination addresses to decapsulate for [default: IFACE's IPv4
        /// addresses].
        #[arg(long = "addr")]
        addrs: Vec<Ipv4Addr>,
        /// Log filter (tracing's EnvFilter syntax).
        #[arg(long, default_value = "info")]
        log: String,
    },
    /// The counters of the decapsulators running on this host.
    Status {
        #[arg(short = 'o', long, value_parser = ["text", "json"], default_value = "text")]
        output: String,
    },
}

fn json(c: &DecapCounters) -> serde_json::Value {
    DecapStat::ALL
        .iter()
        .map(|s| (s.name().to_string(), serde_json::json!(c[*s as usize])))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn main() -> anyhow::Result<()> {
    match Args::parse().cmd {
        Cmd::Run {
            iface,
            gue_port,
            addrs,
            log,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::try_new(&log).context("--log")?)
                .with_writer(std::io::stderr)
                .init();
            let addrs = if addrs.is_empty() {
                let mut nl = xdp::netlink::Netlink::open().context("netlink")?;
                let info = nl
                    .iface(&iface)
                    .with_context(|| format!("interface {iface}"))?;
                nl.ipv4_addrs(Some(info.ifindex))
                    .with_context(|| format!("the addresses of {iface}"))?
            } else {
                addrs
            };
            if addrs.is_empty() {
                bail!("{iface} has no IPv4 address to decapsulate for: give --addr");
            }
            let stop = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(sig, Arc::clone(&stop))
                    .context("installing signal handlers")?;
            }
            if let Err(e) = xdp::sys::raise_memlock_limit() {
                tracing::debug!(error = %e, "RLIMIT_MEMLOCK not raised");
            }
            let decap = Decap::attach(&iface, &addrs, gue_port)?;
            let list: Vec<String> = addrs.iter().map(Ipv4Addr::to_string).collect();
            tracing::info!(
                iface = %iface,
                mode = decap.mode,
                addrs = %list.join(","),
                gue_port,
                "decapsulating"
            );
            // The line scripts and tests wait for.
            println!("ready");
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
            }
            println!("{}", json(&decap.counters()?));
            tracing::info!(iface = %iface, "detached");
            Ok(())
        }
        Cmd::Status { output } => {
            let all = xdp::decap::loaded()?;
            if output == "json" {
                let v: Vec<serde_json::Value> = all
                    .iter()
                    .map(|(id, c)| serde_json::json!({"program": id, "counters": json(c)}))
                    .collect();
                println!("{}", serde_json::Value::from(v));
            } else if all.is_empty() {
                println!("no decapsulator running");
            } else {
                for (id, c) in &all {
                    let fields: Vec<String> = DecapStat::ALL
                        .iter()
                        .map(|s| format!("{} {}", s.name(), c[*s as usize]))
                        .collect();
                    println!("program {id}: {}", fields.join(", "));
                }
            }
            Ok(())
        }
    }
}
