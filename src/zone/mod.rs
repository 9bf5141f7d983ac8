//! The shared zone of one upsync upstream: its server set and selection plan, the
//! per-server state every worker's balancer shares, the poller lease, sync status, and
//! the per-process session ledgers. One `Zone` handle per upstream and process.
//!
//! Layout (all inside the zone's slab pool, so pointers are valid in every process: the
//! zone is mapped before the fork and at the same address after reloads):
//!
//! ```text
//! ZoneHeader ── set ───> SharedSet { generation, len, [*mut Slot; len] } ──> Slot
//!            ── plan ──> [u64] (balancer::Plan in flat form, built once per set)
//!            ── ledgers ──> Ledger (one per process: the slots its sessions hold)
//!            ── reserve ──> memory the master set aside for a reload (see `init`)
//! ```
//!
//! Reloads are two-phase. `init` runs in the master while nginx reads a new
//! configuration (a reload can still be rejected afterwards): it never changes what the
//! running workers see. A zone that is new gets the configured servers at once; a kept
//! zone whose source changed only gets memory reserved for them. `commit_switch` runs
//! when the new cycle is committed (`init_module`) and makes the switch visible.
//!
//! Every access to shared state happens under the pool's mutex (`Zone::lock`); nginx's
//! master force-unlocks it when a worker dies holding it.

mod health;
mod ledger;
mod set;

use std::ptr;

use nginx_sys::{
    ngx_shmtx_lock, ngx_shmtx_unlock, ngx_slab_alloc_locked, ngx_slab_free_locked, ngx_slab_pool_t,
};
use upsync_core::balancer::{Plan, PlanView};
use upsync_core::policy::Lease;
use upsync_core::servers::ServerSpec;

pub use health::{HealthCommit, HealthRecord, Probed};
pub use ledger::Ticket;
pub use set::{sockaddr_of, Slot, NAME_MAX};

use ledger::Ledger;
use set::SharedSet;

const MAGIC: u64 = 0x7570_7379_6e63_0005; // "upsync", layout v5

/// Why the zone could not take a set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZoneError {
    #[error("the shared zone is full: {servers} servers and their selection plan do not fit (raise zone_size=)")]
    Full { servers: usize },
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

/// A plan block in the zone: `words` u64 words at `ptr`.
#[repr(C)]
#[derive(Clone, Copy)]
struct PlanRef {
    ptr: *mut u64,
    words: usize,
}

impl PlanRef {
    const NONE: PlanRef = PlanRef {
        ptr: ptr::null_mut(),
        words: 0,
    };
}

/// Memory the master set aside during a reload for the configured servers of a new
/// source: a set of fresh slots and a plan block, freed when the switch is committed.
#[repr(C)]
struct Reserve {
    set: *mut SharedSet,
    plan: PlanRef,
}

#[repr(C)]
pub struct ZoneHeader {
    magic: u64,
    /// Identifies the source the set belongs to (upstream name, type, endpoint): pollers
    /// of another source (an old worker after a reload that changed it) never publish.
    fingerprint: u64,
    /// The set did not come from `fingerprint`'s source (a committed switch whose publish
    /// failed): a reload must not keep it.
    set_foreign: bool,
    set: *mut SharedSet,
    plan: PlanRef,
    next_generation: u64,
    /// Worker pid that polls the registry (0: nobody), and until when (CLOCK_MONOTONIC
    /// ms; the same clock in every process).
    poller_pid: i64,
    lease_until_ms: u64,
    /// Counts the times the lease was taken: a poller polls under the epoch it took,
    /// and stops publishing as soon as the lease was taken again (even by itself, after
    /// it lost it while stalled).
    lease_epoch: u64,
    /// Round-robin positions in the primary and backup schedules, shared by all workers
    /// so the weighted order holds for the whole instance.
    pub cursors: [u64; 2],
    pub status: SyncStatus,
    reserve: *mut Reserve,
    ledgers: *mut Ledger,
    /// The entries the last answer skipped, as `key\tcause\n` lines (bounded), and how
    /// many there were.
    skipped: PlanRef,
    skipped_count: u64,
    /// When dead processes' ledgers were last looked for (monotonic ms).
    ledgers_checked_ms: u64,
    /// The active health check's table and prober lease (null: never configured).
    health: *mut health::HealthBlock,
}

