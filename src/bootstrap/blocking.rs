//! A one-shot blocking read of a registry, for `strong_dependency=on`: the master reads
//! the registry once before it starts workers and refuses to start if it cannot. Plain
//! std networking; never used in a worker.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::driver::tls::TlsError;

use upsync_core::conf::{Endpoint, Target};
use upsync_core::http::{build_request, ResponseParser};
use upsync_core::registry::{redact, Snapshot, Source};

/// A byte stream to the registry: the socket itself, or TLS over it.
pub trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// Turns a connected socket into the stream to talk over (adds TLS for https).
pub type Wrap<'a> = &'a dyn Fn(TcpStream, &Target) -> Result<Box<dyn Stream>, TlsError>;

/// Why the one-shot read failed (the last address's failure).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no registry address")]
    NoAddress,
    #[error("{addr}: {why}")]
    At { addr: SocketAddr, why: Step },
}

/// What failed at one address.
#[derive(Debug, thiserror::Error)]
pub enum Step {
    #[error("connect: {0}")]
    Connect(io::Error),
    #[error("{0}")]
    Socket(io::Error),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("send: {0}")]
    Send(io::Error),
    #[error("read: {0}")]
    Read(io::Error),
    #[error("timed out")]
    Timeout,
    #[error(transparent)]
    Http(#[from] upsync_core::http::HttpError),
    #[error("no response")]
    NoResponse,
    /// The registry's answer was refused (the text is already redacted).
    #[error("{0}")]
    Registry(String),
    #[error("the registry closed the connection after authentication")]
    ClosedAfterAuth,
    #[error("the registry answered with an event instead of a listing")]
    EventNotListing,
}

/// Tries each address in turn, `attempts` rounds; returns the first snapshot or the last error.
pub fn fetch(
    targets: &[Target],
    endpoint: &Endpoint,
    source: &mut dyn Source,
    attempts: u32,
    timeout: Duration,
    body_limit: usize,
    wrap: Wrap,
) -> Result<Snapshot, FetchError> {
    let mut last = FetchError::NoAddress;
    for _ in 0..attempts.max(1) {
        for t in targets {
            source.reset();
            match fetch_one(t, endpoint, source, timeout, body_limit, wrap) {
                Ok(s) => return Ok(s),
                Err(why) => last = FetchError::At { addr: t.addr, why },
            }
        }
    }
    Err(last)
}

fn fetch_one(
    t: &Target,
    endpoint: &Endpoint,
    source: &mut dyn Source,
    timeout: Duration,
    body_limit: usize,
    wrap: Wrap,
) -> Result<Snapshot, Step> {
    let deadline = Instant::now() + timeout;
    let authority = endpoint.hosts[t.host].authority();
    let s = TcpStream::connect_timeout(&t.addr, timeout).map_err(Step::Connect)?;
    s.set_read_timeout(Some(timeout)).map_err(Step::Socket)?;
    s.set_write_timeout(Some(timeout)).map_err(Step::Socket)?;
    s.set_nodelay(true).map_err(Step::Socket)?;
    let mut s = wrap(s, t)?;
    // An authentication exchange (etcd v3, Nacos) and the Nacos API detection (up to
    // three paths, and a second login path) may come first: a few exchanges at most.
    for _ in 0..6 {
        // After reset() the request carries no index, so it answers at once.
        source.start();
        let req = source.next_request();
        s.write_all(&build_request(
            req.method,
            &req.path_and_query,
            &authority,
            &req.headers,
            &req.body,
        ))
        .map_err(Step::Send)?;
        let mut p = ResponseParser::new(body_limit);
        let mut buf = [0u8; 16 * 1024];
        loop {
            if Instant::now() > deadline {
                return Err(Step::Timeout);
            }
            let n = s.read(&mut buf).map_err(Step::Read)?;
            if n == 0 {
                p.eof()?;
                break;
            }
            if p.feed(&buf[..n])? {
                break;
            }
            if let Some(h) = p.head() {
                let h = h.clone();
                if source.on_partial(&h, p.body()) {
                    break;
                }
            }
        }
        let head = p.head().ok_or(Step::NoResponse)?.clone();
        let result = source.handle(&head, p.body());
        if let Some(snap) = result.map_err(|e| Step::Registry(redact(&e.to_string(), source)))? {
            return Ok(snap);
        }
        if !p.keep_alive() {
            return Err(Step::ClosedAfterAuth);
        }
    }
    Err(Step::EventNotListing)
}
