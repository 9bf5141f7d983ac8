//! One poller per upsync upstream per nginx instance. Every worker runs a cheap election
//! tick; the worker holding the lease in the shared zone keeps one connection to the
//! registry and long-polls it on nginx's event loop. A worker that exits releases the
//! lease; a worker that dies loses it when its pid is gone or the lease runs out, and
//! another worker takes over on its next tick.

use std::cell::{Cell, UnsafeCell};
use std::ffi::c_void;
use std::mem::{size_of, zeroed};
use std::ptr;
use std::rc::Rc;

use ngx::ffi::*;
use ngx::ngx_log_error;

use upsync_core::conf::Target;
use upsync_core::dump;
use crate::module::SrvConf;
use crate::net::conn::{send_pending, Sent};
use upsync_core::http::{build_request, ResponseParser};
use crate::net::tls;
use upsync_core::registry::{redact, retry_delay_ms, source_for, Snapshot, Source};
use upsync_core::servers::Diff;
use crate::zone::{mono_ms, sockaddr_of, Zone};

/// Largest registry response accepted (a 10,000-server KV listing is about 2 MB).
const BODY_LIMIT: usize = 8 * 1024 * 1024;
/// Hot-loop guard: requests are spaced by `MIN_GAP_MS` once the registry has answered
/// `FAST_STREAK` requests in a row within `MIN_GAP_MS` without any progress (a server
/// that does not block), or once more than `MAX_PER_SECOND` requests went out in the
/// current second. Quick answers that carry changes are followed at full speed.
const MIN_GAP_MS: u64 = 20;
const FAST_STREAK: u32 = 3;
const MAX_PER_SECOND: u32 = 100;

/// The part of a poller that nginx calls back into while a poller method is running:
/// the connection's log writer and OpenSSL's new-session callback. It is shared (`Rc`)
/// and mutated only through cells, so those callbacks never make a second
/// `&mut Poller`.
struct Side {
    prefix: String,
    /// The connection logs into this copy of the cycle log, whose writer keeps the last
    /// message (`captured`) for a failure line to quote (the OpenSSL reason of a failed
    /// handshake) and writes only alerts and worse itself: the poller logs each state
    /// change once.
    log: UnsafeCell<ngx_log_t>,
    captured: Cell<String>,
    /// TLS session of the registry address in use, to resume on reconnects.
    tls_session: Cell<*mut c_void>,
}

impl Side {
    /// Writes `msg` to the error log, prefixed with the upstream.
    fn error_log(&self, level: u32, msg: &str) {
        // SAFETY: the cycle log is valid for the life of the process.
        unsafe {
            ngx_log_error!(level, cycle_log(), "{}: {}", self.prefix, msg);
        }
    }

    fn log(&self) -> *mut ngx_log_t {
        self.log.get()
    }

    fn take_captured(&self) -> String {
        self.captured.take()
    }

    /// # Safety
    /// `s` is null or a session from `tls::get_session` that nothing else owns.
    unsafe fn replace_session(&self, s: *mut c_void) {
        tls::free_session(self.tls_session.replace(s));
    }
}

pub struct Poller {
    conf: *const SrvConf,
    zone: Zone,
    source: Box<dyn Source>,
    interval_ms: u64,
    tick_ms: u64,
    lease_ms: u64,
    tick: ngx_event_t,
    wake: ngx_event_t,
    /// What nginx's callbacks write to (the connection's log, the TLS session cache).
    side: Rc<Side>,
    pc: ngx_peer_connection_t,
    sockaddr: libc::sockaddr_storage,
    peer_name: ngx_str_t,
    peer_name_buf: Vec<u8>,
    addr_index: usize,
    out: Vec<u8>,
    sent: usize,
    parser: Option<ResponseParser>,
    connecting: bool,
    in_flight: bool,
    request_started: u64,
    last_request: u64,
    /// Consecutive exchanges that completed in under MIN_GAP_MS with no progress.
    fast_streak: u32,
    window_start: u64,
    window_count: u32,
    request_timeout: u64,
    /// The request in flight is a watch the server never ends: its timeout is normal.
    timeout_is_normal: bool,
    owner: bool,
    failures: u32,
    /// The distinct errors of the current outage, each logged once (bounded).
    logged_errors: Vec<String>,
    empty_warned: bool,
    rng: u64,
}

