//! The health table of an upsync zone: one record per server address (not per slot or
//! index, so it survives every change of the set), the prober lease (a second lease,
//! next to the poller's), and the health flag each slot's `PeerState` carries for the
//! balancer. A publish seeds new slots from the table; the prober writes results here;
//! the master resets or keeps the table when a configuration is committed.
//!
//! Layout: `ZoneHeader.health` -> `HealthBlock` -> `[Entry; cap]` (sorted by address,
//! like the set's slots), all in the zone's slab pool; read and written under the lock.

use std::net::SocketAddr;
use std::ptr;

use upsync_core::health::{AddrKey, Change, Health, HealthState, Thresholds};
use upsync_core::policy::{decide_lease, Lease, LeaseDecision};

use super::set::Slot;
use super::{Locked, ZoneError};

/// Longest failure reason kept per server (sized so `Entry` has no padding).
const REASON_MAX: usize = 95;

#[repr(C)]
pub(super) struct HealthBlock {
    /// Identifies the committed `health_check` configuration (0: none): only probers
    /// of that configuration take the lease.
    conf_id: u64,
    /// Servers the table does not know yet start "checking".
    mandatory: bool,
    /// The prober lease: holder pid (0: none), until when (monotonic ms), and how many
    /// times it was taken (a prober writes only under the epoch it took).
    pid: i64,
    until_ms: u64,
    epoch: u64,
    /// The set generation the table was last matched to.
    generation: u64,
    table: *mut Entry,
    len: usize,
}

/// One server's record. No padding (and the address as `AddrKey`, not `SocketAddr`):
/// valgrind follows shared memory per process, so padding one process wrote would look
/// uninitialised to a process forked later that reads the memory once reused.
#[repr(C)]
#[derive(Clone, Copy)]
struct Entry {
    health: Health,
    key: AddrKey,
    reason_len: u8,
    reason: [u8; REASON_MAX],
}

const _: () = assert!(size_of::<Entry>() == size_of::<Health>() + 32 + 1 + REASON_MAX);

impl Entry {
    fn new(addr: SocketAddr, state: HealthState) -> Entry {
        Entry {
            health: Health::new(state),
            key: AddrKey::of(&addr),
            reason_len: 0,
            reason: [0; REASON_MAX],
        }
    }

    fn addr(&self) -> SocketAddr {
        self.key.addr()
    }

    fn reason(&self) -> String {
        String::from_utf8_lossy(&self.reason[..self.reason_len as usize]).into_owned()
    }

    fn set_reason(&mut self, text: &str) {
        let mut n = text.len().min(REASON_MAX);
        while !text.is_char_boundary(n) {
            n -= 1;
        }
        self.reason[..n].copy_from_slice(&text.as_bytes()[..n]);
        self.reason_len = n as u8;
    }
}

/// One server as the prober sees it after a sync.
#[derive(Debug, Clone, Copy)]
pub struct Probed {
    pub addr: SocketAddr,
    pub down: bool,
    pub state: HealthState,
}

/// A server's record for the status views.
#[derive(Debug, Clone)]
pub struct HealthRecord {
    pub health: Health,
    pub last_failure: String,
}

/// What a committed configuration asks of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthCommit {
    /// No `health_check`: every server takes traffic, the table is dropped.
    Off,
    /// A `health_check` with this id. `keep`: the states before the reload stay
    /// (`persistent`); otherwise every server starts over (checking with `mandatory`,
    /// else up).
    On {
        conf_id: u64,
        mandatory: bool,
        keep: bool,
    },
}

