//! least_conn in O(log n): a segment tree over a set's servers whose nodes hold the best
//! key of their subtree (the fewest connections per weight, primaries before backups),
//! how many servers share it and their weights' sum. Every change of a server's state
//! (a connection taken or given back, a failure, a set change) updates one leaf and its
//! path to the root; a pick reads the root and walks down once.
//!
//! Availability that only time changes (a failure window ending) is kept as the
//! earliest end of a window in each subtree: a pick first brings back the servers whose
//! window has ended, one walk each. Ties go to nginx's smooth weighted round robin among
//! the tied servers when there are few of them (`FEW_TIES`), and to a weighted rotation
//! (a shared cursor over the tied servers' weight units) when there are many.
//!
//! The nodes live wherever the caller keeps them (the shared zone in nginx): plain old
//! data (integers only: any bit pattern is a node), 32 bytes each, `LcTree::nodes_for(n)` of them for a set of n servers.

use std::cmp::Ordering;

use super::{PeerState, Peers};

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LcNode {
    /// The best key of the subtree: the connections and weight of a server with the
    /// fewest connections per weight.
    conns: u32,
    weight: u32,
    /// Servers of the subtree with that key.
    ties: u32,
    /// `BACKUP`: the best is a backup server; `NONE`: no server of the subtree can take
    /// a connection now.
    flags: u32,
    /// The weights of the tied servers, summed.
    tie_weight: u64,
    /// The earliest end (seconds) of a failure window among the subtree's servers that
    /// are out only because they failed; `i64::MAX` when there is none.
    fail_min: i64,
}

const BACKUP: u32 = 1;
const NONE: u32 = 2;

/// Up to this many tied servers share the pick like nginx does (smooth weighted round
/// robin over them); beyond, a weighted rotation keeps the pick O(log n).
pub const FEW_TIES: u32 = 16;

/// Servers a retry may skip (already tried in the session) before the pick falls back
/// to a linear scan.
const MAX_SKIPPED: usize = 32;

impl LcNode {
    /// No server (what a fresh tree block may be filled with before `build`).
    pub const EMPTY: LcNode = LcNode {
        conns: 0,
        weight: 0,
        ties: 0,
        flags: NONE,
        tie_weight: 0,
        fail_min: i64::MAX,
    };

    /// A server's leaf at time `now` (seconds).
    fn leaf(p: &PeerState, now: i64) -> LcNode {
        if p.blocked() {
            return LcNode::EMPTY;
        }
        if let Some(until) = p.failed_until(now) {
            return LcNode {
                fail_min: until,
                ..LcNode::EMPTY
            };
        }
        let weight = p.weight.clamp(1, u32::MAX as i64) as u32;
        LcNode {
            conns: p.conns,
            weight,
            ties: 1,
            flags: if p.backup { BACKUP } else { 0 },
            tie_weight: weight as u64,
            fail_min: i64::MAX,
        }
    }

    fn is_none(&self) -> bool {
        self.flags & NONE != 0
    }

    /// Orders keys: any server before none, primaries before backups, then fewer
    /// connections per weight.
    fn key_cmp(&self, other: &LcNode) -> Ordering {
        match (self.is_none(), other.is_none()) {
            (true, true) => return Ordering::Equal,
            (true, false) => return Ordering::Greater,
            (false, true) => return Ordering::Less,
            _ => {}
        }
        (self.flags & BACKUP)
            .cmp(&(other.flags & BACKUP))
            .then_with(|| {
                (self.conns as u64 * other.weight as u64)
                    .cmp(&(other.conns as u64 * self.weight as u64))
            })
    }

    fn combine(a: &LcNode, b: &LcNode) -> LcNode {
        let mut r = match a.key_cmp(b) {
            Ordering::Less => *a,
            Ordering::Greater => *b,
            Ordering::Equal if a.is_none() => *a,
            Ordering::Equal => LcNode {
                ties: a.ties + b.ties,
                tie_weight: a.tie_weight + b.tie_weight,
                ..*a
            },
        };
        r.fail_min = a.fail_min.min(b.fail_min);
        r
    }
}

/// The tree of one set, over nodes the caller keeps.
pub struct LcTree<'a> {
    nodes: &'a mut [LcNode],
    /// Leaves: `len` rounded up to a power of two.
    size: usize,
    len: usize,
}

impl<'a> LcTree<'a> {
    /// Nodes a set of `len` servers needs.
    pub fn nodes_for(len: usize) -> usize {
        2 * len.max(1).next_power_of_two()
    }

