//! One probe connection (TCP or UDP) on nginx's event loop, made with
//! `ngx_event_connect_peer`, closed when dropped. Its owner gets the connection's events
//! through `ProbeOwner`, from handlers monomorphized for the owner's type. The
//! connection logs into a quiet log (`QuietLog`) that keeps the errno of nginx's last
//! message, so a failure has its cause without a log line per probe.

use std::cell::Cell;
use std::ffi::c_void;
use std::net::SocketAddr;
use std::ptr;

use ngx::ffi::*;
use ngx::ngx_log_error;

use crate::driver::io::{send_pending, Sent};
use crate::driver::PeerTarget;
use crate::ngx_util::cycle_log;

/// A copy of the cycle log whose writer keeps the errno of the last message (the
/// "(111: Connection refused)" part nginx adds) instead of writing it; alerts and worse
/// (nginx's own failures) still reach the error log.
pub struct QuietLog {
    log: ngx_log_t,
    errno: Cell<i32>,
}

impl QuietLog {
    /// A boxed log (its address is given to nginx: it must not move).
    pub fn new() -> Box<QuietLog> {
        // SAFETY: the cycle log is valid in a running worker; the copy is ours.
        let log = unsafe { *cycle_log() };
        let mut q = Box::new(QuietLog {
            log,
            errno: Cell::new(0),
        });
        q.log.log_level = NGX_LOG_INFO as ngx_uint_t;
        q.log.writer = Some(quiet_writer);
        q.log.wdata = &*q as *const QuietLog as *mut c_void;
        q.log.next = ptr::null_mut();
        q
    }

    pub fn ptr(&self) -> *mut ngx_log_t {
        &self.log as *const ngx_log_t as *mut ngx_log_t
    }

    /// The errno of the last message since the last call (0: none).
    pub fn take_errno(&self) -> i32 {
        self.errno.replace(0)
    }
}

unsafe extern "C" fn quiet_writer(
    log: *mut ngx_log_t,
    level: ngx_uint_t,
    buf: *mut u8,
    len: usize,
) {
    // SAFETY: nginx calls the writer of a log made by `QuietLog::new`, whose `wdata`
    // is the boxed QuietLog (alive as long as its prober), with `len` bytes at `buf`.
    let (q, line) = unsafe {
        (
            &*((*log).wdata as *const QuietLog),
            String::from_utf8_lossy(std::slice::from_raw_parts(buf, len)),
        )
    };
    // "... failed (111: Connection refused) while ..."
    let errno = line
        .rfind(" (")
        .and_then(|i| line[i + 2..].split(':').next())
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(0);
    q.errno.set(errno);
    if level <= NGX_LOG_ALERT as ngx_uint_t {
        let msg = upsync_core::servers::printable(line.trim_end(), 300);
        ngx_log_error!(
            level as u32,
            cycle_log(),
            "upsync: health check connection: {msg}"
        );
    }
}

/// The owner of a `ProbeConn`, called (through a raw pointer: the call may end the
/// owner's life) from nginx's event handlers.
pub trait ProbeOwner {
    /// # Safety
    /// `this` is the owner the connection was made for, alive at the call.
    unsafe fn on_conn_event(this: *mut Self, write: bool);
}

pub struct ProbeConn {
    inner: Box<PeerTarget>,
}

/// How connecting went at once.
pub enum Connect {
    /// Connected (always so for UDP).
    Done(ProbeConn),
    /// In progress: the owner gets an event when it ends.
    Pending(ProbeConn),
    /// Refused or failed at once, with the errno (0: unknown).
    Failed(i32),
    /// No socket or connection could be had here (nginx logged why).
    Local,
}

/// Outcome of `ProbeConn::recv`.
pub enum Recv {
    Data(usize),
    Closed,
    Again,
    /// With the errno (0: unknown).
    Failed(i32),
}

