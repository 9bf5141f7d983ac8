//! The selection plan of one server set: built once per set change (outside any lock),
//! flattened into one block of words that the glue publishes in shared memory next to
//! the set, and read by every worker's picks through a borrowed `PlanView`.
//!
//! A plan holds a smooth weighted round-robin schedule (round robin is O(1) with a
//! cursor shared by all workers), prefix sums of the primary weights (hash, ip_hash and
//! random pick the server nginx's linear weight walk would, in O(log n) or O(1) through a
//! weight table), and for `hash_ketama` a ring built like nginx's `hash ... consistent`.

use std::cmp::Ordering;

use super::Method;
use crate::servers::ServerSpec;

/// What the plan needs to know about each server of a set, in set order.
#[derive(Debug, Clone)]
pub struct PlanPeer<'a> {
    /// `ip:port` as nginx would print the `server` (ketama hashes it).
    pub name: &'a str,
    pub weight: u32,
    pub down: bool,
    pub backup: bool,
}

/// Largest total weight given a direct weight -> server table (1 MB per plan).
const MAX_WEIGHT_TABLE: u64 = 1 << 18;

/// Longest round-robin schedule: weights are divided by their gcd and, if still larger,
/// scaled down (keeping every server at least once).
pub const MAX_SCHEDULE: u64 = 1 << 16;

/// nginx's ketama ring has 160 points per unit of weight.
const POINTS_PER_WEIGHT: u64 = 160;

/// Most points a ketama ring gets, whatever the weights: 32 per server, at least 2^18
/// (2 MB: nginx's ring exactly up to a total weight of 1,638) and at most 2^20 (8 MB,
/// reached at 32,768 servers). Beyond it every server's share of points is scaled down
/// (at least one point each).
pub const MIN_RING_CAP: u64 = 1 << 18;
pub const MAX_RING_POINTS: u64 = 1 << 20;

fn ring_cap(servers: usize) -> u64 {
    (servers as u64 * 32).clamp(MIN_RING_CAP, MAX_RING_POINTS)
}

/// An owned plan (built by `Plan::build`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub method: Method,
    /// Smooth weighted round-robin order of set indices: primaries, then backups.
    pub schedule: [Vec<u32>; 2],
    /// Set indices of the primary servers, in set order.
    pub primaries: Vec<u32>,
    /// prefix[k] = total weight of primaries[0..=k].
    pub prefix: Vec<u64>,
    pub total_weight: u64,
    /// nginx's consistent-hash ring, sorted: `point << 32 | set index`.
    pub ring: Vec<u64>,
    /// For each weight unit w < total_weight, the server whose range holds it (when the
    /// total is at most `MAX_WEIGHT_TABLE`): O(1) weight walks.
    pub weight_table: Vec<u32>,
    /// ring_index[b] = first ring position whose point's top 16 bits are >= b.
    pub ring_index: Vec<u32>,
}

