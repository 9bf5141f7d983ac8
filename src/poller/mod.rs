//! One poller per upsync upstream per nginx instance, or per group of upstreams that
//! share a poll (`group`: Consul KV upstreams under one parent). Every worker runs a
//! cheap election tick (`lease`); the worker holding the lease keeps one connection to
//! the registry (`driver::Conn`) and runs the source's exchanges on nginx's event loop;
//! what a registry answers is published by `publish`. Decisions (pacing, failover,
//! backoff, de-duplication, the lease rule) are `upsync_core::policy`'s.

mod failure;
mod group;
mod lease;
mod publish;

pub use group::start_all;
pub use publish::Publisher;

use std::ffi::c_void;
use std::ptr;
use std::rc::Rc;

use ngx::ffi::*;
use ngx::ngx_log_debug_mask;

use crate::driver::{Conn, ConnEvent, ConnOwner, Recv, Side, TlsSetup};
use crate::ngx_util::cycle_log;
use crate::ngx_util::mono_ms;
use crate::process::{exiting, my_pid};
use crate::srv_conf::SrvConf;
use upsync_core::conf::Target;
use upsync_core::http::{build_request, ResponseParser};
use upsync_core::policy::{self, ErrorDedup, Failover, Pacer, Rng};
use upsync_core::registry::consul::{is_connection_limit_answer, turned_away_message};
use upsync_core::registry::{redact, source_for, RegistryError, Snapshot, Source};

/// One request and its response.
struct Exchange {
    out: Vec<u8>,
    sent: usize,
    parser: ResponseParser,
    started: u64,
    timeout_ms: u64,
    /// A watch the server never ends: reaching the timeout is normal.
    timeout_is_normal: bool,
    /// Bytes of the response received so far, and when the last of them came.
    received: usize,
    last_byte: u64,
    /// Sent on a kept-alive connection (which the registry may have closed meanwhile).
    reused: bool,
}

/// A long poll closed with no answer after at least this long is an idle cut (a
/// proxy, load balancer or NAT that drops quiet connections), not a failure.
const IDLE_CUT_MIN_MS: u64 = 1_000;

pub struct Poller {
    conf: *const SrvConf,
    /// Writes what the registry answered into the zone and the dump; its zone and
    /// fingerprint (the source it reads) are the poller's, for the lease too.
    publisher: Publisher,
    source: Box<dyn Source>,
    interval_ms: u64,
    tick_ms: u64,
    lease_ms: u64,
    tick: ngx_event_t,
    wake: ngx_event_t,
    /// What nginx's callbacks write to (the connection's log, the TLS session cache).
    side: Rc<Side>,
    conn: Option<Conn>,
    exchange: Option<Exchange>,
    /// The lease epoch this worker polls under (see `lease`); None: not the poller.
    epoch: Option<u64>,
    pacer: Pacer,
    failover: Failover,
    errors: ErrorDedup,
    /// The data error of the current spell of bad answers (logged once; its end is
    /// logged too).
    data_error: Option<String>,
    rng: Rng,
    /// The durations (ms) of the last idle cuts, and the cap they set on long polls.
    cuts: Vec<u64>,
    poll_cap: Option<u64>,
    /// The upstreams that share this poll besides the first (`group`); empty for a
    /// poller of one upstream.
    members: Vec<group::Member>,
    /// Until when (monotonic ms) a poller without the lease ticks faster (`lease`).
    fast_ticks_until: u64,
}

static mut POLLERS: Vec<*mut Poller> = Vec::new();

/// Starts the poller of one upstream in this worker.
///
/// # Safety
/// Called from `init_process` with a configuration of the running cycle (it outlives the
/// worker's pollers).
pub unsafe fn start(conf: &SrvConf) {
    let spec = conf.upsync.as_ref().expect("upsync configured");
    let source = source_for(spec, conf.credential.as_ref())
        .expect("an upsync_type with an HTTP source (ZooKeeper has its own owner)");
    let side = Side::new(conf.log_prefix());
    // SAFETY: per the contract.
    unsafe { start_with(conf, source, side, spec.interval_ms, Vec::new()) };
}

