//! Session ledgers: each process that balances connections records, in the zone, the
//! slot every one of its open sessions holds. A slot's `conns` and `refs` count sessions
//! of all processes; when a process dies without closing its sessions (SIGKILL, a
//! crash, a fast shutdown), the ledger says exactly what to give back, so `active`
//! counts, `max_conns` and removed servers' memory recover.
//!
//! A ledger is an array of entries with a free list: an entry is a slot pointer (even)
//! or `next_free << 1 | 1` (odd). Taking and giving back a ticket is O(1).

use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU32, Ordering};

use super::set::Slot;
use super::{Locked, Zone};

#[repr(C)]
pub(super) struct Ledger {
    pid: i64,
    /// Distinguishes this ledger from a later one at the same address.
    serial: u64,
    /// When it was made (monotonic ms): a death observed before that is another
    /// process's (pid reuse).
    created_ms: u64,
    /// The process's last quiet point (monotonic ms): an event-loop turn outside any
    /// session, so no name of a slot released before can still be read by it.
    quiet_ms: u64,
    next: *mut Ledger,
    cap: u32,
    /// Entries in use at least once (the rest of `cap` was never handed out).
    len: u32,
    /// Head of the free list: index + 1, 0 when empty.
    free: u32,
    entries: *mut usize,
}

/// A session's hold on a slot, recorded in its process's ledger. Made only by
/// `Locked::acquire`, consumed by `Locked::release`.
pub struct Ticket {
    slot: NonNull<Slot>,
    /// The ledger's serial (its low half: enough to tell a later ledger from this one).
    serial: u32,
    /// Index in the ledger; `u32::MAX` when the ledger could not record it.
    index: u32,
}

impl Ticket {
    /// The server's address and name. They never change for a slot, and the ticket
    /// keeps the slot alive: valid, without the lock, until the ticket is released.
    pub fn server(&self) -> (*const libc::sockaddr, u32, &[u8]) {
        // SAFETY: the ticket holds a reference on the slot; these fields are written
        // once, before the slot is published.
        let s = unsafe { self.slot.as_ref() };
        let (sa, len) = s.sockaddr();
        (sa, len, s.name())
    }

    /// Whether the server has failures on record, read without the lock: when it has
    /// none, a successful connect changes nothing (`Locked::connected`).
    pub fn failing(&self) -> bool {
        // SAFETY: the ticket keeps the slot alive; `fails` is a u32 other processes
        // write under the zone's lock: read atomically, a stale value only means the
        // caller takes the lock to look again.
        unsafe {
            let fails = ptr::addr_of_mut!((*self.slot.as_ptr()).state.fails);
            AtomicU32::from_ptr(fails).load(Ordering::Relaxed) != 0
        }
    }
}

const UNTRACKED: u32 = u32::MAX;
const MIN_CAP: u32 = 64;

/// How often (ms) a zone's ledgers are checked for dead processes.
const REAP_EVERY_MS: u64 = 1_000;

impl Zone {
    /// Gives this process a ledger in the zone (worker start). A ledger left by a dead
    /// process that had the same pid is reclaimed first.
    pub fn attach_process(&mut self, pid: i64, now_ms: u64) {
        let mut l = self.lock();
        let mut stale = l.hdr.ledgers;
        while !stale.is_null() {
            // SAFETY: ledgers in the list are live allocations of this zone (lock held).
            let (next, owner) = unsafe { ((*stale).next, (*stale).pid) };
            if owner == pid {
                // a process with our pid is necessarily gone
                l.reclaim(stale);
            }
            stale = next;
        }
        let g = l.alloc(size_of::<Ledger>()) as *mut Ledger;
        // SAFETY: lock held; the ledger is initialized before it is linked.
        let ledger = unsafe {
            if !g.is_null() {
                l.hdr.next_generation += 1;
                ptr::write(
                    g,
                    Ledger {
                        pid,
                        serial: l.hdr.next_generation,
                        created_ms: now_ms,
                        quiet_ms: now_ms,
                        next: l.hdr.ledgers,
                        cap: 0,
                        len: 0,
                        free: 0,
                        entries: ptr::null_mut(),
                    },
                );
                l.hdr.ledgers = g;
            }
            g
        };
        drop(l);
        self.ledger = ledger;
    }

    /// Gives back everything this process's sessions still hold and removes its ledger
    /// (worker exit: sessions still open at a fast shutdown are never closed one by one).
    pub fn detach_process(&mut self) {
        let ledger = std::mem::replace(&mut self.ledger, ptr::null_mut());
        if !ledger.is_null() {
            self.lock().reclaim(ledger);
        }
    }
}

