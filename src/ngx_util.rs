//! Small helpers several parts of the glue need: the clocks, nginx strings, pool
//! copies and the cycle log.

use std::ptr;

use ngx::core::NgxStr;
use ngx::ffi::{ngx_cached_time, ngx_log_t, ngx_pnalloc, ngx_pool_t, ngx_str_t};

/// nginx's cached wall clock, in seconds (what nginx's own balancers use).
pub fn now_sec() -> i64 {
    // SAFETY: ngx_cached_time always points at a valid time slot in a running nginx.
    unsafe { (*ngx_cached_time).sec as i64 }
}

/// Milliseconds of CLOCK_MONOTONIC: the same clock in every process, for leases and
/// slow_start ramps that one process starts and others read.
pub fn mono_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Milliseconds since the epoch (for status times a person reads).
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An nginx string as a Rust one (invalid UTF-8 replaced).
pub fn str_of(s: &ngx_str_t) -> String {
    if s.len == 0 || s.data.is_null() {
        return String::new();
    }
    // SAFETY: a non-empty nginx string points at `len` readable bytes.
    unsafe { NgxStr::from_ngx_str(*s) }
        .to_string_lossy()
        .into_owned()
}

/// A copy of `s` in `pool`, NUL-terminated (as nginx's file loaders want it) but with
/// `len` not counting the NUL.
///
/// # Safety
/// `pool` is a live nginx pool.
pub unsafe fn pool_str(pool: *mut ngx_pool_t, s: &str) -> Option<ngx_str_t> {
    // SAFETY: per the contract; the allocation is `len + 1` bytes, written in full.
    unsafe {
        let data = ngx_pnalloc(pool, s.len() + 1) as *mut u8;
        if data.is_null() {
            return None;
        }
        ptr::copy_nonoverlapping(s.as_ptr(), data, s.len());
        *data.add(s.len()) = 0;
        Some(ngx_str_t { len: s.len(), data })
    }
}

/// The running cycle's log.
pub fn cycle_log() -> *mut ngx_log_t {
    ngx::log::ngx_cycle_log().as_ptr()
}

/// An event handler nginx calls (a timer's, here).
pub type EventHandler = unsafe extern "C" fn(*mut ngx::ffi::ngx_event_t);

/// Sets up timer events owned by `owner`: each gets its handler, `owner` as its data,
/// the cycle's log, and is cancelable (graceful shutdown never waits for it).
pub fn timer_events(
    owner: *mut std::ffi::c_void,
    events: &mut [(&mut ngx::ffi::ngx_event_t, EventHandler)],
) {
    for (ev, handler) in events.iter_mut() {
        ev.data = owner;
        ev.handler = Some(*handler);
        ev.log = cycle_log();
        ev.set_cancelable(1);
    }
}

/// The words of the directive being parsed (its name first).
///
/// # Safety
/// `cf` is the configuration being parsed, positioned on a directive.
pub unsafe fn conf_words(cf: *mut ngx::ffi::ngx_conf_t) -> Vec<String> {
    // SAFETY: per the contract `args` is an array of nginx strings.
    let a: &[ngx::ffi::ngx_str_t] = unsafe { (*(*cf).args).as_slice() };
    a.iter().map(str_of).collect()
}

/// Arms `ev` to fire in `ms`, replacing a pending time exactly (nginx's own
/// `ngx_add_timer` keeps a pending time within 300 ms of the new one).
pub fn arm_timer(ev: &mut ngx::ffi::ngx_event_t, ms: u64) {
    cancel_timer(ev);
    // SAFETY: an event of this process; nginx's timer tree is this worker's.
    unsafe { ngx::ffi::ngx_add_timer(ev, ms as ngx::ffi::ngx_msec_t) };
}

/// Takes `ev` out of the timer tree if it is in it.
pub fn cancel_timer(ev: &mut ngx::ffi::ngx_event_t) {
    if ev.timer_set() != 0 {
        // SAFETY: an event whose timer is set is in this worker's timer tree.
        unsafe { ngx::ffi::ngx_del_timer(ev) };
    }
}

/// Upstream names for a log prefix: `"a", "b", "c", "d" and 296 more` (four at most).
pub fn quoted_names(names: &[&str]) -> String {
    let shown: Vec<String> = names.iter().take(4).map(|n| format!("\"{n}\"")).collect();
    match names.len().saturating_sub(4) {
        0 => shown.join(", "),
        more => format!("{} and {more} more", shown.join(", ")),
    }
}
