//! What a run produced: results.json (raw runs), pps.png and latency.png (plotters),
//! and the markdown results section (written to `<out>/results.md` and, with `--doc`,
//! between the markers in docs/benchmarks.md).

use crate::cost::Case;
use crate::harness::{RunOptions, Scenario};
use crate::stats::Summary;
use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::Path;

pub const BEGIN: &str = "<!-- results:begin (written by xlb-bench run --doc) -->";
pub const END: &str = "<!-- results:end -->";

#[derive(Debug, Serialize, Deserialize)]
pub struct Meta {
    pub date: String,
    pub kernel: String,
    pub cpu: String,
    pub cpus: usize,
    pub command: String,
    pub smoke: bool,
    pub gen_cpu: usize,
    pub sut_cpu: usize,
    pub proto: String,
    pub runs: usize,
    pub warmup_s: f64,
    pub seconds: f64,
    pub latency_rate: u32,
    /// Seconds per TCP run (absent in reports from before TCP was measured).
    #[serde(default)]
    pub tcp_seconds: u32,
}

fn first_line(path: &str, key: Option<&str>) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    match key {
        None => s.lines().next().unwrap_or("").trim().to_string(),
        Some(k) => s
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("")
            .trim()
            .to_string(),
    }
}

impl Meta {
    pub fn now(o: &RunOptions, runs: usize, warmup_s: f64, seconds: f64) -> Meta {
        let date = std::process::Command::new("date")
            .args(["-u", "+%Y-%m-%d %H:%M UTC"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        Meta {
            date,
            kernel: first_line("/proc/sys/kernel/osrelease", None),
            cpu: first_line("/proc/cpuinfo", Some("model name")),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            command: std::env::args().collect::<Vec<_>>().join(" "),
            smoke: o.smoke,
            gen_cpu: o.gen_cpu,
            sut_cpu: o.sut_cpu,
            proto: o.proto.clone(),
            runs,
            warmup_s,
            seconds,
            latency_rate: o.latency_rate,
            tcp_seconds: 0,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PpsPoint {
    pub scenario: Scenario,
    pub flows: u32,
    /// Frame size on the wire incl. FCS.
    pub size: usize,
    /// Received pps at the sink, one per run.
    pub runs: Vec<f64>,
    pub summary: Summary,
    /// What the generator offered (pps).
    pub offered: Summary,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Latency {
    pub scenario: Option<Scenario>,
    pub rate: u32,
    pub sent: u64,
    pub received: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// Established TCP through the VIP with real stacks (see `harness::tcp`).
#[derive(Debug, Serialize, Deserialize)]
pub struct TcpPoint {
    pub scenario: Scenario,
    /// One iperf3 stream, Gbit/s received: summary and runs.
    pub iperf3: Summary,
    pub iperf3_runs: Vec<f64>,
    /// wrk, keep-alive: requests/s, summary and runs, and errors over all runs.
    pub wrk: Summary,
    pub wrk_runs: Vec<f64>,
    pub wrk_errors: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CostResult {
    pub instructions_per_packet: Vec<(Case, f64)>,
    pub maglev_build_ms: f64,
    pub bytes_per_flow: f64,
    /// Shares and disruption (absent in reports from before it was measured).
    #[serde(default)]
    pub maglev: Option<crate::cost::MaglevQuality>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Results {
    pub meta: Meta,
    pub pps: Vec<PpsPoint>,
    pub latency: Vec<Latency>,
    /// Absent in reports from before TCP was measured.
    #[serde(default)]
    pub tcp: Vec<TcpPoint>,
    pub cost: Option<CostResult>,
}

impl Results {
    fn median(&self, s: Scenario, flows: u32, size: usize) -> Option<f64> {
        self.pps
            .iter()
            .find(|p| p.scenario == s && p.flows == flows && p.size == size)
            .map(|p| p.summary.median)
    }

    fn ratio(&self, a: Scenario, b: Scenario, flows: u32, size: usize) -> Option<f64> {
        let (x, y) = (self.median(a, flows, size)?, self.median(b, flows, size)?);
        (y > 0.0).then(|| x / y)
    }

    /// `a`'s TCP figure over `b`'s (`f` picks iperf3 or wrk).
    fn tcp_ratio(&self, a: Scenario, b: Scenario, f: fn(&TcpPoint) -> f64) -> Option<f64> {
        let get = |s| self.tcp.iter().find(|t| t.scenario == s).map(f);
        let (x, y) = (get(a)?, get(b)?);
        (y > 0.0).then(|| x / y)
    }

    fn instr(&self, c: Case) -> Option<f64> {
        self.cost.as_ref().and_then(|k| {
            k.instructions_per_packet
                .iter()
                .find(|(x, _)| *x == c)
                .map(|(_, v)| *v)
        })
    }

    fn scenarios(&self) -> Vec<Scenario> {
        Scenario::ALL
            .into_iter()
            .filter(|s| self.pps.iter().any(|p| p.scenario == *s))
            .collect()
    }

    fn grid(&self) -> (Vec<usize>, Vec<u32>) {
        let mut sizes: Vec<usize> = self.pps.iter().map(|p| p.size).collect();
        sizes.sort_unstable();
        sizes.dedup();
        let mut flows: Vec<u32> = self.pps.iter().map(|p| p.flows).collect();
        flows.sort_unstable();
        flows.dedup();
        (sizes, flows)
    }
}

fn opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "–".to_string(), f)
}

/// The markdown results section.
pub fn markdown(r: &Results) -> String {
    let mut m = String::new();
    let meta = &r.meta;
    let _ = writeln!(
        m,
        "Measured {} on {} ({} CPUs), Linux {}.",
        meta.date, meta.cpu, meta.cpus, meta.kernel
    );
    let _ = writeln!(
        m,
        "Command: `{}`. Generator on CPU {}, systems under test on CPU {}; {} runs per point, \
         {} s warm-up, {} s measured; {} traffic.\n",
        meta.command,
        meta.gen_cpu,
        meta.sut_cpu,
        meta.runs,
        meta.warmup_s,
        meta.seconds,
        meta.proto
    );
    if meta.smoke {
        let _ = writeln!(
            m,
            "**Smoke run: windows too short for the figures to mean much.**\n"
        );
    }
    let (sizes, flows) = r.grid();
    let scen = r.scenarios();
    let _ = writeln!(
        m,
        "### Packets per second (received at the sink; median, min–max, Mpps)\n"
    );
    let mut head = "| flows | size |".to_string();
    let mut rule = "|---:|---:|".to_string();
    for s in &scen {
        let _ = write!(head, " {} |", s.label());
        rule.push_str("---:|");
    }
    head.push_str(
        " xlb / nft (LB) | xlb / workers only | xlb / XDP redirect | xlb / nft (egress) | DSR L2 / XDP redirect | DSR IPIP / DSR L2 |",
    );
    rule.push_str("---:|---:|---:|---:|---:|---:|");
    let _ = writeln!(m, "{head}\n{rule}");
    for &size in &sizes {
        for &f in &flows {
            let _ = write!(m, "| {f} | {size} B |");
            for &s in &scen {
                let p = r
                    .pps
                    .iter()
                    .find(|p| p.scenario == s && p.flows == f && p.size == size);
                let _ = write!(
                    m,
                    " {} |",
                    p.map_or("–".to_string(), |p| format!(
                        "{:.3} ({:.3}–{:.3})",
                        p.summary.median / 1e6,
                        p.summary.min / 1e6,
                        p.summary.max / 1e6
                    ))
                );
            }
            let x = |v: Option<f64>| opt(v, |v| format!("{v:.2}×"));
            let _ = writeln!(
                m,
                " {} | {} | {} | {} | {} | {} |",
                x(r.ratio(Scenario::XlbSnat, Scenario::NftDnat, f, size)),
                x(r.ratio(Scenario::XlbSnat, Scenario::XlbSnatWorkers, f, size)),
                x(r.ratio(Scenario::XlbSnat, Scenario::XdpRedirect, f, size)),
                x(r.ratio(Scenario::XlbMasq, Scenario::NftMasq, f, size)),
                x(r.ratio(Scenario::XlbDsrL2, Scenario::XdpRedirect, f, size)),
                x(r.ratio(Scenario::XlbDsrIpip, Scenario::XlbDsrL2, f, size)),
            );
        }
    }
    if !r.latency.is_empty() {
        let _ = writeln!(
            m,
            "\n### Latency (UDP request/response through the VIP at {} req/s, µs)\n",
            meta.latency_rate
        );
        let _ = writeln!(
            m,
            "| system | p50 | p99 | p99.9 | max | answered |\n|---|---:|---:|---:|---:|---:|"
        );
        for l in &r.latency {
            let _ = writeln!(
                m,
                "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {} / {} |",
                l.scenario.map_or("?", Scenario::label),
                l.p50_us,
                l.p99_us,
                l.p999_us,
                l.max_us,
                l.received,
                l.sent
            );
        }
    }
    if !r.tcp.is_empty() {
        let _ = writeln!(
            m,
            "\n### TCP through the VIP (established connections, real stacks; median, min–max of {} runs of {} s)\n",
            meta.runs, meta.tcp_seconds
        );
        let _ = writeln!(
            m,
            "One iperf3 stream, and wrk keep-alive HTTP ({WRK} connections, one thread) against \
             nginx; clients in `xb-gen`, servers on the backends' addresses in `xb-srv`.\n",
            WRK = crate::harness::WRK_CONNECTIONS
        );
        let _ = writeln!(
            m,
            "| system | iperf3 Gbit/s | wrk requests/s | wrk errors |\n|---|---:|---:|---:|"
        );
        for t in &r.tcp {
            let _ = writeln!(
                m,
                "| {} | {:.2} ({:.2}–{:.2}) | {:.0} ({:.0}–{:.0}) | {} |",
                t.scenario.label(),
                t.iperf3.median,
                t.iperf3.min,
                t.iperf3.max,
                t.wrk.median,
                t.wrk.min,
                t.wrk.max,
                t.wrk_errors
            );
        }
    }
    if let Some(c) = &r.cost {
        let _ = writeln!(
            m,
            "\n### Engine cost (callgrind, instructions per packet; deterministic)\n"
        );
        let copy = r.instr(Case::Copy).unwrap_or(0.0);
        let _ = writeln!(
            m,
            "| case | instructions/packet | minus the harness's frame copy ({copy:.0}) |\n|---|---:|---:|"
        );
        for (case, v) in &c.instructions_per_packet {
            let name = serde_json::to_string(case).unwrap_or_default();
            let _ = writeln!(
                m,
                "| {} | {v:.0} | {:.0} |",
                name.trim_matches('"'),
                v - copy
            );
        }
        let _ = writeln!(
            m,
            "\nMaglev build (M = 65537, 100 backends): {:.3} ms (median of 21). Memory: {:.0} bytes per flow at 1 M flows.",
            c.maglev_build_ms, c.bytes_per_flow
        );
        if let Some(q) = &c.maglev {
            let _ = writeln!(
                m,
                "Maglev tables (M = 65537): 100 backends at weight 100, worst share {:.2} % off its ideal; 1000 at weight 100, {:.2} %; removing one of 100 moves {:.2} % of the slots (ideal 1 %); a skewed table (99 at weight 1, one at 10000) builds in {:.3} ms.",
                q.worst_share_pct_100, q.worst_share_pct_1000, q.disruption_pct, q.skewed_build_ms
            );
        }
    }
    let _ = writeln!(m, "\n### Targets (reported, not asserted)\n");
    let _ = writeln!(m, "| target | measured | met |\n|---|---:|:---:|");
    let mut target = |name: &str, v: Option<f64>, unit: &str, ok: &dyn Fn(f64) -> bool| {
        let _ = writeln!(
            m,
            "| {name} | {} | {} |",
            opt(v, |v| format!("{v:.2}{unit}")),
            v.map_or("–", |v| if ok(v) { "yes" } else { "no" })
        );
    };
    target(
        "xlb SNAT ≥ 3× nftables (1 k flows, 64 B)",
        r.ratio(Scenario::XlbSnat, Scenario::NftDnat, 1000, 64),
        "×",
        &|v| v >= 3.0,
    );
    target(
        "xlb SNAT (established flows) ≥ 85 % of the XDP redirect ceiling (1 k flows, 64 B)",
        r.ratio(Scenario::XlbSnat, Scenario::XdpRedirect, 1000, 64)
            .map(|v| v * 100.0),
        " %",
        &|v| v >= 85.0,
    );
    target(
        "xlb DSR L2 (established flows) ≥ 90 % of the XDP redirect ceiling (1 k flows, 64 B)",
        r.ratio(Scenario::XlbDsrL2, Scenario::XdpRedirect, 1000, 64)
            .map(|v| v * 100.0),
        " %",
        &|v| v >= 90.0,
    );
    target(
        "xlb DSR over IPIP costs ≤ 10 % against L2 DSR (1 k flows, 64 B)",
        r.ratio(Scenario::XlbDsrIpip, Scenario::XlbDsrL2, 1000, 64)
            .map(|v| (1.0 - v) * 100.0),
        " %",
        &|v| v <= 10.0,
    );
    target(
        "xlb egress masquerading ≥ 3× nftables masquerade (1 k flows, 64 B)",
        r.ratio(Scenario::XlbMasq, Scenario::NftMasq, 1000, 64),
        "×",
        &|v| v >= 3.0,
    );
    target(
        "xlb SNAT workers only ≥ 85 % of the bare AF_XDP forwarder (1 k flows, 64 B)",
        r.ratio(Scenario::XlbSnatWorkers, Scenario::XskFwd, 1000, 64)
            .map(|v| v * 100.0),
        " %",
        &|v| v >= 85.0,
    );
    target(
        "single-stream iperf3 through xlb ≥ 1.0× nftables",
        r.tcp_ratio(Scenario::XlbSnat, Scenario::NftDnat, |t| t.iperf3.median),
        "×",
        &|v| v >= 1.0,
    );
    target(
        "keep-alive HTTP (wrk) through xlb ≥ 1.0× nftables",
        r.tcp_ratio(Scenario::XlbSnat, Scenario::NftDnat, |t| t.wrk.median),
        "×",
        &|v| v >= 1.0,
    );
    let engine = |c: Case| Some(r.instr(c)? - r.instr(Case::Copy).unwrap_or(0.0));
    target(
        "flow hit ≤ 250 instructions (engine only)",
        engine(Case::Hit),
        "",
        &|v| v <= 250.0,
    );
    target(
        "new flow ≤ 1500 instructions (engine only)",
        engine(Case::New),
        "",
        &|v| v <= 1500.0,
    );
    let c = r.cost.as_ref();
    target(
        "Maglev build ≤ 1 ms",
        c.map(|c| c.maglev_build_ms),
        " ms",
        &|v| v <= 1.0,
    );
    target(
        "≤ 150 bytes per flow",
        c.map(|c| c.bytes_per_flow),
        " B",
        &|v| v <= 150.0,
    );
    let _ = writeln!(
        m,
        "\n![pps](bench/pps.png)\n\n![latency](bench/latency.png)"
    );
    m
}

const COLORS: [RGBColor; 9] = [
    RGBColor(90, 90, 90),
    RGBColor(148, 103, 189),
    RGBColor(150, 150, 150),
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
    RGBColor(140, 86, 75),
];

fn color(s: Scenario) -> RGBColor {
    let i = Scenario::ALL.iter().position(|x| *x == s).unwrap_or(0);
    COLORS[i % COLORS.len()]
}

fn font() -> Result<()> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if DONE.get().is_some() {
        return Ok(());
    }
    let path = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
    let bytes = std::fs::read(path)
        .with_context(|| format!("{path} (deploy/install-deps.sh installs fonts-dejavu-core)"))?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{path} is not a usable font"))?;
    let _ = DONE.set(true);
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// Grouped bars: one group per label, one bar per series, with min–max whiskers.
fn bars(
    area: &Area,
    title: &str,
    y_label: &str,
    groups: &[String],
    series: &[(String, RGBColor, Vec<Summary>)],
) -> Result<()> {
    let top = series
        .iter()
        .flat_map(|s| s.2.iter().map(|v| v.max))
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.15;
    let n = groups.len();
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(55)
        .build_cartesian_2d(0f64..n as f64, 0f64..top)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n.max(1) * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < n {
                groups[i].clone()
            } else {
                String::new()
            }
        })
        .y_desc(y_label)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    let k = series.len().max(1) as f64;
    let w = 0.8 / k;
    for (j, (name, c, vals)) in series.iter().enumerate() {
        let c = *c;
        let x0 = |i: usize| i as f64 + 0.1 + j as f64 * w;
        chart
            .draw_series(vals.iter().enumerate().map(|(i, v)| {
                Rectangle::new([(x0(i), 0.0), (x0(i) + w * 0.9, v.median)], c.filled())
            }))
            .map_err(|e| anyhow!("{e}"))?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], c.filled()));
        chart
            .draw_series(vals.iter().enumerate().map(|(i, v)| {
                let xm = x0(i) + w * 0.45;
                PathElement::new(vec![(xm, v.min), (xm, v.max)], BLACK)
            }))
            .map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

fn plots(r: &Results, dir: &Path) -> Result<()> {
    font()?;
    let (sizes, flows) = r.grid();
    let pps = dir.join("pps.png");
    let root =
        BitMapBackend::new(&pps, (1100, 420 * sizes.len().max(1) as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let areas = root.split_evenly((sizes.len().max(1), 1));
    for (area, &size) in areas.iter().zip(&sizes) {
        let groups: Vec<String> = flows.iter().map(|f| format!("{f} flows")).collect();
        let series: Vec<(String, RGBColor, Vec<Summary>)> = r
            .scenarios()
            .into_iter()
            .map(|s| {
                let v = flows
                    .iter()
                    .map(|&f| {
                        r.pps
                            .iter()
                            .find(|p| p.scenario == s && p.flows == f && p.size == size)
                            .map_or(Summary::of(&[]), |p| {
                                let m = |x: f64| x / 1e6;
                                Summary {
                                    median: m(p.summary.median),
                                    min: m(p.summary.min),
                                    max: m(p.summary.max),
                                }
                            })
                    })
                    .collect();
                (s.label().to_string(), color(s), v)
            })
            .collect();
        bars(
            area,
            &format!("Received Mpps, {size} B frames (median, min–max)"),
            "Mpps",
            &groups,
            &series,
        )?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    if !r.latency.is_empty() {
        let lat = dir.join("latency.png");
        let root = BitMapBackend::new(&lat, (800, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let groups = vec!["p50".to_string(), "p99".into(), "p99.9".into()];
        let series: Vec<(String, RGBColor, Vec<Summary>)> = r
            .latency
            .iter()
            .map(|l| {
                let s = l.scenario.unwrap_or(Scenario::XlbSnat);
                let one = |v: f64| Summary {
                    median: v,
                    min: v,
                    max: v,
                };
                (
                    s.label().to_string(),
                    color(s),
                    vec![one(l.p50_us), one(l.p99_us), one(l.p999_us)],
                )
            })
            .collect();
        bars(
            &root,
            &format!(
                "Request/response latency at {} req/s (µs)",
                r.meta.latency_rate
            ),
            "µs",
            &groups,
            &series,
        )?;
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    Ok(())
}

/// Write results.json, results.md, the plots, and the doc section if asked.
pub fn write(r: &Results, dir: &Path, doc: Option<&Path>) -> Result<()> {
    std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(r)?)?;
    let md = markdown(r);
    std::fs::write(dir.join("results.md"), &md)?;
    plots(r, dir)?;
    if let Some(doc) = doc {
        let text = std::fs::read_to_string(doc).with_context(|| format!("reading {doc:?}"))?;
        let (Some(a), Some(b)) = (text.find(BEGIN), text.find(END)) else {
            bail!("{doc:?} lacks the markers {BEGIN} … {END}");
        };
        let new = format!("{}{BEGIN}\n{md}{}", &text[..a], &text[b..]);
        std::fs::write(doc, new)?;
    }
    Ok(())
}

/// The harness's own sanity: every point must have moved traffic, latency requests be
/// answered, every cost be there. Failing these means the harness (or a system under
/// test) is broken, not slow.
pub fn check(r: &Results) -> Result<()> {
    let mut bad = Vec::new();
    for p in &r.pps {
        // Every system here forwards a tenth or more of what the generator offers; a
        // few per mille means frames are being lost to a mistake, not to load.
        if p.offered.median <= 0.0 || p.summary.min < p.offered.median * 0.02 {
            bad.push(format!(
                "{} {} flows {} B: {:.0} pps reached the sink of {:.0} offered",
                p.scenario.label(),
                p.flows,
                p.size,
                p.summary.min,
                p.offered.median
            ));
        }
    }
    for l in &r.latency {
        if l.received * 2 < l.sent || l.sent == 0 {
            bad.push(format!(
                "{}: {} of {} latency requests answered",
                l.scenario.map_or("?", Scenario::label),
                l.received,
                l.sent
            ));
        }
    }
    for t in &r.tcp {
        if t.iperf3.min <= 0.0 || t.wrk.min <= 0.0 {
            bad.push(format!(
                "{}: TCP through the VIP moved nothing (iperf3 {:.2} Gbit/s, wrk {:.0} requests/s)",
                t.scenario.label(),
                t.iperf3.min,
                t.wrk.min
            ));
        }
    }
    if let Some(c) = &r.cost {
        for (case, v) in &c.instructions_per_packet {
            if *v <= 0.0 {
                bad.push(format!("callgrind case {case:?}: no instructions counted"));
            }
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        bail!("the benchmark harness failed:\n  {}", bad.join("\n  "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results(received: f64, answered: u64) -> Results {
        let one = |v: f64| Summary::of(&[v]);
        Results {
            meta: Meta {
                date: String::new(),
                kernel: String::new(),
                cpu: String::new(),
                cpus: 2,
                command: String::new(),
                smoke: true,
                gen_cpu: 0,
                sut_cpu: 1,
                proto: "udp".into(),
                runs: 1,
                warmup_s: 0.3,
                seconds: 0.5,
                latency_rate: 2000,
                tcp_seconds: 1,
            },
            pps: vec![PpsPoint {
                scenario: Scenario::XlbSnat,
                flows: 1000,
                size: 64,
                runs: vec![received],
                summary: one(received),
                offered: one(1.3e6),
            }],
            latency: vec![Latency {
                scenario: Some(Scenario::XlbSnat),
                rate: 2000,
                sent: 2000,
                received: answered,
                p50_us: 150.0,
                p99_us: 400.0,
                p999_us: 900.0,
                max_us: 1000.0,
            }],
            tcp: Vec::new(),
            cost: None,
        }
    }

    #[test]
    fn check_passes_a_working_run_and_names_what_broke() {
        assert!(check(&results(3.0e5, 1990)).is_ok());
        let e = check(&results(2.6e3, 1990))
            .expect_err("a point that lost 99.8 %")
            .to_string();
        assert!(e.contains("xlb SNAT 1000 flows 64 B"), "{e}");
        let e = check(&results(3.0e5, 10))
            .expect_err("10 of 2000 answered")
            .to_string();
        assert!(e.contains("10 of 2000 latency requests"), "{e}");
    }

    #[test]
    fn markdown_has_the_ratios_and_the_targets() {
        let mut r = results(3.0e5, 1990);
        r.pps.push(PpsPoint {
            scenario: Scenario::NftDnat,
            flows: 1000,
            size: 64,
            runs: vec![1.5e5],
            summary: Summary::of(&[1.5e5]),
            offered: Summary::of(&[1.2e6]),
        });
        let m = markdown(&r);
        assert!(
            m.contains("| 1000 | 64 B | 0.300 (0.300–0.300) | 0.150 (0.150–0.150) | 2.00× |"),
            "{m}"
        );
        assert!(
            m.contains("| xlb SNAT ≥ 3× nftables (1 k flows, 64 B) | 2.00× | no |"),
            "{m}"
        );
    }

    #[test]
    fn tcp_figures_have_their_table_their_targets_and_their_check() {
        let mut r = results(3.0e5, 1990);
        let point = |s, gbps: f64, rps: f64| TcpPoint {
            scenario: s,
            iperf3: Summary::of(&[gbps]),
            iperf3_runs: vec![gbps],
            wrk: Summary::of(&[rps]),
            wrk_runs: vec![rps],
            wrk_errors: 0,
        };
        r.tcp.push(point(Scenario::XlbSnat, 3.0, 40_000.0));
        r.tcp.push(point(Scenario::NftDnat, 2.0, 50_000.0));
        let m = markdown(&r);
        assert!(
            m.contains("| xlb SNAT | 3.00 (3.00–3.00) | 40000 (40000–40000) | 0 |"),
            "{m}"
        );
        assert!(
            m.contains("| single-stream iperf3 through xlb ≥ 1.0× nftables | 1.50× | yes |"),
            "{m}"
        );
        assert!(
            m.contains("| keep-alive HTTP (wrk) through xlb ≥ 1.0× nftables | 0.80× | no |"),
            "{m}"
        );
        assert!(check(&r).is_ok());
        r.tcp.push(point(Scenario::XlbSnatWorkers, 0.0, 10.0));
        let e = check(&r)
            .expect_err("a TCP run that moved nothing")
            .to_string();
        assert!(e.contains("xlb SNAT, workers only: TCP"), "{e}");
    }

    #[test]
    fn wrk_output_is_read_with_its_errors() {
        let out = "Running 1s test @ http://10.96.0.10:80/\n  1 threads and 16 connections\n\
                   \x20 Socket errors: connect 0, read 2, write 0, timeout 1\n\
                   \x20 Non-2xx or 3xx responses: 4\nRequests/sec:  12345.67\nTransfer/sec:      1.23MB\n";
        let (rps, errors) = crate::harness::wrk_figures(out).expect("figures");
        assert_eq!((rps, errors), (12345.67, 7));
        assert!(crate::harness::wrk_figures("no figures").is_err());
    }
}
