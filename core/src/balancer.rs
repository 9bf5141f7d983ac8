//! Load-balancing algorithms, independent of where the peers live (plain slices in tests,
//! the shared zone in nginx).
//!
//! Every published server set gets a `Plan`, built once per set and worker: a smooth
//! weighted round-robin schedule (so a round-robin pick is O(1) with a cursor shared by
//! all workers), prefix sums of the primary weights (hash, ip_hash and random pick the
//! same server nginx's linear weight walk would, in O(log n)), and for `hash_ketama` a
//! ring built exactly like nginx's `hash ... consistent`. Per-connection state
//! (connections, failures) stays in `PeerState`.

use std::cmp::Ordering;

/// The per-server state the algorithms read and update.
#[repr(C)]
#[derive(Debug, Clone, Default)]
pub struct PeerState {
    pub weight: i64,
    pub effective_weight: i64,
    pub current_weight: i64,
    pub conns: u32,
    pub max_conns: u32,
    pub fails: u32,
    pub max_fails: u32,
    /// Seconds.
    pub fail_timeout: i64,
    /// Last failure, seconds since the epoch.
    pub accessed: i64,
    /// Start of the current failure window, seconds since the epoch.
    pub checked: i64,
    pub total: u64,
    pub down: bool,
    pub backup: bool,
    /// slow_start window (ms; 0: none) and when the current ramp began (ms).
    pub slow_start_ms: u64,
    pub ramp_start_ms: u64,
}

impl PeerState {
    /// While ramping after `slow_start`: the fraction of its share the peer gets now.
    pub fn ramp(&self, now_ms: u64) -> Option<f64> {
        let elapsed = now_ms.saturating_sub(self.ramp_start_ms);
        if self.slow_start_ms == 0 || self.ramp_start_ms == 0 || elapsed >= self.slow_start_ms {
            return None;
        }
        Some(elapsed as f64 / self.slow_start_ms as f64)
    }

    /// Whether the peer may take a new connection at time `now` (seconds).
    pub fn available(&self, now: i64) -> bool {
        if self.down {
            return false;
        }
        if self.max_fails > 0
            && self.fails >= self.max_fails
            && now - self.checked <= self.fail_timeout
        {
            return false;
        }
        if self.max_conns > 0 && self.conns >= self.max_conns {
            return false;
        }
        true
    }

    /// The peer was chosen: open a new failure window if the last one expired (nginx).
    pub fn picked(&mut self, now: i64) {
        if now - self.checked > self.fail_timeout {
            self.checked = now;
        }
    }

    /// Records the end of a connection attempt (nginx's `free` rules).
    pub fn release(&mut self, failed: bool, now: i64) {
        if failed {
            self.fails += 1;
            self.accessed = now;
            self.checked = now;
            if self.max_fails > 0 {
                self.effective_weight -= self.weight / self.max_fails as i64;
            }
            if self.effective_weight < 0 {
                self.effective_weight = 0;
            }
        } else if self.accessed < self.checked {
            self.fails = 0;
        }
        self.conns = self.conns.saturating_sub(1);
    }

    /// A connection to the peer succeeded: a server that was failing is live again.
    pub fn connected(&mut self) {
        if self.accessed < self.checked {
            self.fails = 0;
        }
    }
}

/// Any indexable list of peers.
pub trait Peers {
    fn len(&self) -> usize;
    fn peer(&mut self, i: usize) -> &mut PeerState;
}

impl Peers for [PeerState] {
    fn len(&self) -> usize {
        <[PeerState]>::len(self)
    }
    fn peer(&mut self, i: usize) -> &mut PeerState {
        &mut self[i]
    }
}

/// How an upstream picks its server (`upsync_lb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Method {
    #[default]
    RoundRobin,
    LeastConn,
    IpHash,
    HashModula,
    HashKetama,
    /// `random`, or `random two` (the less loaded of two random picks).
    Random {
        two: bool,
    },
}

/// What the plan needs to know about each server of a set, in set order.
#[derive(Debug, Clone)]
pub struct PlanPeer<'a> {
    /// `ip:port` as nginx would print the `server` (ketama hashes it).
    pub name: &'a str,
    pub weight: u32,
    pub down: bool,
    pub backup: bool,
}

