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

use nginx_sys::{
    ngx_shmtx_lock, ngx_shmtx_unlock, ngx_slab_alloc_locked, ngx_slab_free_locked, ngx_slab_pool_t,
};

use super::{Zone, ZoneHeader, DOMAIN_NAME_MAX, MAGIC};

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
        let me = crate::process::my_pid();
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
        let me = crate::process::my_pid();
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

/// The names a domain is found by.
fn domain_name(name: &str) -> &[u8] {
    let b = name.as_bytes();
    &b[..b.len().min(DOMAIN_NAME_MAX)]
}

/// What the master needs to set up one upstream's domain.
pub struct DomainSpec<'a> {
    pub name: &'a str,
    /// Identifies the source (see `SrvConf::fingerprint`).
    pub fingerprint: u64,
    /// `zone_size=`: the most memory the upstream may use (0: no cap).
    pub budget: u64,
}

/// The shared zone as the master sees it while it reads a configuration.
#[derive(Clone, Copy)]
pub struct SharedZone {
    pub(super) pool: *mut ngx_slab_pool_t,
    root: *mut Root,
    epoch: u64,
}

impl SharedZone {
    /// Attaches to the shared zone at `pool` for the configuration being read.
    ///
    /// # Safety
    /// `pool` is the slab pool of the `upsync` zone (set up by nginx), mapped for the
    /// cycle's life; called by the master.
    pub unsafe fn attach(pool: *mut ngx_slab_pool_t) -> Option<SharedZone> {
        // SAFETY: per the contract.
        let (root, epoch) = unsafe { attach_root(pool) }?;
        Some(SharedZone { pool, root, epoch })
    }

    /// The domain of the upstream `spec.name`: the one a previous configuration left
    /// (the same name), or a new one. Marks it as used by this configuration.
    pub(super) fn domain(&self, spec: &DomainSpec) -> Option<(*mut ZoneHeader, bool)> {
        let name = domain_name(spec.name);
        // SAFETY: the pool is live; its mutex guards the list of domains and allocation.
        unsafe {
            ngx_shmtx_lock(&mut (*self.pool).mutex);
            let mut d = (*self.root).domains;
            while !d.is_null() {
                // magic and name never change after the domain is made
                let dname = std::slice::from_raw_parts(
                    ptr::addr_of!((*d).name) as *const u8,
                    ((*d).name_len as usize).min(DOMAIN_NAME_MAX),
                );
                if (*d).magic == MAGIC && dname == name {
                    break;
                }
                d = (*d).next;
            }
            let created = d.is_null();
            if created {
                d = ngx_slab_alloc_locked(self.pool, size_of::<ZoneHeader>()) as *mut ZoneHeader;
                if !d.is_null() {
                    // all-zero is a valid header (null pointers, zero counters, a free
                    // lock) once the plan view is set to None
                    ptr::write_bytes(d as *mut u8, 0, size_of::<ZoneHeader>());
                    ptr::addr_of_mut!((*d).plan_view).write(None);
                    (*d).magic = MAGIC;
                    (&mut (*d).name)[..name.len()].copy_from_slice(name);
                    (*d).name_len = name.len() as u32;
                    (*d).used = size_of::<ZoneHeader>() as u64;
                    (*d).next = (*self.root).domains;
                    (*self.root).domains = d;
                }
            }
            if !d.is_null() {
                (*d).claimed = self.epoch;
            }
            ngx_shmtx_unlock(&mut (*self.pool).mutex);
            (!d.is_null()).then_some((d, created))
        }
    }

    /// Frees the domains no configuration since the running one uses, once no process
    /// holds sessions there (`alive` says whether a pid lives). Returns how many.
    pub fn sweep(&self, alive: &dyn Fn(i64) -> bool) -> usize {
        let mut freed = 0;
        // SAFETY: the pool is live; the list is walked and unlinked under its mutex. A
        // domain no live process has a ledger in is used by nobody: its lock is taken
        // to empty it, then it is unlinked and freed.
        unsafe {
            ngx_shmtx_lock(&mut (*self.pool).mutex);
            let mut stale = Vec::new();
            let mut d = (*self.root).domains;
            while !d.is_null() {
                if (*d).claimed != self.epoch {
                    stale.push(d);
                }
                d = (*d).next;
            }
            ngx_shmtx_unlock(&mut (*self.pool).mutex);
            for d in stale {
                let zone = Zone {
                    pool: self.pool,
                    hdr: d,
                    ledger: ptr::null_mut(),
                };
                let mut l = zone.lock();
                if !l.dismantle(alive) {
                    continue;
                }
                drop(l);
                ngx_shmtx_lock(&mut (*self.pool).mutex);
                let mut link: *mut *mut ZoneHeader = &mut (*self.root).domains;
                while !(*link).is_null() {
                    if *link == d {
                        *link = (*d).next;
                        break;
                    }
                    link = &mut (**link).next;
                }
                (*d).magic = 0;
                ngx_slab_free_locked(self.pool, d as *mut _);
                ngx_shmtx_unlock(&mut (*self.pool).mutex);
                freed += 1;
            }
        }
        freed
    }
}