/// A plan seen as slices, wherever it lives (an owned `Plan`, or shared memory).
#[derive(Debug, Clone, Copy)]
pub struct PlanView<'a> {
    pub method: Method,
    pub schedule: [&'a [u32]; 2],
    pub primaries: &'a [u32],
    pub prefix: &'a [u64],
    pub total_weight: u64,
    pub ring: &'a [u64],
    pub weight_table: &'a [u32],
    pub ring_index: &'a [u32],
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// A smooth order in which each server appears `weight` times per cycle: the k-th turn of
/// server i is due at (k + 1/2) / w_i (earliest deadline first), which interleaves heavy
/// and light servers the way nginx's smooth round robin does.
fn smooth_schedule(members: &[(u32, u64)]) -> Vec<u32> {
    if members.is_empty() {
        return Vec::new();
    }
    let g = members.iter().fold(0, |g, &(_, w)| gcd(g, w)).max(1);
    let sum: u64 = members.iter().map(|&(_, w)| w / g).sum();
    let limit = MAX_SCHEDULE.max(members.len() as u64 * 4);
    let scale = if sum > limit {
        limit as f64 / sum as f64
    } else {
        1.0
    };
    let mut turns: Vec<(f64, u32)> = Vec::new();
    for &(idx, w) in members {
        let w = (((w / g) as f64 * scale).round() as u64).max(1);
        for k in 0..w {
            turns.push(((k as f64 + 0.5) / w as f64, idx));
        }
    }
    turns.sort_by(|a, b| {
        a.0.partial_cmp(&b.0)
            .unwrap_or(Ordering::Equal)
            .then(a.1.cmp(&b.1))
    });
    turns.into_iter().map(|(_, i)| i).collect()
}

/// nginx's `hash ... consistent` points for one server: crc32(HOST \0 PORT PREV_HASH),
/// `count` of them.
fn ketama_points(name: &str, count: u64, idx: u32, out: &mut Vec<u64>) {
    let b = name.as_bytes();
    // split at the last ':' followed only by digits (nginx's rule)
    let digits = b.iter().rev().take_while(|c| c.is_ascii_digit()).count();
    let (host, port) = if digits < b.len() && b[b.len() - digits - 1] == b':' {
        (&b[..b.len() - digits - 1], &b[b.len() - digits..])
    } else {
        (b, &b[..0])
    };
    let mut base = crc32fast::Hasher::new();
    base.update(host);
    base.update(&[0]);
    base.update(port);
    let mut prev: u32 = 0;
    for _ in 0..count {
        let mut h = base.clone();
        h.update(&prev.to_le_bytes());
        let v = h.finalize();
        out.push((v as u64) << 32 | idx as u64);
        prev = v;
    }
}

/// Points per server of the ring: 160 per unit of weight, scaled down (at least one
/// each) so the ring never exceeds `ring_cap` whatever the weights.
fn ring_counts(weights: &[u64]) -> Vec<u64> {
    let total: u64 = weights.iter().map(|&w| w * POINTS_PER_WEIGHT).sum();
    let cap = ring_cap(weights.len());
    if total <= cap {
        return weights.iter().map(|&w| w * POINTS_PER_WEIGHT).collect();
    }
    let scale = cap as f64 / total as f64;
    weights
        .iter()
        .map(|&w| ((w * POINTS_PER_WEIGHT) as f64 * scale).floor().max(1.0) as u64)
        .collect()
}

impl Plan {
    pub fn build(peers: &[PlanPeer<'_>], method: Method) -> Plan {
        let mut plan = Plan {
            method,
            ..Plan::default()
        };
        for want_backup in [false, true] {
            let members: Vec<(u32, u64)> = peers
                .iter()
                .enumerate()
                .filter(|(_, p)| p.backup == want_backup && !p.down)
                .map(|(i, p)| (i as u32, p.weight.max(1) as u64))
                .collect();
            plan.schedule[want_backup as usize] = smooth_schedule(&members);
        }
        let mut total = 0u64;
        for (i, p) in peers.iter().enumerate().filter(|(_, p)| !p.backup) {
            total += p.weight.max(1) as u64;
            plan.primaries.push(i as u32);
            plan.prefix.push(total);
        }
        plan.total_weight = total;
        let uses_weights = matches!(
            method,
            Method::IpHash | Method::HashModula | Method::Random { .. }
        );
        if uses_weights && total <= MAX_WEIGHT_TABLE {
            plan.weight_table.reserve(total as usize);
            let mut start = 0u64;
            for (k, &end) in plan.prefix.iter().enumerate() {
                plan.weight_table
                    .extend(std::iter::repeat(plan.primaries[k]).take((end - start) as usize));
                start = end;
            }
        }
        if method == Method::HashKetama {
            let members: Vec<(usize, &PlanPeer)> = peers
                .iter()
                .enumerate()
                .filter(|(_, p)| !p.backup)
                .collect();
            let weights: Vec<u64> = members
                .iter()
                .map(|(_, p)| p.weight.max(1) as u64)
                .collect();
            for ((i, p), count) in members.iter().zip(ring_counts(&weights)) {
                ketama_points(p.name, count, *i as u32, &mut plan.ring);
            }
            plan.ring.sort_unstable();
            plan.ring.dedup_by_key(|p| *p >> 32);
            let mut pos = 0usize;
            plan.ring_index = (0..=65536u64)
                .map(|b| {
                    while pos < plan.ring.len() && (plan.ring[pos] >> 48) < b {
                        pos += 1;
                    }
                    pos as u32
                })
                .collect();
        }
        plan
    }

    /// The plan of a normalized server list (the set order).
    pub fn for_servers(servers: &[ServerSpec], method: Method) -> Plan {
        let names: Vec<String> = servers.iter().map(|s| s.addr.to_string()).collect();
        let peers: Vec<PlanPeer> = servers
            .iter()
            .zip(&names)
            .map(|(s, name)| PlanPeer {
                name,
                weight: s.weight,
                down: s.down,
                backup: s.backup,
            })
            .collect();
        Plan::build(&peers, method)
    }

    pub fn view(&self) -> PlanView<'_> {
        PlanView {
            method: self.method,
            schedule: [&self.schedule[0], &self.schedule[1]],
            primaries: &self.primaries,
            prefix: &self.prefix,
            total_weight: self.total_weight,
            ring: &self.ring,
            weight_table: &self.weight_table,
            ring_index: &self.ring_index,
        }
    }
}

/// The flat form: a header of `HEADER_WORDS` words, then each array padded to a word.
const FLAT_MAGIC: u64 = 0x706c_616e_0000_0001; // "plan", v1
const HEADER_WORDS: usize = 10;

fn words_u32(n: usize) -> usize {
    n.div_ceil(2)
}

fn method_code(m: Method) -> u64 {
    match m {
        Method::RoundRobin => 0,
        Method::LeastConn => 1,
        Method::IpHash => 2,
        Method::HashModula => 3,
        Method::HashKetama => 4,
        Method::Random { two: false } => 5,
        Method::Random { two: true } => 6,
    }
}

fn method_of(code: u64) -> Option<Method> {
    Some(match code {
        0 => Method::RoundRobin,
        1 => Method::LeastConn,
        2 => Method::IpHash,
        3 => Method::HashModula,
        4 => Method::HashKetama,
        5 => Method::Random { two: false },
        6 => Method::Random { two: true },
        _ => return None,
    })
}

impl Plan {
    /// Words the flat form needs.
    pub fn flat_words(&self) -> usize {
        HEADER_WORDS
            + words_u32(self.schedule[0].len())
            + words_u32(self.schedule[1].len())
            + words_u32(self.primaries.len())
            + self.prefix.len()
            + self.ring.len()
            + words_u32(self.weight_table.len())
            + words_u32(self.ring_index.len())
    }

    /// Writes the flat form into `out` (exactly `flat_words()` long).
    pub fn write_flat(&self, out: &mut [u64]) {
        assert_eq!(out.len(), self.flat_words(), "flat plan buffer size");
        let header = [
            FLAT_MAGIC,
            method_code(self.method),
            self.total_weight,
            self.schedule[0].len() as u64,
            self.schedule[1].len() as u64,
            self.primaries.len() as u64,
            self.ring.len() as u64,
            self.weight_table.len() as u64,
            self.ring_index.len() as u64,
            0,
        ];
        out[..HEADER_WORDS].copy_from_slice(&header);
        let mut at = HEADER_WORDS;
        let mut put32 = |at: &mut usize, v: &[u32]| {
            let n = words_u32(v.len());
            let dst: &mut [u32] = bytemuck::cast_slice_mut(&mut out[*at..*at + n]);
            dst[..v.len()].copy_from_slice(v);
            dst[v.len()..].fill(0);
            *at += n;
        };
        put32(&mut at, &self.schedule[0]);
        put32(&mut at, &self.schedule[1]);
        put32(&mut at, &self.primaries);
        let at_prefix = at;
        at += self.prefix.len();
        let at_ring = at;
        at += self.ring.len();
        put32(&mut at, &self.weight_table);
        put32(&mut at, &self.ring_index);
        out[at_prefix..at_prefix + self.prefix.len()].copy_from_slice(&self.prefix);
        out[at_ring..at_ring + self.ring.len()].copy_from_slice(&self.ring);
    }
}

impl<'a> PlanView<'a> {
    /// Reads a plan written by `Plan::write_flat`. None when the block is not one (never
    /// for a block this module wrote: a defensive check, not a parser for hostile data).
    pub fn from_flat(words: &'a [u64]) -> Option<PlanView<'a>> {
        let h = words.get(..HEADER_WORDS)?;
        if h[0] != FLAT_MAGIC {
            return None;
        }
        let method = method_of(h[1])?;
        let len = |i: usize| usize::try_from(h[i]).ok();
        let (s0, s1, np, nr, nw, ni) = (len(3)?, len(4)?, len(5)?, len(6)?, len(7)?, len(8)?);
        let mut at = HEADER_WORDS;
        let mut take32 = |n: usize| -> Option<&'a [u32]> {
            let w = words_u32(n);
            let block = words.get(at..at.checked_add(w)?)?;
            at += w;
            Some(&bytemuck::cast_slice::<u64, u32>(block)[..n])
        };
        let schedule = [take32(s0)?, take32(s1)?];
        let primaries = take32(np)?;
        let prefix = words.get(at..at.checked_add(np)?)?;
        at += np;
        let ring = words.get(at..at.checked_add(nr)?)?;
        at += nr;
        let mut take32 = |n: usize| -> Option<&'a [u32]> {
            let w = words_u32(n);
            let block = words.get(at..at.checked_add(w)?)?;
            at += w;
            Some(&bytemuck::cast_slice::<u64, u32>(block)[..n])
        };
        let weight_table = take32(nw)?;
        let ring_index = take32(ni)?;
        Some(PlanView {
            method,
            schedule,
            primaries,
            prefix,
            total_weight: h[2],
            ring,
            weight_table,
            ring_index,
        })
    }

    /// The primary whose weight range holds `w` (< total_weight): nginx's weight walk.
    pub(super) fn by_weight(&self, w: u64) -> usize {
        if let Some(&i) = self.weight_table.get(w as usize) {
            return i as usize;
        }
        let k = self.prefix.partition_point(|&end| end <= w);
        self.primaries[k.min(self.primaries.len() - 1)] as usize
    }

    /// The first ring position whose point is >= hash (== ring.len() past the end).
    pub(super) fn ring_start(&self, hash: u32) -> usize {
        let b = (hash >> 16) as usize;
        let (lo, hi) = match (self.ring_index.get(b), self.ring_index.get(b + 1)) {
            (Some(&lo), Some(&hi)) => (lo as usize, hi as usize),
            _ => (0, self.ring.len()),
        };
        lo + self.ring[lo..hi].partition_point(|&p| ((p >> 32) as u32) < hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(names: &[String], weights: &[u32]) -> Vec<(String, u32)> {
        names.iter().cloned().zip(weights.iter().copied()).collect()
    }

    fn build(ps: &[(String, u32)], method: Method) -> Plan {
        let pp: Vec<PlanPeer> = ps
            .iter()
            .map(|(n, w)| PlanPeer {
                name: n,
                weight: *w,
                down: false,
                backup: false,
            })
            .collect();
        Plan::build(&pp, method)
    }

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("127.0.{}.{}:{}", i / 250, 1 + i % 250, 8000 + i % 7))
            .collect()
    }

    #[test]
    fn flat_round_trip_every_method() {
        let n = names(50);
        let ws: Vec<u32> = (0..50).map(|i| 1 + i % 4).collect();
        for m in [
            Method::RoundRobin,
            Method::LeastConn,
            Method::IpHash,
            Method::HashModula,
            Method::HashKetama,
            Method::Random { two: false },
            Method::Random { two: true },
        ] {
            let plan = build(&peers(&n, &ws), m);
            let mut flat = vec![0u64; plan.flat_words()];
            plan.write_flat(&mut flat);
            let v = PlanView::from_flat(&flat).expect("flat plan reads back");
            let o = plan.view();
            assert_eq!(v.method, o.method);
            assert_eq!(v.schedule, o.schedule);
            assert_eq!(v.primaries, o.primaries);
            assert_eq!(v.prefix, o.prefix);
            assert_eq!(v.total_weight, o.total_weight);
            assert_eq!(v.ring, o.ring);
            assert_eq!(v.weight_table, o.weight_table);
            assert_eq!(v.ring_index, o.ring_index);
            // a cut or foreign block is refused, never read out of bounds
            assert!(
                PlanView::from_flat(&flat[..flat.len() - 1]).is_none()
                    || flat.len() == HEADER_WORDS
            );
            assert!(PlanView::from_flat(&[0u64; 3]).is_none());
        }
    }

    #[test]
    fn ring_is_bounded_whatever_the_weights() {
        // one server at the old maximum weight: nginx would build 160 million points
        let n = names(3);
        let plan = build(&peers(&n, &[1_000_000, 1, 1]), Method::HashKetama);
        assert!(
            plan.ring.len() as u64 <= MIN_RING_CAP + 3,
            "{}",
            plan.ring.len()
        );
        for i in 0..3u64 {
            assert!(
                plan.ring.iter().any(|p| p & 0xffff_ffff == i),
                "server {i} on the ring"
            );
        }
        // 10,000 servers: at least one point each, and bounded
        let n = names(10_000);
        let ws = vec![10_000u32; 10_000];
        let plan = build(&peers(&n, &ws), Method::HashKetama);
        assert!(plan.ring.len() as u64 <= 320_000 + 10_000);
        assert!(plan.ring.len() >= 300_000);
        // small totals are exactly nginx's: 160 points per unit of weight
        let n = names(2);
        let plan = build(&peers(&n, &[1, 2]), Method::HashKetama);
        assert!(plan.ring.len() > 470 && plan.ring.len() <= 480);
    }

    #[test]
    fn schedules_are_bounded() {
        let n = names(10_000);
        let ws: Vec<u32> = (0..10_000).map(|i| 1 + (i % 97)).collect();
        let plan = build(&peers(&n, &ws), Method::RoundRobin);
        assert!(plan.schedule[0].len() as u64 <= MAX_SCHEDULE + 10_000);
        assert!(plan.schedule[0].len() >= 10_000);
    }
}
