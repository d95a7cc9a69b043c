//! The control socket's event loop (mio, single thread, non-blocking).
//!
//! Requests are answered in order per connection; one bad line gets an error response
//! and the connection stays usable; a line longer than [`MAX_LINE`] closes the
//! connection after an error (it cannot be resynchronised cheaply). Between events the
//! loop calls [`Handler::tick`] at least every `tick` interval so `lbd` can refresh its
//! network view and apply worker requests on the same thread, with no locks.

use crate::proto::{parse_request, ErrorKind, Request, ResponseEnvelope, MAX_LINE};
use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub trait Handler {
    fn handle(&mut self, req: Request) -> ResponseEnvelope;
    /// Periodic work on the control thread.
    fn tick(&mut self) {}
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("another lbd is already serving {0}")]
    InUse(PathBuf),
    #[error("control socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// A bound control socket: the path is removed when it is dropped.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Bind `path` with mode 0660, creating its directory (0755) and replacing a stale
    /// socket file, but never one another server still answers on.
    pub fn bind(path: &Path) -> Result<ControlSocket, ServerError> {
        let err = |source| ServerError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() && !dir.exists() {
                std::fs::create_dir_all(dir).map_err(err)?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                    .map_err(err)?;
            }
        }
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ServerError::InUse(path.to_path_buf()));
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
        Ok(ControlSocket {
            listener,
            path: path.to_path_buf(),
        })
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
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    closing: bool,
}

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);

/// Serve until `stop` is set (checked at least every `tick`), calling `handler`.
pub fn serve(
    sock: &mut ControlSocket,
    handler: &mut impl Handler,
    stop: &Arc<AtomicBool>,
    tick: Duration,
) -> io::Result<()> {
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut sock.listener, LISTENER, Interest::READABLE)?;
    let _waker = Waker::new(poll.registry(), WAKER)?;
    let mut events = Events::with_capacity(64);
    let mut conns: HashMap<Token, Conn> = HashMap::new();
    let mut next_token = 2usize;
    let mut last_tick = Instant::now();
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
                            let t = Token(next_token);
                            next_token += 1;
                            poll.registry().register(
                                &mut stream,
                                t,
                                Interest::READABLE | Interest::WRITABLE,
                            )?;
                            conns.insert(
                                t,
                                Conn {
                                    stream,
                                    rbuf: Vec::new(),
                                    wbuf: Vec::new(),
                                    closing: false,
                                },
                            );
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "accepting a control connection");
                            break;
                        }
                    }
                },
                WAKER => {}
                t => {
                    let Some(c) = conns.get_mut(&t) else { continue };
                    let alive = service(c, handler);
                    if !alive {
                        if let Some(mut c) = conns.remove(&t) {
                            let _ = poll.registry().deregister(&mut c.stream);
                        }
                    }
                }
            }
        }
        if last_tick.elapsed() >= tick {
            handler.tick();
            last_tick = Instant::now();
        }
    }
    Ok(())
}

/// Read what is there, answer complete lines, write what fits. False when the
/// connection is finished.
fn service(c: &mut Conn, handler: &mut impl Handler) -> bool {
    let mut buf = [0u8; 4096];
    let mut eof = false;
    loop {
        match c.stream.read(&mut buf) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => c.rbuf.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
    while let Some(pos) = c.rbuf.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = c.rbuf.drain(..=pos).collect();
        let line = &line[..line.len() - 1];
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let resp = match parse_request(line) {
            Ok(req) => handler.handle(req),
            Err(error) => ResponseEnvelope {
                version: crate::proto::VERSION,
                outcome: crate::proto::Outcome::Error { error },
            },
        };
        push_response(&mut c.wbuf, &resp);
    }
    if c.rbuf.len() > MAX_LINE {
        let resp = ResponseEnvelope::error(
            ErrorKind::BadRequest,
            format!("request line exceeds {MAX_LINE} bytes"),
        );
        push_response(&mut c.wbuf, &resp);
        c.rbuf.clear();
        c.closing = true;
    }
    while !c.wbuf.is_empty() {
        match c.stream.write(&c.wbuf) {
            Ok(0) => return false,
            Ok(n) => {
                c.wbuf.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
    !((eof || c.closing) && c.wbuf.is_empty())
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
        fn handle(&mut self, req: Request) -> ResponseEnvelope {
            self.0 += 1;
            ResponseEnvelope::ok(Reply::Done {
                message: format!("{req:?} #{}", self.0),
            })
        }
    }

    #[test]
    fn serves_requests_in_order_and_survives_bad_lines() {
        let dir = std::env::temp_dir().join(format!("xlb-ctl-{}", std::process::id()));
        let path = dir.join("s.sock");
        let mut sock = ControlSocket::bind(&path).expect("bind");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        assert!(matches!(
            ControlSocket::bind(&path),
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
