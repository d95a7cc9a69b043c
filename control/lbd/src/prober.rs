//! The health prober: one thread with non-blocking sockets (mio) runs every probe of
//! every backend that has a check. It never blocks the control loop and never touches
//! the workers: the loop hands it the targets ([`Prober::set`]) and reads the results
//! ([`Prober::results`]) at its tick. Probes leave from the edge node's own stack.

use control::health::{HealthSpec, Probe};
use crossbeam_channel::{Receiver, Sender};
use mio::net::{TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a result is about: the service and the backend (its address and service port).
pub type Key = (lb::service::Frontend, std::net::SocketAddrV4);

/// A backend to probe at `addr` (its address, the check's port or its own).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub key: Key,
    pub addr: SocketAddr,
    pub spec: HealthSpec,
}

/// One probe's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub key: Key,
    pub ok: bool,
    /// What was seen: "connected", "HTTP 200", "connection refused", "timeout", ...
    pub detail: String,
}

/// The prober thread's handle.
#[derive(Debug)]
pub struct Prober {
    targets: Sender<Vec<Target>>,
    waker: Arc<Waker>,
    results: Receiver<Outcome>,
}

impl Prober {
    /// Probe these targets from now on (each at once, then every interval).
    pub fn set(&self, targets: Vec<Target>) {
        if self.targets.send(targets).is_ok() {
            let _ = self.waker.wake();
        }
    }

    /// Results since the last call.
    pub fn results(&self) -> impl Iterator<Item = Outcome> + '_ {
        self.results.try_iter()
    }
}

const WAKER: Token = Token(usize::MAX);
/// Results waiting for the control loop; more are dropped (the next round brings them).
const RESULTS: usize = 65_536;
/// The most of an HTTP answer read (the status line is in it).
const HTTP_READ: usize = 1024;

/// Start the prober thread.
pub fn spawn() -> std::io::Result<Prober> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
    let (ttx, trx) = crossbeam_channel::unbounded();
    let (rtx, rrx) = crossbeam_channel::bounded(RESULTS);
    std::thread::Builder::new()
        .name("xlb-health".into())
        .spawn(move || run(poll, trx, rtx))?;
    Ok(Prober {
        targets: ttx,
        waker,
        results: rrx,
    })
}

enum Conn {
    /// TCP or HTTP: connecting, then (HTTP) reading the answer.
    Tcp(TcpStream, Vec<u8>, bool),
    Udp(UdpSocket),
}

struct InFlight {
    target: usize,
    deadline: Instant,
    conn: Conn,
}

fn run(mut poll: Poll, targets_rx: Receiver<Vec<Target>>, results: Sender<Outcome>) {
    let mut events = Events::with_capacity(256);
    let mut targets: Vec<Target> = Vec::new();
    let mut due: Vec<Instant> = Vec::new();
    let mut flying: HashMap<usize, InFlight> = HashMap::new();
    let mut next_token = 0usize;
    loop {
        let now = Instant::now();
        let next = due
            .iter()
            .copied()
            .chain(flying.values().map(|f| f.deadline))
            .min()
            .map(|t| t.saturating_duration_since(now))
            .unwrap_or(Duration::from_secs(3600));
        if let Err(e) = poll.poll(&mut events, Some(next)) {
            if e.kind() != ErrorKind::Interrupted {
                tracing::error!(error = %e, "health prober stopped");
                return;
            }
        }
        let mut done: Vec<(usize, Result<String, String>)> = Vec::new();
        for ev in events.iter() {
            if ev.token() == WAKER {
                continue;
            }
            let id = ev.token().0;
            let Some(f) = flying.get_mut(&id) else {
                continue;
            };
            let Some(t) = targets.get(f.target) else {
                done.push((id, Err("target gone".into())));
                continue;
            };
            if let Some(r) = progress(&mut poll, id, f, &t.spec) {
                done.push((id, r));
            }
        }
        // New targets: every probe starts over.
        if let Some(t) = targets_rx.try_iter().last() {
            for (_, mut f) in flying.drain() {
                deregister(&mut poll, &mut f.conn);
            }
            done.clear();
            let now = Instant::now();
            due = vec![now; t.len()];
            targets = t;
        }
        let now = Instant::now();
        for (id, f) in &flying {
            if f.deadline <= now && !done.iter().any(|(d, _)| d == id) {
                let ms = targets.get(f.target).map_or(0, |t| t.spec.timeout());
                done.push((*id, Err(format!("timeout after {ms} ms"))));
            }
        }
        for (id, r) in done {
            let Some(mut f) = flying.remove(&id) else {
                continue;
            };
            deregister(&mut poll, &mut f.conn);
            if let Some(t) = targets.get(f.target) {
                let (ok, detail) = match r {
                    Ok(d) => (true, d),
                    Err(d) => (false, d),
                };
                let _ = results.try_send(Outcome {
                    key: t.key,
                    ok,
                    detail,
                });
            }
        }
        // Start what is due (one probe of a target at a time).
        for (i, t) in targets.iter().enumerate() {
            let Some(d) = due.get_mut(i) else { continue };
            if *d > now || flying.values().any(|f| f.target == i) {
                continue;
            }
            *d = now + Duration::from_millis(u64::from(t.spec.interval_ms));
            next_token = (next_token + 1) % (usize::MAX - 1);
            let id = next_token;
            match start(&mut poll, id, t) {
                Ok(conn) => {
                    flying.insert(
                        id,
                        InFlight {
                            target: i,
                            deadline: now + Duration::from_millis(u64::from(t.spec.timeout())),
                            conn,
                        },
                    );
                }
                Err(e) => {
                    let _ = results.try_send(Outcome {
                        key: t.key,
                        ok: false,
                        detail: e,
                    });
                }
            }
        }
    }
}