static mut POLLERS: Vec<*mut Poller> = Vec::new();

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn exiting() -> bool {
    // SAFETY: process-global flags set by nginx's signal handling on this thread.
    unsafe { ngx_exiting != 0 || ngx_quit != 0 || ngx_terminate != 0 }
}

fn pid_alive(pid: i64) -> bool {
    // SAFETY: kill with signal 0 only checks for existence.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 || *libc::__errno_location() == libc::EPERM }
}

unsafe fn cycle_log() -> *mut ngx_log_t {
    (*ngx_cycle).log
}

/// Starts the poller of one upstream in this worker.
///
/// # Safety
/// Called from `init_process` with the running cycle and a configuration that outlives it.
pub unsafe fn start(_cycle: *mut ngx_cycle_t, conf: &SrvConf) {
    let spec = conf.upsync.as_ref().expect("upsync configured");
    let zone = conf.zone.expect("zone initialized");
    let interval = spec.interval_ms;
    let tick_ms = (interval / 2).clamp(100, 2000);
    let p: *mut Poller = Box::into_raw(Box::new(Poller {
        conf,
        zone,
        source: source_for(spec, conf.credential.as_ref()),
        interval_ms: interval,
        tick_ms,
        // A dead poller is replaced at the next tick (its pid is gone); the lease only
        // matters for a live worker that stopped ticking (hung, or starved of CPU), so
        // it is long enough not to flip between busy workers.
        lease_ms: (interval * 3).clamp(3_000, 30_000),
        tick: zeroed(),
        wake: zeroed(),
        side: Rc::new(Side {
            prefix: conf.log_prefix(),
            log: UnsafeCell::new(*cycle_log()),
            captured: Cell::new(String::new()),
            tls_session: Cell::new(ptr::null_mut()),
        }),
        pc: zeroed(),
        sockaddr: zeroed(),
        peer_name: ngx_str_t::empty(),
        peer_name_buf: Vec::new(),
        addr_index: 0,
        out: Vec::new(),
        sent: 0,
        parser: None,
        connecting: false,
        in_flight: false,
        request_started: 0,
        last_request: 0,
        fast_streak: 0,
        window_start: 0,
        window_count: 0,
        request_timeout: 0,
        timeout_is_normal: false,
        owner: false,
        failures: 0,
        logged_errors: Vec::new(),
        empty_warned: false,
        rng: (ngx_pid as u64) << 32 ^ mono_ms() ^ 0x9e37_79b9_7f4a_7c15,
    }));
    let me = &mut *p;
    let log = &mut *me.side.log();
    log.log_level = NGX_LOG_INFO as ngx_uint_t;
    log.writer = Some(capture_log);
    log.wdata = Rc::as_ptr(&me.side) as *mut c_void;
    log.next = ptr::null_mut();
    for (ev, handler) in [
        (
            &mut me.tick,
            tick_handler as unsafe extern "C" fn(*mut ngx_event_t),
        ),
        (&mut me.wake, wake_handler),
    ] {
        ev.data = p as *mut c_void;
        ev.handler = Some(handler);
        ev.log = cycle_log();
        ev.set_cancelable(1);
    }
    // Spread the first election tick so workers do not all race at once.
    let first = me.random() % 50;
    ngx_add_timer(&mut me.tick, first as ngx_msec_t);
    (*ptr::addr_of_mut!(POLLERS)).push(p);
}

