//! An incremental HTTP/1.1 response parser for the registry client: the event loop feeds
//! whatever bytes arrived, and the parser says when the response is complete. Handles
//! Content-Length, chunked and close-delimited bodies, with hard limits on head and body
//! size so a hostile registry cannot make a worker allocate without bound.

pub const MAX_HEAD: usize = 64 * 1024;
pub const MAX_HEADERS: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    /// HTTP/1.1 (true) or 1.0.
    pub http11: bool,
    /// Header names lower-cased, values trimmed, in arrival order.
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// First header with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Why a response could not be read. The last good server set stays in place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("response header larger than {MAX_HEAD} bytes or more than {MAX_HEADERS} headers")]
    HeadTooLarge,
    #[error("response body larger than the {0} byte limit (8 times the shared memory the upstream may use: raise upsync_zone_size, or the upstream's zone_size=)")]
    BodyTooLarge(usize),
    #[error("invalid response header: {0}")]
    BadHead(String),
    #[error("invalid Content-Length")]
    BadContentLength,
    #[error("invalid chunked encoding")]
    BadChunk,
    /// The connection closed before the response was complete.
    #[error("connection closed before the response was complete (truncated)")]
    Truncated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(usize),
    DataEnd,
    Trailer,
}

#[derive(Debug)]
enum State {
    Head,
    Body { framing: Framing, chunk: Chunk },
    Done,
}

#[derive(Debug)]
pub struct ResponseParser {
    state: State,
    /// Unparsed input (head bytes, or a partial chunk-size line).
    pending: Vec<u8>,
    head: Option<Head>,
    body: Vec<u8>,
    body_limit: usize,
    /// Responses to HEAD and 1xx/204/304 have no body.
    no_body: bool,
}

impl ResponseParser {
    pub fn new(body_limit: usize) -> Self {
        ResponseParser {
            state: State::Head,
            pending: Vec::new(),
            head: None,
            body: Vec::new(),
            body_limit,
            no_body: false,
        }
    }

    pub fn head(&self) -> Option<&Head> {
        self.head.as_ref()
    }

    pub fn body(&self) -> &[u8] {
        &self.body
    }

    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Whether the connection may carry another request after this response.
    pub fn keep_alive(&self) -> bool {
        let Some(h) = &self.head else { return false };
        let close = h
            .header("connection")
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")));
        self.is_done()
            && h.http11
            && !close
            && !matches!(
                self.state,
                State::Body {
                    framing: Framing::UntilClose,
                    ..
                }
            )
            && self.framing_was_explicit()
    }

    fn framing_was_explicit(&self) -> bool {
        let Some(h) = &self.head else { return false };
        self.no_body
            || h.header("content-length").is_some()
            || h.header("transfer-encoding").is_some()
    }

    /// Feeds newly received bytes. Returns `Ok(true)` once the response is complete; bytes
    /// after the end of the response are an error (registries never pipeline).
    pub fn feed(&mut self, mut data: &[u8]) -> Result<bool, HttpError> {
        loop {
            match &mut self.state {
                State::Done => {
                    return if data.is_empty() {
                        Ok(true)
                    } else {
                        Err(HttpError::BadHead(
                            "data after the end of the response".into(),
                        ))
                    };
                }
                State::Head => {
                    if data.is_empty() {
                        return Ok(false);
                    }
                    self.pending.extend_from_slice(data);
                    data = &[];
                    let Some(consumed) = self.parse_head()? else {
                        if self.pending.len() > MAX_HEAD {
                            return Err(HttpError::HeadTooLarge);
                        }
                        return Ok(false);
                    };
                    let rest = self.pending.split_off(consumed);
                    self.pending.clear();
                    if matches!(self.state, State::Done) && !rest.is_empty() {
                        return Err(HttpError::BadHead(
                            "data after the end of the response".into(),
                        ));
                    }
                    if !rest.is_empty() {
                        return self.feed(&rest);
                    }
                    continue;
                }
                State::Body { framing, chunk } => match (*framing, *chunk) {
                    (Framing::UntilClose, _) => {
                        self.push_body(data)?;
                        return Ok(false);
                    }
                    (Framing::Length(left), chunk) => {
                        let take = left.min(data.len());
                        self.push_body(&data[..take])?;
                        let left = left - take;
                        data = &data[take..];
                        if left == 0 {
                            self.state = State::Done;
                        } else {
                            self.state = State::Body {
                                framing: Framing::Length(left),
                                chunk,
                            };
                            return Ok(false);
                        }
                    }
                    (Framing::Chunked, c) => {
                        if data.is_empty() {
                            return Ok(false);
                        }
                        data = self.feed_chunked(c, data)?;
                    }
                },
            }
        }
    }

    /// The peer closed the connection: completes a close-delimited body, otherwise the
    /// response was truncated.
    pub fn eof(&mut self) -> Result<(), HttpError> {
        match self.state {
            State::Done => Ok(()),
            State::Body {
                framing: Framing::UntilClose,
                ..
            } => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(HttpError::Truncated),
        }
    }

