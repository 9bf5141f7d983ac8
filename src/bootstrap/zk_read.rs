//! A one-shot blocking read of a ZooKeeper znode's children, for
//! `strong_dependency=on` with `upsync_type=zookeeper`: the master drives the sans-IO
//! session over a plain std socket until the first complete listing, then closes the
//! session. Never used in a worker.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use upsync_core::registry::zookeeper::{listing, Event, Layout, Session, ZkConfig};
use upsync_core::registry::{redact_secrets, Snapshot};

/// Why the one-shot read failed (the last address's failure).
#[derive(Debug, thiserror::Error)]
pub enum ZkReadError {
    #[error("no ZooKeeper address")]
    NoAddress,
    #[error("{addr}: {why}")]
    At { addr: SocketAddr, why: String },
}

/// Tries each member in turn, `attempts` rounds, each within `timeout`; returns the
/// first listing of `path` as a snapshot, or the last error.
pub fn fetch(
    addrs: &[SocketAddr],
    cfg: &ZkConfig,
    path: &str,
    layout: Layout,
    attempts: u32,
    timeout: Duration,
) -> Result<Snapshot, ZkReadError> {
    let mut last = ZkReadError::NoAddress;
    for _ in 0..attempts.max(1) {
        for &addr in addrs {
            let mut session = Session::new(cfg.clone());
            let secrets = session.secrets();
            match read_one(&mut session, addr, path, layout, timeout) {
                Ok(snap) => return Ok(snap),
                Err(why) => {
                    last = ZkReadError::At {
                        addr,
                        why: redact_secrets(&why, &secrets),
                    }
                }
            }
        }
    }
    Err(last)
}

fn io_step(what: &str, e: io::Error) -> String {
    format!("{what}: {e}")
}

fn read_one(
    s: &mut Session,
    addr: SocketAddr,
    path: &str,
    layout: Layout,
    timeout: Duration,
) -> Result<Snapshot, String> {
    let start = Instant::now();
    let now = || start.elapsed().as_millis() as u64;
    let deadline = timeout.as_millis() as u64;
    s.watch(path, now()).map_err(|e| e.to_string())?;
    let mut sock = TcpStream::connect_timeout(&addr, timeout).map_err(|e| io_step("connect", e))?;
    sock.set_nodelay(true).map_err(|e| io_step("socket", e))?;
    sock.set_write_timeout(Some(timeout))
        .map_err(|e| io_step("socket", e))?;
    s.on_connected(now());
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let out = s.take_output();
        if !out.is_empty() {
            sock.write_all(&out).map_err(|e| io_step("send", e))?;
        }
        for ev in s.take_events() {
            match ev {
                Event::Listing { children, .. } => {
                    s.close(now());
                    let _ = sock.write_all(&s.take_output());
                    return Ok(Snapshot::of(listing(layout, &children), true));
                }
                Event::Error { err, .. } => return Err(err.to_string()),
                // expiry and refused credentials also come back as errors
                Event::Session(_) => {}
            }
        }
        if now() >= deadline {
            return Err("timed out".into());
        }
        let wait = s
            .next_deadline()
            .map_or(deadline, |d| d.min(deadline))
            .saturating_sub(now())
            .clamp(1, 1000);
        sock.set_read_timeout(Some(Duration::from_millis(wait)))
            .map_err(|e| io_step("socket", e))?;
        match sock.read(&mut buf) {
            Ok(0) => return Err("the server closed the connection".into()),
            Ok(n) => s.on_data(&buf[..n], now()).map_err(|e| e.to_string())?,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(io_step("read", e)),
        }
        if s.next_deadline().is_some_and(|d| d <= now()) {
            s.on_timer(now()).map_err(|e| e.to_string())?;
        }
    }
}