/// What `Zone::init` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InitOutcome {
    /// A new zone: it holds the configured servers.
    Fresh,
    /// A kept zone with a set from the same source (reload): the set is kept.
    Kept,
    /// A kept zone whose source changed: memory is reserved, `commit_switch` publishes
    /// the configured servers once the new cycle is committed.
    Switch,
}

/// A handle on one upstream's zone, valid in every process after the zone is
/// initialized. `ledger` is this process's session ledger (null until `attach_process`).
#[derive(Clone, Copy)]
pub struct Zone {
    pool: *mut ngx_slab_pool_t,
    hdr: *mut ZoneHeader,
    ledger: *mut Ledger,
}

/// The mutex-holding view of a zone: made by `Zone::lock`, unlocks on drop. It owns the
/// exclusive borrow of the shared state for its lifetime.
pub struct Locked<'a> {
    pool: *mut ngx_slab_pool_t,
    hdr: &'a mut ZoneHeader,
    ledger: *mut Ledger,
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // SAFETY: `pool` is the zone's live slab pool and this guard holds its mutex,
        // taken in `Zone::lock` (or `Zone::init`).
        unsafe { ngx_shmtx_unlock(&mut (*self.pool).mutex) };
    }
}

impl Zone {
    /// Attaches to the zone at `pool` while nginx reads a configuration (master), and
    /// prepares it for `initial` (the configured servers) with `plan` built for them.
    /// Never changes what running workers see (see the module comment).
    ///
    /// # Safety
    /// `pool` must be the start of an nginx shared zone (a slab pool set up by nginx)
    /// that stays mapped for the life of the cycle.
    pub unsafe fn init(
        pool: *mut ngx_slab_pool_t,
        fingerprint: u64,
        initial: &[ServerSpec],
        plan: &Plan,
    ) -> Result<(Zone, InitOutcome), ZoneError> {
        // SAFETY: per this function's contract `pool` is a live slab pool.
        unsafe { ngx_shmtx_lock(&mut (*pool).mutex) };
        // SAFETY: the pool's mutex is held; `data` is the header this module put there
        // (checked by its magic) or null/foreign in a new zone.
        let existing = unsafe { (*pool).data as *mut ZoneHeader };
        // SAFETY: as above; a non-null `data` of a zone with our tag is our header.
        let reused = !existing.is_null() && unsafe { (*existing).magic } == MAGIC;
        let hdr = if reused {
            existing
        } else {
            // SAFETY: mutex held; the allocation is zeroed before use.
            let h =
                unsafe { ngx_slab_alloc_locked(pool, size_of::<ZoneHeader>()) } as *mut ZoneHeader;
            if h.is_null() {
                // SAFETY: mutex held since the top of this function.
                unsafe { ngx_shmtx_unlock(&mut (*pool).mutex) };
                return Err(ZoneError::Full {
                    servers: initial.len(),
                });
            }
            // SAFETY: `h` is a fresh allocation of the header's size; all-zero is a valid
            // header (null pointers, zero counters) before `magic` is set.
            unsafe {
                ptr::write_bytes(h as *mut u8, 0, size_of::<ZoneHeader>());
                (*h).magic = MAGIC;
                (*pool).data = h as *mut _;
            }
            h
        };
        let zone = Zone {
            pool,
            hdr,
            ledger: ptr::null_mut(),
        };
        // The mutex is already held: the guard takes it over and unlocks on drop.
        let mut l = Locked {
            pool,
            // SAFETY: `hdr` is our header in the zone; the mutex is held.
            hdr: unsafe { &mut *hdr },
            ledger: ptr::null_mut(),
        };
        if !reused {
            l.hdr.fingerprint = fingerprint;
            let block = l.alloc_plan(plan)?;
            l.publish(initial, block, None)?;
            return Ok((zone, InitOutcome::Fresh));
        }
        // A kept zone: running workers use it, nothing visible may change. A reserve left
        // by a reload that was rejected later is given back first.
        l.drop_reserve();
        if l.hdr.fingerprint == fingerprint && !l.hdr.set_foreign && !l.hdr.set.is_null() {
            return Ok((zone, InitOutcome::Kept));
        }
        l.reserve(initial.len(), plan.flat_words())?;
        Ok((zone, InitOutcome::Switch))
    }