    /// The tree of a set of `len` servers over `nodes` (exactly `nodes_for(len)` of
    /// them, as `build` left them); None when the sizes do not match.
    pub fn new(nodes: &'a mut [LcNode], len: usize) -> Option<LcTree<'a>> {
        (nodes.len() == Self::nodes_for(len)).then_some(LcTree {
            size: nodes.len() / 2,
            nodes,
            len,
        })
    }

    /// Sets every leaf from `peers` (the set, in set order) at time `now`.
    pub fn build<P: Peers + ?Sized>(&mut self, peers: &mut P, now: i64) {
        let size = self.size;
        for i in 0..size {
            self.nodes[size + i] = if i < self.len && i < peers.len() {
                LcNode::leaf(peers.peer(i), now)
            } else {
                LcNode::EMPTY
            };
        }
        self.nodes[0] = LcNode::EMPTY;
        for k in (1..size).rev() {
            self.nodes[k] = LcNode::combine(&self.nodes[2 * k], &self.nodes[2 * k + 1]);
        }
    }

    /// Server `i`'s state changed (at time `now`).
    pub fn update(&mut self, i: usize, p: &PeerState, now: i64) {
        if i < self.len {
            self.set_leaf(i, LcNode::leaf(p, now));
        }
    }

    fn set_leaf(&mut self, i: usize, leaf: LcNode) {
        let mut k = self.size + i;
        if self.nodes[k] == leaf {
            return;
        }
        self.nodes[k] = leaf;
        while k > 1 {
            k /= 2;
            let node = LcNode::combine(&self.nodes[2 * k], &self.nodes[2 * k + 1]);
            if self.nodes[k] == node {
                return; // nothing above changes either
            }
            self.nodes[k] = node;
        }
    }

    /// The leftmost leaf under the root for which `go(node)` holds, walking only into
    /// children for which it holds.
    fn descend(&self, go: impl Fn(&LcNode) -> bool) -> Option<usize> {
        let mut k = 1;
        if !go(&self.nodes[1]) {
            return None;
        }
        while k < self.size {
            k = if go(&self.nodes[2 * k]) {
                2 * k
            } else {
                2 * k + 1
            };
        }
        Some(k - self.size)
    }

    /// The tied server that owns weight unit `u` (< the root's tie weight).
    fn by_tie_weight(&self, mut u: u64) -> usize {
        let best = self.nodes[1];
        let mut k = 1;
        while k < self.size {
            let l = &self.nodes[2 * k];
            let lw = if l.key_cmp(&best) == Ordering::Equal {
                l.tie_weight
            } else {
                0
            };
            if u < lw {
                k *= 2;
            } else {
                u -= lw;
                k = 2 * k + 1;
            }
        }
        k - self.size
    }

    /// Calls `f` with every server tied at the best key, in set order.
    fn for_each_tie(&self, k: usize, best: &LcNode, f: &mut impl FnMut(usize)) {
        if self.nodes[k].key_cmp(best) != Ordering::Equal {
            return;
        }
        if k >= self.size {
            return f(k - self.size);
        }
        self.for_each_tie(2 * k, best, f);
        self.for_each_tie(2 * k + 1, best, f);
    }

    /// Every server tied at the best key (at most `FEW_TIES` of them), into `out`.
    fn ties(&self, out: &mut [usize; FEW_TIES as usize]) -> usize {
        let best = self.nodes[1];
        let mut n = 0;
        self.for_each_tie(1, &best, &mut |i| {
            if n < out.len() {
                out[n] = i;
                n += 1;
            }
        });
        n
    }

    /// The pick when nothing of the best key was tried (a session's first attempt):
    /// the one best server, nginx's smooth round robin among a few tied ones, or the
    /// rotation among many. None sends the caller to the general path.
    fn pick_fresh<P: Peers + ?Sized, T: Fn(usize) -> bool + ?Sized>(
        &self,
        peers: &mut P,
        tried: &T,
        cursor: &mut u64,
    ) -> Option<usize> {
        let best = self.nodes[1];
        let usable = |i: usize| i < peers.len() && !tried(i);
        if best.ties == 1 {
            return self
                .descend(|n| n.key_cmp(&best) == Ordering::Equal)
                .filter(|&i| usable(i));
        }
        if best.ties > FEW_TIES {
            let u = *cursor % best.tie_weight.max(1);
            let i = self.by_tie_weight(u);
            if !usable(i) {
                return None;
            }
            *cursor = cursor.wrapping_add(1);
            return Some(i);
        }
        // as nginx's scan: every tied server untried, else the general path
        let mut all = true;
        self.for_each_tie(1, &best, &mut |i| all &= usable(i));
        if !all {
            return None;
        }
        let (mut chosen, mut chosen_cw, mut total) = (None, i64::MIN, 0i64);
        self.for_each_tie(1, &best, &mut |i| {
            let p = peers.peer(i);
            p.current_weight += p.effective_weight;
            total += p.effective_weight;
            if p.effective_weight < p.weight {
                p.effective_weight += 1;
            }
            if chosen.is_none() || p.current_weight > chosen_cw {
                chosen = Some(i);
                chosen_cw = p.current_weight;
            }
        });
        let i = chosen?;
        peers.peer(i).current_weight -= total;
        Some(i)
    }

    /// nginx's least_conn over the tree: the available server with the fewest
    /// connections per weight, primaries first, skipping servers for which `tried`
    /// holds. `cursor` is the shared position of the weighted rotation among many ties.
    pub fn pick<P: Peers + ?Sized, T: Fn(usize) -> bool + ?Sized>(
        &mut self,
        peers: &mut P,
        now: i64,
        tried: &T,
        cursor: &mut u64,
    ) -> Option<usize> {
        // servers whose failure window ended are available again
        let mut guard = self.len;
        while self.nodes[1].fail_min < now && guard > 0 {
            let Some(i) = self.descend(|n| n.fail_min < now) else {
                break;
            };
            if i >= peers.len() {
                break;
            }
            self.update(i, peers.peer(i), now);
            guard -= 1;
        }
        if self.nodes[1].is_none() {
            return None;
        }
        if let Some(i) = self.pick_fresh(peers, tried, cursor) {
            return Some(i);
        }
        let mut skipped = [0usize; MAX_SKIPPED];
        let mut ns = 0;
        let chosen = loop {
            let best = self.nodes[1];
            if best.is_none() {
                break Some(None);
            }
            let mut few = [0usize; FEW_TIES as usize];
            let candidates: &[usize] = if best.ties == 1 {
                let Some(i) = self.descend(|n| n.key_cmp(&best) == Ordering::Equal) else {
                    break Some(None);
                };
                few[0] = i;
                &few[..1]
            } else if best.ties <= FEW_TIES {
                let n = self.ties(&mut few);
                &few[..n]
            } else {
                let u = *cursor % best.tie_weight.max(1);
                *cursor = cursor.wrapping_add(1);
                few[0] = self.by_tie_weight(u);
                &few[..1]
            };
            let fresh = |i: &&usize| **i < peers.len() && !tried(**i);
            match candidates.iter().filter(fresh).count() {
                0 => {}
                // one server left: nginx's scan takes it without round robin
                1 => break Some(candidates.iter().find(fresh).copied()),
                _ => break Some(Some(smooth_among(peers, candidates, &|i| !tried(i)))),
            }
            // all of them were tried in this session: set them aside and look again
            if ns + candidates.len() > skipped.len() {
                break None;
            }
            for &i in candidates {
                skipped[ns] = i;
                ns += 1;
                self.set_leaf(i, LcNode::EMPTY);
            }
        };
        for &i in &skipped[..ns] {
            if i < peers.len() {
                self.update(i, peers.peer(i), now);
            }
        }
        match chosen {
            Some(c) => c,
            // many tried servers: the linear scan handles any number
            None => super::pick_least_conn(peers, now, tried),
        }
    }
}

/// nginx's smooth weighted round robin among `list` (those for which `ok` holds).
fn smooth_among<P: Peers + ?Sized>(
    peers: &mut P,
    list: &[usize],
    ok: &dyn Fn(usize) -> bool,
) -> usize {
    let mut best = list[0];
    let mut best_cw = i64::MIN;
    let mut total = 0i64;
    let mut found = false;
    for &i in list.iter().filter(|&&i| ok(i)) {
        let p = peers.peer(i);
        p.current_weight += p.effective_weight;
        total += p.effective_weight;
        if p.effective_weight < p.weight {
            p.effective_weight += 1;
        }
        if !found || p.current_weight > best_cw {
            best = i;
            best_cw = p.current_weight;
            found = true;
        }
    }
    peers.peer(best).current_weight -= total;
    best
}
