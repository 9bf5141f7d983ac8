//! The shared zone of one upsync upstream: its current server set, the per-server state
//! that every worker's balancer shares (connections, failures, smooth-WRR weights), the
//! poller election lease, and sync status.
//!
//! Layout (all inside the zone's slab pool, so pointers are valid in every worker: the
//! zone is mapped before the fork and at the same address after reloads):
//!
//! ```text
//! ZoneHeader ── set ──> SharedSet { generation, len, slots: [*mut Slot; len] }
//!                                               └──> Slot { refs, in_set, PeerState, addr }
//! ```
//!
//! A `Slot` lives while it is in the current set or any session still uses it: `refs`
//! counts one for set membership plus one per open session. Whoever drops `refs` to zero
//! frees it, so a removed server keeps its sessions and is reclaimed when the last one
//! closes, with no fixed delay. Every access happens under the pool's mutex; nginx's
//! master force-unlocks that mutex if a worker dies holding it.

use std::mem::{size_of, MaybeUninit};
use std::net::SocketAddr;
use std::ptr;

use nginx_sys::{
    ngx_shmtx_lock, ngx_shmtx_unlock, ngx_slab_alloc_locked, ngx_slab_free_locked, ngx_slab_pool_t,
};

use upsync_core::balancer::{PeerState, Peers};
use upsync_core::servers::ServerSpec;

const MAGIC: u64 = 0x7570_7379_6e63_0003; // "upsync", layout v3

/// Longest address text: `[ffff:...:ffff%scope]:65535` fits easily.
pub const NAME_MAX: usize = 64;

#[repr(C)]
pub struct Slot {
    refs: u32,
    in_set: bool,
    pub state: PeerState,
    pub spec_weight: u32,
    pub spec_max_fails: u32,
    pub spec_fail_timeout: u32,
    pub spec_max_conns: u32,
    pub spec_down: bool,
    pub spec_backup: bool,
    pub spec_slow_start: u32,
    pub socklen: u32,
    pub sockaddr: libc::sockaddr_storage,
    pub name_len: u8,
    pub name: [u8; NAME_MAX],
}

impl Slot {
    pub fn name(&self) -> &[u8] {
        &self.name[..self.name_len as usize]
    }

    pub fn spec(&self) -> ServerSpec {
        let text = std::str::from_utf8(self.name()).unwrap_or("");
        let addr: SocketAddr = text
            .parse()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        ServerSpec {
            addr,
            weight: self.spec_weight,
            max_fails: self.spec_max_fails,
            fail_timeout: self.spec_fail_timeout,
            max_conns: self.spec_max_conns,
            down: self.spec_down,
            backup: self.spec_backup,
            slow_start: self.spec_slow_start,
        }
    }

    fn set_spec(&mut self, s: &ServerSpec, now_ms: Option<u64>) {
        let weight_changed = self.spec_weight != s.weight;
        // a server coming back from `down` ramps up again (slow_start)
        if let Some(now) = now_ms {
            if self.spec_down && !s.down {
                self.state.ramp_start_ms = now;
            }
        }
        self.spec_slow_start = s.slow_start;
        self.state.slow_start_ms = s.slow_start as u64 * 1000;
        self.spec_weight = s.weight;
        self.spec_max_fails = s.max_fails;
        self.spec_fail_timeout = s.fail_timeout;
        self.spec_max_conns = s.max_conns;
        self.spec_down = s.down;
        self.spec_backup = s.backup;
        let st = &mut self.state;
        st.weight = s.weight as i64;
        if weight_changed {
            st.effective_weight = st.weight;
            st.current_weight = 0;
        }
        st.max_fails = s.max_fails;
        st.fail_timeout = s.fail_timeout as i64;
        st.max_conns = s.max_conns;
        st.down = s.down;
        st.backup = s.backup;
    }
}

#[repr(C)]
pub struct SharedSet {
    pub generation: u64,
    pub len: usize,
    // followed by `len` slot pointers
}

