//! least_conn's tree in an upstream's domain: built for a set, kept up to date as
//! servers' state changes (see `upsync_core::balancer::LcTree`).

use upsync_core::balancer::{LcNode, LcTree, Method};

use super::set::Slot;
use super::{Locked, PlanRef, LC_TREE_MIN};

impl Locked<'_> {
    /// Nodes of least_conn's tree for the current plan and a set of `len` servers (0
    /// for other methods).
    pub(super) fn lc_nodes_for(&self, method: Option<Method>, len: usize) -> usize {
        match method {
            Some(Method::LeastConn) if len > LC_TREE_MIN => LcTree::nodes_for(len),
            _ => 0,
        }
    }

    /// Gives the current set the least_conn tree its plan calls for, built from the
    /// servers' state now: in `tree` (a block of the right size from `alloc_lc`), or
    /// none. Frees the previous tree.
    pub(super) fn install_lc(&mut self, tree: PlanRef) {
        let old = std::mem::replace(&mut self.hdr.lc, tree);
        if !old.ptr.is_null() {
            // SAFETY: the previous tree is this domain's, no longer referenced; lock held.
            unsafe { self.free(old.ptr as *mut u8, old.words * size_of::<LcNode>()) };
        }
        if !tree.ptr.is_null() {
            self.refresh_lc();
        }
    }

    /// Builds least_conn's tree again from the servers' state (many of them changed at
    /// once).
    pub(super) fn refresh_lc(&mut self) {
        // the tree's leaves are the set's positions
        for (k, &s) in self.slots().iter().enumerate() {
            // SAFETY: slots of the current set are live while the lock is held.
            unsafe { (*s).set_index(k) };
        }
        let now = crate::ngx_util::now_sec();
        let (mut peers, _, _, lc) = self.pick_parts();
        if let Some(mut lc) = lc {
            lc.build(&mut peers, now);
        }
    }

    /// A block for a least_conn tree of `nodes` nodes (null for 0 nodes); None when the
    /// zone has no room.
    pub(super) fn alloc_lc(&mut self, nodes: usize) -> Option<PlanRef> {
        if nodes == 0 {
            return Some(PlanRef::NONE);
        }
        // the block is filled by `install_lc` before any pick reads it
        let ptr = self.alloc(nodes * size_of::<LcNode>());
        (!ptr.is_null()).then_some(PlanRef {
            ptr: ptr as *mut u64,
            words: nodes,
        })
    }

    /// A server's state changed: its leaf in least_conn's tree follows.
    #[inline]
    pub(super) fn lc_touch(&mut self, slot: *mut Slot) {
        let lc = self.hdr.lc;
        if lc.ptr.is_null() {
            return;
        }
        let len = self.slots().len();
        // SAFETY: the caller holds a reference on `slot`; the tree is the current set's
        // (lock held); a slot out of the set has no leaf.
        unsafe {
            let s = &*slot;
            if !s.in_set() {
                return;
            }
            let nodes = std::slice::from_raw_parts_mut(lc.ptr as *mut LcNode, lc.words);
            if let Some(mut tree) = LcTree::new(nodes, len) {
                tree.update(s.index(), &s.state, crate::ngx_util::now_sec());
            }
        }
    }
}
