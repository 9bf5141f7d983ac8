//! The one shared memory zone all upsync upstreams live in (`upsync`, sized by
//! `upsync_zone_size`, 128m by default): each upstream has a domain there (its
//! `ZoneHeader`, found by the upstream's name across reloads) with its own lock and its
//! own count of the memory it uses, capped by `zone_size=` when that is set.
//!
//! Pages of the zone cost memory only once something is written to them, so a large
//! zone is cheap until it is used; one zone for all upstreams keeps the address space
//! and nginx's per-zone bookkeeping independent of how many upstreams there are.
//!
//! ```text
//! slab pool ── data ──> Root { domains ─> ZoneHeader ─> ZoneHeader ─> ... }
//! ```
//!
//! Allocation takes the slab pool's mutex (inside `ngx_slab_alloc`), always while the
//! domain's lock is held or by the master alone: domain lock, then pool mutex.

use std::ptr;
use std::sync::atomic::{AtomicI64, Ordering};

use nginx_sys::{ngx_shmtx_lock, ngx_shmtx_unlock, ngx_slab_alloc_locked, ngx_slab_pool_t};

use super::ZoneHeader;

const ROOT_MAGIC: u64 = 0x7570_7379_6e63_5200; // "upsyncR", v0

/// The zone's root, at the slab pool's `data`.
#[repr(C)]
pub(super) struct Root {
    magic: u64,
    /// Every upstream's domain, linked through `ZoneHeader::next`.
    pub(super) domains: *mut ZoneHeader,
    /// Counts the configurations read (each `claim`s the domains it uses).
    pub(super) epoch: u64,
}

/// Attaches to the root of the shared zone at `pool` (making it in a new zone), and
/// starts a configuration's claims: returns the root and the new epoch. Silences
/// nginx's own "no memory" lines for this pool: the module reports a set that does not
/// fit itself, once, with what to change.
///
/// # Safety
/// `pool` is the slab pool of the `upsync` zone, mapped for the cycle's life; called by
/// the master while it reads a configuration.
pub(super) unsafe fn attach_root(pool: *mut ngx_slab_pool_t) -> Option<(*mut Root, u64)> {
    // SAFETY: per the contract; the pool's mutex guards `data` and the allocation.
    unsafe {
        ngx_shmtx_lock(&mut (*pool).mutex);
        (*pool).set_log_nomem(0);
        let mut root = (*pool).data as *mut Root;
        if root.is_null() || (*root).magic != ROOT_MAGIC {
            root = ngx_slab_alloc_locked(pool, size_of::<Root>()) as *mut Root;
            if !root.is_null() {
                ptr::write(
                    root,
                    Root {
                        magic: ROOT_MAGIC,
                        domains: ptr::null_mut(),
                        epoch: 0,
                    },
                );
                (*pool).data = root as *mut _;
            }
        }
        let epoch = if root.is_null() {
            0
        } else {
            (*root).epoch += 1;
            (*root).epoch
        };
        ngx_shmtx_unlock(&mut (*pool).mutex);
        (!root.is_null()).then_some((root, epoch))
    }
}

/// The lock of one domain: the pid of the process holding it (0: free). A holder that
/// died (a killed worker) is noticed by whoever waits, and the lock is taken back.
#[repr(C)]
pub(super) struct DomainLock {
    holder: AtomicI64,
}

/// Spins before yielding the CPU, and yields this often between checks that the
/// holder still lives.
const SPINS: u32 = 64;
const CHECK_EVERY: u32 = 1024;

impl DomainLock {
    #[inline]
    pub(super) fn lock(&self) {
        // SAFETY: a process-global nginx sets at process start.
        let me = unsafe { nginx_sys::ngx_pid } as i64;
        if self
            .holder
            .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            self.lock_contended(me);
        }
    }

    #[cold]
    fn lock_contended(&self, me: i64) {
        let mut tries: u32 = 0;
        loop {
            if self.holder.load(Ordering::Relaxed) == 0
                && self
                    .holder
                    .compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
            {
                return;
            }
            tries = tries.wrapping_add(1);
            if tries < SPINS {
                std::hint::spin_loop();
                continue;
            }
            // SAFETY: plain system call.
            unsafe { libc::sched_yield() };
            if tries % CHECK_EVERY == 0 {
                self.take_back_from_dead();
            }
        }
    }

    /// The holder is gone (or is this process under a pid a dead holder had: a process
    /// never waits for a lock it holds): frees the lock.
    fn take_back_from_dead(&self) {
        let holder = self.holder.load(Ordering::Relaxed);
        // SAFETY: as in `lock`.
        let me = unsafe { nginx_sys::ngx_pid } as i64;
        if holder == 0 || (holder != me && crate::process::pid_alive(holder)) {
            return;
        }
        if self
            .holder
            .compare_exchange(holder, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            let log = crate::ngx_util::cycle_log();
            ngx::ngx_log_error!(
                nginx_sys::NGX_LOG_ALERT,
                log,
                "upsync: a shared zone lock was held by process {holder}, which is gone; taken back"
            );
        }
    }

    #[inline]
    pub(super) fn unlock(&self) {
        self.holder.store(0, Ordering::Release);
    }
}
