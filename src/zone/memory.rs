//! An upstream's memory in the shared zone: allocations counted against its cap, plan
//! blocks, the reserve a reload sets aside, and emptying a domain no one uses.

use std::ptr;

use nginx_sys::{ngx_slab_alloc, ngx_slab_free};
use upsync_core::balancer::Plan;

use super::{set, Locked, PlanBlock, PlanRef, Reserve, ZoneError};

impl Locked<'_> {
    /// Allocates a plan block and writes `plan` into it. Under the lock, for the master
    /// (`init`, `commit_switch`); pollers fill theirs outside the lock (`PlanBlock`).
    pub(super) fn alloc_plan(&mut self, plan: &Plan) -> Result<PlanBlock, ZoneError> {
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
        // the block is its owner's until published or freed
        let ptr = self.alloc(words.max(1) * 8) as *mut u64;
        (!ptr.is_null()).then_some(PlanBlock { ptr, words })
    }

    /// Gives back a plan block that was not published.
    pub fn free_plan_block(&mut self, block: PlanBlock) {
        // SAFETY: the block came from `alloc_plan_block` in this domain and was never
        // published; the lock is held.
        unsafe { self.free(block.ptr as *mut u8, block.words.max(1) * 8) };
    }

    pub(super) fn drop_reserve(&mut self) {
        let r = std::mem::replace(&mut self.hdr.reserve, ptr::null_mut());
        if r.is_null() {
            return;
        }
        // SAFETY: the reserve and everything it points to were allocated by `reserve`
        // in this domain and are referenced from nowhere else; the lock is held.
        unsafe {
            set::free_unshared(self, (*r).set);
            let plan = (*r).plan;
            if !plan.ptr.is_null() {
                self.free(plan.ptr as *mut u8, plan.words.max(1) * 8);
            }
            self.free(r as *mut u8, size_of::<Reserve>());
        }
    }

    /// Sets aside memory for `servers` fresh slots, their list and a plan of
    /// `plan_words`: what `commit_switch` will need.
    pub(super) fn reserve(&mut self, servers: usize, plan_words: usize) -> Result<(), ZoneError> {
        let full = ZoneError::Full { servers };
        let r = self.alloc(size_of::<Reserve>()) as *mut Reserve;
        if r.is_null() {
            return Err(full);
        }
        // SAFETY: the lock is held; every allocation below is owned by the reserve,
        // which `drop_reserve` gives back whole (also after a failure here).
        unsafe {
            ptr::write(
                r,
                Reserve {
                    set: ptr::null_mut(),
                    plan: PlanRef::NONE,
                },
            );
            self.hdr.reserve = r;
            (*r).set = set::alloc_unshared(self, servers).ok_or(full.clone())?;
            let plan = self.alloc_plan_block(plan_words).ok_or(full)?;
            (*r).plan = PlanRef {
                ptr: plan.ptr,
                words: plan.words,
            };
        }
        Ok(())
    }

    /// Memory for this domain: `size` bytes from the shared pool, counted against the
    /// domain's cap (null when over the cap or when the zone is full).
    pub(super) fn alloc(&mut self, size: usize) -> *mut u8 {
        let size = size.max(1);
        let budget = self.hdr.budget;
        if budget > 0 && self.hdr.used + size as u64 > budget {
            return ptr::null_mut();
        }
        // SAFETY: the pool is live; `ngx_slab_alloc` takes its mutex (the domain's lock,
        // held, always comes first).
        let p = unsafe { ngx_slab_alloc(self.pool, size) } as *mut u8;
        if !p.is_null() {
            self.hdr.used += size as u64;
        }
        p
    }

    /// Gives back `size` bytes from `alloc`.
    ///
    /// # Safety
    /// `p` came from this domain's `alloc(size)` and is referenced from nowhere now.
    pub(super) unsafe fn free(&mut self, p: *mut u8, size: usize) {
        // SAFETY: per the contract.
        unsafe { ngx_slab_free(self.pool, p as *mut _) };
        self.hdr.used = self.hdr.used.saturating_sub(size.max(1) as u64);
    }

    /// Empties a domain no configuration uses any more, if no live process has sessions
    /// in it (`alive`): every ledger, the set, plan, tree and the rest. False when a
    /// process still uses it.
    pub(super) fn dismantle(&mut self, alive: &dyn Fn(i64) -> bool) -> bool {
        if self.has_live_ledger(alive) {
            return false;
        }
        self.reclaim_all();
        self.drop_reserve();
        self.set_skipped(&[]);
        self.clear_set();
        let plan = std::mem::replace(&mut self.hdr.plan, PlanRef::NONE);
        self.hdr.plan_view = None;
        if !plan.ptr.is_null() {
            // SAFETY: the plan block is this domain's; nothing references it now.
            unsafe { self.free(plan.ptr as *mut u8, plan.words.max(1) * 8) };
        }
        self.install_lc(PlanRef::NONE);
        self.free_health();
        self.sweep_retired(None);
        true
    }
}
