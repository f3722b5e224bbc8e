//! A minimal HTTP/1.1 client for GET requests over a connection the caller opened: the
//! legitimate clients and the HTTP flood both need to choose their source address and to
//! count exactly what they send, which a full client library would hide.

use anyhow::{Context as _, Result, bail};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;

/// Largest response head (status line and headers) accepted.
const MAX_HEAD: usize = 8 * 1024;
/// Largest response body accepted.
const MAX_BODY: usize = 64 * 1024;

/// A response: its status code and body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Whether the connection is used for one request or kept for more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Connection {
    Close,
    KeepAlive,
}

/// Sends `GET path` and reads the whole response.
pub async fn get(
    stream: &mut BufReader<TcpStream>,
    host: &str,
    path: &str,
    connection: Connection,
) -> Result<Response> {
    let connection_header = match connection {
        Connection::Close => "close",
        Connection::KeepAlive => "keep-alive",
    };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: limiter-demo\r\nAccept: application/json\r\nConnection: {connection_header}\r\n\r\n"
    );
    stream
        .get_mut()
        .write_all(request.as_bytes())
        .await
        .context("send the request")?;
    read_response(stream).await
}

async fn read_response(stream: &mut BufReader<TcpStream>) -> Result<Response> {
    let mut head_len = 0;
    let mut line = String::new();
    read_line(stream, &mut line, &mut head_len).await?;
    let status = parse_status_line(&line)?;
    let mut content_length = None;
    loop {
        line.clear();
        read_line(stream, &mut line, &mut head_len).await?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.trim().eq_ignore_ascii_case("content-length")
        {
            let length: usize = value
                .trim()
                .parse()
                .with_context(|| format!("bad Content-Length {value:?}"))?;
            if length > MAX_BODY {
                bail!("response body of {length} bytes is too large");
            }
            content_length = Some(length);
        }
    }
    let mut body = Vec::new();
    match content_length {
        Some(length) => {
            body.resize(length, 0);
            stream
                .read_exact(&mut body)
                .await
                .context("read the response body")?;
        }
        // Without a length the body runs to the end of the connection.
        None => {
            stream
                .take(MAX_BODY as u64)
                .read_to_end(&mut body)
                .await
                .context("read the response body")?;
        }
    }
    Ok(Response { status, body })
}

async fn read_line(
    stream: &mut BufReader<TcpStream>,
    line: &mut String,
    head_len: &mut usize,
) -> Result<()> {
    let read = stream
        .read_line(line)
        .await
        .context("read the response head")?;
    if read == 0 {
        bail!("the server closed the connection before responding");
    }
    *head_len += read;
    if *head_len > MAX_HEAD {
        bail!("response head longer than {MAX_HEAD} bytes");
    }
    Ok(())
}

fn parse_status_line(line: &str) -> Result<u16> {
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(version), Some(code)) if version.starts_with("HTTP/1.") => code
            .parse()
            .with_context(|| format!("bad status line {:?}", line.trim_end())),
        _ => bail!("bad status line {:?}", line.trim_end()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line("HTTP/1.1 200 OK\r\n").unwrap(), 200);
        assert_eq!(
            parse_status_line("HTTP/1.0 503 Service Unavailable\r\n").unwrap(),
            503
        );
        assert!(parse_status_line("SSH-2.0-OpenSSH\r\n").is_err());
        assert!(parse_status_line("\r\n").is_err());
    }
}