impl SharedSet {
    /// # Safety
    /// `self` must be followed by `len` slot pointers (as `alloc_set` lays it out).
    pub unsafe fn slots(&self) -> &[*mut Slot] {
        let first = (self as *const SharedSet).add(1) as *const *mut Slot;
        std::slice::from_raw_parts(first, self.len)
    }
}

/// Status kept for `upstream_show` and for a poller that takes over.
#[repr(C)]
pub struct SyncStatus {
    pub position: u64,
    pub last_sync_ms: u64,
    pub last_change_ms: u64,
    pub consecutive_failures: u64,
    pub updates: u64,
    pub last_error_len: u32,
    pub last_error: [u8; 256],
    /// The registry address of the last successful read (`ip:port`).
    pub in_use_len: u32,
    pub in_use: [u8; 64],
}

#[repr(C)]
pub struct ZoneHeader {
    magic: u64,
    /// Identifies the upsync source the set came from; a reload that points the upstream
    /// elsewhere starts over from the configuration.
    pub fingerprint: u64,
    pub set: *mut SharedSet,
    pub next_generation: u64,
    /// Worker pid that polls the registry (0: nobody), and until when (ms since epoch).
    pub poller_pid: i64,
    pub lease_until_ms: u64,
    /// Round-robin positions in the primary and backup schedules, shared by all workers
    /// so the weighted order holds for the whole instance.
    pub cursors: [u64; 2],
    pub status: SyncStatus,
}

/// The mutex-holding view of a zone. Created by `Zone::lock`, unlocks on drop.
pub struct Locked<'a> {
    pool: *mut ngx_slab_pool_t,
    pub hdr: &'a mut ZoneHeader,
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // SAFETY: `pool` is the zone's slab pool and we hold its mutex (taken in `lock`).
        unsafe { ngx_shmtx_unlock(&mut (*self.pool).mutex) };
    }
}

/// A handle on one upstream's zone, valid in every process after the zone is initialized.
#[derive(Clone, Copy)]
pub struct Zone {
    pool: *mut ngx_slab_pool_t,
    hdr: *mut ZoneHeader,
}

// SAFETY: nginx workers are single-threaded; the handle is only used on the event thread.
unsafe impl Send for Zone {}
unsafe impl Sync for Zone {}

pub enum InitOutcome {
    /// The zone already held a set for the same source (reload): it is kept.
    Kept,
    /// The zone was (re)initialized from the configuration's servers.
    Fresh,
}

impl Zone {
    /// Attaches to (or initializes) the zone at `pool`.
    ///
    /// # Safety
    /// `pool` must be the start of an nginx shared zone (a slab pool set up by nginx).
    pub unsafe fn init(
        pool: *mut ngx_slab_pool_t,
        fingerprint: u64,
        initial: &[ServerSpec],
    ) -> Result<(Zone, InitOutcome), &'static str> {
        ngx_shmtx_lock(&mut (*pool).mutex);
        let existing = (*pool).data as *mut ZoneHeader;
        let result = if !existing.is_null()
            && (*existing).magic == MAGIC
            && (*existing).fingerprint == fingerprint
            && !(*existing).set.is_null()
        {
            Ok((
                Zone {
                    pool,
                    hdr: existing,
                },
                InitOutcome::Kept,
            ))
        } else {
            let hdr = if !existing.is_null() && (*existing).magic == MAGIC {
                existing
            } else {
                let h = ngx_slab_alloc_locked(pool, size_of::<ZoneHeader>()) as *mut ZoneHeader;
                if h.is_null() {
                    ngx_shmtx_unlock(&mut (*pool).mutex);
                    return Err("shared zone too small for its header");
                }
                ptr::write_bytes(h as *mut u8, 0, size_of::<ZoneHeader>());
                (*h).magic = MAGIC;
                (*pool).data = h as *mut _;
                h
            };
            (*hdr).fingerprint = fingerprint;
            (*hdr).poller_pid = 0;
            (*hdr).lease_until_ms = 0;
            (*hdr).status.position = 0;
            let zone = Zone { pool, hdr };
            let mut locked = Locked {
                pool,
                hdr: &mut *hdr,
            };
            let r = locked
                .publish(initial, None)
                .map(|_| (zone, InitOutcome::Fresh));
            std::mem::forget(locked);
            r
        };
        ngx_shmtx_unlock(&mut (*pool).mutex);
        result
    }

    pub fn lock(&self) -> Locked<'_> {
        // SAFETY: `pool` is a live slab pool (zones live as long as the cycle); the guard
        // unlocks on drop. Workers are single-threaded, so no re-entrant locking occurs.
        unsafe {
            ngx_shmtx_lock(&mut (*self.pool).mutex);
            Locked {
                pool: self.pool,
                hdr: &mut *self.hdr,
            }
        }
    }

    /// Pool usage for status output: (used pages, total pages).
    pub fn usage(&self) -> (usize, usize) {
        // SAFETY: reading two counters of a live pool; a torn read only skews a statistic.
        unsafe {
            let p = &*self.pool;
            let total = (p.end as usize - p.start as usize) / 4096;
            (total.saturating_sub(p.pfree as usize), total)
        }
    }
}