    fn push_body(&mut self, data: &[u8]) -> Result<(), HttpError> {
        if self.body.len() + data.len() > self.body_limit {
            return Err(HttpError::BodyTooLarge(self.body_limit));
        }
        self.body.extend_from_slice(data);
        Ok(())
    }

    /// Parses the head out of `pending`; returns the number of bytes it used.
    fn parse_head(&mut self) -> Result<Option<usize>, HttpError> {
        let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut storage);
        let consumed = match resp.parse(&self.pending) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
            Err(e) => return Err(HttpError::BadHead(e.to_string())),
        };
        let status = resp.code.unwrap_or(0);
        let headers: Vec<(String, String)> = resp
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).trim().to_string(),
                )
            })
            .collect();
        let head = Head {
            status,
            http11: resp.version == Some(1),
            headers,
        };
        if (100..200).contains(&status) {
            // Interim response (100 Continue): drop it and parse the real head from what
            // follows; offsets returned are relative to the drained buffer.
            self.pending.drain(..consumed);
            return self.parse_head();
        }
        let chunked = head.header("transfer-encoding").is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("chunked"))
        });
        let framing = if status == 204 || status == 304 {
            self.no_body = true;
            Framing::Length(0)
        } else if chunked {
            Framing::Chunked
        } else if let Some(cl) = head.header("content-length") {
            let all_same = head
                .headers
                .iter()
                .filter(|(k, _)| k == "content-length")
                .all(|(_, v)| v == cl);
            match cl.parse::<usize>() {
                Ok(n) if all_same && cl.bytes().all(|b| b.is_ascii_digit()) => {
                    if n > self.body_limit {
                        return Err(HttpError::BodyTooLarge(self.body_limit));
                    }
                    Framing::Length(n)
                }
                _ => return Err(HttpError::BadContentLength),
            }
        } else {
            Framing::UntilClose
        };
        self.head = Some(head);
        self.state = if framing == Framing::Length(0) {
            State::Done
        } else {
            State::Body {
                framing,
                chunk: Chunk::Size,
            }
        };
        Ok(Some(consumed))
    }

    /// Consumes chunked-encoding input in state `c`; returns the unconsumed rest.
    fn feed_chunked<'a>(&mut self, c: Chunk, data: &'a [u8]) -> Result<&'a [u8], HttpError> {
        let set = |s: &mut State, c: Chunk| {
            *s = State::Body {
                framing: Framing::Chunked,
                chunk: c,
            }
        };
        match c {
            Chunk::Data(left) => {
                let take = left.min(data.len());
                self.push_body(&data[..take])?;
                set(
                    &mut self.state,
                    if take == left {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left - take)
                    },
                );
                Ok(&data[take..])
            }
            Chunk::Size | Chunk::DataEnd | Chunk::Trailer => {
                // line-oriented states: gather one line
                let Some(nl) = data.iter().position(|&b| b == b'\n') else {
                    self.pending.extend_from_slice(data);
                    if self.pending.len() > 4096 {
                        return Err(HttpError::BadChunk);
                    }
                    return Ok(&[]);
                };
                self.pending.extend_from_slice(&data[..nl]);
                let rest = &data[nl + 1..];
                let line = std::mem::take(&mut self.pending);
                let line = line.strip_suffix(b"\r").unwrap_or(&line);
                match c {
                    Chunk::DataEnd => {
                        if !line.is_empty() {
                            return Err(HttpError::BadChunk);
                        }
                        set(&mut self.state, Chunk::Size);
                    }
                    Chunk::Trailer => {
                        if line.is_empty() {
                            self.state = State::Done;
                        }
                    }
                    _ => {
                        let size_part = line.split(|&b| b == b';').next().unwrap_or(b"");
                        let size_str = std::str::from_utf8(size_part)
                            .map_err(|_| HttpError::BadChunk)?
                            .trim();
                        if size_str.is_empty() || size_str.len() > 15 {
                            return Err(HttpError::BadChunk);
                        }
                        let size =
                            usize::from_str_radix(size_str, 16).map_err(|_| HttpError::BadChunk)?;
                        if size == 0 {
                            set(&mut self.state, Chunk::Trailer);
                        } else {
                            if self.body.len() + size > self.body_limit {
                                return Err(HttpError::BodyTooLarge(self.body_limit));
                            }
                            set(&mut self.state, Chunk::Data(size));
                        }
                    }
                }
                Ok(rest)
            }
        }
    }
}

/// `s` as one URL query value or path segment: every byte but RFC 3986's unreserved
/// ones percent-encoded (UTF-8 bytes one by one).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &c in s.as_bytes() {
        if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
            out.push(c as char);
        } else {
            out.push_str(&format!("%{c:02X}"));
        }
    }
    out
}