impl ProbeConn {
    /// Starts connecting to `addr` (UDP: a connected datagram socket) for `owner`.
    ///
    /// # Safety
    /// `owner` stays at its address, and owns the returned connection, until it drops
    /// it; `log` outlives the connection.
    pub unsafe fn connect<O: ProbeOwner>(
        owner: *mut O,
        addr: SocketAddr,
        udp: bool,
        log: &QuietLog,
    ) -> Connect {
        let mut inner = PeerTarget::new(
            &addr,
            log.ptr(),
            ngx_connection_log_error_e_NGX_ERROR_INFO,
            udp,
        );
        let i = &mut *inner;
        log.take_errno();
        // SAFETY: `pc` is fully set up and stays boxed for the connection's life.
        let rc = unsafe { ngx_event_connect_peer(&mut i.pc) };
        if rc == NGX_DECLINED as ngx_int_t {
            return Connect::Failed(log.take_errno());
        }
        if rc == NGX_ERROR as ngx_int_t || rc == NGX_BUSY as ngx_int_t {
            return Connect::Local;
        }
        let c = i.pc.connection;
        // SAFETY: nginx made `c` for this peer connection; its events are ours to set up.
        unsafe {
            (*c).data = owner as *mut c_void;
            (*(*c).read).handler = Some(read_handler::<O>);
            (*(*c).write).handler = Some(write_handler::<O>);
            (*(*c).read).set_cancelable(1);
            (*(*c).write).set_cancelable(1);
        }
        let conn = ProbeConn { inner };
        if rc == NGX_AGAIN as ngx_int_t {
            Connect::Pending(conn)
        } else {
            Connect::Done(conn)
        }
    }

    fn c(&self) -> *mut ngx_connection_t {
        self.inner.pc.connection
    }

    /// The pending error of the socket (SO_ERROR; 0: none).
    pub fn so_error(&self) -> i32 {
        // SAFETY: the connection is live.
        crate::driver::io::so_error(unsafe { (*self.c()).fd })
    }

    /// Sends `buf[*sent..]`. Ok(true): all out; Ok(false): the socket is full (the write
    /// event is armed); Err: the errno.
    pub fn send(&mut self, buf: &mut [u8], sent: &mut usize) -> Result<bool, i32> {
        // SAFETY: the connection is live and ours.
        match unsafe { send_pending(self.c(), buf, sent) } {
            Sent::All => Ok(true),
            Sent::Again => Ok(false),
            Sent::Error => Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0)),
        }
    }

    /// Reads what is there (a whole datagram on UDP).
    pub fn recv(&mut self, buf: &mut [u8], log: &QuietLog) -> Recv {
        let c = self.c();
        log.take_errno();
        // SAFETY: the connection is live; `recv` is nginx's reader for its type and
        // writes at most `buf.len()` bytes into `buf`.
        let n = unsafe {
            let Some(recv) = (*c).recv else {
                return Recv::Closed;
            };
            recv(c, buf.as_mut_ptr(), buf.len())
        };
        if n > 0 {
            Recv::Data(n as usize)
        } else if n == 0 {
            Recv::Closed
        } else if n == NGX_AGAIN as isize {
            self.wait_readable();
            Recv::Again
        } else {
            Recv::Failed(log.take_errno())
        }
    }

    /// Arms the read event.
    pub fn wait_readable(&mut self) {
        // SAFETY: the connection is live; a failure surfaces as the probe's timeout.
        unsafe { ngx_handle_read_event((*self.c()).read, 0) };
    }

    /// Whether bytes are known to be waiting.
    pub fn read_ready(&self) -> bool {
        // SAFETY: the connection is live.
        unsafe { (*(*self.c()).read).ready() != 0 }
    }
}

impl Drop for ProbeConn {
    fn drop(&mut self) {
        let c = self.c();
        if c.is_null() {
            return;
        }
        // SAFETY: the connection is ours; nginx forgets its events and timers in
        // ngx_close_connection (a probe connection has no pool).
        unsafe { ngx_close_connection(c) };
        self.inner.pc.connection = ptr::null_mut();
    }
}

unsafe extern "C" fn read_handler<O: ProbeOwner>(ev: *mut ngx_event_t) {
    // SAFETY: nginx calls this for the read event of a connection made by
    // `connect::<O>`, whose `data` is its owner.
    unsafe {
        let c = (*ev).data as *mut ngx_connection_t;
        O::on_conn_event((*c).data as *mut O, false);
    }
}

unsafe extern "C" fn write_handler<O: ProbeOwner>(ev: *mut ngx_event_t) {
    // SAFETY: as `read_handler`, for the write event.
    unsafe {
        let c = (*ev).data as *mut ngx_connection_t;
        O::on_conn_event((*c).data as *mut O, true);
    }
}