impl Locked<'_> {
    /// The current set's slots (empty before the first publish).
    pub fn slots(&self) -> &[*mut Slot] {
        if self.hdr.set.is_null() {
            return &[];
        }
        // SAFETY: the set pointer is owned by the header and valid under the lock.
        unsafe { (*self.hdr.set).slots() }
    }

    pub fn generation(&self) -> u64 {
        if self.hdr.set.is_null() {
            0
        } else {
            // SAFETY: as in `slots`.
            unsafe { (*self.hdr.set).generation }
        }
    }

    /// The current servers, in set order.
    pub fn specs(&self) -> Vec<ServerSpec> {
        // SAFETY: slots of the current set are live while we hold the lock.
        self.slots()
            .iter()
            .map(|&s| unsafe { (*s).spec() })
            .collect()
    }

    /// Replaces the set with `specs` (sorted by address). Servers that stay keep their slot,
    /// and so their counters and open sessions. On allocation failure nothing changes.
    /// `now_ms` (monotonic) starts the slow_start ramp of servers that are new or come
    /// back from `down`; None for the set nginx starts with.
    pub fn publish(
        &mut self,
        specs: &[ServerSpec],
        now_ms: Option<u64>,
    ) -> Result<(), &'static str> {
        let old: Vec<*mut Slot> = self.slots().to_vec();
        // SAFETY: all pointers below come from this pool and are used under its mutex.
        unsafe {
            let set = ngx_slab_alloc_locked(
                self.pool,
                size_of::<SharedSet>() + specs.len() * size_of::<*mut Slot>(),
            ) as *mut SharedSet;
            if set.is_null() {
                return Err("shared zone is full (cannot allocate the server list)");
            }
            let mut new_slots: Vec<*mut Slot> = Vec::with_capacity(specs.len());
            let mut created: Vec<*mut Slot> = Vec::new();
            let mut oi = 0;
            for spec in specs {
                let name = spec.addr.to_string();
                while oi < old.len() && (*old[oi]).spec().addr < spec.addr {
                    oi += 1;
                }
                let slot = if oi < old.len() && (*old[oi]).name() == name.as_bytes() {
                    old[oi]
                } else {
                    let s = ngx_slab_alloc_locked(self.pool, size_of::<Slot>()) as *mut Slot;
                    if s.is_null() {
                        for c in created {
                            ngx_slab_free_locked(self.pool, c as *mut _);
                        }
                        ngx_slab_free_locked(self.pool, set as *mut _);
                        return Err("shared zone is full (cannot allocate a server)");
                    }
                    init_slot(s, spec, &name);
                    (*s).state.ramp_start_ms = now_ms.unwrap_or(0);
                    created.push(s);
                    s
                };
                new_slots.push(slot);
            }
            // Commit. Old slots are marked out of the set; the new set marks its members
            // back in (a fresh slot gets its membership reference); whatever stays out
            // loses its membership reference. Linear in the set sizes.
            for &s in &old {
                (*s).in_set = false;
            }
            for (&s, spec) in new_slots.iter().zip(specs) {
                if (*s).refs == 0 {
                    (*s).refs = 1;
                }
                (*s).in_set = true;
                (*s).set_spec(spec, now_ms);
            }
            for &s in &old {
                if !(*s).in_set {
                    self.unref(s);
                }
            }
            self.hdr.next_generation += 1;
            (*set).generation = self.hdr.next_generation;
            (*set).len = new_slots.len();
            ptr::copy_nonoverlapping(
                new_slots.as_ptr(),
                (set as *mut SharedSet).add(1) as *mut *mut Slot,
                new_slots.len(),
            );
            if !self.hdr.set.is_null() {
                ngx_slab_free_locked(self.pool, self.hdr.set as *mut _);
            }
            self.hdr.set = set;
        }
        Ok(())
    }

    /// Takes a session reference on a slot of the current set.
    pub fn acquire(&mut self, slot: *mut Slot) {
        // SAFETY: `slot` is in the current set (the caller just picked it under the lock).
        unsafe {
            (*slot).refs += 1;
            (*slot).state.conns += 1;
            (*slot).state.total += 1;
        }
    }

    /// Drops a session reference, freeing the slot if it left the set and was the last.
    ///
    /// # Safety
    /// `slot` must hold a reference taken by `acquire`.
    pub unsafe fn release(&mut self, slot: *mut Slot, failed: bool, now: i64) {
        (*slot).state.release(failed, now);
        self.unref(slot);
    }

    unsafe fn unref(&mut self, slot: *mut Slot) {
        (*slot).refs -= 1;
        if (*slot).refs == 0 {
            ngx_slab_free_locked(self.pool, slot as *mut _);
        }
    }

    /// Sets the last error text (truncated to fit).
    pub fn set_error(&mut self, msg: &str) {
        let st = &mut self.hdr.status;
        let n = msg.len().min(st.last_error.len());
        st.last_error[..n].copy_from_slice(&msg.as_bytes()[..n]);
        st.last_error_len = n as u32;
    }

    pub fn set_in_use(&mut self, addr: &str) {
        let st = &mut self.hdr.status;
        let n = addr.len().min(st.in_use.len());
        st.in_use[..n].copy_from_slice(&addr.as_bytes()[..n]);
        st.in_use_len = n as u32;
    }

    pub fn in_use(&self) -> String {
        let st = &self.hdr.status;
        String::from_utf8_lossy(&st.in_use[..st.in_use_len as usize]).into_owned()
    }

    pub fn last_error(&self) -> String {
        let st = &self.hdr.status;
        String::from_utf8_lossy(&st.last_error[..st.last_error_len as usize]).into_owned()
    }
}

