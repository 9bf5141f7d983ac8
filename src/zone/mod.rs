//! One upsync upstream's domain in the shared zone (see `shared`): its server set and
//! selection plan, the per-server state every worker's balancer shares, the poller
//! lease, sync status, and the per-process session ledgers. One `Zone` handle per
//! upstream and process.
//!
//! Layout (all inside the shared zone's slab pool, so pointers are valid in every
//! process: the zone is mapped before the fork and at the same address after reloads):
//!
//! ```text
//! ZoneHeader ── set ───> SharedSet { generation, len, [*mut Slot; len] } ──> Slot
//!            ── plan ──> [u64] (balancer::Plan in flat form, built once per set)
//!            ── lc ────> [LcNode] (least_conn's tree over the set, kept up to date)
//!            ── ledgers ──> Ledger (one per process: the slots its sessions hold)
//!            ── reserve ──> memory the master set aside for a reload (see `init`)
//! ```
//!
//! Reloads are two-phase. `init` runs in the master while nginx reads a new
//! configuration (a reload can still be rejected afterwards): it never changes what the
//! running workers see. A domain that is new gets the configured servers at once; a
//! kept domain whose source changed only gets memory reserved for them. `commit_switch`
//! runs when the new cycle is committed (`init_module`) and makes the switch visible.
//!
//! Every access to a domain's state happens under its lock (`Zone::lock`); a worker
//! that dies holding it is noticed by the next process that waits (`shared`). Memory
//! comes from the shared pool and is counted against the domain (`alloc`, `free`).

mod health;
mod lc;
mod ledger;
mod memory;
mod set;
mod shared;

use std::ptr;
use std::sync::atomic::{AtomicU64, Ordering};

use nginx_sys::ngx_slab_pool_t;
use upsync_core::balancer::{LcNode, LcTree, Method, Plan, PlanView};
use upsync_core::policy::{decide_lease, Lease, LeaseDecision};
use upsync_core::servers::ServerSpec;

pub use health::{HealthCommit, HealthRecord, Probed};
pub use ledger::{reaped_line, Ticket};

pub use set::{sockaddr_of, Slot, NAME_MAX};

use ledger::Ledger;
use set::SharedSet;
use shared::DomainLock;
pub use shared::{DomainSpec, SharedZone};

const MAGIC: u64 = 0x7570_7379_6e63_0008; // "upsync", layout v8

/// Why the zone could not take a set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZoneError {
    #[error("{servers} servers and their selection plan do not fit in the shared zone")]
    Full { servers: usize },
}

/// Sets up to this size pick least_conn by a scan (as cheap as nginx's for a few
/// servers); larger ones keep a tree.
const LC_TREE_MIN: usize = 32;

/// The memory of one server's slot.
pub const SLOT_BYTES: u64 = size_of::<Slot>() as u64;

/// The memory a set of `servers` with a plan of `plan_words` takes in the zone for
/// `method` (slots, their list, the plan, least_conn's tree).
pub fn bytes_for(servers: usize, plan_words: usize, method: Method) -> u64 {
    let tree = match method {
        Method::LeastConn if servers > LC_TREE_MIN => {
            LcTree::nodes_for(servers) * size_of::<LcNode>()
        }
        _ => 0,
    };
    (servers * (size_of::<Slot>() + size_of::<*mut Slot>()) + plan_words * 8 + tree) as u64
}

/// Where an upstream's memory stands, for messages and status views.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// Bytes the upstream's domain uses now.
    pub used: u64,
    /// Its cap (`zone_size=`), 0 for none.
    pub budget: u64,
    /// Free bytes in the shared zone (whole free pages), and its size.
    pub shared_free: u64,
    pub shared_size: u64,
}

