//! When each server is probed: a first probe spread over the interval (at once for a
//! server whose state is unknown), then one every `interval` plus a random delay up to
//! `jitter`; and the timetable that gives the prober the next due server in O(log n).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::Hash;

use crate::policy::Rng;

/// When a server's first probe is due: at once when `immediate` (a "checking" server,
/// which takes no traffic until it is probed), else at a random point of the interval,
/// so that a prober that takes over a large set does not probe it all at once.
pub fn first_due(now_ms: u64, interval_ms: u64, immediate: bool, rng: &mut Rng) -> u64 {
    if immediate || interval_ms == 0 {
        now_ms
    } else {
        now_ms + rng.next_u64() % interval_ms
    }
}

/// When the probe after one that started at `started_ms` is due.
pub fn next_due(started_ms: u64, interval_ms: u64, jitter_ms: u64, rng: &mut Rng) -> u64 {
    let jitter = if jitter_ms == 0 {
        0
    } else {
        rng.next_u64() % (jitter_ms + 1)
    };
    started_ms + interval_ms + jitter
}

/// Keys ordered by due time. Re-adding a key replaces its time; removal is lazy (stale
/// heap entries are skipped), so both are O(log n).
#[derive(Debug)]
pub struct Timetable<K: Ord + Hash + Copy> {
    pub(super) heap: BinaryHeap<Reverse<(u64, u64, K)>>,
    /// The sequence number of each key's live entry.
    live: HashMap<K, u64>,
    seq: u64,
}

impl<K: Ord + Hash + Copy> Default for Timetable<K> {
    fn default() -> Self {
        Timetable {
            heap: BinaryHeap::new(),
            live: HashMap::new(),
            seq: 0,
        }
    }
}

impl<K: Ord + Hash + Copy> Timetable<K> {
    /// Schedules `key` at `due_ms` (replacing its earlier time).
    pub fn add(&mut self, key: K, due_ms: u64) {
        self.seq += 1;
        self.live.insert(key, self.seq);
        self.heap.push(Reverse((due_ms, self.seq, key)));
        // keep stale entries from piling up when keys are re-added often
        if self.heap.len() > 2 * self.live.len() + 64 {
            let live = &self.live;
            self.heap
                .retain(|Reverse((_, s, k))| live.get(k) == Some(s));
        }
    }

    /// Forgets `key`.
    pub fn remove(&mut self, key: &K) {
        self.live.remove(key);
    }

    pub fn contains(&self, key: &K) -> bool {
        self.live.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    fn drop_stale(&mut self) {
        while let Some(Reverse((_, s, k))) = self.heap.peek() {
            if self.live.get(k) == Some(s) {
                return;
            }
            self.heap.pop();
        }
    }

    /// The earliest due time.
    pub fn next_due(&mut self) -> Option<u64> {
        self.drop_stale();
        self.heap.peek().map(|Reverse((due, _, _))| *due)
    }

    /// Takes the earliest key due at `now_ms` (it is no longer scheduled).
    pub fn pop_due(&mut self, now_ms: u64) -> Option<K> {
        self.drop_stale();
        match self.heap.peek() {
            Some(Reverse((due, _, _))) if *due <= now_ms => {
                let Reverse((_, _, k)) = self.heap.pop()?;
                self.live.remove(&k);
                Some(k)
            }
            _ => None,
        }
    }
}
