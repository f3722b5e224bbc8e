//! The CLI's side of the control socket: one request, one response, bounded in time.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use crate::protocol::{Request, Response};

/// Why a request could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error("the limiter daemon is not running (nothing at {0}); start it with `limiter run`")]
    NotRunning(String),
    /// The socket exists but the connection failed (permissions, ...).
    #[error("cannot connect to {path}: {source}")]
    Connect {
        /// The socket.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The exchange failed midway.
    #[error("talking to the daemon: {0}")]
    Io(#[from] std::io::Error),
    /// The daemon's answer was not understood.
    #[error("the daemon's answer was not understood: {0}")]
    Protocol(#[from] serde_json::Error),
}

/// How long the CLI waits for the daemon before giving up.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Sends one request and returns the daemon's response.
pub fn request(socket: &Path, request: &Request) -> Result<Response, ClientError> {
    let shown = socket.display().to_string();
    let mut stream = UnixStream::connect(socket).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::NotRunning(shown.clone())
        }
        _ => ClientError::Connect {
            path: shown.clone(),
            source,
        },
    })?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    Ok(serde_json::from_str(&answer)?)
}
