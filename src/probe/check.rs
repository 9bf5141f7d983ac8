//! One probe of one server: connect (TCP, or a connected UDP socket), send the match's
//! `send` (or, for a plain UDP check, NGINX Plus's datagram), read until the `expect`
//! rule decides, all within `health_check_timeout` (one cancelable timer). The outcome
//! goes to the prober, which drops the probe (closing its connection).

use std::ffi::c_void;
use std::net::SocketAddr;

use ngx::ffi::*;

use super::conn::{Connect, ProbeConn, ProbeOwner, QuietLog, Recv};
use super::Prober;
use crate::ngx_util::cycle_log;
use upsync_core::health::{
    MatchRule, ProbeFailure, RegexMatch, Verdict, PLAIN_UDP_PAYLOAD, RESPONSE_LIMIT,
};

/// How a probe ended.
#[derive(Debug)]
pub enum Outcome {
    Pass,
    Fail(ProbeFailure),
    /// This worker could not make the probe (out of connections or descriptors; nginx
    /// has said why): the server is not judged, the probe is tried again next interval.
    Local,
}

/// What a probe needs from its prober's configuration (borrowed for the probe's life:
/// the configuration outlives every probe).
pub struct CheckSpec {
    pub udp: bool,
    pub timeout_ms: u64,
    pub rule: Option<*const MatchRule>,
    pub regex: *const dyn RegexMatch,
    pub log: *const QuietLog,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Connecting,
    Sending,
    Reading,
}

pub struct Probe {
    pub prober: *mut Prober,
    /// The server (the key of its record), and the address probed (`port=`).
    pub addr: SocketAddr,
    target: SocketAddr,
    pub started_ms: u64,
    spec: CheckSpec,
    stage: Stage,
    conn: Option<ProbeConn>,
    out: Vec<u8>,
    sent: usize,
    got: Vec<u8>,
    timer: ngx_event_t,
}

impl Drop for Probe {
    fn drop(&mut self) {
        crate::ngx_util::cancel_timer(&mut self.timer);
    }
}

/// A send or receive failure with the errno's text.
fn errno_failure(errno: i32, make: fn(String) -> ProbeFailure) -> ProbeFailure {
    make(if errno == 0 {
        "unknown error".to_string()
    } else {
        std::io::Error::from_raw_os_error(errno).to_string()
    })
}

/// The failure a connect errno means.
fn connect_failure(errno: i32) -> ProbeFailure {
    match errno {
        libc::ECONNREFUSED => ProbeFailure::Refused,
        libc::ETIMEDOUT => ProbeFailure::ConnectTimeout,
        0 => ProbeFailure::Connect("unknown error".into()),
        e => ProbeFailure::Connect(std::io::Error::from_raw_os_error(e).to_string()),
    }
}

impl Probe {
    pub fn new(
        prober: *mut Prober,
        addr: SocketAddr,
        target: SocketAddr,
        spec: CheckSpec,
        now_ms: u64,
    ) -> Box<Probe> {
        Box::new(Probe {
            prober,
            addr,
            target,
            started_ms: now_ms,
            spec,
            stage: Stage::Connecting,
            conn: None,
            out: Vec::new(),
            sent: 0,
            got: Vec::new(),
            // SAFETY: ngx_event_t is plain old data; all-zero is its initial value.
            timer: unsafe { std::mem::zeroed() },
        })
    }

    fn rule(&self) -> Option<&MatchRule> {
        // SAFETY: the rule lives in the configuration, which outlives the probe.
        self.spec.rule.map(|r| unsafe { &*r })
    }

    /// Starts the probe. Some(outcome) when it ended at once (the caller drops it).
    ///
    /// # Safety
    /// `this` is a boxed probe that stays at its address until its prober drops it.
    pub unsafe fn start(this: *mut Probe) -> Option<Outcome> {
        // SAFETY: per the contract; this is the only reference to the probe now.
        let p = unsafe { &mut *this };
        p.timer.data = this as *mut c_void;
        p.timer.handler = Some(timeout_handler);
        p.timer.log = cycle_log();
        p.timer.set_cancelable(1);
        // SAFETY: the probe owns its timer; nginx's timer tree is this worker's.
        unsafe { ngx_add_timer(&mut p.timer, p.spec.timeout_ms as ngx_msec_t) };
        // SAFETY: the probe stays boxed and keeps the connection in `conn`.
        match unsafe { ProbeConn::connect(this, p.target, p.spec.udp, &*p.spec.log) } {
            Connect::Failed(errno) => Some(Outcome::Fail(connect_failure(errno))),
            Connect::Local => Some(Outcome::Local),
            Connect::Pending(c) => {
                p.conn = Some(c);
                None
            }
            Connect::Done(c) => {
                p.conn = Some(c);
                p.connected()
            }
        }
    }

    /// Connected: send what there is to send.
    fn connected(&mut self) -> Option<Outcome> {
        let payload: Vec<u8> = match self.rule() {
            Some(r) if !r.send.is_empty() => r.send.clone(),
            _ if self.spec.udp => PLAIN_UDP_PAYLOAD.to_vec(),
            _ => Vec::new(),
        };
        if payload.is_empty() && !self.rule().is_some_and(MatchRule::expects) {
            return Some(Outcome::Pass); // a plain TCP check: connecting was the test
        }
        self.out = payload;
        self.stage = Stage::Sending;
        self.send()
    }