/// The current set seen as balancer peers.
pub struct SetPeers<'a> {
    pub slots: &'a [*mut Slot],
}

impl Peers for SetPeers<'_> {
    fn len(&self) -> usize {
        self.slots.len()
    }
    fn peer(&mut self, i: usize) -> &mut PeerState {
        // SAFETY: slots of the current set are live; callers hold the zone lock.
        unsafe { &mut (*self.slots[i]).state }
    }
}

unsafe fn init_slot(s: *mut Slot, spec: &ServerSpec, name: &str) {
    ptr::write_bytes(s as *mut u8, 0, size_of::<Slot>());
    let slot = &mut *s;
    let (storage, len) = sockaddr_of(&spec.addr);
    slot.sockaddr = storage;
    slot.socklen = len;
    let n = name.len().min(NAME_MAX);
    slot.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    slot.name_len = n as u8;
    slot.state.effective_weight = spec.weight as i64;
    slot.spec_weight = spec.weight;
    slot.set_spec(spec, None);
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

/// Converts a socket address to the C form nginx connects with.
pub fn sockaddr_of(addr: &SocketAddr) -> (libc::sockaddr_storage, u32) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { MaybeUninit::zeroed().assume_init() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large enough and suitably aligned for any sockaddr.
            unsafe { ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as u32)
}
