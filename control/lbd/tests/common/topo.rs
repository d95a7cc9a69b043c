//! An RAII namespace topology for end-to-end tests (after aya's integration-test netns
//! guard): deploy/topology.sh builds it, `Drop` kills every process the test started and
//! deletes the namespaces, also when the test fails.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const VIP: &str = "10.96.0.10";

/// Python for client programs: `poke(conn, word)` sends a line on a connection (a
/// `(socket, file, …)` tuple) whose backend went away and says what came back: "data",
/// "eof", "reset" or "timeout".
pub const PY_POKE: &str = r#"
import json, socket, subprocess, sys

def lbctl_json(*args):
    """`lbctl ARGS -o json` against the test's lbd (argv 1 and 2), decoded."""
    out = subprocess.run([sys.argv[1], "--socket", sys.argv[2], *args, "-o", "json"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)

def poke(c, word):
    s = c[0]
    s.sendall(word + b"\n")
    try:
        return "data" if s.recv(100) else "eof"
    except ConnectionResetError:
        return "reset"
    except socket.timeout:
        return "timeout"
"#;

pub use xdp::testing::repo;

/// The DSR decapsulator, built beside lbd (by the `xdp` crate).
pub fn decap_path() -> PathBuf {
    let lbd = PathBuf::from(env!("CARGO_BIN_EXE_lbd"));
    let p = lbd.with_file_name("xlb-decap");
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        p.display()
    );
    p
}

pub fn lbctl_path() -> PathBuf {
    let lbd = PathBuf::from(env!("CARGO_BIN_EXE_lbd"));
    let p = lbd.with_file_name("lbctl");
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        p.display()
    );
    p
}

pub struct Topo {
    pub prefix: String,
    /// The topology script under deploy/ (its `down` runs on drop).
    script: &'static str,
    pub socket: PathBuf,
    children: Vec<Child>,
    lbd: Option<Child>,
    log: PathBuf,
}

impl Topo {
    /// Build the topology with `queues` queues on the LB's veths and `backends` backends,
    /// each running deploy/backend.py (HTTP 8080, UDP 5353, TCP echo 9000).
    pub fn up(tag: &str, queues: u32, backends: u32) -> Topo {
        let mut t = Topo::build(
            "deploy/topology.sh",
            tag,
            &[&queues.to_string(), &backends.to_string()],
        );
        for i in 1..=backends {
            t.start_server(&format!("b{i}"));
        }
        t
    }

    /// The masquerading topology (deploy/masq-topology.sh): pods behind the edge node
    /// `lb`, servers `srv`, `far` (behind an MTU-1280 link) and `nm` (non-masquerade).
    pub fn masq_up(tag: &str, queues: u32) -> Topo {
        let mut t = Topo::build("deploy/masq-topology.sh", tag, &[&queues.to_string()]);
        for n in ["srv", "far", "nm"] {
            t.start_server(n);
        }
        t
    }

    /// The direct-server-return topology (deploy/dsr-topology.sh): client → router →
    /// edge node `lb` (one-armed on lb0) and backends on one segment, whose answers go
    /// to the router, not through the edge node. Each backend runs deploy/backend.py and
    /// xlb-decap (GUE on 6080), and holds the VIP on lo.
    pub fn dsr_up(tag: &str, queues: u32, backends: u32) -> Topo {
        let mut t = Topo::build(
            "deploy/dsr-topology.sh",
            tag,
            &[&queues.to_string(), &backends.to_string()],
        );
        for i in 1..=backends {
            let b = format!("b{i}");
            t.start_server(&b);
            t.spawn_ready(
                &b,
                decap_path().to_str().expect("utf-8 path"),
                &["run", "--iface", "eth0", "--gue-port", "6080"],
            );
        }
        t
    }

    /// Start `prog args` in namespace `short`, its output discarded; it is killed with
    /// the topology.
    pub fn spawn(&mut self, short: &str, prog: &str, args: &[&str]) {
        let c = self
            .cmd(short, prog)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        self.children.push(c);
    }

    fn build(script: &'static str, tag: &str, args: &[&str]) -> Topo {
        let prefix = format!(
            "x{}{}",
            &tag[..tag.len().min(3)],
            std::process::id() % 10_000
        );
        let st = Command::new(repo().join(script))
            .args(["up", &prefix])
            .args(args)
            .status()
            .expect("run the topology script");
        assert!(st.success(), "{script} up failed");
        let dir = std::env::temp_dir().join(format!("{prefix}-run"));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        Topo {
            socket: dir.join("lbd.sock"),
            log: dir.join("lbd.log"),
            prefix,
            script,
            children: Vec::new(),
            lbd: None,
        }
    }