    fn send(&mut self) -> Option<Outcome> {
        let expects = self.rule().is_some_and(MatchRule::expects);
        let conn = self.conn.as_mut()?;
        if self.sent < self.out.len() {
            match conn.send(&mut self.out, &mut self.sent) {
                Ok(true) => {}
                Ok(false) => return None,
                Err(e) if self.spec.udp && e == libc::ECONNREFUSED => {
                    return Some(Outcome::Fail(ProbeFailure::Unreachable))
                }
                Err(e) => return Some(Outcome::Fail(errno_failure(e, ProbeFailure::Send))),
            }
        }
        if !self.spec.udp && !expects {
            return Some(Outcome::Pass); // sent, nothing to expect
        }
        // read the answer (or, for a plain UDP check, wait for an ICMP error until
        // the timeout)
        self.stage = Stage::Reading;
        conn.wait_readable();
        if conn.read_ready() {
            return self.read();
        }
        None
    }

    fn read(&mut self) -> Option<Outcome> {
        let mut buf = [0u8; 4096];
        loop {
            let conn = self.conn.as_mut()?;
            let log = self.spec.log;
            // SAFETY: the prober's log outlives its probes.
            let got = match conn.recv(&mut buf, unsafe { &*log }) {
                // an empty datagram is an answer, not the end
                Recv::Closed if self.spec.udp => Recv::Data(0),
                other => other,
            };
            match got {
                Recv::Data(n) => {
                    if self.spec.udp {
                        self.got.clear(); // each datagram is judged on its own
                    }
                    let room = RESPONSE_LIMIT.saturating_sub(self.got.len());
                    self.got.extend_from_slice(&buf[..n.min(room)]);
                    let Some(rule) = self.rule().filter(|r| r.expects()) else {
                        return Some(Outcome::Pass); // a plain UDP check got an answer
                    };
                    // SAFETY: the regex lives in the configuration.
                    let re = unsafe { &*self.spec.regex };
                    match rule.judge(&self.got, self.spec.udp, Some(re)) {
                        Verdict::Pass => return Some(Outcome::Pass),
                        Verdict::Fail(f) => return Some(Outcome::Fail(f)),
                        Verdict::More => {}
                    }
                }
                Recv::Closed => {
                    let rule = self.rule()?;
                    // SAFETY: as above.
                    let re = unsafe { &*self.spec.regex };
                    return Some(match rule.judge(&self.got, true, Some(re)) {
                        Verdict::Pass => Outcome::Pass,
                        Verdict::Fail(f) => Outcome::Fail(f),
                        Verdict::More => Outcome::Fail(ProbeFailure::Closed),
                    });
                }
                Recv::Again => return None,
                Recv::Failed(e) if self.spec.udp && e == libc::ECONNREFUSED => {
                    return Some(Outcome::Fail(ProbeFailure::Unreachable))
                }
                Recv::Failed(e) => {
                    return Some(Outcome::Fail(errno_failure(e, ProbeFailure::Recv)))
                }
            }
        }
    }

    /// An event of the connection.
    fn on_event(&mut self, write: bool) -> Option<Outcome> {
        match self.stage {
            Stage::Connecting => {
                let err = self.conn.as_ref()?.so_error();
                if err != 0 {
                    return Some(Outcome::Fail(connect_failure(err)));
                }
                self.connected()
            }
            Stage::Sending if write => self.send(),
            Stage::Sending => None,
            Stage::Reading if write => None,
            Stage::Reading => self.read(),
        }
    }

    /// `health_check_timeout` passed.
    fn timed_out(&mut self) -> Outcome {
        let expects = self.rule().is_some_and(MatchRule::expects);
        Outcome::Fail(match self.stage {
            Stage::Connecting => ProbeFailure::ConnectTimeout,
            // a plain UDP check: no ICMP error came back
            Stage::Reading if self.spec.udp && !expects => return Outcome::Pass,
            Stage::Reading if !self.got.is_empty() => ProbeFailure::MismatchTimeout(
                self.rule().map(|r| r.name.clone()).unwrap_or_default(),
                self.spec.timeout_ms,
            ),
            _ => ProbeFailure::Timeout(self.spec.timeout_ms),
        })
    }

    /// The probe ended: tells the prober (which drops it).
    ///
    /// # Safety
    /// `this` is a live probe; it must not be used after this call.
    unsafe fn end(this: *mut Probe, outcome: Outcome) {
        // SAFETY: per the contract; the fields are read before the prober drops it.
        unsafe {
            let (prober, addr) = ((*this).prober, (*this).addr);
            Prober::probe_done(prober, addr, outcome);
        }
    }
}

impl ProbeOwner for Probe {
    unsafe fn on_conn_event(this: *mut Probe, write: bool) {
        // SAFETY: per the trait's contract; the borrow ends before `end`.
        let done = unsafe { (*this).on_event(write) };
        if let Some(outcome) = done {
            // SAFETY: `this` is live and not used after.
            unsafe { Probe::end(this, outcome) };
        }
    }
}

unsafe extern "C" fn timeout_handler(ev: *mut ngx_event_t) {
    // SAFETY: the timer's data is its probe (set in `start`), alive while the timer is
    // armed (the probe's drop deletes it).
    unsafe {
        let this = (*ev).data as *mut Probe;
        let outcome = (*this).timed_out();
        Probe::end(this, outcome);
    }
}
