//! The session's connection to an ensemble member: connecting (the member in use, then
//! the next on failure, `policy::Failover`), feeding what arrives to the session and
//! writing what it has to send, its deadlines on a cancelable nginx timer, and what a
//! failure does (the session is kept for the next member, unless it expired).

use ngx::ffi::*;

use super::ZkOwner;
use crate::driver::{Conn, ConnError, ConnEvent, ConnOwner, Recv};
use crate::ngx_util::{arm_timer, cancel_timer, mono_ms};
use upsync_core::policy::Retry;
use upsync_core::registry::zookeeper::ZkError;

/// A connection that carried the session at least this long counts as working: its
/// end starts a new round of failover (so members that take a session and then fail
/// at once cannot make the owner reconnect without pause).
const HEALTHY_MS: u64 = 1_000;

/// Why the connection ended.
pub(super) enum Failure {
    Conn(ConnError),
    Zk(ZkError),
    Closed,
}

impl Failure {
    fn text(&self, addr: std::net::SocketAddr) -> String {
        match self {
            Failure::Conn(e) => e.to_string(),
            Failure::Zk(e) => format!("{e} (at {addr})"),
            Failure::Closed => format!("{addr} closed the connection"),
        }
    }

    /// What makes two failures the same for the log (timings left out, so a server
    /// that hangs is reported once, not once per attempt).
    fn key(&self, addr: std::net::SocketAddr) -> String {
        match self {
            Failure::Zk(ZkError::ReadTimeout { .. }) => format!("read timeout {addr}"),
            Failure::Zk(ZkError::HandshakeTimeout { .. }) => format!("handshake timeout {addr}"),
            other => other.text(addr),
        }
    }
}

pub(super) unsafe extern "C" fn timer_handler(ev: *mut ngx_event_t) {
    // SAFETY: the timer event's data is its owner (set in `start`).
    let o = unsafe { &mut *((*ev).data as *mut ZkOwner) };
    o.on_timer();
}

pub(super) unsafe extern "C" fn retry_handler(ev: *mut ngx_event_t) {
    // SAFETY: the retry event's data is its owner (set in `start`).
    let o = unsafe { &mut *((*ev).data as *mut ZkOwner) };
    if o.conn.is_none() && o.session.is_some() && o.holds_lead() {
        o.connect();
    }
}

impl ConnOwner for ZkOwner {
    fn conn_mut(&mut self) -> Option<&mut Conn> {
        self.conn.as_mut()
    }

    fn on_conn_event(&mut self, ev: ConnEvent) {
        match ev {
            ConnEvent::Ready => self.on_ready(),
            ConnEvent::Writable => self.flush(),
            ConnEvent::Readable => self.on_readable(),
            ConnEvent::ReadTimeout => {} // the session keeps the time itself
            ConnEvent::Failed(e) => self.fail(Failure::Conn(e)),
        }
    }
}

impl ZkOwner {
    /// Connects to the member in use.
    pub(super) fn connect(&mut self) {
        if self.session.is_none() || self.conn.is_some() {
            return;
        }
        let addr = self.addr();
        self.debug(&format!("connecting to {addr}"));
        let timeout = (self.cfg.session_timeout_ms as u64 / 3).clamp(1_000, 5_000);
        // SAFETY: owners are boxed and never freed, and keep their connection in
        // `self.conn` until they drop it.
        match unsafe { Conn::connect(self as *mut ZkOwner, addr, None, &self.side, timeout) } {
            Ok((conn, ready)) => {
                self.conn = Some(conn);
                self.ready = false;
                if ready {
                    self.on_ready();
                }
            }
            Err(e) => self.fail(Failure::Conn(e)),
        }
    }

    /// TCP is up: the session's handshake goes out.
    fn on_ready(&mut self) {
        self.ready = true;
        self.established_at = 0;
        let Some(s) = self.session.as_mut() else {
            return;
        };
        s.on_connected(mono_ms());
        self.flush();
        if let Some(conn) = self.conn.as_mut() {
            if let Err(e) = conn.wait_readable() {
                return self.fail(Failure::Conn(e));
            }
        }
        self.arm_timer();
    }