/// Starts a poller in this worker: for the upstream of `conf` alone (no `members`; its
/// lines go through `side`), or for a group led by it (`source` reads them all, `side`
/// names the group, the lead's own lines have their own side).
///
/// # Safety
/// As `start`, for `conf` and every member's configuration.
unsafe fn start_with(
    conf: &SrvConf,
    source: Box<dyn Source>,
    side: Rc<Side>,
    interval: u64,
    members: Vec<group::Member>,
) {
    let pid = my_pid() as u64;
    let publisher = if members.is_empty() {
        Publisher::new(conf, side.clone())
    } else {
        Publisher::new(conf, Side::new(conf.log_prefix()))
    };
    let p: *mut Poller = Box::into_raw(Box::new(Poller {
        conf,
        publisher,
        source,
        interval_ms: interval,
        tick_ms: policy::tick_ms(interval),
        lease_ms: policy::lease_ms(interval),
        // SAFETY: ngx_event_t is plain old data; all-zero is its initial value.
        tick: unsafe { std::mem::zeroed() },
        // SAFETY: as above.
        wake: unsafe { std::mem::zeroed() },
        side,
        conn: None,
        exchange: None,
        epoch: None,
        pacer: Pacer::default(),
        failover: Failover::new(conf.addrs.len()),
        errors: ErrorDedup::default(),
        data_error: None,
        rng: Rng::new(pid << 32 ^ mono_ms()),
        cuts: Vec::new(),
        poll_cap: None,
        members,
        fast_ticks_until: mono_ms() + lease::FAST_TICKS_FOR_MS,
    }));
    // SAFETY: `p` was just boxed and is never freed (pollers live until the process
    // exits); its timers are cancelable, so they never hold up an exit.
    unsafe {
        let me = &mut *p;
        crate::ngx_util::timer_events(
            p as *mut c_void,
            &mut [
                (
                    &mut me.tick,
                    lease::tick_handler as unsafe extern "C" fn(*mut ngx_event_t),
                ),
                (&mut me.wake, wake_handler),
            ],
        );
        // Spread the first election tick so workers do not all race at once.
        let first = me.rng.next_u64() % 50;
        ngx_add_timer(&mut me.tick, first as ngx_msec_t);
        (*ptr::addr_of_mut!(POLLERS)).push(p);
    }
}

/// Releases every lease this worker holds (worker exit).
pub fn stop_all() {
    // SAFETY: the worker is single-threaded; pollers live until the process exits.
    unsafe {
        for &p in (*ptr::addr_of!(POLLERS)).iter() {
            (*p).shutdown();
        }
    }
}

unsafe extern "C" fn wake_handler(ev: *mut ngx_event_t) {
    // SAFETY: the wake event's data is its poller (set in `start`).
    let p = unsafe { &mut *((*ev).data as *mut Poller) };
    if p.epoch.is_some() && p.exchange.is_none() && !exiting() {
        p.start_request();
    }
}

impl ConnOwner for Poller {
    fn conn_mut(&mut self) -> Option<&mut Conn> {
        self.conn.as_mut()
    }

    fn on_conn_event(&mut self, ev: ConnEvent) {
        if exiting() {
            // nginx closes idle connections when a graceful shutdown begins (see
            // `Conn::wake_on_shutdown`): the long poll goes now, not at the next tick
            return self.shutdown();
        }
        match ev {
            ConnEvent::Ready | ConnEvent::Writable => self.send(),
            ConnEvent::Readable => self.read(),
            ConnEvent::ReadTimeout => self.read_timed_out(),
            ConnEvent::Failed(e) => self.fail(e.to_string()),
        }
    }
}

impl Poller {
    /// The largest answer read: `policy::response_limit` of what the upstream may use
    /// (its `zone_size=`, else the shared zone); a group's poll may take the sum of its
    /// upstreams' limits, never more than the whole zone's.
    fn body_limit(&self) -> usize {
        let lead = self.publisher.zone.usage();
        self.members
            .iter()
            .map(|m| m.publisher.zone.usage().response_limit())
            .fold(lead.response_limit(), usize::saturating_add)
            .min(policy::response_limit(lead.shared_size))
    }

    fn conf(&self) -> &SrvConf {
        // SAFETY: the configuration outlives the worker's pollers.
        unsafe { &*self.conf }
    }

    fn log(&self, level: u32, msg: &str) {
        self.side.error_log(level, msg);
    }

    fn debug(&self, msg: &str) {
        ngx_log_debug_mask!(
            DebugMask::Stream,
            cycle_log(),
            "upsync: {}: {msg}",
            self.conf().name
        );
    }

