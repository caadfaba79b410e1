//! A minimal HTTP/1.1 client side for keep-alive load: reads `Content-Length` responses off one
//! connection into reused buffers, so a run does not allocate per request.

use std::io::{self, Read};
use std::net::TcpStream;

/// Reads HTTP/1.1 responses with a `Content-Length` off a keep-alive connection, buffer reused.
#[derive(Default)]
pub struct ResponseReader {
    buf: Vec<u8>,
    /// The last response said `Connection: close`: the server closes the connection after it.
    closing: bool,
}

impl ResponseReader {
    /// Reads one whole response and returns its status code; copies the body into `body` if given.
    pub fn read_response(
        &mut self,
        stream: &mut TcpStream,
        body: Option<&mut Vec<u8>>,
    ) -> io::Result<u16> {
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some((status, head, total)) = parse_response(&self.buf) {
                self.closing = says_close(&self.buf[..head]);
                if let Some(body) = body {
                    body.clear();
                    body.extend_from_slice(&self.buf[head..total]);
                }
                self.buf.drain(..total);
                return Ok(status);
            }
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed the connection",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

impl ResponseReader {
    /// Whether the last response said `Connection: close` (some servers, sockudo among them, close
    /// after every API answer): the next request needs a new connection.
    pub fn server_closes(&self) -> bool {
        self.closing
    }
}

/// Whether a response head carries `Connection: close`.
fn says_close(head: &[u8]) -> bool {
    std::str::from_utf8(head).is_ok_and(|head| {
        head.lines().any(|l| {
            l.split_once(':').is_some_and(|(name, value)| {
                name.eq_ignore_ascii_case("connection")
                    && value.trim().eq_ignore_ascii_case("close")
            })
        })
    })
}

/// The status, head length and total length of the first complete response in `buf`, if it is all there.
fn parse_response(buf: &[u8]) -> Option<(u16, usize, usize)> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = std::str::from_utf8(&buf[..head_end]).ok()?;
    let status = head.get(9..12)?.parse().ok()?;
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    (buf.len() >= head_end + length).then_some((status, head_end, head_end + length))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_close_answer_is_noticed() {
        assert!(says_close(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n"));
        assert!(says_close(b"HTTP/1.1 200 OK\r\nConnection:  Close\r\n\r\n"));
        assert!(!says_close(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\n"
        ));
        assert!(!says_close(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"));
    }

    #[test]
    fn parse_response_waits_for_the_whole_body() {
        let r = b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\n{}";
        assert_eq!(parse_response(r), None);
        let r = b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}HTTP";
        assert_eq!(parse_response(r), Some((201, r.len() - 6, r.len() - 4)));
    }
}
