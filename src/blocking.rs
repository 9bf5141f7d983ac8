//! A one-shot blocking read of a registry, for `strong_dependency=on`: the master reads
//! the registry once before it starts workers and refuses to start if it cannot. Plain
//! std networking; never used in a worker.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use upsync_core::registry::{redact, Snapshot, Source};
use upsync_core::conf::{Endpoint, Target};
use upsync_core::http::{build_request, ResponseParser};

/// A byte stream to the registry: the socket itself, or TLS over it.
pub trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

/// Turns a connected socket into the stream to talk over (adds TLS for https).
pub type Wrap<'a> = &'a dyn Fn(TcpStream, &Target) -> Result<Box<dyn Stream>, String>;

/// Tries each address in turn, `attempts` rounds; returns the first snapshot or the last error.
pub fn fetch(
    targets: &[Target],
    endpoint: &Endpoint,
    source: &mut dyn Source,
    attempts: u32,
    timeout: Duration,
    wrap: Wrap,
) -> Result<Snapshot, String> {
    let mut last = String::from("no registry address");
    for _ in 0..attempts.max(1) {
        for t in targets {
            source.reset();
            match fetch_one(t, endpoint, source, timeout, wrap) {
                Ok(s) => return Ok(s),
                Err(e) => last = format!("{}: {e}", t.addr),
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
    wrap: Wrap,
) -> Result<Snapshot, String> {
    let deadline = Instant::now() + timeout;
    let authority = endpoint.hosts[t.host].authority();
    let s = TcpStream::connect_timeout(&t.addr, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
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
        .map_err(|e| format!("send: {e}"))?;
        let mut p = ResponseParser::new(8 * 1024 * 1024);
        let mut buf = [0u8; 16 * 1024];
        loop {
            if Instant::now() > deadline {
                return Err("timed out".into());
            }
            let n = s.read(&mut buf).map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                p.eof().map_err(|e| e.to_string())?;
                break;
            }
            if p.feed(&buf[..n]).map_err(|e| e.to_string())? {
                break;
            }
            if let Some(h) = p.head() {
                let h = h.clone();
                if source.on_partial(&h, p.body()) {
                    break;
                }
            }
        }
        let head = p.head().ok_or("no response")?.clone();
        let result = source.handle(&head, p.body());
        if let Some(snap) = result.map_err(|e| redact(&e.to_string(), source))? {
            return Ok(snap);
        }
        if !p.keep_alive() {
            return Err("the registry closed the connection after authentication".into());
        }
    }
    Err("the registry answered with an event instead of a listing".into())
}