    /// The registry address in use (the failover list rotates on failures).
    fn target(&self) -> Target {
        let addrs = &self.conf().addrs;
        addrs[self.failover.current() % addrs.len()]
    }

    fn schedule(&mut self, delay_ms: u64) {
        crate::ngx_util::arm_timer(&mut self.wake, delay_ms);
    }

    /// Drops the exchange in flight and the connection, so a later `start_request`
    /// begins afresh.
    fn abort_exchange(&mut self) {
        self.conn = None;
        self.exchange = None;
        crate::ngx_util::cancel_timer(&mut self.wake);
    }

    fn start_request(&mut self) {
        let now = mono_ms();
        if let Some(wait) = self.pacer.admit(now) {
            return self.schedule(wait);
        }
        self.source.set_now(now);
        self.source.start();
        let req = self.source.next_request();
        let authority = {
            let conf = self.conf();
            conf.upsync
                .as_ref()
                .expect("upsync configured")
                .endpoint
                .hosts[self.target().host]
                .authority()
        };
        // a watch the client ends itself ends before an idle cut would
        let timeout_ms = match self.poll_cap {
            Some(cap) if req.timeout_is_normal => req.timeout_ms.min(cap),
            _ => req.timeout_ms,
        };
        self.exchange = Some(Exchange {
            out: build_request(
                req.method,
                &req.path_and_query,
                &authority,
                &req.headers,
                &req.body,
            ),
            sent: 0,
            parser: ResponseParser::new(self.body_limit()),
            started: now,
            timeout_ms,
            timeout_is_normal: req.timeout_is_normal,
            received: 0,
            last_byte: now,
            reused: self.conn.is_some(),
        });
        self.debug(&format!(
            "{} {} to {}",
            req.method,
            req.path_and_query,
            self.target().addr
        ));
        if self.conn.is_some() {
            return self.send(); // the kept-alive connection
        }
        let conf = self.conf();
        let tls = conf
            .upsync
            .as_ref()
            .and_then(|u| u.tls.as_ref())
            .map(|t| TlsSetup {
                ctx: conf.ssl,
                name: conf.tls_name(&self.target()),
                verify: t.verify,
            });
        let addr = self.target().addr;
        let timeout = req.timeout_ms.clamp(1_000, 5_000);
        // SAFETY: pollers are boxed and never freed, and keep their connection in
        // `self.conn` until they drop it.
        match unsafe { Conn::connect(self as *mut Poller, addr, tls, &self.side, timeout) } {
            Ok((mut conn, ready)) => {
                conn.wake_on_shutdown();
                self.conn = Some(conn);
                if ready {
                    self.send();
                }
            }
            Err(e) => self.fail(e.to_string()),
        }
    }