/// Releases every lease this worker holds (worker exit).
pub fn stop_all() {
    // SAFETY: single-threaded worker; pollers live until process exit.
    unsafe {
        for &p in (*ptr::addr_of!(POLLERS)).iter() {
            (*p).shutdown();
        }
    }
}

unsafe extern "C" fn tick_handler(ev: *mut ngx_event_t) {
    (*((*ev).data as *mut Poller)).on_tick();
}

unsafe extern "C" fn wake_handler(ev: *mut ngx_event_t) {
    let p = &mut *((*ev).data as *mut Poller);
    if p.owner && !p.in_flight && !exiting() {
        p.start_request();
    }
}

unsafe extern "C" fn conn_read_handler(ev: *mut ngx_event_t) {
    let c = (*ev).data as *mut ngx_connection_t;
    (*((*c).data as *mut Poller)).on_read(ev);
}

unsafe extern "C" fn conn_write_handler(ev: *mut ngx_event_t) {
    let c = (*ev).data as *mut ngx_connection_t;
    (*((*c).data as *mut Poller)).on_write(ev);
}

/// The quiet log's writer: keeps the message part of the last line (after the time,
/// level, pid and connection number); alerts and worse (nginx's own failures, such as
/// an epoll_ctl() error) also go to the error log at once.
unsafe extern "C" fn capture_log(log: *mut ngx_log_t, level: ngx_uint_t, buf: *mut u8, len: usize) {
    let side = &*((*log).wdata as *const Side);
    let line = String::from_utf8_lossy(std::slice::from_raw_parts(buf, len));
    let msg = line
        .find('#')
        .and_then(|i| line[i..].find(": ").map(|j| &line[i + j + 2..]))
        .unwrap_or(&line);
    let msg = match msg.strip_prefix('*') {
        Some(rest) => rest.split_once(' ').map_or(rest, |(_, m)| m),
        None => msg,
    };
    let msg = upsync_core::servers::printable(msg.trim_end(), 300);
    if level <= NGX_LOG_ALERT as ngx_uint_t {
        side.error_log(level as u32, &format!("registry connection: {msg}"));
    }
    side.captured.set(msg);
}

unsafe extern "C" fn tls_handshake_done(c: *mut ngx_connection_t) {
    (*((*c).data as *mut Poller)).on_handshake(c);
}

/// OpenSSL made a session the next connection can resume (TLS 1.3 sends it after the
/// handshake): keep the newest.
unsafe extern "C" fn tls_save_session(c: *mut ngx_connection_t) {
    // The connection logs into the side's log, whose wdata is the side.
    let side = &*((*(*c).log).wdata as *const Side);
    let s = tls::get_session(c);
    if !s.is_null() {
        side.replace_session(s);
    }
}

/// `pc.get` for our own connection: the address is already set.
unsafe extern "C" fn registry_peer_get(
    _pc: *mut ngx_peer_connection_t,
    _data: *mut c_void,
) -> ngx_int_t {
    NGX_OK as ngx_int_t
}

impl Poller {
    fn conf(&self) -> &SrvConf {
        // SAFETY: the configuration outlives the worker's pollers.
        unsafe { &*self.conf }
    }

    fn random(&mut self) -> u64 {
        // xorshift64*: enough to spread timers; not for anything secret.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn log(&self, level: u32, msg: &str) {
        self.side.error_log(level, msg);
    }

    unsafe fn on_tick(&mut self) {
        if exiting() {
            self.shutdown();
            return;
        }
        let now = mono_ms();
        let me = ngx_pid as i64;
        let owner_now = {
            let l = self.zone.lock();
            let h = &mut *l.hdr;
            if h.poller_pid == me {
                h.lease_until_ms = now + self.lease_ms;
                true
            } else if h.poller_pid == 0 || h.lease_until_ms < now || !pid_alive(h.poller_pid) {
                h.poller_pid = me;
                h.lease_until_ms = now + self.lease_ms;
                true
            } else {
                false
            }
        };
        if owner_now && !self.owner {
            self.owner = true;
            self.log(
                NGX_LOG_INFO,
                &format!("this worker (pid {me}) now polls the registry"),
            );
            self.source.reset();
            self.schedule(0);
        } else if !owner_now && self.owner {
            self.owner = false;
            self.log(NGX_LOG_WARN, "lost the polling lease to another worker");
            self.abort_exchange();
        }
        ngx_add_timer(&mut self.tick, self.tick_ms as ngx_msec_t);
    }

