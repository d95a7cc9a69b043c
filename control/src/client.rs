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
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let s = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(Client {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    pub fn call(&mut self, req: &Request) -> Result<ResponseEnvelope, ClientError> {
        let mut line = serde_json::to_vec(&RequestEnvelope {
            version: VERSION,
            request: req.clone(),
        })?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        let mut resp = String::new();
        if self.reader.read_line(&mut resp)? == 0 {
            return Err(ClientError::Closed);
        }
        Ok(serde_json::from_str(&resp)?)
    }
}