fn deregister(poll: &mut Poll, c: &mut Conn) {
    let _ = match c {
        Conn::Tcp(s, _, _) => poll.registry().deregister(s),
        Conn::Udp(s) => poll.registry().deregister(s),
    };
}

fn start(poll: &mut Poll, id: usize, t: &Target) -> Result<Conn, String> {
    let reason = |e: std::io::Error| e.to_string();
    match &t.spec.probe {
        Probe::Tcp {} | Probe::Http { .. } => {
            let mut s = TcpStream::connect(t.addr).map_err(reason)?;
            poll.registry()
                .register(&mut s, Token(id), Interest::WRITABLE | Interest::READABLE)
                .map_err(reason)?;
            Ok(Conn::Tcp(s, Vec::new(), false))
        }
        Probe::Udp { send, .. } => {
            let local: SocketAddr = ([0, 0, 0, 0], 0).into();
            let mut s = UdpSocket::bind(local).map_err(reason)?;
            // Connected: the kernel reports the backend's port unreachable.
            s.connect(t.addr).map_err(reason)?;
            s.send(send.as_bytes()).map_err(reason)?;
            poll.registry()
                .register(&mut s, Token(id), Interest::READABLE)
                .map_err(reason)?;
            Ok(Conn::Udp(s))
        }
    }
}

/// Go on with a probe its socket is ready for: `Some` when it is decided.
fn progress(
    _poll: &mut Poll,
    _id: usize,
    f: &mut InFlight,
    spec: &HealthSpec,
) -> Option<Result<String, String>> {
    match (&mut f.conn, &spec.probe) {
        (Conn::Tcp(s, buf, sent), probe) => {
            if let Ok(Some(e)) | Err(e) = s.take_error() {
                return Some(Err(e.to_string()));
            }
            match s.peer_addr() {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotConnected => return None,
                Err(e) => return Some(Err(e.to_string())),
            }
            let Probe::Http { path, .. } = probe else {
                return Some(Ok("connected".into()));
            };
            if !*sent {
                let req = format!(
                    "GET {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: xlb-health\r\nConnection: close\r\n\r\n",
                    s.peer_addr().map(|a| a.ip().to_string()).unwrap_or_default()
                );
                // A few dozen bytes into a fresh socket's buffer: written whole or refused.
                match s.write(req.as_bytes()) {
                    Ok(n) if n == req.len() => *sent = true,
                    Ok(_) => return Some(Err("request not sent whole".into())),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
                    Err(e) => return Some(Err(e.to_string())),
                }
            }
            let mut chunk = [0u8; 512];
            loop {
                match s.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        if buf.len() >= HTTP_READ || buf.windows(2).any(|w| w == b"\r\n") {
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        if buf.windows(2).any(|w| w == b"\r\n") {
                            break;
                        }
                        return None;
                    }
                    Err(e) => return Some(Err(e.to_string())),
                }
            }
            Some(http_status(buf, spec.codes().unwrap_or((200, 399))))
        }
        (Conn::Udp(s), Probe::Udp { expect, .. }) => {
            let mut b = [0u8; 2048];
            match s.recv(&mut b) {
                Ok(n) => {
                    let got = String::from_utf8_lossy(&b[..n]);
                    if got.contains(expect.as_str()) {
                        Some(Ok(format!("answered {} bytes", n)))
                    } else {
                        Some(Err(format!(
                            "unexpected answer {:?}",
                            got.chars().take(40).collect::<String>()
                        )))
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => None,
                Err(e) => Some(Err(e.to_string())),
            }
        }
        (Conn::Udp(_), _) => Some(Err("probe changed".into())),
    }
}

/// The status line of an HTTP answer, against the accepted codes.
pub fn http_status(answer: &[u8], codes: (u16, u16)) -> Result<String, String> {
    let line = answer
        .split(|&b| b == b'\n')
        .next()
        .map(|l| String::from_utf8_lossy(l).trim().to_string())
        .unwrap_or_default();
    let mut parts = line.split_whitespace();
    let code = match (parts.next(), parts.next()) {
        (Some(v), Some(c)) if v.starts_with("HTTP/") => c.parse::<u16>().ok(),
        _ => None,
    };
    match code {
        Some(c) if (codes.0..=codes.1).contains(&c) => Ok(format!("HTTP {c}")),
        Some(c) => Err(format!("HTTP {c}, not {}-{}", codes.0, codes.1)),
        None if line.is_empty() => Err("closed without an answer".into()),
        None => Err(format!(
            "not HTTP: {:?}",
            line.chars().take(40).collect::<String>()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_read_against_the_range() {
        assert_eq!(
            http_status(b"HTTP/1.0 200 OK\r\n\r\n", (200, 399)),
            Ok("HTTP 200".into())
        );
        assert_eq!(
            http_status(b"HTTP/1.1 302 Found\r\n", (200, 399)),
            Ok("HTTP 302".into())
        );
        assert!(http_status(b"HTTP/1.1 503 Unavailable\r\n", (200, 399)).is_err());
        assert!(http_status(b"", (200, 399)).is_err());
        assert!(http_status(b"SSH-2.0-OpenSSH\r\n", (200, 399)).is_err());
    }
}