    /// Drops the exchange in flight, if any, so a later `start_request` begins afresh.
    unsafe fn abort_exchange(&mut self) {
        self.close_connection();
        self.in_flight = false;
        self.parser = None;
        if self.wake.timer_set() != 0 {
            ngx_del_timer(&mut self.wake);
        }
    }

    /// Stops polling and gives the lease back so another worker takes over at once.
    unsafe fn shutdown(&mut self) {
        self.abort_exchange();
        for ev in [&mut self.tick, &mut self.wake] {
            if ev.timer_set() != 0 {
                ngx_del_timer(ev);
            }
        }
        if self.owner {
            self.owner = false;
            let l = self.zone.lock();
            if l.hdr.poller_pid == ngx_pid as i64 {
                l.hdr.poller_pid = 0;
                l.hdr.lease_until_ms = 0;
            }
        }
    }

    unsafe fn schedule(&mut self, delay_ms: u64) {
        if self.wake.timer_set() != 0 {
            ngx_del_timer(&mut self.wake);
        }
        ngx_add_timer(&mut self.wake, delay_ms as ngx_msec_t);
    }

    unsafe fn start_request(&mut self) {
        let now = mono_ms();
        if now.saturating_sub(self.window_start) >= 1000 {
            self.window_start = now;
            self.window_count = 0;
        }
        let gap = self.last_request + MIN_GAP_MS;
        if (self.fast_streak >= FAST_STREAK || self.window_count >= MAX_PER_SECOND) && now < gap {
            self.schedule(gap - now);
            return;
        }
        self.window_count += 1;
        self.source.start();
        let req = self.source.next_request();
        let authority = {
            let conf = self.conf();
            conf.upsync.as_ref().unwrap().endpoint.hosts[self.target().host].authority()
        };
        self.out = build_request(
            req.method,
            &req.path_and_query,
            &authority,
            &req.headers,
            &req.body,
        );
        self.sent = 0;
        self.parser = Some(ResponseParser::new(BODY_LIMIT));
        self.in_flight = true;
        self.request_started = now;
        self.last_request = now;
        self.request_timeout = req.timeout_ms;
        self.timeout_is_normal = req.timeout_is_normal;
        if !self.pc.connection.is_null() {
            // Reuse the kept-alive connection.
            self.send();
            return;
        }
        self.connect();
    }

    /// Why the connection's last send or recv failed: what nginx logged for it (the
    /// OpenSSL reason on a TLS connection), else the OS error.
    fn io_error(&mut self) -> String {
        let os = std::io::Error::last_os_error();
        match self.side.take_captured() {
            c if !c.is_empty() => c,
            _ => os.to_string(),
        }
    }

    /// The failure of ngx_handle_read_event, with what nginx logged about it.
    fn cannot_wait(&self) -> String {
        match self.side.take_captured() {
            why if why.is_empty() => "cannot wait for the response".into(),
            why => format!("cannot wait for the response: {why}"),
        }
    }

    /// The registry address in use (the failover list rotates on failures).
    fn target(&self) -> Target {
        let addrs = &self.conf().addrs;
        addrs[self.addr_index % addrs.len()]
    }