    /// deploy/backend.py NAME in namespace NAME: HTTP 8080, UDP 5353, TCP echo 9000.
    fn start_server(&mut self, name: &str) {
        let script = repo().join("deploy/backend.py");
        let script = script.to_string_lossy().into_owned();
        let args = [
            script.as_str(),
            name,
            "--http",
            "8080",
            "--udp",
            "5353",
            "--tcp-echo",
            "9000",
        ];
        self.spawn_ready(name, "python3", &args);
    }

    /// Kill every process in namespace `short` whose command line contains `pattern`
    /// (SIGKILL: as a crash).
    pub fn kill_in(&self, short: &str, pattern: &str) {
        let o = Command::new("ip")
            .args(["netns", "pids", &self.ns(short)])
            .output()
            .expect("ip netns pids");
        for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(pattern) {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
    }

    /// nginx in namespace `short` on port 8081 answering "ok <short>" to every request,
    /// with room for `conns` concurrent connections (keep-alive for an hour) over as
    /// many worker processes as that takes.
    pub fn start_nginx(&mut self, short: &str, conns: u32) {
        let dir = self.dir().join(format!("nginx-{short}"));
        // Processes here may hold fewer than 20 000 files (the hard RLIMIT_NOFILE, which
        // tests cannot raise): 8 000 connections per nginx worker.
        let workers = conns.div_ceil(8000).max(1);
        let per = conns / workers + 64;
        let files = 2 * per + 64;
        std::fs::create_dir_all(&dir).expect("nginx dir");
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off; worker_processes {workers}; worker_rlimit_nofile {files};\n\
                 pid {d}/pid; error_log {d}/error.log;\n\
                 events {{ worker_connections {per}; }}\n\
                 http {{ access_log off; keepalive_timeout 3600s; keepalive_requests 1000000;\n\
                 client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};\n\
                 uwsgi_temp_path {d}; scgi_temp_path {d};\n\
                 server {{ listen 8081 backlog=4096; location / {{ return 200 \"ok {short}\\n\"; }} }} }}\n",
                d = dir.display(),
            ),
        )
        .expect("nginx.conf");
        let st = self
            .cmd(short, "sysctl")
            .args(["-qw", "net.core.somaxconn=4096"])
            .status()
            .expect("sysctl");
        assert!(st.success());
        let c = self
            .cmd(short, "nginx")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nginx (deploy/install-deps.sh installs it)");
        self.children.push(c);
        // Ready when it answers.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let o = self
                .cmd(short, "curl")
                .args(["-s", "--max-time", "1", "http://127.0.0.1:8081/"])
                .output()
                .expect("curl");
            if o.stdout.starts_with(b"ok") {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("nginx in {short} did not come up");
    }

    /// `ip ARGS` in namespace `short`, which must succeed (addresses, MTUs).
    pub fn ip(&self, short: &str, args: &[&str]) {
        let st = self.cmd(short, "ip").args(args).status().expect("ip");
        assert!(st.success(), "ip {args:?} in {short}");
    }

    /// Start `prog args` in namespace `short` and wait for it to print "ready"; it is
    /// killed with the topology.
    pub fn spawn_ready(&mut self, short: &str, prog: &str, args: &[&str]) {
        let mut c = self
            .cmd(short, prog)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let mut line = String::new();
        BufReader::new(c.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("ready line");
        assert_eq!(line.trim(), "ready", "{prog} {args:?}");
        self.children.push(c);
    }

    /// The directory this topology keeps its files in (socket, log, configs).
    /// lbd's control socket.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    pub fn dir(&self) -> PathBuf {
        std::env::temp_dir().join(format!("{}-run", self.prefix))
    }

    /// The usual start of an end-to-end test: `None` (test skipped) when unprivileged
    /// outside CI, else the topology with lbd running on it.
    pub fn start(test: &str, queues: u32, backends: u32) -> Option<Topo> {
        if !super::privileged(test) {
            return None;
        }
        let mut t = Topo::up(test, queues, backends);
        t.start_lbd(&[]);
        Some(t)
    }

    pub fn ns(&self, short: &str) -> String {
        format!("{}-{}", self.prefix, short)
    }

    /// A command run inside namespace `short` (client, lb, b1, ...).
    pub fn cmd(&self, short: &str, prog: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(short)]).arg(prog);
        c
    }

    /// Start lbd on both LB interfaces (two-armed), with `extra` arguments.
    pub fn start_lbd(&mut self, extra: &[&str]) {
        self.start_lbd_on(&["lb0", "lb1"], extra);
    }

    pub fn start_lbd_on(&mut self, ifaces: &[&str], extra: &[&str]) {
        let log = std::fs::File::create(&self.log).expect("log");
        let mut cmd = self.cmd("lb", env!("CARGO_BIN_EXE_lbd"));
        for i in ifaces {
            cmd.args(["--iface", i]);
        }
        if !extra.contains(&"--flows-per-worker") {
            cmd.args(["--flows-per-worker", "16384"]);
        }
        // No state file unless the test names one (the default is the host's).
        // Nothing pinned unless the test pins (the default is the host's bpffs).
        if !extra.contains(&"--pin-dir") && !extra.contains(&"--no-pin") {
            cmd.arg("--no-pin");
        }
        if !extra.contains(&"--state-file") && !extra.contains(&"--no-state") {
            cmd.arg("--no-state");
        }
        let child = cmd
            .arg("--socket")
            .arg(&self.socket)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start lbd");
        self.lbd = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.try_lbctl(&["status"]).status.success() {
                return;
            }
            if let Some(Ok(Some(st))) = self.lbd.as_mut().map(|c| c.try_wait()) {
                panic!("lbd exited with {st}: {}", self.lbd_log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("lbd did not come up: {}", self.lbd_log());
    }

    pub fn lbd_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// True while lbd runs.
    pub fn lbd_alive(&mut self) -> bool {
        matches!(self.lbd.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn try_lbctl(&self, args: &[&str]) -> Output {
        Command::new(lbctl_path())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run lbctl")
    }

    /// Run lbctl, assert success, return stdout.
    pub fn lbctl(&self, args: &[&str]) -> String {
        let o = self.try_lbctl(args);
        assert!(
            o.status.success(),
            "lbctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `lbctl service add FRONTEND -b B…` (asserting success).
    pub fn add_service<S: AsRef<str>>(&self, frontend: &str, backends: &[S]) {
        let mut args = vec!["service", "add", frontend];
        for b in backends {
            args.extend(["-b", b.as_ref()]);
        }
        self.lbctl(&args);
    }

    pub fn lbctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.lbctl(&a)).expect("lbctl json")
    }

    /// Sum of a per-worker counter from `lbctl stats`.
    pub fn worker_sum(&self, field: &str) -> u64 {
        let s = self.lbctl_json(&["stats"]);
        s["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .map(|w| w[field].as_u64().unwrap_or(0))
            .sum()
    }

    pub fn worker_drop(&self, reason: &str) -> u64 {
        let s = self.lbctl_json(&["stats"]);
        s["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .map(|w| w["drops"][reason].as_u64().unwrap_or(0))
            .sum()
    }

    /// Flow directions the workers have in the XDP fast path, per `lbctl status`.
    pub fn fast_entries(&self) -> u64 {
        self.lbctl_json(&["status"])["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .map(|w| w["fast_path_entries"].as_u64().unwrap_or(0))
            .sum()
    }

    pub fn xdp_stat(&self, name: &str) -> u64 {
        self.lbctl_json(&["stats"])["xdp"][name]
            .as_u64()
            .unwrap_or(0)
    }

    /// Load an nftables script in namespace `ns` (tests count packets with it).
    pub fn nft(&self, ns: &str, rules: &str) {
        let mut c = self
            .cmd(ns, "nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("nft");
        std::io::Write::write_all(&mut c.stdin.take().expect("stdin"), rules.as_bytes())
            .expect("rules");
        assert!(c.wait().expect("nft").success(), "nft rules load");
    }

    /// The packet count of the counter commented `name` in table inet xlbtest of `ns`.
    pub fn nft_counter(&self, ns: &str, name: &str) -> u64 {
        self.nft_counter_in(ns, "inet", name)
    }

    /// The same in table `family` xlbtest (a bridge's counters: family "bridge").
    pub fn nft_counter_in(&self, ns: &str, family: &str, name: &str) -> u64 {
        let o = self
            .cmd(ns, "nft")
            .args(["-j", "list", "table", family, "xlbtest"])
            .output()
            .expect("nft");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("nft json");
        for item in v["nftables"].as_array().expect("nftables") {
            let r = &item["rule"];
            if r["comment"].as_str() == Some(name) {
                for e in r["expr"].as_array().expect("expr") {
                    if let Some(p) = e["counter"]["packets"].as_u64() {
                        return p;
                    }
                }
            }
        }
        panic!("no counter {name} in {ns}");
    }

    /// Run a python3 program in the client namespace; return stdout (asserting success).
    pub fn client_py(&self, code: &str) -> String {
        self.py("client", code)
    }

    /// Run a client program (python3, in the client namespace) that drives lbd itself:
    /// [`PY_POKE`] comes first, and it gets lbctl's path and lbd's socket as its two
    /// arguments. It must succeed and print "ok" last; its output is returned.
    pub fn client_py_with_lbctl(&self, code: &str) -> String {
        let o = self
            .cmd("client", "python3")
            .args(["-c", &format!("{PY_POKE}{code}")])
            .arg(lbctl_path())
            .arg(&self.socket)
            .output()
            .expect("python3");
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        println!("{out}");
        assert!(
            o.status.success() && out.ends_with("ok\n"),
            "{out}\n{}\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.lbd_log()
        );
        out
    }

    /// Run a python3 program in namespace `ns`; return stdout (asserting success).
    pub fn py(&self, ns: &str, code: &str) -> String {
        let o = self
            .cmd(ns, "python3")
            .args(["-c", code])
            .output()
            .expect("python3");
        assert!(
            o.status.success(),
            "client program failed: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.lbd_log()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// `n` HTTP requests through the VIP with curl (one connection each); the bodies.
    pub fn curl_many(&self, n: u32) -> Vec<String> {
        self.curl_many_from("client", n)
    }

    pub fn curl_many_from(&self, ns: &str, n: u32) -> Vec<String> {
        self.curl_vip(ns, &format!("/?[1-{n}]"))
    }

    /// curl in namespace `ns` to `http://VIP` followed by `rest` (`:PORT/PATH`, a curl
    /// URL glob allowed): the lines it got.
    pub fn curl_vip(&self, ns: &str, rest: &str) -> Vec<String> {
        let o = self
            .cmd(ns, "curl")
            .args(["-s", "--max-time", "5", "--retry", "0"])
            .arg(format!("http://{VIP}{rest}"))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Topo {
    /// Kill lbd with SIGKILL, as a crash or an OOM kill would: nothing of lbd runs.
    pub fn kill_lbd(&mut self) {
        if let Some(mut c) = self.lbd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stop lbd as an operator would (SIGINT, then SIGKILL after 5 s).
    pub fn stop_lbd(&mut self) {
        if let Some(mut c) = self.lbd.take() {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = Command::new("kill")
                    .args(["-INT", &c.id().to_string()])
                    .status();
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        self.stop_lbd();
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // What the children left behind (nginx's worker processes outlive a killed
        // master): every process still in one of this topology's namespaces.
        let list = Command::new("ip").args(["netns", "list"]).output();
        let names = list.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        let mine = format!("{}-", self.prefix);
        for ns in names.iter().flat_map(|n| n.lines()) {
            let Some(ns) = ns
                .split_whitespace()
                .next()
                .filter(|n| n.starts_with(&mine))
            else {
                continue;
            };
            if let Ok(o) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&o.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-KILL", pid]).status();
                }
            }
        }
        let _ = Command::new(repo().join(self.script))
            .args(["down", &self.prefix])
            .status();
        let _ = std::fs::remove_dir_all(std::env::temp_dir().join(format!("{}-run", self.prefix)));
    }
}

/// Count how often each line occurs.
pub fn tally(lines: &[String]) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for l in lines {
        *m.entry(l.clone()).or_insert(0) += 1;
    }
    m
}

/// A line-oriented client of a TCP echo server (deploy/backend.py answers each line with
/// "NAME:" + the line), one connection, run by python3 in a namespace.
pub struct Echo {
    child: Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl Echo {
    /// A connection from the client namespace to `dst:port`.
    pub fn connect(t: &Topo, dst: &str, port: u16) -> Echo {
        Echo::from(t, "client", "0.0.0.0", dst, port)
    }

    /// A connection from namespace `ns`, source address `src`, to `dst:port`.
    pub fn from(t: &Topo, ns: &str, src: &str, dst: &str, port: u16) -> Echo {
        let mut child = t
            .cmd(ns, "python3")
            .args([
                "-c",
                &format!(
                    "import socket,sys\nc=socket.create_connection(('{dst}',{port}),source_address=('{src}',0),timeout=5)\n\
                     f=c.makefile('rw')\nfor line in sys.stdin:\n    f.write(line); f.flush(); print(f.readline().strip(), flush=True)\n"
                ),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("echo client");
        let out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        Echo { child, out }
    }

    /// Send a line; the answer.
    pub fn say(&mut self, line: &str) -> String {
        use std::io::{BufRead, Write};
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}").expect("write");
        stdin.flush().expect("flush");
        let mut answer = String::new();
        self.out.read_line(&mut answer).expect("read");
        answer.trim().to_string()
    }

    /// The name of the server that answers.
    pub fn name(&mut self) -> String {
        self.say("?").split(':').next().unwrap_or("").to_string()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
