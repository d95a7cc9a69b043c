//! `lbd --metrics-addr ADDR:PORT`: Prometheus metrics at `/metrics`, in the OpenMetrics
//! text format (prometheus-client).
//!
//! A small HTTP server runs on its own thread; for each scrape it asks the control loop
//! for a [`Sample`] (the loop answers between two ticks, from what it already has: the
//! workers' published counters, the XDP program's counters, the service table, and the
//! traffic by service), and [`encode`] turns the sample into the exposition. The
//! encoding is pure (checked by the end-to-end scrape and a strict parser); nothing here
//! touches the workers or the kernel.
//!
//! Label sets are bounded: workers, interfaces and queues, drop reasons, NAT
//! addresses, services and backends (at most 4096 pairs per worker); no per-flow label.

use control::proto::{ServiceStatsView, ServiceView, StatsView, StatusView};
use crossbeam_channel::{Receiver, Sender};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::time::Duration;

/// How long a scrape waits for the control loop.
const SCRAPE_WAIT: Duration = Duration::from_secs(5);
/// OpenMetrics' content type (Prometheus asks for it and parses it strictly).
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One NAT address's ports (a SNAT pool address, or an egress address).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSample {
    pub address: String,
    /// Ports of its range.
    pub ports: u64,
    /// Mappings holding a port now (one per inside endpoint; toward different remotes
    /// two may share a port), over the workers.
    pub allocated: u64,
    /// The most `allocated` seen since lbd started (sampled every control-loop tick).
    pub high_water: u64,
    /// New flows refused because no port was free.
    pub failures: u64,
}

/// Everything a scrape shows, as the control loop has it.
#[derive(Debug, Clone)]
pub struct Sample {
    pub stats: StatsView,
    pub status: StatusView,
    pub services: Vec<ServiceView>,
    pub traffic: Vec<ServiceStatsView>,
    pub pools: Vec<PoolSample>,
}

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A counter family, registered; filled by the caller.
fn counters(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    reg.register(name, help, f.clone());
    f
}

fn gauges(reg: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let f = Family::<Labels, Gauge>::default();
    reg.register(name, help, f.clone());
    f
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The services' Maglev tables as an info metric (`xlb_service_maglev_info`): the
/// fingerprint nodes of a tier compare, and the table size.
#[derive(Debug)]
struct MaglevInfo(Vec<(String, String, String)>);

impl Collector for MaglevInfo {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self.0.is_empty() {
            return Ok(());
        }
        let mut m = encoder.encode_descriptor(
            "xlb_service_maglev",
            "A service's Maglev table: its fingerprint (equal on every node with the same backends and seed) and size",
            None,
            MetricType::Info,
        )?;
        for (service, fingerprint, size) in &self.0 {
            let info = Info::new(labels(&[
                ("service", service),
                ("fingerprint", fingerprint),
                ("table_size", size),
            ]));
            info.encode(m.encode_family(&Labels::new())?)?;
        }
        Ok(())
    }
}

