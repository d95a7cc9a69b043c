//! The control socket's event loop (mio, single thread, non-blocking).
//!
//! Requests are answered in order per connection; one bad line gets an error response
//! and the connection stays usable. The loop protects itself and the daemon from its
//! clients, because everything that configures lbd shares this one thread:
//! - a request line longer than [`MAX_LINE`] is refused however its bytes arrive (the
//!   check is on the buffered line, not on one read), and the connection closed after
//!   the error (it cannot be resynchronised cheaply);
//! - a client that does not read its answers stops being read: once [`Limits::output`]
//!   bytes of answers wait for it, no more of its requests are taken, so its memory is
//!   bounded and its pipelined requests wait in its own socket buffer;
//! - at most [`Limits::connections`] connections; one more is told so and closed, and
//!   refusals are logged once per [`LOG_EVERY`] with a count;
//! - a connection idle (nothing read, nothing written) for [`Limits::idle`] is closed;
//! - a change carrying a request id is applied once: the same id again gets the first
//!   answer (the last [`REMEMBERED_IDS`] ids are kept), so a client that timed out can
//!   retry without "already exists".
//!
//! Between events the loop calls [`Handler::tick`] at least every `tick` interval so
//! `lbd` can refresh its network view and apply worker requests on the same thread,
//! with no locks. Every request is handed over with the peer's credentials
//! (SO_PEERCRED), so changes are logged with who made them.

use crate::proto::{parse_request, ErrorKind, Request, ResponseEnvelope, MAX_LINE};
use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Who sent a request (SO_PEERCRED at accept time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Peer {
    pub uid: Option<u32>,
    pub pid: Option<i32>,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.uid, self.pid) {
            (Some(u), Some(p)) => write!(f, "uid {u} pid {p}"),
            _ => f.write_str("unknown peer"),
        }
    }
}

pub trait Handler {
    fn handle(&mut self, req: Request, peer: Peer) -> ResponseEnvelope;
    /// Periodic work on the control thread.
    fn tick(&mut self) {}
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("another lbd is already serving {0}")]
    InUse(PathBuf),
    #[error("{0} exists and is not a socket; refusing to replace it (remove it or choose another --socket)")]
    NotASocket(PathBuf),
    #[error("control socket group {0:?}: no such group")]
    NoGroup(String),
    #[error("control socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// What the control loop allows its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open connections at once.
    pub connections: usize,
    /// Nothing read or written for this long closes a connection.
    pub idle: Duration,
    /// Answers waiting for a client that does not read them; past this its requests
    /// are not read.
    pub output: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: 64,
            idle: Duration::from_secs(60),
            output: 1 << 20,
        }
    }
}

/// Refusals and accept errors are logged at most this often.
pub const LOG_EVERY: Duration = Duration::from_secs(10);
/// Request ids remembered for idempotent retries.
pub const REMEMBERED_IDS: usize = 1024;

/// How the socket file is created.
#[derive(Debug, Clone)]
pub struct SocketOptions {
    /// Permission bits (e.g. 0o660).
    pub mode: u32,
    /// Group owning the socket (its members may use lbctl), by name or number.
    pub group: Option<String>,
}

impl Default for SocketOptions {
    fn default() -> Self {
        SocketOptions {
            mode: 0o660,
            group: None,
        }
    }
}

/// A group name or number as a gid.
fn gid_of(group: &str) -> Result<u32, ServerError> {
    if let Ok(n) = group.parse::<u32>() {
        return Ok(n);
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        _ => Err(ServerError::NoGroup(group.to_string())),
    }
}

/// A bound control socket: the path is removed when it is dropped.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    pub limits: Limits,
}