    /// Makes a source switch prepared by `init` visible (the new cycle is committed):
    /// gives back the reserve, publishes `initial` with `plan`, takes the new source's
    /// fingerprint and restarts the lease and status. Returns the publish error, if any:
    /// the previous set then stays, marked as not from the new source.
    pub fn commit_switch(
        &self,
        fingerprint: u64,
        initial: &[ServerSpec],
        plan: &Plan,
    ) -> Result<(), ZoneError> {
        let mut l = self.lock();
        l.drop_reserve();
        l.hdr.fingerprint = fingerprint;
        l.hdr.poller_pid = 0;
        l.hdr.lease_until_ms = 0;
        l.hdr.cursors = [0, 0];
        let updates = l.hdr.status.updates;
        // SAFETY: SyncStatus is plain old data; all-zero is its initial value.
        l.hdr.status = unsafe { std::mem::zeroed() };
        l.hdr.status.updates = updates;
        l.set_skipped(&[]);
        let result = l
            .alloc_plan(plan)
            .and_then(|block| l.publish(initial, block, None));
        l.hdr.set_foreign = result.is_err();
        result.map(|_| ())
    }

    pub fn lock(&self) -> Locked<'_> {
        // SAFETY: `pool` is a live slab pool (zones are mapped for the life of the
        // process); workers are single-threaded and never lock a zone twice, so the
        // mutex is free or held by another process; the guard unlocks it on drop.
        unsafe { ngx_shmtx_lock(&mut (*self.pool).mutex) };
        Locked {
            pool: self.pool,
            // SAFETY: the header is ours (set up by `init`) and the mutex is held for the
            // guard's lifetime, so this is the only reference to it in this process.
            hdr: unsafe { &mut *self.hdr },
            ledger: self.ledger,
        }
    }

    /// Pool usage for status output: (used pages, total pages).
    pub fn usage(&self) -> (usize, usize) {
        // SAFETY: reads two counters of a live pool; a torn read only skews a statistic.
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
        // SAFETY: the set is owned by the header and stays allocated while the lock is
        // held; it is laid out as `SharedSet::alloc` describes.
        unsafe { (*self.hdr.set).slots() }
    }

    /// Slot `i` of the current set (an index of `slots()`).
    pub fn slot(&self, i: usize) -> &Slot {
        // SAFETY: slots of the current set are live while the lock is held.
        unsafe { &*self.slots()[i] }
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
        self.slots()
            .iter()
            // SAFETY: slots of the current set are live while the lock is held.
            .map(|&s| unsafe { (*s).spec() })
            .collect()
    }

    /// The current plan (a plan with no servers before the first publish).
    pub fn plan(&self) -> Option<PlanView<'_>> {
        let p = self.hdr.plan;
        if p.ptr.is_null() {
            return None;
        }
        // SAFETY: the block was allocated with `words` words and filled by
        // `Plan::write_flat` before it was published; it is freed only under the lock.
        let words = unsafe { std::slice::from_raw_parts(p.ptr, p.words) };
        PlanView::from_flat(words)
    }

    /// The parts a pick needs at once: the set's per-server state, the plan and the
    /// shared round-robin cursors. Disjoint memory, so one may be mutated while the
    /// other is read.
    pub fn pick_parts(&mut self) -> (SetPeers<'_>, Option<PlanView<'_>>, &mut [u64; 2]) {
        let slots: *const [*mut Slot] = self.slots();
        let plan = self.hdr.plan;
        // SAFETY: the slot list, the slots, the plan block and the header's cursors are
        // four separate allocations owned by the zone; the lock is held for the borrows'
        // lifetime ('_ of `self`), and `SetPeers` only hands out one `&mut PeerState` at
        // a time through `&mut self`.
        unsafe {
            let plan = if plan.ptr.is_null() {
                None
            } else {
                PlanView::from_flat(std::slice::from_raw_parts(plan.ptr, plan.words))
            };
            (
                SetPeers {
                    slots: &*slots,
                    _lock: std::marker::PhantomData,
                },
                plan,
                &mut self.hdr.cursors,
            )
        }
    }

    /// The polling lease.
    pub fn lease(&self) -> Lease {
        Lease {
            holder: self.hdr.poller_pid,
            until_ms: self.hdr.lease_until_ms,
        }
    }

    /// The epoch of the lease as it is held now.
    pub fn lease_epoch(&self) -> u64 {
        self.hdr.lease_epoch
    }

    /// Takes the lease for `pid` until `until_ms`; returns its new epoch.
    pub fn take_lease(&mut self, pid: i64, until_ms: u64) -> u64 {
        self.hdr.poller_pid = pid;
        self.hdr.lease_until_ms = until_ms;
        self.hdr.lease_epoch += 1;
        self.hdr.lease_epoch
    }

    /// Extends the lease its holder keeps.
    pub fn renew_lease(&mut self, until_ms: u64) {
        self.hdr.lease_until_ms = until_ms;
    }

    /// Gives the lease back, if `pid` holds it.
    pub fn release_lease(&mut self, pid: i64) {
        if self.hdr.poller_pid == pid {
            self.hdr.poller_pid = 0;
            self.hdr.lease_until_ms = 0;
        }
    }

    /// Records the entries the last answer skipped (at most `SKIPPED_SHOWN` of them are
    /// kept, for the status views).
    pub fn set_skipped(&mut self, skipped: &[upsync_core::registry::Skipped]) {
        const SKIPPED_SHOWN: usize = 100;
        let mut text = String::new();
        for s in skipped.iter().take(SKIPPED_SHOWN) {
            text.push_str(&s.key.replace(['\t', '\n'], " "));
            text.push('\t');
            text.push_str(&s.cause.replace(['\t', '\n'], " "));
            text.push('\n');
        }
        let old = std::mem::replace(&mut self.hdr.skipped, PlanRef::NONE);
        if !old.ptr.is_null() {
            // SAFETY: the block was allocated by this function on this pool; lock held.
            unsafe { ngx_slab_free_locked(self.pool, old.ptr as *mut _) };
        }
        self.hdr.skipped_count = skipped.len() as u64;
        if text.is_empty() {
            return;
        }
        // SAFETY: lock held; the block is filled before it is linked.
        unsafe {
            let p = ngx_slab_alloc_locked(self.pool, text.len()) as *mut u64;
            if p.is_null() {
                return; // the count still shows; the list needs room in the zone
            }
            ptr::copy_nonoverlapping(text.as_ptr(), p as *mut u8, text.len());
            self.hdr.skipped = PlanRef {
                ptr: p,
                words: text.len(),
            };
        }
    }

    /// The skipped entries recorded (key, cause) and how many there were in all.
    pub fn skipped(&self) -> (Vec<(String, String)>, u64) {
        let b = self.hdr.skipped;
        if b.ptr.is_null() {
            return (Vec::new(), self.hdr.skipped_count);
        }
        // SAFETY: `words` bytes of text written by `set_skipped`, freed only under the lock.
        let text = unsafe { std::slice::from_raw_parts(b.ptr as *const u8, b.words) };
        let list = String::from_utf8_lossy(text)
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .map(|(k, c)| (k.to_string(), c.to_string()))
            .collect();
        (list, self.hdr.skipped_count)
    }

    /// The sync status, for reading (`status` gives it to write).
    pub fn status_ref(&self) -> &SyncStatus {
        &self.hdr.status
    }

    /// The fingerprint of the source the zone serves.
    pub fn fingerprint(&self) -> u64 {
        self.hdr.fingerprint
    }

    /// Allocates a plan block and writes `plan` into it. Under the lock, for the master
    /// (`init`, `commit_switch`); pollers fill theirs outside the lock (`PlanBlock`).
    fn alloc_plan(&mut self, plan: &Plan) -> Result<PlanBlock, ZoneError> {
        let mut block = self
            .alloc_plan_block(plan.flat_words())
            .ok_or(ZoneError::Full {
                servers: plan.primaries.len(),
            })?;
        block.fill(plan);
        Ok(block)
    }

    /// An empty plan block of `words` words, not yet visible to anyone.
    pub fn alloc_plan_block(&mut self, words: usize) -> Option<PlanBlock> {
        // SAFETY: the lock is held; the block is ours until published or freed.
        let ptr = unsafe { ngx_slab_alloc_locked(self.pool, words.max(1) * 8) } as *mut u64;
        (!ptr.is_null()).then_some(PlanBlock { ptr, words })
    }

    /// Gives back a plan block that was not published.
    pub fn free_plan_block(&mut self, block: PlanBlock) {
        // SAFETY: the block came from `alloc_plan_block` on this pool and was never
        // published; the lock is held.
        unsafe { ngx_slab_free_locked(self.pool, block.ptr as *mut _) };
    }

    fn drop_reserve(&mut self) {
        let r = std::mem::replace(&mut self.hdr.reserve, ptr::null_mut());
        if r.is_null() {
            return;
        }
        // SAFETY: the reserve and everything it points to were allocated by `reserve`
        // on this pool and are referenced from nowhere else; the lock is held.
        unsafe {
            set::free_unshared(self.pool, (*r).set);
            if !(*r).plan.ptr.is_null() {
                ngx_slab_free_locked(self.pool, (*r).plan.ptr as *mut _);
            }
            ngx_slab_free_locked(self.pool, r as *mut _);
        }
    }

    /// Sets aside memory for `servers` fresh slots, their list and a plan of
    /// `plan_words`: what `commit_switch` will need.
    fn reserve(&mut self, servers: usize, plan_words: usize) -> Result<(), ZoneError> {
        let full = ZoneError::Full { servers };
        // SAFETY: the lock is held; every allocation below is owned by the reserve (or
        // freed here on failure).
        unsafe {
            let r = ngx_slab_alloc_locked(self.pool, size_of::<Reserve>()) as *mut Reserve;
            if r.is_null() {
                return Err(full);
            }
            ptr::write(
                r,
                Reserve {
                    set: ptr::null_mut(),
                    plan: PlanRef::NONE,
                },
            );
            self.hdr.reserve = r;
            (*r).set = set::alloc_unshared(self.pool, servers).ok_or(full.clone())?;
            let plan = self.alloc_plan_block(plan_words).ok_or(full)?;
            (*r).plan = PlanRef {
                ptr: plan.ptr,
                words: plan.words,
            };
        }
        Ok(())
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

    pub fn status(&mut self) -> &mut SyncStatus {
        &mut self.hdr.status
    }
}