    unsafe fn connect(&mut self) {
        let addr = self.target().addr;
        self.side.take_captured();
        let (storage, len) = sockaddr_of(&addr);
        self.sockaddr = storage;
        self.peer_name_buf = addr.to_string().into_bytes();
        self.peer_name = ngx_str_t {
            len: self.peer_name_buf.len(),
            data: self.peer_name_buf.as_mut_ptr(),
        };
        self.pc = zeroed();
        self.pc.sockaddr = &mut self.sockaddr as *mut _ as *mut sockaddr;
        self.pc.socklen = len;
        self.pc.name = &mut self.peer_name;
        self.pc.get = Some(registry_peer_get);
        self.pc.log = self.side.log();
        self.pc
            .set_log_error(ngx_connection_log_error_e_NGX_ERROR_ERR as u32);
        self.pc.tries = 1;
        let rc = ngx_event_connect_peer(&mut self.pc);
        if rc == NGX_ERROR as ngx_int_t
            || rc == NGX_BUSY as ngx_int_t
            || rc == NGX_DECLINED as ngx_int_t
        {
            let err = std::io::Error::last_os_error();
            self.pc.connection = ptr::null_mut();
            self.fail(format!("cannot connect to {addr}: {err}"));
            return;
        }
        let c = self.pc.connection;
        (*c).data = self as *mut Poller as *mut c_void;
        // Requests go out whole: no Nagle delay. Without this, a request written right
        // after the TLS handshake's last flight waits for the registry's delayed ACK
        // (~40 ms on Linux), on every reconnect (etcd v3 watches end with one).
        let one: libc::c_int = 1;
        libc::setsockopt(
            (*c).fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            &one as *const _ as *const c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        );
        (*c).log = self.side.log();
        (*(*c).read).log = (*c).log;
        (*(*c).write).log = (*c).log;
        (*(*c).read).handler = Some(conn_read_handler);
        (*(*c).write).handler = Some(conn_write_handler);
        (*(*c).read).set_cancelable(1);
        (*(*c).write).set_cancelable(1);
        if rc == NGX_AGAIN as ngx_int_t {
            self.connecting = true;
            ngx_add_timer(
                (*c).write,
                self.request_timeout.clamp(1_000, 5_000) as ngx_msec_t,
            );
            return;
        }
        self.connecting = false;
        self.established();
    }

    /// The TCP connection is up: start TLS for https registries, else send.
    unsafe fn established(&mut self) {
        let ssl = self.conf().ssl;
        if ssl.is_null() {
            return self.send();
        }
        let c = self.pc.connection;
        if (*c).pool.is_null() {
            (*c).pool = ngx_create_pool(1024, self.side.log());
            if (*c).pool.is_null() {
                return self.fail("out of memory for the TLS session".into());
            }
        }
        let name = self.conf().tls_name(&self.target());
        match tls::start_handshake(
            c,
            ssl,
            &name,
            self.side.tls_session.get(),
            tls_handshake_done,
            tls_save_session,
        ) {
            rc if rc == NGX_AGAIN as ngx_int_t => {
                let t = self.request_timeout.clamp(1_000, 5_000);
                ngx_add_timer((*c).read, t as ngx_msec_t);
            }
            rc if rc == NGX_OK as ngx_int_t => self.on_handshake(c),
            _ => {
                let why = self.side.take_captured();
                self.fail(format!(
                    "TLS handshake with {} failed: {why}",
                    self.target().addr
                ));
            }
        }
    }

    /// The TLS handshake ended (or timed out): check the certificate, then send.
    unsafe fn on_handshake(&mut self, c: *mut ngx_connection_t) {
        let addr = self.target().addr;
        let timed_out = (*(*c).read).timedout() != 0 || (*(*c).write).timedout() != 0;
        (*(*c).read).set_timedout(0);
        (*(*c).write).set_timedout(0);
        for ev in [(*c).read, (*c).write] {
            if (*ev).timer_set() != 0 {
                ngx_del_timer(ev);
            }
        }
        if !tls::handshaked(c) {
            let why = self.side.take_captured();
            return self.fail(if timed_out {
                format!("TLS handshake with {addr} timed out")
            } else {
                format!("TLS handshake with {addr} failed: {why}")
            });
        }
        let spec = self.conf().upsync.as_ref().unwrap().tls.as_ref().unwrap();
        if spec.verify {
            let name = self.conf().tls_name(&self.target());
            if let Err(e) = tls::verify_connection(c, &name) {
                return self.fail(format!("{e} at {addr}"));
            }
        }
        (*(*c).read).handler = Some(conn_read_handler);
        (*(*c).write).handler = Some(conn_write_handler);
        self.send();
    }

