//! The load generator's HTTP/1.1 client: one keep-alive connection per worker, requests
//! written as prepared bytes, answers read with `httparse`.
//!
//! reqwest (hyper's client with its pool, dispatch channel and per-request header map) cost
//! the generator about as much CPU per callback as the daemon spent answering it. On two
//! shared cores that CPU is taken from the daemon being measured. The generator sends the
//! same few request shapes every time, so the shapes are built once and each request is one
//! write. The answers need only a status and a Content-Length.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most header bytes an answer may have; the daemon's are about 150.
const HEAD_MAX: usize = 8 * 1024;

/// A request ready to write: request line, headers and body.
pub fn post(path_and_query: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut req = format!(
        "POST {path_and_query} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: {content_type}\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

/// One connection: reconnects when the server closes it, as a keep-alive client must.
pub struct Conn {
    port: u16,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl Conn {
    pub fn new(port: u16) -> Conn {
        Conn {
            port,
            stream: None,
            buf: Vec::with_capacity(HEAD_MAX),
        }
    }

    /// Sends `request` and reads the whole answer; returns its status. On any error the
    /// connection is dropped, so the next request opens a fresh one.
    pub async fn send(&mut self, request: &[u8]) -> io::Result<u16> {
        let result = self.exchange(request).await;
        if !matches!(result, Ok((_, true))) {
            self.stream = None;
        }
        result.map(|(status, _)| status)
    }

    /// The status and whether the connection may be used again.
    async fn exchange(&mut self, request: &[u8]) -> io::Result<(u16, bool)> {
        if self.stream.is_none() {
            let s = TcpStream::connect(("127.0.0.1", self.port)).await?;
            s.set_nodelay(true)?;
            self.stream = Some(s);
        }
        let stream = self.stream.as_mut().expect("connected above");
        stream.write_all(request).await?;
        self.buf.clear();
        loop {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            let head = match response.parse(&self.buf) {
                Ok(httparse::Status::Complete(head)) => head,
                Ok(httparse::Status::Partial) if self.buf.len() < HEAD_MAX => continue,
                Ok(httparse::Status::Partial) => return Err(invalid("answer head too long")),
                Err(e) => return Err(invalid(&e.to_string())),
            };
            let status = response.code.unwrap_or(0);
            let mut length = None;
            let mut keep = true;
            for h in response.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    length = std::str::from_utf8(h.value)
                        .ok()
                        .and_then(|v| v.trim().parse::<usize>().ok());
                } else if h.name.eq_ignore_ascii_case("connection") {
                    keep = !h.value.eq_ignore_ascii_case(b"close");
                }
            }
            // Every answer measured here has a length; one without cannot be delimited on a
            // kept-alive connection.
            let length = length.ok_or_else(|| invalid("answer without content-length"))?;
            let mut have = self.buf.len() - head;
            while have < length {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                have += n;
            }
            return Ok((status, keep && have == length));
        }
    }
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// Answers two requests on one connection, then closes it; the client reconnects.
    #[tokio::test]
    async fn reads_answers_and_reconnects_after_close() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                for last in [false, true] {
                    let _ = s.read(&mut buf).await.unwrap();
                    let close = if last { "connection: close\r\n" } else { "" };
                    s.write_all(
                        format!("HTTP/1.1 200 OK\r\n{close}content-length: 7\r\n\r\nsuccess")
                            .as_bytes(),
                    )
                    .await
                    .unwrap();
                }
            }
        });
        let mut conn = Conn::new(port);
        let req = post("/x?y=1", "application/json", b"{}");
        for _ in 0..5 {
            assert_eq!(conn.send(&req).await.unwrap(), 200);
        }
    }
}