impl Locked<'_> {
    fn block(&self) -> Option<&HealthBlock> {
        // SAFETY: the block is this zone's (made by `health_commit`), freed never; the
        // lock is held for the borrow.
        unsafe { self.hdr.health.as_ref() }
    }

    fn block_mut(&mut self) -> Option<&mut HealthBlock> {
        // SAFETY: as in `block`, with `&mut self` making the borrow exclusive.
        unsafe { self.hdr.health.as_mut() }
    }

    fn entries(&self) -> &[Entry] {
        match self.block() {
            Some(b) if !b.table.is_null() => {
                // SAFETY: `len` entries written by `rebuild_table`, freed only under the
                // lock.
                unsafe { std::slice::from_raw_parts(b.table, b.len) }
            }
            _ => &[],
        }
    }

    fn entries_mut(&mut self) -> &mut [Entry] {
        match self.block_mut() {
            Some(b) if !b.table.is_null() => {
                // SAFETY: as in `entries`, exclusive through `&mut self`.
                unsafe { std::slice::from_raw_parts_mut(b.table, b.len) }
            }
            _ => &mut [],
        }
    }

    fn find(&self, addr: &SocketAddr) -> Option<usize> {
        self.entries().binary_search_by(|e| e.addr().cmp(addr)).ok()
    }

    fn slot_index(&self, addr: &SocketAddr) -> Option<usize> {
        self.slots()
            // SAFETY: slots of the current set are live while the lock is held.
            .binary_search_by(|&s| unsafe { (*s).addr() }.cmp(addr))
            .ok()
    }

    /// The committed health-check configuration (0: none).
    pub fn health_conf_id(&self) -> u64 {
        self.block().map_or(0, |b| b.conf_id)
    }

    /// Sets a new slot's health flag from the table (publish): the state its address
    /// has, or for an address the table does not know, "checking" under `mandatory`.
    pub(super) fn health_seed(&self, slot: &mut Slot) {
        let Some(b) = self.block().filter(|b| b.conf_id != 0) else {
            return;
        };
        slot.state.unhealthy = match self.find(&slot.addr()) {
            Some(i) => !self.entries()[i].health.state.in_traffic(),
            None => b.mandatory,
        };
    }

    /// The master commits a configuration (see `HealthCommit`). Restarts the prober
    /// lease, so probers of the previous configuration stop writing.
    pub fn health_commit(&mut self, what: HealthCommit) -> Result<(), ZoneError> {
        if self.hdr.health.is_null() {
            if what == HealthCommit::Off {
                return Ok(());
            }
            let b = self.alloc(size_of::<HealthBlock>()) as *mut HealthBlock;
            // SAFETY: the lock is held; the block is zeroed before it is linked.
            unsafe {
                if b.is_null() {
                    return Err(ZoneError::Full {
                        servers: self.slots().len(),
                    });
                }
                ptr::write_bytes(b as *mut u8, 0, size_of::<HealthBlock>());
                self.hdr.health = b;
            }
        }
        let generation = self.generation();
        let b = self.block_mut().expect("allocated above");
        b.pid = 0;
        b.until_ms = 0;
        b.epoch += 1;
        match what {
            HealthCommit::Off => {
                b.conf_id = 0;
                b.mandatory = false;
                self.free_table();
                for &s in self.slots() {
                    // SAFETY: slots of the current set are live while the lock is held.
                    unsafe { (*s).state.unhealthy = false };
                }
                self.refresh_lc();
                Ok(())
            }
            HealthCommit::On {
                conf_id,
                mandatory,
                keep,
            } => {
                let had = b.conf_id != 0;
                b.conf_id = conf_id;
                b.mandatory = mandatory;
                if !(keep && had) {
                    // every server starts over: what the table says no longer holds
                    let start = HealthState::initial(mandatory);
                    for &s in self.slots() {
                        // SAFETY: as above.
                        unsafe { (*s).state.unhealthy = !start.in_traffic() };
                    }
                    for e in self.entries_mut() {
                        e.health.restart(start);
                    }
                }
                self.refresh_lc();
                let rebuilt = self.rebuild_table();
                if let Some(b) = self.block_mut() {
                    b.generation = generation;
                }
                rebuilt
            }
        }
    }

    fn free_table(&mut self) {
        let Some(b) = self.block_mut() else {
            return;
        };
        let t = std::mem::replace(&mut b.table, ptr::null_mut());
        let len = std::mem::take(&mut b.len);
        if !t.is_null() {
            // SAFETY: the table of `len` entries is this domain's and no longer
            // referenced; the lock is held.
            unsafe { self.free(t as *mut u8, len * size_of::<Entry>()) };
        }
    }

    /// Frees the health state (a domain being emptied).
    pub(super) fn free_health(&mut self) {
        self.free_table();
        let b = std::mem::replace(&mut self.hdr.health, ptr::null_mut());
        if !b.is_null() {
            // SAFETY: the block is this domain's and no longer referenced; lock held.
            unsafe { self.free(b as *mut u8, size_of::<HealthBlock>()) };
        }
    }

    /// Matches the table to the current set: a record per server, kept for addresses
    /// it had, new for the others (in the state their slot was seeded with). Records of
    /// servers no longer in the set go. On allocation failure the old table stays.
    fn rebuild_table(&mut self) -> Result<(), ZoneError> {
        let slots: Vec<*mut Slot> = self.slots().to_vec();
        let old = self.entries();
        let mut fresh: Vec<Entry> = Vec::with_capacity(slots.len());
        let mut oi = 0;
        for &s in &slots {
            // SAFETY: slots of the current set are live while the lock is held.
            let (addr, unhealthy) = unsafe { ((*s).addr(), (*s).state.unhealthy) };
            while oi < old.len() && old[oi].addr() < addr {
                oi += 1;
            }
            fresh.push(if oi < old.len() && old[oi].addr() == addr {
                old[oi]
            } else {
                let state = if unhealthy {
                    HealthState::Checking
                } else {
                    HealthState::Up
                };
                Entry::new(addr, state)
            });
        }
        let table = if fresh.is_empty() {
            ptr::null_mut()
        } else {
            let t = self.alloc(fresh.len() * size_of::<Entry>()) as *mut Entry;
            // SAFETY: the lock is held; the table is filled before it is linked.
            unsafe {
                if t.is_null() {
                    return Err(ZoneError::Full {
                        servers: fresh.len(),
                    });
                }
                ptr::copy_nonoverlapping(fresh.as_ptr(), t, fresh.len());
                t
            }
        };
        self.free_table();
        let b = self.block_mut().expect("health block exists");
        b.table = table;
        b.len = fresh.len();
        Ok(())
    }

    /// The prober lease and the configuration it is for.
    pub fn prober_lease(&self) -> (Lease, u64) {
        self.block().map_or(
            (
                Lease {
                    holder: 0,
                    until_ms: 0,
                },
                0,
            ),
            |b| {
                (
                    Lease {
                        holder: b.pid,
                        until_ms: b.until_ms,
                    },
                    b.conf_id,
                )
            },
        )
    }

    /// The epoch of the prober lease as it is held now.
    pub fn prober_epoch(&self) -> u64 {
        self.block().map_or(0, |b| b.epoch)
    }

    /// Takes the prober lease for `pid` until `until_ms`; returns its new epoch.
    pub fn take_prober_lease(&mut self, pid: i64, until_ms: u64) -> u64 {
        let Some(b) = self.block_mut() else {
            return 0;
        };
        b.pid = pid;
        b.until_ms = until_ms;
        b.epoch += 1;
        b.epoch
    }

    /// The prober election of `me` at `now`, as `Locked::elect` for the poller's lease.
    pub fn elect_prober(&mut self, me: i64, now: u64, until_ms: u64) -> Option<u64> {
        match decide_lease(self.prober_lease().0, me, now, crate::process::pid_alive) {
            LeaseDecision::Renew => {
                self.renew_prober_lease(until_ms);
                Some(self.prober_epoch())
            }
            LeaseDecision::Take => Some(self.take_prober_lease(me, until_ms)),
            LeaseDecision::Wait => None,
        }
    }

    pub fn renew_prober_lease(&mut self, until_ms: u64) {
        if let Some(b) = self.block_mut() {
            b.until_ms = until_ms;
        }
    }

    /// Gives the prober lease back, if `pid` holds it.
    pub fn release_prober_lease(&mut self, pid: i64) {
        if let Some(b) = self.block_mut().filter(|b| b.pid == pid) {
            b.pid = 0;
            b.until_ms = 0;
        }
    }

    /// When the set changed since the table was last matched to it (or `force`),
    /// matches it and returns the servers to probe; None when nothing changed. The
    /// error says the zone had no room for the new table (the old one stays).
    pub fn health_sync(&mut self, force: bool) -> Option<(Vec<Probed>, Option<ZoneError>)> {
        let generation = self.generation();
        let b = self.block()?;
        if b.generation == generation && !force {
            return None;
        }
        let rebuilt = if b.generation != generation {
            self.rebuild_table()
        } else {
            Ok(())
        };
        if let Some(b) = self.block_mut() {
            b.generation = generation;
        }
        let list = self
            .slots()
            .iter()
            .map(|&s| {
                // SAFETY: slots of the current set are live while the lock is held.
                let s = unsafe { &*s };
                Probed {
                    addr: s.addr(),
                    down: s.spec().down,
                    state: self
                        .find(&s.addr())
                        .map(|i| self.entries()[i].health.state)
                        .unwrap_or(if s.state.unhealthy {
                            HealthState::Checking
                        } else {
                            HealthState::Up
                        }),
                }
            })
            .collect();
        Some((list, rebuilt.err()))
    }

    /// Records one completed check of `addr` (`failure`: why it failed; None: passed):
    /// updates its record and, on a change, its slot's flag, restarting the slot's
    /// slow_start ramp at `now_mono_ms` when it comes back. None when the table has no
    /// record of `addr` (it left the set).
    pub fn health_record(
        &mut self,
        addr: &SocketAddr,
        failure: Option<&str>,
        th: Thresholds,
        now_wall_ms: u64,
        now_mono_ms: u64,
    ) -> Option<Change> {
        let i = self.find(addr)?;
        let e = &mut self.entries_mut()[i];
        let change = e.health.record(failure.is_none(), th, now_wall_ms);
        if let Some(why) = failure {
            e.set_reason(why);
        }
        let in_traffic = e.health.state.in_traffic();
        if change != Change::Unchanged {
            if let Some(k) = self.slot_index(addr) {
                let slot = self.slots()[k];
                // SAFETY: a slot of the current set, live while the lock is held.
                unsafe {
                    (*slot).state.unhealthy = !in_traffic;
                    if in_traffic && (*slot).state.slow_start_ms > 0 {
                        (*slot).state.ramp_start_ms = now_mono_ms;
                    }
                }
                self.lc_touch(slot);
            }
        }
        Some(change)
    }

    /// How many servers of the set could take traffic (not `down`) and how many of
    /// those the health check lets through.
    pub fn health_counts(&self) -> (usize, usize) {
        let mut candidates = 0;
        let mut healthy = 0;
        for &s in self.slots() {
            // SAFETY: slots of the current set are live while the lock is held.
            let st = unsafe { &(*s).state };
            if !st.down {
                candidates += 1;
                if !st.unhealthy {
                    healthy += 1;
                }
            }
        }
        (candidates, healthy)
    }

    /// The health records of the slots `range` (of `slots()`), in set order, in
    /// O(log n + the range) (None: no `health_check` configured). A slot the table does
    /// not know yet shows the state its flag says.
    pub fn health_records_in(&self, range: std::ops::Range<usize>) -> Option<Vec<HealthRecord>> {
        self.block().filter(|b| b.conf_id != 0)?;
        let entries = self.entries();
        let slots = self.slots().get(range).unwrap_or(&[]);
        // SAFETY: slots of the current set are live while the lock is held.
        let first = slots.first().map(|&s| unsafe { (*s).addr() });
        let mut ei = first.map_or(0, |a| entries.partition_point(|e| e.addr() < a));
        let out = slots
            .iter()
            .map(|&s| {
                // SAFETY: slots of the current set are live while the lock is held.
                let s = unsafe { &*s };
                while ei < entries.len() && entries[ei].addr() < s.addr() {
                    ei += 1;
                }
                match entries.get(ei).filter(|e| e.addr() == s.addr()) {
                    Some(e) => HealthRecord {
                        health: e.health,
                        last_failure: e.reason(),
                    },
                    None => HealthRecord {
                        health: Health::new(if s.state.unhealthy {
                            HealthState::Checking
                        } else {
                            HealthState::Up
                        }),
                        last_failure: String::new(),
                    },
                }
            })
            .collect();
        Some(out)
    }
}