    unsafe fn on_write(&mut self, ev: *mut ngx_event_t) {
        if !self.in_flight || (!self.connecting && self.sent >= self.out.len()) {
            return; // nothing left to send: the response is awaited on the read side
        }
        if (*ev).timedout() != 0 {
            (*ev).set_timedout(0);
            let name = String::from_utf8_lossy(&self.peer_name_buf).into_owned();
            self.fail(format!("connecting to {name} timed out"));
            return;
        }
        if self.connecting {
            self.connecting = false;
            if (*ev).timer_set() != 0 {
                ngx_del_timer(ev);
            }
            let mut err: libc::c_int = 0;
            let mut len = size_of::<libc::c_int>() as libc::socklen_t;
            let fd = (*self.pc.connection).fd;
            if libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                &mut err as *mut _ as *mut c_void,
                &mut len,
            ) == -1
            {
                err = *libc::__errno_location();
            }
            if err != 0 {
                let name = String::from_utf8_lossy(&self.peer_name_buf).into_owned();
                self.fail(format!(
                    "cannot connect to {name}: {}",
                    std::io::Error::from_raw_os_error(err)
                ));
                return;
            }
            return self.established();
        }
        self.send();
    }

    unsafe fn send(&mut self) {
        let c = self.pc.connection;
        match send_pending(c, &mut self.out, &mut self.sent) {
            Sent::All => {}
            Sent::Again => return,
            Sent::Error => {
                let err = self.io_error();
                let addr = self.target().addr;
                self.fail(format!("sending the request to {addr} failed: {err}"));
                return;
            }
        }
        // The response deadline starts once, when the request is out: write events keep
        // coming while the response trickles in (edge-triggered epoll reports the socket
        // writable with each segment) and must not push the deadline back.
        if (*(*c).read).timer_set() == 0 {
            ngx_add_timer((*c).read, self.request_timeout as ngx_msec_t);
        }
        if ngx_handle_read_event((*c).read, 0) != NGX_OK as ngx_int_t {
            self.fail(self.cannot_wait());
            return;
        }
        if (*(*c).read).ready() != 0 {
            self.on_read((*c).read);
        }
    }

    unsafe fn on_read(&mut self, ev: *mut ngx_event_t) {
        let c = self.pc.connection;
        if c.is_null() {
            return;
        }
        if self.connecting && (*ev).timedout() == 0 {
            // A refused connect can be reported on the read side first: let the connect
            // check (SO_ERROR) name it.
            return self.on_write((*c).write);
        }
        if !self.in_flight {
            // An idle kept-alive connection became readable: the registry closed it (or
            // sent something unasked). Either way it cannot be reused.
            self.close_connection();
            return;
        }
        if (*ev).timedout() != 0 {
            (*ev).set_timedout(0);
            if self.timeout_is_normal {
                // A quiet watch reached upsync_timeout: start it again.
                self.close_connection();
                self.in_flight = false;
                self.parser = None;
                self.schedule(0);
                return;
            }
            self.fail(format!(
                "no complete response within {}ms (upsync_timeout)",
                self.request_timeout
            ));
            return;
        }
        let mut buf = [0u8; 16 * 1024];
        loop {
            let recv = (*c).recv.expect("connection recv");
            let n = recv(c, buf.as_mut_ptr(), buf.len());
            let parser = self.parser.as_mut().expect("parser in flight");
            if n > 0 {
                match parser.feed(&buf[..n as usize]) {
                    Ok(true) => return self.complete(),
                    Ok(false) => {
                        // A streaming response (etcd v3 watch) may be done before it ends.
                        if let Some(head) = parser.head() {
                            if self.source.on_partial(head, parser.body()) {
                                return self.complete();
                            }
                        }
                        // A watch that stays open (Kubernetes) may carry a new set now.
                        let streamed = self.source.take_streamed();
                        if let Some(note) = self.source.take_note() {
                            self.log(NGX_LOG_NOTICE, &redact(&note, self.source.as_ref()));
                        }
                        if let Some(snap) = streamed {
                            self.apply(snap);
                        }
                        continue;
                    }
                    Err(e) => return self.fail(format!("bad response: {e}")),
                }
            } else if n == 0 {
                return match parser.eof() {
                    Ok(()) => self.complete(),
                    Err(e) => self.fail(format!("bad response: {e}")),
                };
            } else if n == NGX_AGAIN as isize {
                if ngx_handle_read_event((*c).read, 0) != NGX_OK as ngx_int_t {
                    self.fail(self.cannot_wait());
                }
                return;
            } else {
                let err = self.io_error();
                let addr = self.target().addr;
                return self.fail(format!("reading the response from {addr} failed: {err}"));
            }
        }
    }

    unsafe fn complete(&mut self) {
        let c = self.pc.connection;
        if (*(*c).read).timer_set() != 0 {
            ngx_del_timer((*c).read);
        }
        let parser = self.parser.take().expect("parser in flight");
        self.in_flight = false;
        let fast = mono_ms().saturating_sub(self.request_started) < MIN_GAP_MS;
        if !parser.keep_alive() {
            self.close_connection();
        }
        let head = parser.head().expect("complete response has a head");
        let result = self.source.handle(head, parser.body());
        if let Some(note) = self.source.take_note() {
            self.log(NGX_LOG_NOTICE, &redact(&note, self.source.as_ref()));
        }
        let progress = match &result {
            Ok(None) => true, // a watch fired
            Ok(Some(snap)) => snap.advanced,
            Err(_) => false,
        };
        self.fast_streak = if fast && !progress {
            self.fast_streak.saturating_add(1)
        } else {
            0
        };
        match result {
            Ok(None) => {
                // A watch fired: read again at once.
                self.schedule(0);
            }
            Ok(Some(snap)) => {
                let advanced = snap.advanced;
                self.apply(snap);
                let elapsed = mono_ms().saturating_sub(self.request_started);
                // A change: ask again at once. No change and a quick answer (the registry
                // does not block, or timed out early): wait out the interval.
                let delay = if advanced {
                    0
                } else {
                    self.interval_ms.saturating_sub(elapsed)
                };
                self.schedule(delay);
            }
            Err(e) => {
                self.close_connection();
                self.fail(e.to_string());
            }
        }
    }

    /// Records a failed exchange: logs each distinct error once per outage, keeps the
    /// last good set, and moves on to the next registry address: at once while the
    /// round of addresses is not done, after a backoff delay once every one failed.
    unsafe fn fail(&mut self, msg: String) {
        let msg = redact(&msg, self.source.as_ref());
        self.close_connection();
        self.in_flight = false;
        self.parser = None;
        self.failures = self.failures.saturating_add(1);
        self.addr_index = self.addr_index.wrapping_add(1);
        // A session belongs to the address that issued it (and a failed one is no
        // help): the next handshake is a full one.
        self.side.replace_session(ptr::null_mut());
        self.source.reset();
        let n = self.conf().addrs.len() as u32;
        let (delay, next) = if n > 1 && self.failures % n != 0 {
            (
                0,
                format!(
                    "trying the next registry address {} now",
                    self.target().addr
                ),
            )
        } else {
            let jitter = (self.random() % 1000) as f64 / 1000.0;
            let rounds = self.failures.div_ceil(n.max(1));
            let d = retry_delay_ms(self.interval_ms, rounds, jitter);
            if n > 1 {
                (
                    d,
                    format!(
                        "every registry address failed; retrying {} in {d}ms",
                        self.target().addr
                    ),
                )
            } else {
                (d, format!("retrying in {d}ms"))
            }
        };
        if !self.logged_errors.contains(&msg) {
            self.log(
                NGX_LOG_ERR,
                &format!("{msg}; keeping the current servers, {next} (further identical errors are not logged)"),
            );
            if self.logged_errors.len() >= 16 {
                self.logged_errors.remove(0);
            }
            self.logged_errors.push(msg.clone());
        }
        {
            let mut l = self.zone.lock();
            l.hdr.status.consecutive_failures = self.failures as u64;
            l.set_error(&msg);
        }
        self.schedule(delay);
    }

    unsafe fn apply(&mut self, snap: Snapshot) {
        if self.failures > 0 {
            let at = if self.conf().addrs.len() > 1 {
                format!(" (at {})", self.target().addr)
            } else {
                String::new()
            };
            self.log(
                NGX_LOG_NOTICE,
                &format!(
                    "registry answers again after {} failed attempt{}{at}",
                    self.failures,
                    if self.failures == 1 { "" } else { "s" }
                ),
            );
        }
        self.failures = 0;
        self.logged_errors.clear();
        if snap.duplicates > 0 {
            self.log(
                NGX_LOG_WARN,
                &format!(
                    "{} entries repeat an address already listed; the first one is used",
                    snap.duplicates
                ),
            );
        }
        let position = self.source.position();
        let in_use = self.target().addr.to_string();
        let mut l = self.zone.lock();
        l.set_in_use(&in_use);
        l.hdr.status.position = position;
        l.hdr.status.last_sync_ms = wall_ms();
        l.hdr.status.consecutive_failures = 0;
        l.set_error("");
        let current = l.specs();
        if snap.servers.is_empty() {
            drop(l);
            if !current.is_empty() && !self.empty_warned {
                self.empty_warned = true;
                self.log(
                    NGX_LOG_WARN,
                    &format!("the registry lists no servers; keeping the last {} (an upstream is never emptied)", current.len()),
                );
            }
            return;
        }
        self.empty_warned = false;
        let diff = Diff::between(&current, &snap.servers);
        if diff.is_empty() {
            return;
        }
        if let Err(e) = l.publish(&snap.servers, Some(mono_ms())) {
            drop(l);
            self.log(
                NGX_LOG_ERR,
                &format!(
                    "cannot apply {} servers: {e}; keeping the current ones",
                    snap.servers.len()
                ),
            );
            return;
        }
        let generation = l.generation();
        l.hdr.status.updates += 1;
        l.hdr.status.last_change_ms = wall_ms();
        drop(l);
        let (used, total) = self.zone.usage();
        self.log(
            NGX_LOG_NOTICE,
            &format!(
                "{} servers now (+{} -{} ~{}), index {position}, generation {generation}, zone {used}/{total} pages",
                snap.servers.len(),
                diff.added,
                diff.removed,
                diff.changed
            ),
        );
        let path = self.conf().dump_path();
        if let Err(e) = dump::write_atomic(
            std::path::Path::new(&path),
            dump::render(&snap.servers).as_bytes(),
        ) {
            self.log(
                NGX_LOG_ERR,
                &format!("cannot write the dump file \"{path}\": {e}"),
            );
        }
    }

    unsafe fn close_connection(&mut self) {
        let c = self.pc.connection;
        if !c.is_null() {
            tls::shutdown(c);
            let pool = (*c).pool;
            ngx_close_connection(c);
            if !pool.is_null() {
                ngx_destroy_pool(pool);
            }
            self.pc.connection = ptr::null_mut();
        }
        self.connecting = false;
    }
}