impl Locked<'_> {
    /// Takes a session reference on slot `i` of the current set (picked at `now`, in
    /// seconds) and records it in this process's ledger. `i` must be an index of
    /// `slots()`.
    #[inline]
    pub fn acquire(&mut self, i: usize, now: i64) -> Ticket {
        let slot = self.slots()[i];
        // SAFETY: `slot` is in the current set, live under the lock.
        unsafe {
            (*slot).state.picked(now);
            (*slot).refs_add();
            (*slot).state.conns += 1;
            (*slot).state.total += 1;
        }
        self.lc_touch(slot);
        let (index, serial) = match self.ledger_push(slot) {
            // SAFETY: `ledger_push` only succeeds with this process's live ledger.
            Some(k) => (k, unsafe { (*self.ledger).serial } as u32),
            None => (UNTRACKED, 0),
        };
        Ticket {
            // SAFETY: slots of a set are never null.
            slot: unsafe { NonNull::new_unchecked(slot) },
            serial,
            index,
        }
    }

    /// Gives a session's reference back (its connection closed): nginx's failure
    /// accounting, then the reference, freeing the slot if it left the set and this was
    /// the last. A ticket whose ledger was reclaimed in the meantime (the process was
    /// taken for dead) was given back already and is ignored.
    #[inline]
    pub fn release(&mut self, t: Ticket, failed: bool, now: i64) {
        if !self.holds(&t) {
            return;
        }
        if t.index != UNTRACKED {
            // SAFETY: the ticket's index was handed out by this live ledger.
            unsafe { self.ledger_remove(t.index) };
        }
        let slot = t.slot.as_ptr();
        // SAFETY: the ticket holds a reference on `slot`, so it is live.
        unsafe {
            (*slot).state.release(failed, now);
            self.lc_touch(slot);
            self.unref(slot);
        }
    }

    /// The session's connection is established: a server that was failing is live
    /// again, and ramps up anew (slow_start) from `now_ms`.
    pub fn connected(&mut self, t: &Ticket, now_ms: u64) {
        if !self.holds(t) {
            return;
        }
        // SAFETY: the ticket holds a reference on its slot (checked by `holds`).
        let st = unsafe { &mut (*t.slot.as_ptr()).state };
        let was_failed = st.max_fails > 0 && st.fails >= st.max_fails;
        st.connected();
        if was_failed && st.fails == 0 {
            st.ramp_start_ms = now_ms;
        }
        self.lc_touch(t.slot.as_ptr());
    }

    /// The TLS session kept for the ticket's server (DER) into `out`; false when none.
    pub fn session(&self, t: &Ticket, out: &mut Vec<u8>) -> bool {
        self.holds(t) && self.slot_session(t.slot.as_ptr(), out)
    }

    /// Keeps a TLS session (DER) for the ticket's server, for the next connection.
    pub fn store_session(&mut self, t: &Ticket, der: &[u8]) {
        if self.holds(t) {
            self.store_slot_session(t.slot.as_ptr(), der);
        }
    }

    /// Whether `t`'s reference is still held (its ledger was not reclaimed).
    #[inline]
    fn holds(&self, t: &Ticket) -> bool {
        // SAFETY: `self.ledger` is null or this process's live ledger.
        t.index == UNTRACKED
            || (!self.ledger.is_null() && unsafe { (*self.ledger).serial } as u32 == t.serial)
    }

    /// Records `slot` in this process's ledger; None when there is none or it cannot
    /// grow (the session is then simply not reclaimable).
    #[inline]
    fn ledger_push(&mut self, slot: *mut Slot) -> Option<u32> {
        let g = self.ledger;
        if g.is_null() {
            return None;
        }
        // SAFETY: `g` is this process's live ledger; the lock is held.
        unsafe {
            let g = &mut *g;
            if g.free != 0 {
                let k = g.free - 1;
                let e = g.entries.add(k as usize);
                g.free = (*e >> 1) as u32;
                *e = slot as usize;
                return Some(k);
            }
            if g.len == g.cap {
                let cap = (g.cap * 2).max(MIN_CAP);
                let bigger = self.alloc(cap as usize * size_of::<usize>()) as *mut usize;
                if bigger.is_null() {
                    return None;
                }
                if !g.entries.is_null() {
                    ptr::copy_nonoverlapping(g.entries, bigger, g.len as usize);
                    self.free(g.entries as *mut u8, g.cap as usize * size_of::<usize>());
                }
                g.entries = bigger;
                g.cap = cap;
            }
            let k = g.len;
            *g.entries.add(k as usize) = slot as usize;
            g.len += 1;
            Some(k)
        }
    }

    /// # Safety
    /// `k` is an index this process's live ledger handed out and did not take back.
    #[inline]
    unsafe fn ledger_remove(&mut self, k: u32) {
        // SAFETY: per the contract.
        unsafe {
            let g = &mut *self.ledger;
            *g.entries.add(k as usize) = ((g.free as usize) << 1) | 1;
            g.free = k + 1;
        }
    }

    /// Looks for ledgers of dead processes (at most once a second per zone) and gives
    /// back what their sessions held. `alive(pid)` says whether a process lives and
    /// when that was observed (monotonic ms). Returns (processes, sessions) reclaimed.
    pub fn reap_dead(
        &mut self,
        now_ms: u64,
        alive: &mut dyn FnMut(i64) -> (bool, u64),
    ) -> (u32, u64) {
        // this is a timer's turn of the event loop: a quiet point of this process
        if !self.ledger.is_null() {
            // SAFETY: this process's live ledger; the lock is held.
            unsafe { (*self.ledger).quiet_ms = now_ms };
        }
        if now_ms.saturating_sub(self.hdr.ledgers_checked_ms) < REAP_EVERY_MS {
            return (0, 0);
        }
        self.hdr.ledgers_checked_ms = now_ms;
        let (mut procs, mut sessions) = (0, 0);
        let mut g = self.hdr.ledgers;
        while !g.is_null() {
            // SAFETY: ledgers in the list are live (lock held).
            let (next, pid, created) = unsafe { ((*g).next, (*g).pid, (*g).created_ms) };
            if g != self.ledger {
                let (lives, seen_ms) = alive(pid);
                if !lives && seen_ms > created {
                    procs += 1;
                    sessions += self.reclaim(g);
                }
            }
            g = next;
        }
        let quiet = self.oldest_quiet();
        self.sweep_retired(quiet);
        (procs, sessions)
    }

    /// The oldest quiet point among the processes with a ledger (None: there is none).
    fn oldest_quiet(&self) -> Option<u64> {
        let mut oldest: Option<u64> = None;
        let mut g = self.hdr.ledgers;
        while !g.is_null() {
            // SAFETY: ledgers in the list are live (lock held).
            let (next, q) = unsafe { ((*g).next, (*g).quiet_ms) };
            oldest = Some(oldest.map_or(q, |o| o.min(q)));
            g = next;
        }
        oldest
    }

    /// Whether a process that `alive` says lives has a ledger here.
    pub(super) fn has_live_ledger(&self, alive: &dyn Fn(i64) -> bool) -> bool {
        let mut g = self.hdr.ledgers;
        while !g.is_null() {
            // SAFETY: ledgers in the list are live (lock held).
            let (next, pid) = unsafe { ((*g).next, (*g).pid) };
            if alive(pid) {
                return true;
            }
            g = next;
        }
        false
    }

    /// Gives back what every ledger holds and removes them all (a domain being
    /// emptied: their processes are gone).
    pub(super) fn reclaim_all(&mut self) {
        while !self.hdr.ledgers.is_null() {
            let g = self.hdr.ledgers;
            self.reclaim(g);
        }
    }

    /// Gives back every session reference recorded in `ledger`, unlinks and frees it.
    /// Returns the number of sessions.
    fn reclaim(&mut self, ledger: *mut Ledger) -> u64 {
        let mut n = 0;
        // SAFETY: `ledger` is linked in this zone's list (lock held); each even entry is
        // a slot on which the dead process held one reference.
        unsafe {
            let g = &mut *ledger;
            for k in 0..g.len as usize {
                let e = *g.entries.add(k);
                if e & 1 == 0 && e != 0 {
                    let slot = e as *mut Slot;
                    (*slot).session_ended();
                    self.lc_touch(slot);
                    self.unref(slot);
                    n += 1;
                }
            }
            if !g.entries.is_null() {
                self.free(g.entries as *mut u8, g.cap as usize * size_of::<usize>());
            }
            let mut link: *mut *mut Ledger = &mut self.hdr.ledgers;
            while !(*link).is_null() {
                if *link == ledger {
                    *link = g.next;
                    break;
                }
                link = &mut (**link).next;
            }
            self.free(ledger as *mut u8, size_of::<Ledger>());
        }
        if ledger == self.ledger {
            self.ledger = ptr::null_mut();
        }
        n
    }
}

/// The log line for what `reap_dead` reclaimed, if anything.
pub fn reaped_line((procs, sessions): (u32, u64)) -> Option<String> {
    (procs > 0).then(|| {
        format!("released {sessions} session(s) held by {procs} exited worker process(es)")
    })
}
