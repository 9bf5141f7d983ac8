//! What nginx calls back into while an owner of a registry connection is running: the
//! connection's log writer (which keeps nginx's last message about the connection, so a
//! failure line can quote the OpenSSL reason) and OpenSSL's new-session callback (which
//! keeps the session to resume). Shared (`Rc`) and changed only through cells, so those
//! callbacks never make a second `&mut` to the owner.

use std::cell::{Cell, UnsafeCell};
use std::ffi::c_void;
use std::ptr;
use std::rc::Rc;

use ngx::ffi::*;
use ngx::ngx_log_error;

use super::tls;
use crate::ngx_util::cycle_log;

pub struct Side {
    /// `upsync: upstream "NAME" (...)`: the prefix of the owner's log lines.
    prefix: String,
    /// The connection logs into this copy of the cycle log, whose writer keeps the last
    /// message (`captured`) and writes only alerts and worse itself: the owner logs
    /// each state change once.
    log: UnsafeCell<ngx_log_t>,
    captured: Cell<String>,
    /// TLS session of the registry address in use, to resume on reconnects.
    tls_session: Cell<*mut c_void>,
}

impl Side {
    pub fn new(prefix: String) -> Rc<Side> {
        // SAFETY: the cycle log is valid in a running worker; the copy is ours.
        let log = unsafe { *cycle_log() };
        let side = Rc::new(Side {
            prefix,
            log: UnsafeCell::new(log),
            captured: Cell::new(String::new()),
            tls_session: Cell::new(ptr::null_mut()),
        });
        // SAFETY: nothing else references the log copy yet; `wdata` points at the side,
        // which the `Rc` keeps at this address for as long as connections use the log.
        unsafe {
            let log = &mut *side.log.get();
            log.log_level = NGX_LOG_INFO as ngx_uint_t;
            log.writer = Some(capture_log);
            log.wdata = Rc::as_ptr(&side) as *mut c_void;
            log.next = ptr::null_mut();
        }
        side
    }

    /// Writes `msg` to the error log, prefixed with the upstream.
    pub fn error_log(&self, level: u32, msg: &str) {
        ngx_log_error!(level, cycle_log(), "{}: {}", self.prefix, msg);
    }

    /// The log the owner's connections write to.
    pub fn log(&self) -> *mut ngx_log_t {
        self.log.get()
    }

    /// What nginx last logged about the connection (empty if nothing).
    pub fn take_captured(&self) -> String {
        self.captured.take()
    }

    /// The session to resume on the next handshake (null: none).
    pub fn tls_session(&self) -> *mut c_void {
        self.tls_session.get()
    }

    /// Forgets the kept session: it belongs to the address that issued it (and a failed
    /// one is no help), so the next handshake is a full one.
    pub fn forget_session(&self) {
        // SAFETY: the cell holds null or a session reference this side owns.
        unsafe { tls::free_session(self.tls_session.replace(ptr::null_mut())) };
    }
}

impl Drop for Side {
    fn drop(&mut self) {
        self.forget_session();
    }
}

/// The quiet log's writer: keeps the message part of the last line (after the time,
/// level, pid and connection number); alerts and worse (nginx's own failures, such as
/// an epoll_ctl() error) also go to the error log at once.
unsafe extern "C" fn capture_log(log: *mut ngx_log_t, level: ngx_uint_t, buf: *mut u8, len: usize) {
    // SAFETY: nginx calls the writer of a log made by `Side::new`, whose `wdata` is the
    // side (alive while its connections are), with `len` bytes at `buf`.
    let (side, line) = unsafe {
        (
            &*((*log).wdata as *const Side),
            String::from_utf8_lossy(std::slice::from_raw_parts(buf, len)),
        )
    };
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

/// OpenSSL made a session the next connection can resume (TLS 1.3 sends it after the
/// handshake): keep the newest.
///
/// # Safety
/// Called by nginx for a connection that logs into a side's log.
pub unsafe extern "C" fn save_session(c: *mut ngx_connection_t) {
    // SAFETY: per the contract, the connection's log's `wdata` is its side.
    unsafe {
        let side = &*((*(*c).log).wdata as *const Side);
        let s = tls::get_session(c);
        if !s.is_null() {
            tls::free_session(side.tls_session.replace(s));
        }
    }
}