    fn send(&mut self) {
        let (Some(conn), Some(x)) = (self.conn.as_mut(), self.exchange.as_mut()) else {
            return;
        };
        if x.sent >= x.out.len() {
            return; // everything is out: the response is awaited on the read side
        }
        match conn.send(&mut x.out, &mut x.sent) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => return self.fail_io(e.to_string()),
        }
        conn.start_read_deadline(x.timeout_ms);
        if let Err(e) = conn.wait_readable() {
            return self.fail(e.to_string());
        }
        if conn.read_ready() {
            self.read();
        }
    }

    fn read_timed_out(&mut self) {
        let Some(x) = self.exchange.as_ref() else {
            return;
        };
        if x.timeout_is_normal {
            // A quiet watch reached upsync_timeout: start it again.
            self.abort_exchange();
            return self.schedule(0);
        }
        let ms = x.timeout_ms;
        self.fail(format!(
            "no complete response within {ms}ms (upsync_timeout)"
        ));
    }

    fn read(&mut self) {
        if self.exchange.is_none() {
            // An idle kept-alive connection became readable: the registry closed it (or
            // sent something unasked). Either way it cannot be reused.
            self.conn = None;
            return;
        }
        let mut buf = [0u8; 16 * 1024];
        loop {
            let (Some(conn), Some(x)) = (self.conn.as_mut(), self.exchange.as_mut()) else {
                return;
            };
            match conn.recv(&mut buf) {
                Recv::Data(n) => {
                    x.received += n;
                    x.last_byte = mono_ms();
                    match x.parser.feed(&buf[..n]) {
                        Ok(true) => return self.complete(),
                        Ok(false) => {
                            // A streaming response (etcd v3 watch) may be done before it
                            // ends.
                            if let Some(head) = x.parser.head() {
                                if self.source.on_partial(head, x.parser.body()) {
                                    return self.complete();
                                }
                            }
                            // A watch that stays open (Kubernetes) may carry a new set now.
                            let streamed = self.source.take_streamed();
                            if let Some(note) = self.source.take_note() {
                                self.log(NGX_LOG_NOTICE, &redact(&note, self.source.as_ref()));
                            }
                            if let Some(snap) = streamed {
                                self.apply(snap, std::time::Instant::now());
                            }
                        }
                        Err(e) => return self.fail(format!("bad response: {e}")),
                    }
                }
                // no answer yet, or a watch stream that went quiet
                Recv::Closed if x.received == 0 || x.timeout_is_normal => {
                    return self.closed_unanswered()
                }
                Recv::Closed => {
                    return match x.parser.eof() {
                        Ok(()) => self.complete(),
                        Err(_) if self.refused_by_limit() => {
                            self.fail(turned_away_message(self.target().addr))
                        }
                        Err(e) => self.fail(format!("bad response: {e}")),
                    }
                }
                Recv::Again => return,
                Recv::Failed(e) => return self.fail_io(e.to_string()),
            }
        }
    }

    fn complete(&mut self) {
        let answered = std::time::Instant::now();
        let Some(x) = self.exchange.take() else {
            return;
        };
        if let Some(conn) = self.conn.as_mut() {
            conn.clear_read_deadline();
        }
        if !x.parser.keep_alive() {
            self.conn = None;
        }
        let head = x.parser.head().expect("complete response has a head");
        let position = self.source.position();
        let result = self.source.handle(head, x.parser.body());
        if let Some(note) = self.source.take_note() {
            self.log(NGX_LOG_NOTICE, &redact(&note, self.source.as_ref()));
        }
        let progress = match &result {
            Ok(None) => true, // a watch fired
            Ok(Some(snap)) => snap.advanced,
            Err(_) => false,
        };
        self.pacer.answered(x.started, mono_ms(), progress);
        match result {
            // A watch fired: read again at once.
            Ok(None) => self.schedule(0),
            Ok(Some(snap)) => {
                let advanced = snap.advanced;
                self.apply(snap, answered);
                let elapsed = mono_ms().saturating_sub(x.started);
                // A change, or a long poll that ran its course: ask again at once. No
                // change and a quick answer (a registry that does not block): wait out
                // the interval.
                let delay = if advanced || elapsed >= IDLE_CUT_MIN_MS {
                    0
                } else {
                    self.interval_ms.saturating_sub(elapsed)
                };
                self.schedule(delay);
            }
            Err(RegistryError::AclFiltered) if !self.members.is_empty() => self.dissolve(),
            Err(e) if e.is_data_error() => self.data_failed(e, position),
            Err(e) => {
                self.conn = None;
                let limit = matches!(&e, RegistryError::Status { code, body }
                    if self.is_consul() && is_connection_limit_answer(*code, body));
                self.fail(if limit {
                    turned_away_message(self.target().addr)
                } else {
                    e.to_string()
                });
            }
        }
    }

    /// A good answer (its last byte arrived at `answered`): the end of an outage or of a
    /// spell of bad data is logged, then the snapshot is published.
    fn apply(&mut self, snap: Snapshot, answered: std::time::Instant) {
        let failures = self.failover.succeeded();
        if failures > 0 {
            let at = if self.failover.is_list() {
                format!(" (at {})", self.target().addr)
            } else {
                String::new()
            };
            self.log(
                NGX_LOG_NOTICE,
                &format!(
                    "registry answers again after {failures} failed attempt{}{at}",
                    if failures == 1 { "" } else { "s" }
                ),
            );
        }
        self.errors.clear();
        if let Some(e) = self.data_error.take() {
            self.log(
                NGX_LOG_NOTICE,
                &format!("the registry's answer is valid again (was: {e})"),
            );
        }
        let position = self.source.position();
        let in_use = self.target().addr.to_string();
        self.publisher
            .publish(self.epoch, snap, position, &in_use, answered);
        self.publish_parts(position, &in_use, answered);
    }
}
