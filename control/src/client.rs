//! A blocking client for the control socket (what `lbctl` and tests use).

use crate::proto::{Request, RequestEnvelope, ResponseEnvelope, VERSION};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to lbd at {path}: {source} (is lbd running? --socket or LBCTL_SOCKET selects another socket)")]
    Connect { path: String, source: io::Error },
    #[error("lbd did not answer within {secs} s: the change may still be applied; retry with --request-id {id} to apply it at most once")]
    TimedOut { secs: u64, id: String },
    #[error("lbd did not answer within {0} s")]
    ReadTimedOut(u64),
    #[error("talking to lbd: {0}")]
    Io(#[from] io::Error),
    #[error("lbd closed the connection without answering")]
    Closed,
    #[error("lbd sent a response this lbctl cannot read: {0}")]
    Decode(#[from] serde_json::Error),
}

#[derive(Debug)]
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    timeout: Duration,
}

/// How long a client waits for an answer unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

impl Client {
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        Client::connect_with_timeout(path, DEFAULT_TIMEOUT)
    }

    pub fn connect_with_timeout(path: &Path, timeout: Duration) -> Result<Client, ClientError> {
        let s = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(Client {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
            timeout,
        })
    }

    pub fn call(&mut self, req: &Request) -> Result<ResponseEnvelope, ClientError> {
        self.call_with_id(req, None)
    }

    /// Send `req` with request id `id` (a change sent again with the same id is applied
    /// at most once). A time-out on a change says so, with the id to retry with.
    pub fn call_with_id(
        &mut self,
        req: &Request,
        id: Option<&str>,
    ) -> Result<ResponseEnvelope, ClientError> {
        let mut line = serde_json::to_vec(&RequestEnvelope {
            version: VERSION,
            id: id.map(str::to_string),
            request: req.clone(),
        })?;
        line.push(b'\n');
        let timed_out = |e: &io::Error| {
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            )
        };
        let secs = self.timeout.as_secs();
        let late = |e: io::Error| match id {
            Some(id) if timed_out(&e) && req.is_change() => ClientError::TimedOut {
                secs,
                id: id.to_string(),
            },
            _ if timed_out(&e) => ClientError::ReadTimedOut(secs),
            _ => ClientError::Io(e),
        };
        self.writer.write_all(&line).map_err(late)?;
        let mut resp = String::new();
        if self.reader.read_line(&mut resp).map_err(late)? == 0 {
            return Err(ClientError::Closed);
        }
        Ok(serde_json::from_str(&resp)?)
    }
}