impl Usage {
    /// The largest registry answer read for the upstream: `policy::response_limit` of
    /// what it may use (its `zone_size=`, else the whole shared zone).
    pub fn response_limit(&self) -> usize {
        upsync_core::policy::response_limit(if self.budget > 0 {
            self.budget
        } else {
            self.shared_size
        })
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

/// Longest upstream name a domain records (longer names are cut: a domain is found by
/// this prefix, and nginx upstream names are short).
const DOMAIN_NAME_MAX: usize = 192;

#[repr(C)]
pub struct ZoneHeader {
    magic: u64,
    lock: DomainLock,
    /// The next domain of the shared zone.
    next: *mut ZoneHeader,
    name_len: u32,
    name: [u8; DOMAIN_NAME_MAX],
    /// The last configuration (`Root::epoch`) that uses this domain.
    claimed: u64,
    /// Bytes allocated for this domain, and the cap (`zone_size=`, 0: none).
    used: u64,
    budget: u64,
    /// Identifies the source the set belongs to (upstream name, type, endpoint): pollers
    /// of another source (an old worker after a reload that changed it) never publish.
    fingerprint: u64,
    /// The set did not come from `fingerprint`'s source (a committed switch whose publish
    /// failed): a reload must not keep it.
    set_foreign: bool,
    set: *mut SharedSet,
    plan: PlanRef,
    /// `plan` parsed (slices into its block: the zone is mapped at the same address in
    /// every process), replaced with it.
    plan_view: Option<PlanView<'static>>,
    /// least_conn's tree over the set (`words` is its node count), when the method is
    /// least_conn.
    lc: PlanRef,
    /// The current set's length and generation, readable without the lock (hints: a
    /// session sizes its bookkeeping with them, the pick reads the set under the lock).
    set_len: AtomicU64,
    set_generation: AtomicU64,
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
    /// Slots no one holds any more, freed once no process can still read their name
    /// (`Locked::sweep_retired`).
    retired: *mut Slot,
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
        self.hdr.lock.unlock();
    }
}

impl Zone {
    /// Sets up the domain of one upstream while nginx reads a configuration (master),
    /// and prepares it for `initial` (the configured servers) with the plan `plan`
    /// builds for them, only when it is needed (not for a domain kept as it is). Never
    /// changes what running workers see (see the module comment).
    pub fn init(
        shared: &SharedZone,
        spec: &DomainSpec,
        initial: &[ServerSpec],
        plan: impl FnOnce() -> Plan,
    ) -> Result<(Zone, InitOutcome), ZoneError> {
        let full = ZoneError::Full {
            servers: initial.len(),
        };
        let (hdr, created) = shared.domain(spec).ok_or(full)?;
        let zone = Zone {
            pool: shared.pool,
            hdr,
            ledger: ptr::null_mut(),
        };
        let mut l = zone.lock();
        l.hdr.budget = spec.budget;
        if created {
            l.hdr.fingerprint = spec.fingerprint;
            // a new domain: no other process uses it yet
            let block = l.alloc_plan(&plan())?;
            l.publish(initial, block, None)?;
            return Ok((zone, InitOutcome::Fresh));
        }
        // A kept domain: running workers use it, nothing visible may change. A reserve
        // left by a reload that was rejected later is given back first.
        l.drop_reserve();
        if l.hdr.fingerprint == spec.fingerprint && !l.hdr.set_foreign && !l.hdr.set.is_null() {
            return Ok((zone, InitOutcome::Kept));
        }
        // the plan is built outside the lock running workers take for each connection
        drop(l);
        let words = plan().flat_words();
        zone.lock().reserve(initial.len(), words)?;
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
        // SAFETY: the header is this upstream's domain (set up by `init`), mapped for
        // the life of the process; workers are single-threaded and never lock a domain
        // twice, so the guard made here is the only reference to it in this process.
        let hdr = unsafe { &mut *self.hdr };
        hdr.lock.lock();
        Locked {
            pool: self.pool,
            hdr,
            ledger: self.ledger,
        }
    }

    /// The current set's (length, generation) without taking the lock (see
    /// `ZoneHeader::set_len`).
    pub fn set_hint(&self) -> (usize, u64) {
        // SAFETY: the header is ours and mapped; the fields are only written atomically.
        unsafe {
            (
                (*self.hdr).set_len.load(Ordering::Relaxed) as usize,
                (*self.hdr).set_generation.load(Ordering::Relaxed),
            )
        }
    }