/// Builds a request. `extra` are complete header lines without CRLF; a non-empty body
/// is sent as JSON with its length.
pub fn build_request(
    method: &str,
    path_and_query: &str,
    authority: &str,
    extra: &[String],
    body: &[u8],
) -> Vec<u8> {
    let mut r = format!(
        "{method} {path_and_query} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: ngx-stream-upsync/{}\r\nAccept: application/json\r\n",
        env!("CARGO_PKG_VERSION")
    );
    for h in extra {
        r.push_str(h);
        r.push_str("\r\n");
    }
    if !body.is_empty() || method != "GET" {
        // JSON unless the source says otherwise (a Nacos login is a form).
        if !extra.iter().any(|h| {
            h.get(..13)
                .is_some_and(|n| n.eq_ignore_ascii_case("content-type:"))
        }) {
            r.push_str("Content-Type: application/json\r\n");
        }
        r.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    r.push_str("\r\n");
    let mut out = r.into_bytes();
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` split at every possible point, checking the result is the same.
    fn parse_split(input: &[u8], eof: bool) -> Vec<Result<(u16, Vec<u8>), HttpError>> {
        (0..=input.len())
            .map(|cut| {
                let mut p = ResponseParser::new(1 << 20);
                let mut done = p.feed(&input[..cut])?;
                if !done {
                    done = p.feed(&input[cut..])?;
                }
                if !done && eof {
                    p.eof()?;
                } else if !done {
                    return Err(HttpError::Truncated);
                }
                Ok((p.head().unwrap().status, p.body().to_vec()))
            })
            .collect()
    }

    fn all_ok(input: &[u8], eof: bool, status: u16, body: &[u8]) {
        for r in parse_split(input, eof) {
            assert_eq!(
                r,
                Ok((status, body.to_vec())),
                "input {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn content_length() {
        all_ok(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Consul-Index: 7\r\n\r\nhello",
            false,
            200,
            b"hello",
        );
        all_ok(
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
            false,
            404,
            b"",
        );
    }

    #[test]
    fn chunked() {
        all_ok(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\n",
            false,
            200,
            b"hello world",
        );
    }

    #[test]
    fn until_close() {
        all_ok(b"HTTP/1.0 200 OK\r\n\r\nabc", true, 200, b"abc");
    }

    #[test]
    fn headers_case_insensitive() {
        let mut p = ResponseParser::new(100);
        assert!(p
            .feed(b"HTTP/1.1 200 OK\r\nx-consul-INDEX: 42\r\ncontent-length: 0\r\n\r\n")
            .unwrap());
        assert_eq!(p.head().unwrap().header("X-Consul-Index"), Some("42"));
        assert!(p.keep_alive());
    }

    #[test]
    fn keep_alive_rules() {
        let mut p = ResponseParser::new(100);
        p.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
        assert!(!p.keep_alive());
        let mut p = ResponseParser::new(100);
        p.feed(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
        assert!(!p.keep_alive());
    }

    #[test]
    fn errors() {
        let cases: &[(&[u8], HttpError)] = &[
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
                HttpError::Truncated,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
                HttpError::BodyTooLarge(100),
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
                HttpError::BadContentLength,
            ),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                HttpError::BadContentLength,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                HttpError::BadChunk,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n",
                HttpError::BadChunk,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab",
                HttpError::Truncated,
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfff\r\n",
                HttpError::BodyTooLarge(100),
            ),
            (b"GARBAGE\r\n\r\n", HttpError::BadHead(String::new())),
        ];
        for (input, want) in cases {
            let mut p = ResponseParser::new(100);
            let got = p
                .feed(input)
                .and_then(|done| if done { Ok(()) } else { p.eof() });
            let err = got.expect_err("should fail");
            match want {
                HttpError::BadHead(_) => assert!(matches!(err, HttpError::BadHead(_)), "{err:?}"),
                w => assert_eq!(&err, w, "input {:?}", String::from_utf8_lossy(input)),
            }
        }
    }

    #[test]
    fn interim_responses_are_skipped() {
        all_ok(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
            false,
            200,
            b"abc",
        );
        all_ok(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",
            false,
            200,
            b"x",
        );
    }

    #[test]
    fn header_flood_is_bounded() {
        let mut input = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..200 {
            input.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        input.extend_from_slice(b"\r\n");
        let mut p = ResponseParser::new(100);
        assert_eq!(p.feed(&input), Err(HttpError::HeadTooLarge));
        let mut p = ResponseParser::new(100);
        let big = vec![b'a'; MAX_HEAD + 10];
        let mut head = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        head.extend_from_slice(&big);
        assert_eq!(p.feed(&head), Err(HttpError::HeadTooLarge));
    }

    #[test]
    fn request_shape() {
        let r = build_request(
            "GET",
            "/v1/kv/a/?recurse&index=3",
            "127.0.0.1:8500",
            &["X-Consul-Token: t".into()],
            b"",
        );
        let s = String::from_utf8(r).unwrap();
        assert!(s.starts_with("GET /v1/kv/a/?recurse&index=3 HTTP/1.1\r\nHost: 127.0.0.1:8500\r\n"));
        assert!(s.ends_with("X-Consul-Token: t\r\n\r\n"));
        let r =
            String::from_utf8(build_request("POST", "/v3/kv/range", "h:1", &[], b"{}")).unwrap();
        assert!(r.ends_with("Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"));
    }
}