/// Precomputed selection structures for one server set.
#[derive(Debug, Default, Clone)]
pub struct Plan {
    pub generation: u64,
    /// Smooth weighted round-robin order of set indices: primaries, then backups.
    pub schedule: [Vec<u32>; 2],
    /// Set indices of the primary servers, in set order.
    pub primaries: Vec<u32>,
    /// prefix[k] = total weight of primaries[0..=k].
    pub prefix: Vec<u64>,
    pub total_weight: u64,
    /// (point, set index), sorted by point: nginx's consistent-hash ring.
    pub ring: Vec<(u32, u32)>,
    /// For each weight unit w < total_weight, the server whose range holds it (when the
    /// total is at most `MAX_WEIGHT_TABLE`): O(1) weight walks.
    pub weight_table: Vec<u32>,
    /// ring_index[b] = first ring position whose point's top 16 bits are >= b.
    pub ring_index: Vec<u32>,
}

/// Largest total weight given a direct weight -> server table (1 MB per plan).
const MAX_WEIGHT_TABLE: u64 = 1 << 18;

/// Longest round-robin schedule: weights are divided by their gcd and, if still larger,
/// scaled down (keeping every server at least once).
const MAX_SCHEDULE: u64 = 1 << 16;

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
    let scale = if sum > MAX_SCHEDULE.max(members.len() as u64 * 4) {
        (MAX_SCHEDULE.max(members.len() as u64 * 4)) as f64 / sum as f64
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

/// nginx's `hash ... consistent` points for one server: crc32(HOST \0 PORT PREV_HASH).
fn ketama_points(name: &str, weight: u32, idx: u32, out: &mut Vec<(u32, u32)>) {
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
    for _ in 0..weight as u64 * 160 {
        let mut h = base.clone();
        h.update(&prev.to_le_bytes());
        let v = h.finalize();
        out.push((v, idx));
        prev = v;
    }
}

impl Plan {
    pub fn build(generation: u64, peers: &[PlanPeer<'_>], method: Method) -> Plan {
        let mut plan = Plan {
            generation,
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
            for (i, p) in peers.iter().enumerate().filter(|(_, p)| !p.backup) {
                ketama_points(p.name, p.weight.max(1), i as u32, &mut plan.ring);
            }
            plan.ring.sort_unstable();
            plan.ring.dedup_by_key(|p| p.0);
            let mut pos = 0usize;
            plan.ring_index = (0..=65536u64)
                .map(|b| {
                    while pos < plan.ring.len() && ((plan.ring[pos].0 as u64) >> 16) < b {
                        pos += 1;
                    }
                    pos as u32
                })
                .collect();
        }
        plan
    }

    /// The primary whose weight range holds `w` (< total_weight): nginx's weight walk.
    fn by_weight(&self, w: u64) -> usize {
        if let Some(&i) = self.weight_table.get(w as usize) {
            return i as usize;
        }
        let k = self.prefix.partition_point(|&end| end <= w);
        self.primaries[k] as usize
    }

    /// The first ring position whose point is >= hash (== ring.len() past the end).
    fn ring_start(&self, hash: u32) -> usize {
        let b = (hash >> 16) as usize;
        let (lo, hi) = (self.ring_index[b] as usize, self.ring_index[b + 1] as usize);
        lo + self.ring[lo..hi].partition_point(|&(p, _)| p < hash)
    }
}

/// Round robin: the next available server in the schedule after `cursor`.
pub fn pick_round_robin<P: Peers + ?Sized>(
    peers: &mut P,
    plan: &Plan,
    backup: bool,
    cursor: &mut u64,
    now: i64,
    tried: &dyn Fn(usize) -> bool,
) -> Option<usize> {
    let sched = &plan.schedule[backup as usize];
    let len = sched.len() as u64;
    if len == 0 {
        return None;
    }
    let start = *cursor % len;
    for step in 0..len {
        let pos = (start + step) % len;
        let i = sched[pos as usize] as usize;
        if !tried(i) && peers.peer(i).available(now) {
            *cursor = pos + 1;
            return Some(i);
        }
    }
    None
}

/// nginx's smooth weighted round robin over the peers for which `eligible(i)` holds.
pub fn smooth_wrr<P: Peers + ?Sized>(
    peers: &mut P,
    eligible: &dyn Fn(usize, &PeerState) -> bool,
) -> Option<usize> {
    let mut best: Option<usize> = None;
    let mut best_cw = i64::MIN;
    let mut total = 0i64;
    for i in 0..peers.len() {
        let p = peers.peer(i);
        if !eligible(i, p) {
            continue;
        }
        p.current_weight += p.effective_weight;
        total += p.effective_weight;
        if p.effective_weight < p.weight {
            p.effective_weight += 1;
        }
        if best.is_none() || p.current_weight > best_cw {
            best = Some(i);
            best_cw = p.current_weight;
        }
    }
    let b = best?;
    peers.peer(b).current_weight -= total;
    Some(b)
}

/// nginx's least_conn: fewest connections per weight among available peers (primaries,
/// then backups); ties go to smooth weighted round robin among the tied peers.
pub fn pick_least_conn<P: Peers + ?Sized>(
    peers: &mut P,
    now: i64,
    tried: &dyn Fn(usize) -> bool,
) -> Option<usize> {
    for backup in [false, true] {
        let ok = |i: usize, p: &PeerState| p.backup == backup && !tried(i) && p.available(now);
        let mut best: Option<(u64, u64)> = None; // (conns, weight) of the best ratio
        let mut many = false;
        for i in 0..peers.len() {
            let p = peers.peer(i);
            if !ok(i, p) {
                continue;
            }
            let (c, w) = (p.conns as u64, p.weight.max(1) as u64);
            match best {
                None => best = Some((c, w)),
                Some((bc, bw)) => match (c * bw).cmp(&(bc * w)) {
                    Ordering::Less => {
                        best = Some((c, w));
                        many = false;
                    }
                    Ordering::Equal => many = true,
                    Ordering::Greater => {}
                },
            }
        }
        let Some((bc, bw)) = best else { continue };
        let same = |i: usize, p: &PeerState| {
            ok(i, p) && p.conns as u64 * bw == bc * p.weight.max(1) as u64
        };
        if !many {
            return (0..peers.len()).find(|&i| {
                let p = peers.peer(i);
                same(i, p)
            });
        }
        return smooth_wrr(peers, &same);
    }
    None
}

/// How many times a hash method looks for another server before falling back to round
/// robin (nginx's limit).
const HASH_TRIES: u32 = 20;

/// nginx's `hash KEY` (no `consistent`): ((crc32([REHASH] KEY) >> 16) & 0x7fff) summed
/// over attempts, modulo the total weight.
pub fn pick_hash_modula<P: Peers + ?Sized>(
    peers: &mut P,
    plan: &Plan,
    key: &[u8],
    now: i64,
    tried: &dyn Fn(usize) -> bool,
) -> Option<usize> {
    if plan.primaries.len() < 2 || key.is_empty() || plan.total_weight == 0 {
        return None;
    }
    let mut hash: u64 = 0;
    let hashes = (0..=HASH_TRIES).map(|rehash| {
        let mut h = crc32fast::Hasher::new();
        if rehash > 0 {
            h.update(rehash.to_string().as_bytes());
        }
        h.update(key);
        hash += ((h.finalize() >> 16) & 0x7fff) as u64;
        hash
    });
    first_usable_by_weight(peers, plan, hashes, now, tried)
}

/// The first usable primary among the weight positions a hash sequence points at
/// (nginx's hash and ip_hash retries).
fn first_usable_by_weight<P: Peers + ?Sized>(
    peers: &mut P,
    plan: &Plan,
    hashes: impl Iterator<Item = u64>,
    now: i64,
    tried: &dyn Fn(usize) -> bool,
) -> Option<usize> {
    for hash in hashes {
        let i = plan.by_weight(hash % plan.total_weight);
        if !tried(i) && peers.peer(i).available(now) {
            return Some(i);
        }
    }
    None
}

/// nginx's `ip_hash`: the first three octets of an IPv4 client (all 16 bytes of IPv6).
pub fn pick_ip_hash<P: Peers + ?Sized>(
    peers: &mut P,
    plan: &Plan,
    addr: &[u8],
    now: i64,
    tried: &dyn Fn(usize) -> bool,
) -> Option<usize> {
    if plan.primaries.len() < 2 || plan.total_weight == 0 {
        return None;
    }
    let bytes = if addr.len() == 4 { &addr[..3] } else { addr };
    let mut hash: u64 = 89;
    let hashes = (0..=HASH_TRIES).map(|_| {
        for &b in bytes {
            hash = (hash * 113 + b as u64) % 6271;
        }
        hash
    });
    first_usable_by_weight(peers, plan, hashes, now, tried)
}

/// nginx's `hash KEY consistent`: the first ring point at or after crc32(KEY), then the
/// following points while the server there cannot be used.
pub fn pick_ketama<P: Peers + ?Sized>(
    peers: &mut P,
    plan: &Plan,
    key: &[u8],
    now: i64,
    tried: &dyn Fn(usize) -> bool,
) -> Option<usize> {
    if plan.ring.is_empty() || plan.primaries.len() < 2 || key.is_empty() {
        return None;
    }
    let hash = crc32fast::hash(key);
    let start = plan.ring_start(hash);
    for k in 0..=HASH_TRIES as usize {
        let i = plan.ring[(start + k) % plan.ring.len()].1 as usize;
        if !tried(i) && peers.peer(i).available(now) {
            return Some(i);
        }
    }
    None
}

/// nginx's `random [two]`: a server drawn with probability proportional to its weight;
/// with `two`, the less loaded (connections per weight) of two different draws.
pub fn pick_random<P: Peers + ?Sized>(
    peers: &mut P,
    plan: &Plan,
    two: bool,
    now: i64,
    tried: &dyn Fn(usize) -> bool,
    rand: &mut dyn FnMut() -> u64,
) -> Option<usize> {
    if plan.total_weight == 0 {
        return None;
    }
    let mut draw = |peers: &mut P, not: Option<usize>| -> Option<usize> {
        for _ in 0..=HASH_TRIES {
            let i = plan.by_weight(rand() % plan.total_weight);
            if Some(i) != not && !tried(i) && peers.peer(i).available(now) {
                return Some(i);
            }
        }
        None
    };
    let first = draw(peers, None)?;
    if !two || plan.primaries.len() < 2 {
        return Some(first);
    }
    let Some(second) = draw(peers, Some(first)) else {
        return Some(first);
    };
    let (a, b) = (peers.peer(first).clone(), peers.peer(second).clone());
    if (b.conns as i64) * a.weight.max(1) < (a.conns as i64) * b.weight.max(1) {
        Some(second)
    } else {
        Some(first)
    }
}

/// Picks a server with `method`; hash and random methods fall back to round robin (as
/// nginx does) when they find nothing, and backups serve when no primary can. A server
/// in its `slow_start` ramp is passed over with probability 1 - ramp (a few times at
/// most, so a lone ramping server still serves).
#[allow(clippy::too_many_arguments)]
pub fn pick<P: Peers + ?Sized>(
    peers: &mut P,
    plan: &Plan,
    method: Method,
    key: &[u8],
    cursors: &mut [u64; 2],
    now: i64,
    now_ms: u64,
    tried: &dyn Fn(usize) -> bool,
    rand: &mut dyn FnMut() -> u64,
) -> Option<usize> {
    let mut skipped: [usize; 3] = [usize::MAX; 3];
    let mut last = None;
    for attempt in 0..=skipped.len() {
        let skip = skipped;
        let excluded = |i: usize| tried(i) || skip.contains(&i);
        let chosen = pick_once(peers, plan, method, key, cursors, now, &excluded, rand);
        let Some(i) = chosen else { return last };
        last = Some(i);
        match peers.peer(i).ramp(now_ms) {
            Some(frac)
                if attempt < skipped.len() && (rand() % 10_000) as f64 >= frac * 10_000.0 =>
            {
                skipped[attempt] = i;
            }
            _ => return Some(i),
        }
    }
    last
}

#[allow(clippy::too_many_arguments)]
fn pick_once<P: Peers + ?Sized>(
    peers: &mut P,
    plan: &Plan,
    method: Method,
    key: &[u8],
    cursors: &mut [u64; 2],
    now: i64,
    tried: &dyn Fn(usize) -> bool,
    rand: &mut dyn FnMut() -> u64,
) -> Option<usize> {
    let chosen = match method {
        Method::RoundRobin => None,
        Method::LeastConn => return pick_least_conn(peers, now, tried),
        Method::IpHash => pick_ip_hash(peers, plan, key, now, tried),
        Method::HashModula => pick_hash_modula(peers, plan, key, now, tried),
        Method::HashKetama => pick_ketama(peers, plan, key, now, tried),
        Method::Random { two } => pick_random(peers, plan, two, now, tried, rand),
    };
    chosen
        .or_else(|| pick_round_robin(peers, plan, false, &mut cursors[0], now, tried))
        .or_else(|| pick_round_robin(peers, plan, true, &mut cursors[1], now, tried))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(weight: i64) -> PeerState {
        PeerState {
            weight,
            effective_weight: weight,
            max_fails: 2,
            fail_timeout: 10,
            ..Default::default()
        }
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("127.0.0.1:{}", 8000 + i)).collect()
    }

    fn plan_for(ps: &[PeerState], names: &[String], method: Method) -> Plan {
        let pp: Vec<PlanPeer> = ps
            .iter()
            .zip(names)
            .map(|(p, n)| PlanPeer {
                name: n,
                weight: p.weight as u32,
                down: p.down,
                backup: p.backup,
            })
            .collect();
        Plan::build(1, &pp, method)
    }

    fn no(_: usize) -> bool {
        false
    }

    #[test]
    fn nginx_smooth_wrr_sequence() {
        // nginx's documented example: weights 5,1,1 give a a b a c a a
        let mut v = vec![peer(5), peer(1), peer(1)];
        let seq: Vec<usize> = (0..7)
            .map(|_| smooth_wrr(v.as_mut_slice(), &|_, _| true).unwrap())
            .collect();
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn schedule_is_weighted_and_interleaved() {
        let mut v = vec![peer(5), peer(1), peer(1)];
        let n = names(3);
        let plan = plan_for(&v, &n, Method::RoundRobin);
        assert_eq!(plan.schedule[0].len(), 7);
        let mut cur = 0;
        let seq: Vec<usize> = (0..7)
            .map(|_| pick_round_robin(v.as_mut_slice(), &plan, false, &mut cur, 0, &no).unwrap())
            .collect();
        let count = |k| seq.iter().filter(|&&i| i == k).count();
        assert_eq!((count(0), count(1), count(2)), (5, 1, 1));
        // never three of the heavy one in a row across the cycle boundary
        assert!(
            !seq.windows(4).any(|w| w.iter().all(|&i| i == 0)),
            "{seq:?}"
        );
        // gcd reduction
        let v2 = vec![peer(300), peer(100)];
        assert_eq!(
            plan_for(&v2, &names(2), Method::RoundRobin).schedule[0].len(),
            4
        );
    }

    #[test]
    fn round_robin_skips_unavailable_and_uses_backup() {
        let mut v = vec![peer(3), peer(1), peer(1)];
        v[2].backup = true;
        let n = names(3);
        let plan = plan_for(&v, &n, Method::RoundRobin);
        let mut cursors = [0, 0];
        let mut counts = [0; 3];
        let mut r = || 0u64;
        for _ in 0..400 {
            counts[pick(
                v.as_mut_slice(),
                &plan,
                Method::RoundRobin,
                b"",
                &mut cursors,
                0,
                0,
                &no,
                &mut r,
            )
            .unwrap()] += 1;
        }
        assert_eq!(counts, [300, 100, 0]);
        v[0].down = true;
        v[1].max_conns = 1;
        v[1].conns = 1;
        assert_eq!(
            pick(
                v.as_mut_slice(),
                &plan,
                Method::RoundRobin,
                b"",
                &mut cursors,
                0,
                0,
                &no,
                &mut r
            ),
            Some(2)
        );
        v[2].fails = 2;
        v[2].checked = 0;
        assert_eq!(
            pick(
                v.as_mut_slice(),
                &plan,
                Method::RoundRobin,
                b"",
                &mut cursors,
                5,
                0,
                &no,
                &mut r
            ),
            None
        );
        // fail_timeout over: tried again
        assert_eq!(
            pick(
                v.as_mut_slice(),
                &plan,
                Method::RoundRobin,
                b"",
                &mut cursors,
                11,
                0,
                &no,
                &mut r
            ),
            Some(2)
        );
    }

    #[test]
    fn failures_expire_and_connect_resets() {
        let mut p = peer(1);
        p.release(true, 100);
        p.release(true, 100);
        assert!(!p.available(105));
        assert!(p.available(111));
        // picked again after fail_timeout opens a new window; success then clears fails
        p.picked(111);
        p.connected();
        assert_eq!(p.fails, 0);
    }

    #[test]
    fn least_conn_prefers_fewest_per_weight() {
        let mut v = vec![peer(1), peer(2), peer(1)];
        v[0].conns = 1;
        v[1].conns = 1;
        v[2].conns = 1;
        // ratios 1, 0.5, 1 -> peer 1
        assert_eq!(pick_least_conn(v.as_mut_slice(), 0, &no), Some(1));
        v[1].conns = 2; // ties 1,1,1: weighted round robin among them
        let mut counts = [0; 3];
        for _ in 0..40 {
            counts[pick_least_conn(v.as_mut_slice(), 0, &no).unwrap()] += 1;
        }
        assert_eq!(counts, [10, 20, 10]);
    }

    /// nginx's ip_hash and hash walk, written the way nginx writes them, as the oracle.
    fn nginx_walk(weights: &[u64], w: u64) -> usize {
        let mut w = w;
        let mut p = 0;
        while w >= weights[p] {
            w -= weights[p];
            p += 1;
        }
        p
    }

    #[test]
    fn hash_modula_and_ip_hash_match_nginx_walk() {
        let ws = [3u64, 1, 7, 2, 5];
        let mut v: Vec<PeerState> = ws.iter().map(|&w| peer(w as i64)).collect();
        let n = names(5);
        let plan = plan_for(&v, &n, Method::HashModula);
        let total: u64 = ws.iter().sum();
        for k in 0..200 {
            let key = format!("10.0.{}.{}", k / 7, k);
            let h = ((crc32fast::hash(key.as_bytes()) >> 16) & 0x7fff) as u64;
            assert_eq!(
                pick_hash_modula(v.as_mut_slice(), &plan, key.as_bytes(), 0, &no),
                Some(nginx_walk(&ws, h % total))
            );
            let addr = [10u8, 0, (k / 7) as u8, k as u8];
            let mut hh = 89u64;
            for &b in &addr[..3] {
                hh = (hh * 113 + b as u64) % 6271;
            }
            assert_eq!(
                pick_ip_hash(v.as_mut_slice(), &plan, &addr, 0, &no),
                Some(nginx_walk(&ws, hh % total))
            );
        }
        // an unavailable server: the key moves on (rehash), not to nothing
        v[nginx_walk(&ws, ((crc32fast::hash(b"x") >> 16) & 0x7fff) as u64 % total)].down = true;
        assert!(pick_hash_modula(v.as_mut_slice(), &plan, b"x", 0, &no).is_some());
    }

    #[test]
    fn ketama_ring_like_nginx() {
        let v = vec![peer(1), peer(2)];
        let n = names(2);
        let plan = plan_for(&v, &n, Method::HashKetama);
        assert!(plan.ring.len() > 470 && plan.ring.len() <= 480);
        assert!(plan.ring.windows(2).all(|w| w[0].0 < w[1].0));
        // first point of 127.0.0.1:8000: crc32("127.0.0.1" "\0" "8000" 00 00 00 00)
        let mut b = b"127.0.0.1\x008000".to_vec();
        b.extend_from_slice(&0u32.to_le_bytes());
        let first = crc32fast::hash(&b);
        assert!(plan.ring.contains(&(first, 0)));
        for h in [0u32, 1, first, first.wrapping_add(1), 0x8000_0000, u32::MAX] {
            assert_eq!(
                plan.ring_start(h),
                plan.ring.partition_point(|&(p, _)| p < h),
                "hash {h}"
            );
        }
    }

    #[test]
    fn ketama_moves_about_one_nth_when_a_server_is_added() {
        let n = names(5);
        let mut four: Vec<PeerState> = (0..4).map(|_| peer(1)).collect();
        let mut five: Vec<PeerState> = (0..5).map(|_| peer(1)).collect();
        let p4 = plan_for(&four, &n[..4], Method::HashKetama);
        let p5 = plan_for(&five, &n, Method::HashKetama);
        let keys = 10_000;
        let moved = (0..keys)
            .filter(|k| {
                let key = format!("key-{k}");
                pick_ketama(four.as_mut_slice(), &p4, key.as_bytes(), 0, &no)
                    != pick_ketama(five.as_mut_slice(), &p5, key.as_bytes(), 0, &no)
            })
            .count();
        // ideal 1/5 = 2000; ketama with 160 points per server stays close
        assert!((1500..2500).contains(&moved), "moved {moved}");
    }

    #[test]
    fn random_two_prefers_less_loaded() {
        let mut v = vec![peer(1), peer(1)];
        v[0].conns = 10;
        let n = names(2);
        let plan = plan_for(&v, &n, Method::Random { two: true });
        let mut seed = 7u64;
        let mut r = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            seed >> 33
        };
        for _ in 0..50 {
            assert_eq!(
                pick_random(v.as_mut_slice(), &plan, true, 0, &no, &mut r),
                Some(1)
            );
        }
        let mut counts = [0; 2];
        v[0].conns = 0;
        for _ in 0..2000 {
            counts[pick_random(v.as_mut_slice(), &plan, false, 0, &no, &mut r).unwrap()] += 1;
        }
        assert!((900..1100).contains(&counts[0]), "{counts:?}");
    }

    #[test]
    fn slow_start_ramps_share() {
        let mut v = vec![peer(1), peer(1)];
        v[1].slow_start_ms = 10_000;
        v[1].ramp_start_ms = 1_000;
        let n = names(2);
        let plan = plan_for(&v, &n, Method::RoundRobin);
        let mut seed = 1u64;
        let mut r = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            seed >> 33
        };
        let share = |v: &mut Vec<PeerState>, now_ms: u64, r: &mut dyn FnMut() -> u64| {
            let mut cursors = [0, 0];
            (0..4000)
                .filter(|_| {
                    pick(
                        v.as_mut_slice(),
                        &plan,
                        Method::RoundRobin,
                        b"",
                        &mut cursors,
                        0,
                        now_ms,
                        &no,
                        r,
                    ) == Some(1)
                })
                .count()
        };
        let early = share(&mut v, 2_000, &mut r); // 10% into the ramp
        let mid = share(&mut v, 6_000, &mut r); // 50%
        let done = share(&mut v, 11_000, &mut r); // over
        assert!(early < mid && mid < done, "{early} {mid} {done}");
        assert!(early < 800, "early {early}");
        assert_eq!(done, 2000);
        // a lone ramping server still serves
        let mut lone = vec![peer(1)];
        lone[0].slow_start_ms = 10_000;
        lone[0].ramp_start_ms = 1_000;
        let p1 = plan_for(&lone, &n[..1], Method::RoundRobin);
        let mut cursors = [0, 0];
        assert_eq!(
            pick(
                lone.as_mut_slice(),
                &p1,
                Method::RoundRobin,
                b"",
                &mut cursors,
                0,
                1_001,
                &no,
                &mut r
            ),
            Some(0)
        );
    }

    #[test]
    fn large_schedules_are_bounded() {
        let v: Vec<PeerState> = (0..10_000).map(|i| peer(1 + (i % 97))).collect();
        let n = names(10_000);
        let plan = plan_for(&v, &n, Method::RoundRobin);
        assert!(plan.schedule[0].len() as u64 <= MAX_SCHEDULE + 10_000);
        assert!(plan.schedule[0].len() >= 10_000);
    }
}