    /// Where the upstream's memory stands (read without the lock: a statistic).
    pub fn usage(&self) -> Usage {
        // SAFETY: reads counters of a live domain and pool; a torn read only skews a
        // statistic.
        unsafe {
            let p = &*self.pool;
            Usage {
                used: (*self.hdr).used,
                budget: (*self.hdr).budget,
                shared_free: p.pfree as u64 * 4096,
                shared_size: (p.end as usize - p.start as usize) as u64,
            }
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

    /// The current plan (None before the first publish).
    pub fn plan(&self) -> Option<PlanView<'_>> {
        self.hdr.plan_view
    }

    /// The parts a pick needs at once: the set's per-server state, the plan, the shared
    /// round-robin cursors and the least_conn tree. Disjoint memory, so one may be
    /// mutated while another is read.
    pub fn pick_parts(
        &mut self,
    ) -> (
        SetPeers<'_>,
        Option<&PlanView<'_>>,
        &mut [u64; 2],
        Option<LcTree<'_>>,
    ) {
        let slots: *const [*mut Slot] = self.slots();
        let lc = self.hdr.lc;
        let len = self.slots().len();
        // SAFETY: the slot list, the slots, the tree and the header's cursors and plan
        // view are separate memory owned by the zone; the lock is held for the borrows'
        // lifetime ('_ of `self`), and `SetPeers` only hands out one `&mut PeerState`
        // at a time through `&mut self`.
        unsafe {
            let tree = if lc.ptr.is_null() {
                None
            } else {
                LcTree::new(
                    std::slice::from_raw_parts_mut(lc.ptr as *mut LcNode, lc.words),
                    len,
                )
            };
            let hdr: *mut ZoneHeader = &mut *self.hdr;
            (
                SetPeers {
                    slots: &*slots,
                    _lock: std::marker::PhantomData,
                },
                (*hdr).plan_view.as_ref(),
                &mut (*hdr).cursors,
                tree,
            )
        }
    }

    /// Makes `plan` the current plan (freeing the previous block).
    fn set_plan(&mut self, plan: PlanRef) {
        let old = std::mem::replace(&mut self.hdr.plan, plan);
        // SAFETY: the block holds `words` words written by `Plan::write_flat`; it stays
        // allocated, at this address in every process, until the next `set_plan`
        // replaces the view with it.
        self.hdr.plan_view =
            unsafe { PlanView::from_flat(std::slice::from_raw_parts(plan.ptr, plan.words)) };
        if !old.ptr.is_null() {
            // SAFETY: the previous plan block is this pool's and referenced from nowhere
            // else now; the lock is held.
            unsafe { self.free(old.ptr as *mut u8, old.words.max(1) * 8) };
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

    /// The election of `me` at `now` (`policy::decide_lease`): renews or takes the
    /// lease until `until_ms`; the epoch held, or None while another live process
    /// holds it.
    pub fn elect(&mut self, me: i64, now: u64, until_ms: u64) -> Option<u64> {
        match decide_lease(self.lease(), me, now, crate::process::pid_alive) {
            LeaseDecision::Renew => {
                self.renew_lease(until_ms);
                Some(self.lease_epoch())
            }
            LeaseDecision::Take => Some(self.take_lease(me, until_ms)),
            LeaseDecision::Wait => None,
        }
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
            // SAFETY: the block of `words` bytes was allocated by this function; lock held.
            unsafe { self.free(old.ptr as *mut u8, old.words) };
        }
        self.hdr.skipped_count = skipped.len() as u64;
        if text.is_empty() {
            return;
        }
        let p = self.alloc(text.len()) as *mut u64;
        // SAFETY: lock held; the block is filled before it is linked.
        unsafe {
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

    /// A good answer from the registry at `in_use`: the status moves on to `position`
    /// (the time of the sync), and the failure count and last error clear.
    pub fn mark_synced(&mut self, position: u64, in_use: &str) {
        self.set_in_use(in_use);
        let st = self.status();
        st.position = position;
        st.last_sync_ms = crate::ngx_util::wall_ms();
        st.consecutive_failures = 0;
        self.set_error("");
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