impl ControlSocket {
    /// Bind `path` with `opts`' mode and group, creating its directory (0755). A socket
    /// file nobody answers on (a crashed lbd's) is replaced; anything else at `path` (a
    /// live lbd's socket, a regular file, a directory) is left alone and refused. The
    /// group is resolved before anything is touched.
    pub fn bind(path: &Path, opts: &SocketOptions) -> Result<ControlSocket, ServerError> {
        let err = |source| ServerError::Io {
            path: path.to_path_buf(),
            source,
        };
        let gid = opts.group.as_deref().map(gid_of).transpose()?;
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() && !dir.exists() {
                std::fs::create_dir_all(dir).map_err(err)?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                    .map_err(err)?;
            }
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(ServerError::InUse(path.to_path_buf()));
                }
                std::fs::remove_file(path).map_err(err)?;
            }
            Ok(_) => return Err(ServerError::NotASocket(path.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        let sock = ControlSocket {
            listener,
            path: path.to_path_buf(),
            limits: Limits::default(),
        };
        // From here on, a failure drops `sock`, which removes the file it created.
        if let Some(gid) = gid {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(err)?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(opts.mode)).map_err(err)?;
        Ok(sock)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

struct Conn {
    stream: UnixStream,
    peer: Peer,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    closing: bool,
    last_active: Instant,
}

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);

/// Changes already answered, by request id, with the request they answered (bounded,
/// oldest forgotten first).
#[derive(Default)]
struct Answered {
    by_id: HashMap<String, (Request, ResponseEnvelope)>,
    order: VecDeque<String>,
}

impl Answered {
    fn get(&self, id: &str) -> Option<&(Request, ResponseEnvelope)> {
        self.by_id.get(id)
    }

    fn put(&mut self, id: String, req: Request, resp: ResponseEnvelope) {
        if self.order.len() >= REMEMBERED_IDS {
            if let Some(old) = self.order.pop_front() {
                self.by_id.remove(&old);
            }
        }
        self.order.push_back(id.clone());
        self.by_id.insert(id, (req, resp));
    }
}

/// A log line at most once per [`LOG_EVERY`], with how many events it stands for.
#[derive(Default)]
struct RateLimited {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimited {
    /// Some(count) when a line is due.
    fn due(&mut self) -> Option<u64> {
        self.suppressed += 1;
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

fn peer_of(stream: &UnixStream) -> Peer {
    match nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials) {
        Ok(c) => Peer {
            uid: Some(c.uid()),
            pid: Some(c.pid()),
        },
        Err(_) => Peer::default(),
    }
}

/// Serve until `stop` is set (checked at least every `tick`), calling `handler`.
pub fn serve(
    sock: &mut ControlSocket,
    handler: &mut impl Handler,
    stop: &Arc<AtomicBool>,
    tick: Duration,
) -> io::Result<()> {
    let limits = sock.limits;
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut sock.listener, LISTENER, Interest::READABLE)?;
    let _waker = Waker::new(poll.registry(), WAKER)?;
    let mut events = Events::with_capacity(64);
    let mut conns: HashMap<Token, Conn> = HashMap::new();
    let mut answered = Answered::default();
    let mut next_token = 2usize;
    let mut last_tick = Instant::now();
    let mut refused = RateLimited::default();
    let mut accept_failed = RateLimited::default();
    while !stop.load(Ordering::Relaxed) {
        let wait = tick.saturating_sub(last_tick.elapsed());
        match poll.poll(&mut events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        for ev in events.iter() {
            match ev.token() {
                LISTENER => loop {
                    match sock.listener.accept() {
                        Ok((mut stream, _)) => {
                            if conns.len() >= limits.connections {
                                let mut w = Vec::new();
                                push_response(
                                    &mut w,
                                    &ResponseEnvelope::error(
                                        ErrorKind::Busy,
                                        format!(
                                            "lbd serves at most {} control connections at once; try again",
                                            limits.connections
                                        ),
                                    ),
                                );
                                let _ = stream.write(&w);
                                if let Some(n) = refused.due() {
                                    tracing::warn!(
                                        limit = limits.connections,
                                        refused = n,
                                        "control connections refused: at the limit"
                                    );
                                }
                                continue;
                            }
                            let t = Token(next_token);
                            next_token += 1;
                            poll.registry().register(
                                &mut stream,
                                t,
                                Interest::READABLE | Interest::WRITABLE,
                            )?;
                            let peer = peer_of(&stream);
                            conns.insert(
                                t,
                                Conn {
                                    stream,
                                    peer,
                                    rbuf: Vec::new(),
                                    wbuf: Vec::new(),
                                    closing: false,
                                    last_active: Instant::now(),
                                },
                            );
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            if let Some(n) = accept_failed.due() {
                                tracing::warn!(error = %e, failures = n, "accepting control connections");
                            }
                            break;
                        }
                    }
                },
                WAKER => {}
                t => {
                    let Some(c) = conns.get_mut(&t) else { continue };
                    let alive = service(c, handler, &mut answered, &limits);
                    if !alive {
                        if let Some(mut c) = conns.remove(&t) {
                            let _ = poll.registry().deregister(&mut c.stream);
                        }
                    }
                }
            }
        }
        let now = Instant::now();
        conns.retain(|_, c| {
            let keep = now.duration_since(c.last_active) < limits.idle;
            if !keep {
                let _ = poll.registry().deregister(&mut c.stream);
            }
            keep
        });
        if last_tick.elapsed() >= tick {
            handler.tick();
            last_tick = Instant::now();
        }
    }
    Ok(())
}

/// Answer one complete line.
fn answer(
    line: &[u8],
    peer: Peer,
    handler: &mut impl Handler,
    answered: &mut Answered,
) -> ResponseEnvelope {
    let p = match parse_request(line) {
        Ok(p) => p,
        Err(error) => {
            return ResponseEnvelope {
                version: crate::proto::VERSION,
                id: None,
                outcome: crate::proto::Outcome::Error { error },
            }
        }
    };
    let change = p.request.is_change();
    if let Some((req, prev)) =
        p.id.as_deref()
            .filter(|_| change)
            .and_then(|id| answered.get(id))
    {
        if *req == p.request {
            return prev.clone();
        }
        let mut e = ResponseEnvelope::error(
            ErrorKind::BadRequest,
            "this request id was used for another change; a retry must repeat the request as it was",
        );
        e.id = p.id;
        return e;
    }
    let mut resp = handler.handle(p.request.clone(), peer);
    resp.id = p.id.clone();
    if let (true, Some(id)) = (change, p.id) {
        answered.put(id, p.request, resp.clone());
    }
    resp
}

/// Read what is there, answer complete lines while the client keeps up with its answers,
/// write what fits. False when the connection is finished.
fn service(
    c: &mut Conn,
    handler: &mut impl Handler,
    answered: &mut Answered,
    limits: &Limits,
) -> bool {
    let mut buf = [0u8; 4096];
    let mut eof = false;
    loop {
        // Answer what is buffered, as long as the client reads its answers.
        while !c.closing && c.wbuf.len() < limits.output {
            let window = &c.rbuf[..c.rbuf.len().min(MAX_LINE + 1)];
            let Some(pos) = window.iter().position(|&b| b == b'\n') else {
                if c.rbuf.len() > MAX_LINE {
                    refuse_long_line(c);
                }
                break;
            };
            let line: Vec<u8> = c.rbuf.drain(..=pos).collect();
            c.last_active = Instant::now();
            let line = &line[..line.len() - 1];
            if !line.iter().all(u8::is_ascii_whitespace) {
                let resp = answer(line, c.peer, handler, answered);
                push_response(&mut c.wbuf, &resp);
            }
        }
        while !c.wbuf.is_empty() {
            match c.stream.write(&c.wbuf) {
                Ok(0) => return false,
                Ok(n) => {
                    c.wbuf.drain(..n);
                    c.last_active = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        // A client whose answers pile up is not read (it waits for WRITABLE); a pending
        // line is answered before anything more is read, so the buffer stays bounded.
        if c.closing || eof || c.wbuf.len() >= limits.output {
            break;
        }
        if c.rbuf.contains(&b'\n') {
            continue;
        }
        match c.stream.read(&mut buf) {
            Ok(0) => eof = true,
            Ok(n) => {
                c.rbuf.extend_from_slice(&buf[..n]);
                c.last_active = Instant::now();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    !((eof || c.closing) && c.wbuf.is_empty())
}

fn refuse_long_line(c: &mut Conn) {
    let resp = ResponseEnvelope::error(
        ErrorKind::BadRequest,
        format!("request line exceeds {MAX_LINE} bytes"),
    );
    push_response(&mut c.wbuf, &resp);
    c.rbuf.clear();
    c.closing = true;
}

fn push_response(w: &mut Vec<u8>, resp: &ResponseEnvelope) {
    match serde_json::to_vec(resp) {
        Ok(mut v) => {
            v.push(b'\n');
            w.extend_from_slice(&v);
        }
        Err(e) => {
            let fallback = ResponseEnvelope::error(
                ErrorKind::Datapath,
                format!("response could not be encoded: {e}"),
            );
            if let Ok(mut v) = serde_json::to_vec(&fallback) {
                v.push(b'\n');
                w.extend_from_slice(&v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Client;
    use crate::proto::{Outcome, Reply};

    struct Echo(usize);
    impl Handler for Echo {
        fn handle(&mut self, req: Request, _: Peer) -> ResponseEnvelope {
            self.0 += 1;
            ResponseEnvelope::ok(Reply::Done {
                message: format!("{req:?} #{}", self.0),
            })
        }
    }

    fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("xlb-ctl-{}-{name}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        dir.join("s.sock")
    }

    /// Serve `limits` on a fresh socket while `client` runs; returns its result and how
    /// many requests the handler saw.
    fn with_server<T: Send + 'static>(
        name: &str,
        limits: Limits,
        client: impl FnOnce(&Path) -> T + Send + 'static,
    ) -> (T, usize) {
        let path = temp_path(name);
        let mut sock = ControlSocket::bind(&path, &SocketOptions::default()).expect("bind");
        sock.limits = limits;
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, p2) = (stop.clone(), path.clone());
        let t = std::thread::spawn(move || {
            let r = client(&p2);
            stop2.store(true, Ordering::Relaxed);
            r
        });
        let mut h = Echo(0);
        serve(&mut sock, &mut h, &stop, Duration::from_millis(10)).expect("serve");
        (t.join().expect("client thread"), h.0)
    }

    fn read_line(s: &mut std::os::unix::net::UnixStream) -> String {
        let mut r = std::io::BufReader::new(s.try_clone().expect("clone"));
        let mut l = String::new();
        std::io::BufRead::read_line(&mut r, &mut l).expect("line");
        l
    }

    #[test]
    fn a_long_line_is_refused_however_it_arrives() {
        // In one write (the whole line is buffered at once) and in small pieces.
        for chunk in [usize::MAX, 1000] {
            let (l, seen) = with_server("long", Limits::default(), move |p| {
                let mut s = std::os::unix::net::UnixStream::connect(p).expect("connect");
                let mut line = br#"{"version":1,"type":"status","pad":""#.to_vec();
                line.resize(3 << 20, b'x');
                line.extend_from_slice(b"\"}\n");
                let w = s.try_clone().expect("clone");
                let writer = std::thread::spawn(move || {
                    let mut w = w;
                    for c in line.chunks(chunk.min(line.len())) {
                        if w.write_all(c).is_err() {
                            break; // the server closed the connection
                        }
                    }
                });
                let l = read_line(&mut s);
                drop(s);
                let _ = writer.join();
                l
            });
            assert!(l.contains("exceeds"), "{l}");
            assert_eq!(seen, 0, "the oversized request was not executed");
        }
    }

    #[test]
    fn a_client_that_does_not_read_is_not_read() {
        let limits = Limits {
            output: 64 << 10,
            ..Limits::default()
        };
        let (sent, seen) = with_server("noread", limits, |p| {
            let s = std::os::unix::net::UnixStream::connect(p).expect("connect");
            s.set_write_timeout(Some(Duration::from_millis(500)))
                .expect("timeout");
            let req = b"{\"version\":1,\"type\":\"status\"}\n";
            let mut w = s;
            let mut sent = 0usize;
            // Pipeline requests without ever reading an answer, until lbd stops taking
            // them (the write blocks and times out).
            while sent < 200_000 && w.write_all(req).is_ok() {
                sent += 1;
            }
            sent
        });
        assert!(sent < 200_000, "the server stopped reading ({sent} sent)");
        // Answers (≥ 60 bytes each) fill the output bound plus what the kernel buffers
        // for the socket; the rest of what was sent stays unread in the client's socket.
        let kernel: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_default")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(212_992);
        assert!(seen < sent, "{seen} answered of {sent}");
        assert!(
            seen * 60 < (64 << 10) + 2 * kernel,
            "{seen} answered: more than the bound holds"
        );
    }

    #[test]
    fn connections_are_capped_and_idle_ones_closed() {
        let limits = Limits {
            connections: 3,
            idle: Duration::from_millis(300),
            ..Limits::default()
        };
        let (r, _) = with_server("cap", limits, |p| {
            let held: Vec<_> = (0..3)
                .map(|_| std::os::unix::net::UnixStream::connect(p).expect("connect"))
                .collect();
            std::thread::sleep(Duration::from_millis(50));
            let mut extra = std::os::unix::net::UnixStream::connect(p).expect("connect");
            let refused = read_line(&mut extra);
            // The idle ones are closed: reading them sees EOF.
            std::thread::sleep(Duration::from_millis(600));
            let closed = held
                .into_iter()
                .all(|mut s| s.read(&mut [0u8; 1]).map(|n| n == 0).unwrap_or(true));
            let mut c = crate::client::Client::connect(p).expect("room again");
            let ok = c.call(&Request::Status {}).is_ok();
            (refused, closed, ok)
        });
        assert!(r.0.contains("\"busy\""), "{}", r.0);
        assert!(r.1, "idle connections closed");
        assert!(r.2, "a new client is served");
    }

    #[test]
    fn a_change_with_an_id_is_applied_once() {
        let (lines, seen) = with_server("ids", Limits::default(), |p| {
            let mut s = std::os::unix::net::UnixStream::connect(p).expect("connect");
            let add =
                br#"{"version":1,"id":"r1","type":"service_remove","frontend":"10.0.0.10:80/tcp"}"#;
            let mut out = Vec::new();
            for _ in 0..2 {
                s.write_all(add).expect("w");
                s.write_all(b"\n").expect("w");
                out.push(read_line(&mut s));
            }
            // The same id for another change is refused, not answered with the first.
            s.write_all(
                br#"{"version":1,"id":"r1","type":"service_remove","frontend":"10.0.0.11:80/tcp"}"#,
            )
            .expect("w");
            s.write_all(b"\n").expect("w");
            out.push(read_line(&mut s));
            // Reads are answered afresh even with an id.
            for _ in 0..2 {
                s.write_all(b"{\"version\":1,\"id\":\"r2\",\"type\":\"status\"}\n")
                    .expect("w");
                out.push(read_line(&mut s));
            }
            out
        });
        assert_eq!(lines[0], lines[1], "the retry gets the first answer");
        assert!(
            lines[0].contains("\"id\":\"r1\"") && lines[0].contains("#1"),
            "{}",
            lines[0]
        );
        assert!(lines[2].contains("used for another change"), "{}", lines[2]);
        assert!(
            lines[3].contains("#2") && lines[4].contains("#3"),
            "{lines:?}"
        );
        assert_eq!(seen, 3);
    }

    #[test]
    fn bind_never_replaces_what_is_not_a_stale_socket() {
        let path = temp_path("nosock");
        std::fs::write(&path, b"operator data").expect("write");
        assert!(matches!(
            ControlSocket::bind(&path, &SocketOptions::default()),
            Err(ServerError::NotASocket(_))
        ));
        assert_eq!(std::fs::read(&path).expect("kept"), b"operator data");
        std::fs::remove_file(&path).expect("rm");
        // A stale socket (nobody listening) is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("stale"));
        assert!(path.exists());
        let s = ControlSocket::bind(&path, &SocketOptions::default()).expect("replaces stale");
        // An unknown group is refused before anything is touched.
        drop(s);
        let bad = SocketOptions {
            group: Some("no-such-group-xlb".into()),
            ..SocketOptions::default()
        };
        assert!(matches!(
            ControlSocket::bind(&path, &bad),
            Err(ServerError::NoGroup(_))
        ));
        assert!(!path.exists());
        // Mode and group as asked (group 0 exists everywhere).
        let opts = SocketOptions {
            mode: 0o600,
            group: Some("0".into()),
        };
        let s = ControlSocket::bind(&path, &opts).expect("bind");
        let m = std::fs::metadata(&path).expect("meta");
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::os::unix::fs::MetadataExt::gid(&m), 0);
        drop(s);
    }

    #[test]
    fn serves_requests_in_order_and_survives_bad_lines() {
        let dir = std::env::temp_dir().join(format!("xlb-ctl-{}", std::process::id()));
        let path = dir.join("s.sock");
        let mut sock = ControlSocket::bind(&path, &SocketOptions::default()).expect("bind");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert!(matches!(
            ControlSocket::bind(&path, &SocketOptions::default()),
            Err(ServerError::InUse(_))
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let p2 = path.clone();
        let t = std::thread::spawn(move || {
            let mut c = Client::connect(&p2).expect("connect");
            let a = c.call(&Request::Status {}).expect("call");
            let mut raw = std::os::unix::net::UnixStream::connect(&p2).expect("raw");
            raw.write_all(b"garbage\n{\"version\":1,\"type\":\"stats\"}\n")
                .expect("write");
            let mut r = std::io::BufReader::new(raw);
            let mut l1 = String::new();
            let mut l2 = String::new();
            std::io::BufRead::read_line(&mut r, &mut l1).expect("l1");
            std::io::BufRead::read_line(&mut r, &mut l2).expect("l2");
            stop2.store(true, Ordering::Relaxed);
            (a, l1, l2)
        });
        serve(&mut sock, &mut Echo(0), &stop, Duration::from_millis(20)).expect("serve");
        let (a, l1, l2) = t.join().expect("client thread");
        assert!(
            matches!(a.outcome, Outcome::Ok { result: Reply::Done { ref message } } if message == "Status #1")
        );
        assert!(l1.contains("\"bad_request\""), "{l1}");
        assert!(l2.contains("Stats #2"), "{l2}");
        drop(sock);
        assert!(!path.exists(), "socket file removed on drop");
        let _ = std::fs::remove_dir(dir);
    }
}
