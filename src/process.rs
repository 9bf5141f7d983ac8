//! Facts about nginx processes the module acts on: whether this one is exiting, and
//! whether another one (by pid) is alive, with a per-process cache so that checking
//! many zones costs one `kill(pid, 0)` per pid and second.

use std::cell::RefCell;

use ngx::ffi::{ngx_exiting, ngx_pid, ngx_quit, ngx_terminate};

use crate::ngx_util::mono_ms;

/// This process's pid (the holder written in leases, ledgers and locks).
#[inline]
pub fn my_pid() -> i64 {
    // SAFETY: a process-global written before any module code runs in a process.
    unsafe { ngx_pid as i64 }
}

/// This process was told to stop (graceful or fast): it must not take or use a lease.
pub fn exiting() -> bool {
    // SAFETY: process-global flags written by nginx's signal handling on this thread.
    unsafe { ngx_exiting != 0 || ngx_quit != 0 || ngx_terminate != 0 }
}

/// Whether a process with this pid exists now (EPERM: it exists, under another user).
pub fn pid_alive(pid: i64) -> bool {
    if pid <= 0 || pid > i32::MAX as i64 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for existence.
    let rc = unsafe { libc::kill(pid as libc::pid_t, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// How long a cached observation is trusted.
const CACHE_MS: u64 = 1_000;

thread_local! {
    static SEEN: RefCell<Vec<(i64, bool, u64)>> = const { RefCell::new(Vec::new()) };
}

/// Whether `pid` lives, and when that was observed (monotonic ms): at most one
/// `kill(pid, 0)` per pid and second in this process.
pub fn observe(pid: i64) -> (bool, u64) {
    let now = mono_ms();
    SEEN.with(|seen| {
        let mut seen = seen.borrow_mut();
        if let Some(e) = seen.iter_mut().find(|e| e.0 == pid) {
            if now.saturating_sub(e.2) < CACHE_MS {
                return (e.1, e.2);
            }
            *e = (pid, pid_alive(pid), now);
            return (e.1, e.2);
        }
        if seen.len() >= 256 {
            seen.remove(0);
        }
        let e = (pid, pid_alive(pid), now);
        seen.push(e);
        (e.1, e.2)
    })
}