/// A plan block allocated in the zone but not yet published: only its owner can see
/// it, so it may be filled without the lock. Publish it with `Locked::publish`, or give
/// it back with `Locked::free_plan_block`.
pub struct PlanBlock {
    ptr: *mut u64,
    words: usize,
}

impl PlanBlock {
    /// Writes `plan` (whose `flat_words()` the block was allocated for).
    pub fn fill(&mut self, plan: &Plan) {
        // SAFETY: the block is `words` words allocated for this handle alone (not yet
        // published, so no other process or guard references it).
        let words = unsafe { std::slice::from_raw_parts_mut(self.ptr, self.words) };
        plan.write_flat(words);
    }
}

/// The current set seen as balancer peers (borrowed from a `Locked` guard).
pub struct SetPeers<'a> {
    slots: &'a [*mut Slot],
    _lock: std::marker::PhantomData<&'a mut ZoneHeader>,
}

impl upsync_core::balancer::Peers for SetPeers<'_> {
    fn len(&self) -> usize {
        self.slots.len()
    }
    fn peer(&mut self, i: usize) -> &mut upsync_core::balancer::PeerState {
        // SAFETY: slots of the current set are live while the guard this borrows from
        // holds the lock, and `&mut self` makes the returned borrow the only one.
        unsafe { &mut (*self.slots[i]).state }
    }
}