/// The exposition of `s` (OpenMetrics text, ending in `# EOF`).
pub fn encode(s: &Sample) -> Result<String, std::fmt::Error> {
    let mut reg = Registry::default();
    reg.register(
        "xlb_build",
        "The running lbd",
        Info::new(labels(&[("version", &s.status.version)])),
    );

    // Workers.
    let rx = counters(
        &mut reg,
        "xlb_worker_rx_packets",
        "Frames a worker processed",
    );
    let tx = counters(&mut reg, "xlb_worker_tx_packets", "Frames a worker sent");
    let handoff = counters(
        &mut reg,
        "xlb_worker_handoff_packets",
        "Frames handed to (out) or received from (in) another worker: replies on another worker's queue",
    );
    let created = counters(
        &mut reg,
        "xlb_worker_flows_created",
        "Flows a worker opened",
    );
    let expired = counters(
        &mut reg,
        "xlb_worker_flows_expired",
        "Flows that idled out or ended",
    );
    let evicted = counters(
        &mut reg,
        "xlb_worker_flows_evicted",
        "Flows not yet established evicted for new ones while the table was full",
    );
    let adopted = counters(
        &mut reg,
        "xlb_worker_flows_adopted",
        "Flows taken over at start from the fast path the previous lbd left",
    );
    let sent = counters(
        &mut reg,
        "xlb_worker_generated_packets",
        "Packets lbd originated: ICMP errors (icmp) and TCP resets to clients of removed backends (reset)",
    );
    let drops = counters(
        &mut reg,
        "xlb_drops",
        "Packets dropped, by where (xdp: the steering program; worker) and why",
    );
    for w in &s.stats.workers {
        let id = w.id.to_string();
        let l = labels(&[("worker", &id)]);
        rx.get_or_create(&l).inc_by(w.rx);
        tx.get_or_create(&l).inc_by(w.tx);
        handoff
            .get_or_create(&labels(&[("worker", &id), ("direction", "out")]))
            .inc_by(w.handoff_out);
        handoff
            .get_or_create(&labels(&[("worker", &id), ("direction", "in")]))
            .inc_by(w.handoff_in);
        created.get_or_create(&l).inc_by(w.flows_created);
        expired.get_or_create(&l).inc_by(w.flows_expired);
        evicted.get_or_create(&l).inc_by(w.flows_evicted);
        adopted.get_or_create(&l).inc_by(w.flows_adopted);
        sent.get_or_create(&labels(&[("worker", &id), ("kind", "icmp")]))
            .inc_by(w.icmp_sent);
        sent.get_or_create(&labels(&[("worker", &id), ("kind", "reset")]))
            .inc_by(w.resets_sent);
        // Every reason, also at 0: a series that appears only when it first moves is
        // invisible to rate() until then.
        for r in lb::DropReason::ALL {
            let n = w.drops.get(r.name()).copied().unwrap_or(0);
            drops
                .get_or_create(&labels(&[
                    ("source", "worker"),
                    ("worker", &id),
                    ("reason", r.name()),
                ]))
                .inc_by(n);
        }
    }
    let xdp = counters(
        &mut reg,
        "xlb_xdp_packets",
        "The steering program's counters: what it did with each frame (to a worker, passed to the kernel, executed in the fast path, dropped)",
    );
    for (name, n) in &s.stats.xdp {
        xdp.get_or_create(&labels(&[("counter", name)])).inc_by(*n);
        if let Some(reason) = name.strip_suffix("_dropped") {
            drops
                .get_or_create(&labels(&[("source", "xdp"), ("reason", reason)]))
                .inc_by(*n);
        }
    }
    let fast = counters(
        &mut reg,
        "xlb_fast_path_packets",
        "Packets of established flows executed by the XDP fast path, without a worker",
    );
    fast.get_or_create(&Vec::new())
        .inc_by(s.stats.xdp.get("fast_path").copied().unwrap_or(0));
    let xsk = counters(
        &mut reg,
        "xlb_afxdp_kernel",
        "An AF_XDP socket's kernel counters (XDP_STATISTICS): frames lost before a worker saw them",
    );
    for sk in &s.stats.sockets {
        let (w, q) = (sk.worker.to_string(), sk.queue.to_string());
        for (name, n) in &sk.kernel {
            xsk.get_or_create(&labels(&[
                ("worker", &w),
                ("iface", &sk.iface),
                ("queue", &q),
                ("counter", name),
            ]))
            .inc_by(*n);
        }
    }

    // Tables.
    let entries = gauges(
        &mut reg,
        "xlb_flow_table_entries",
        "Flows in a worker's table",
    );
    let capacity = gauges(
        &mut reg,
        "xlb_flow_table_capacity",
        "A worker's flow table size (--flows-per-worker)",
    );
    let mappings = gauges(
        &mut reg,
        "xlb_nat_mappings",
        "Inside endpoints with a NAT mapping on a worker (SNAT and masquerading)",
    );
    let fast_entries = gauges(
        &mut reg,
        "xlb_fast_path_entries",
        "Flow directions a worker installed in the XDP fast path",
    );
    for w in &s.status.workers {
        let l = labels(&[("worker", &w.id.to_string())]);
        entries.get_or_create(&l).set(gauge(w.flows));
        capacity.get_or_create(&l).set(gauge(w.flow_capacity));
        mappings.get_or_create(&l).set(gauge(w.mappings));
        fast_entries
            .get_or_create(&l)
            .set(gauge(w.fast_path_entries));
    }
    let ports = gauges(
        &mut reg,
        "xlb_nat_ports",
        "Ports of a NAT address's range (SNAT pool or egress address)",
    );
    let allocated = gauges(
        &mut reg,
        "xlb_nat_ports_allocated",
        "Mappings (inside endpoints) holding a port of a NAT address now; toward different remotes two may share a port",
    );
    let free = gauges(
        &mut reg,
        "xlb_nat_ports_free",
        "Ports of a NAT address less its mappings (0 at least)",
    );
    let high = gauges(
        &mut reg,
        "xlb_nat_ports_allocated_high_water",
        "The most mappings on a NAT address at once since lbd started",
    );
    let failures = counters(
        &mut reg,
        "xlb_nat_port_allocation_failures",
        "New flows refused on a NAT address because no port was free toward their remote (backend or destination)",
    );
    for p in &s.pools {
        let l = labels(&[("address", &p.address)]);
        ports.get_or_create(&l).set(gauge(p.ports));
        allocated.get_or_create(&l).set(gauge(p.allocated));
        free.get_or_create(&l)
            .set(gauge(p.ports.saturating_sub(p.allocated)));
        high.get_or_create(&l).set(gauge(p.high_water));
        failures.get_or_create(&l).inc_by(p.failures);
    }

    // Services and backends.
    let flows = counters(
        &mut reg,
        "xlb_service_flows",
        "Flows opened to a service's backend since lbd started",
    );
    let active = gauges(
        &mut reg,
        "xlb_service_flows_active",
        "Live flows to a service's backend (not closing)",
    );
    let packets = counters(
        &mut reg,
        "xlb_service_packets",
        "Packets of a service's backend's flows; in: client to backend, out: the answers through xlb",
    );
    let bytes = counters(
        &mut reg,
        "xlb_service_bytes",
        "IP bytes of a service's backend's flows; in: client to backend, out: the answers through xlb",
    );
    for svc in &s.traffic {
        for b in &svc.backends {
            let t = &b.totals;
            let l = labels(&[("service", &svc.frontend), ("backend", &b.backend)]);
            flows.get_or_create(&l).inc_by(t.flows);
            active.get_or_create(&l).set(gauge(t.active));
            for (dir, p, n) in [
                ("in", t.packets_in, t.bytes_in),
                ("out", t.packets_out, t.bytes_out),
            ] {
                let l = labels(&[
                    ("service", &svc.frontend),
                    ("backend", &b.backend),
                    ("direction", dir),
                ]);
                packets.get_or_create(&l).inc_by(p);
                bytes.get_or_create(&l).inc_by(n);
            }
        }
    }
    let weight = gauges(
        &mut reg,
        "xlb_backend_weight",
        "A backend's weight (0: draining)",
    );
    let state = gauges(
        &mut reg,
        "xlb_backend_state",
        "A backend's state: 1 for the one it is in (active; unhealthy: its health check fails, no new flows; draining: weight 0 with live flows; drained)",
    );
    let healthy = gauges(
        &mut reg,
        "xlb_backend_healthy",
        "A checked backend's health: 1 while its probes say it is up, 0 while down",
    );
    let mut maglev = Vec::new();
    for svc in &s.services {
        for b in &svc.backends {
            let name = format!("{}:{}", b.address, b.port);
            let l = labels(&[("service", &svc.frontend), ("backend", &name)]);
            weight.get_or_create(&l).set(i64::from(b.weight));
            if let Some(up) = b.healthy {
                healthy.get_or_create(&l).set(i64::from(up));
            }
            for st in ["active", "unhealthy", "draining", "drained"] {
                state
                    .get_or_create(&labels(&[
                        ("service", &svc.frontend),
                        ("backend", &name),
                        ("state", st),
                    ]))
                    .set(i64::from(b.state == st));
            }
        }
        maglev.push((
            svc.frontend.clone(),
            svc.fingerprint.clone(),
            svc.table_size.to_string(),
        ));
    }
    reg.register_collector(Box::new(MaglevInfo(maglev)));

    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg)?;
    Ok(out)
}

