//! A one-shot blocking read of a registry, for `strong_dependency=on`: the master reads
//! the registry once before it starts workers and refuses to start if it cannot. Plain
//! std networking; never used in a worker.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::{Snapshot, Source};
use crate::net::http::{build_request, ResponseParser};

/// Tries each address in turn, `attempts` rounds; returns the first snapshot or the last error.
pub fn fetch(
    addrs: &[SocketAddr],
    authority: &str,
    source: &mut dyn Source,
    attempts: u32,
    timeout: Duration,
) -> Result<Snapshot, String> {
    let mut last = String::from("no registry address");
    for _ in 0..attempts.max(1) {
        for addr in addrs {
            source.reset();
            match fetch_one(*addr, authority, source, timeout) {
                Ok(s) => return Ok(s),
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
    }
    Err(last)
}

fn fetch_one(
    addr: SocketAddr,
    authority: &str,
    source: &mut dyn Source,
    timeout: Duration,
) -> Result<Snapshot, String> {
    let deadline = Instant::now() + timeout;
    // After reset() the request carries no index, so it answers at once.
    source.start();
    let req = source.next_request();
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.write_all(&build_request(
        req.method,
        &req.path_and_query,
        authority,
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
    match source.handle(&head, p.body()).map_err(|e| e.to_string())? {
        Some(snap) => Ok(snap),
        None => Err("the registry answered with an event instead of a listing".into()),
    }
}