    /// Writes what the session has to send (what the socket does not take now waits
    /// for the write event).
    pub(super) fn flush(&mut self) {
        if !self.ready {
            return;
        }
        if let Some(s) = self.session.as_mut() {
            let more = s.take_output();
            if self.out.is_empty() {
                self.out = more;
                self.sent = 0;
            } else {
                self.out.extend_from_slice(&more);
            }
        }
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if self.sent >= self.out.len() {
            return;
        }
        match conn.send(&mut self.out, &mut self.sent) {
            Ok(true) => {
                self.out.clear();
                self.sent = 0;
            }
            Ok(false) => {}
            Err(e) => self.fail(Failure::Conn(e)),
        }
    }

    fn on_readable(&mut self) {
        if !self.ready {
            return;
        }
        let mut buf = [0u8; 32 * 1024];
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return;
            };
            match conn.recv(&mut buf) {
                Recv::Data(n) => {
                    let Some(s) = self.session.as_mut() else {
                        return;
                    };
                    let result = s.on_data(&buf[..n], mono_ms());
                    self.handle_events();
                    if let Err(e) = result {
                        return self.fail(Failure::Zk(e));
                    }
                }
                Recv::Closed => return self.fail(Failure::Closed),
                Recv::Again => break,
                Recv::Failed(e) => return self.fail(Failure::Conn(e)),
            }
        }
        self.flush();
        self.arm_timer();
    }

    fn on_timer(&mut self) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        let result = s.on_timer(mono_ms());
        self.handle_events();
        match result {
            Err(e) => self.fail(Failure::Zk(e)),
            Ok(()) => {
                self.flush();
                self.arm_timer();
            }
        }
    }

    /// Arms the timer for the session's next deadline.
    pub(super) fn arm_timer(&mut self) {
        match self.session.as_ref().and_then(|s| s.next_deadline()) {
            Some(at) => arm_timer(&mut self.timer, at.saturating_sub(mono_ms())),
            None => cancel_timer(&mut self.timer),
        }
    }

    /// The connection ended: the session learns it (and keeps its state for the next
    /// member), the failure is logged once per outage and recorded in every upstream's
    /// status, and the next member is tried at once, or after a pause once every member
    /// failed in this round.
    pub(super) fn fail(&mut self, why: Failure) {
        let now = mono_ms();
        let addr = self.addr();
        let healthy =
            self.established_at > 0 && now.saturating_sub(self.established_at) >= HEALTHY_MS;
        self.conn = None;
        self.ready = false;
        self.established_at = 0;
        self.out.clear();
        self.sent = 0;
        if let Some(s) = self.session.as_mut() {
            s.on_disconnected(now);
        }
        self.handle_events();
        if healthy {
            // the outage before this connection is over: a new one starts now
            self.failover.succeeded();
            self.errors.clear();
        }
        let msg = why.text(addr);
        match &why {
            // The server refused to resume an expired session (its own line came with
            // the event): the member works, a new session starts at once.
            Failure::Zk(ZkError::SessionExpired { .. }) => {
                arm_timer(&mut self.retry, 0);
                return self.arm_timer();
            }
            // A server without addWatch closes the connection once; the session goes
            // on with one-shot watches at once.
            Failure::Zk(e @ ZkError::AddWatchUnsupported { .. }) => {
                self.log(NGX_LOG_NOTICE, &e.to_string());
                arm_timer(&mut self.retry, 0);
                return self.arm_timer();
            }
            _ => {}
        }
        // No member answered within the session timeout: the expiry has its own line.
        let quiet = matches!(why, Failure::Zk(ZkError::SessionLost { .. }));
        let jitter = self.rng.fraction();
        let (delay, what) = match self.failover.failed(self.interval_ms, jitter) {
            Retry::Next => (0, format!("trying the next member {} now", self.addr())),
            Retry::Backoff(d) => {
                // a pause longer than the session would lose it for nothing
                let d = d.min(self.cfg.session_timeout_ms as u64 / 3).max(50);
                if self.failover.is_list() {
                    (
                        d,
                        format!("every member failed; retrying {} in {d}ms", self.addr()),
                    )
                } else {
                    (d, format!("retrying in {d}ms"))
                }
            }
        };
        self.debug(&format!("failed: {msg}; next try in {delay}ms"));
        if !quiet && self.errors.first_time(&why.key(addr)) {
            self.log(
                NGX_LOG_ERR,
                &format!("{msg}; keeping the current servers, {what} (further identical errors are not logged)"),
            );
        }
        let failures = self.failover.failures() as u64;
        for m in &self.members {
            m.publisher.record_error(m.epoch, &msg, Some(failures));
        }
        arm_timer(&mut self.retry, delay);
        self.arm_timer();
    }
}