/// A scrape waiting for the control loop: where to send the exposition, or why there is
/// none (the scrape then gets 503, never an empty 200).
pub type Scrape = Sender<Result<String, String>>;

/// Serve `/metrics` on `addr` from a thread of its own; each scrape sends the control
/// loop a [`Scrape`] on the returned channel, for it to answer with the exposition.
pub fn serve(addr: SocketAddr) -> Result<Receiver<Scrape>, String> {
    let server =
        tiny_http::Server::http(addr).map_err(|e| format!("--metrics-addr {addr}: {e}"))?;
    let (tx, rx) = crossbeam_channel::bounded::<Scrape>(8);
    std::thread::Builder::new()
        .name("xlb-metrics".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let path = req.url().split('?').next().unwrap_or("").to_string();
                let resp = match (req.method(), path.as_str()) {
                    (tiny_http::Method::Get, "/metrics") => scrape(&tx),
                    (tiny_http::Method::Get, _) => {
                        text(404, "not found: the metrics are at /metrics\n")
                    }
                    _ => text(405, "only GET\n"),
                };
                let _ = req.respond(resp);
            }
        })
        .map_err(|e| format!("metrics thread: {e}"))?;
    Ok(rx)
}

fn text(code: u16, body: &str) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    tiny_http::Response::from_string(body).with_status_code(code)
}

fn scrape(loop_tx: &Sender<Scrape>) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    if loop_tx.try_send(tx).is_err() {
        return text(503, "lbd is busy: too many scrapes at once\n");
    }
    match rx.recv_timeout(SCRAPE_WAIT) {
        Ok(Ok(body)) => {
            let mut r = tiny_http::Response::from_string(body);
            if let Ok(h) = tiny_http::Header::from_bytes("Content-Type", CONTENT_TYPE) {
                r = r.with_header(h);
            }
            r
        }
        Ok(Err(why)) => text(503, &format!("lbd could not collect its metrics: {why}\n")),
        Err(_) => text(503, "lbd's control loop did not answer\n"),
    }
}
