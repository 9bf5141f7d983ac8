//! The picks: nginx's balancing methods over a set's peers and its published plan.

use std::cmp::Ordering;

use super::{PeerState, Peers, PlanView};

/// Round robin: the next available server in the schedule after `cursor`.
#[inline]
pub fn pick_round_robin<P: Peers + ?Sized>(
    peers: &mut P,
    plan: &PlanView<'_>,
    backup: bool,
    cursor: &mut u64,
    now: i64,
    tried: &(impl Fn(usize) -> bool + ?Sized),
) -> Option<usize> {
    let sched = &plan.schedule[backup as usize];
    let len = sched.len();
    if len == 0 {
        return None;
    }
    // the cursor is shared and the set may have shrunk: wrap it once, then walk
    let mut pos = *cursor as usize;
    if pos >= len {
        pos %= len;
    }
    for _ in 0..len {
        let i = sched[pos] as usize;
        pos += 1;
        if !tried(i) && peers.peer(i).available(now) {
            *cursor = pos as u64;
            return Some(i);
        }
        if pos == len {
            pos = 0;
        }
    }
    None
}

/// nginx's smooth weighted round robin over the peers for which `eligible(i)` holds.
#[inline]
pub fn smooth_wrr<P: Peers + ?Sized>(
    peers: &mut P,
    eligible: &(impl Fn(usize, &PeerState) -> bool + ?Sized),
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
#[inline]
pub fn pick_least_conn<P: Peers + ?Sized>(
    peers: &mut P,
    now: i64,
    tried: &(impl Fn(usize) -> bool + ?Sized),
) -> Option<usize> {
    for backup in [false, true] {
        // (index, conns, weight) of the best ratio, and whether another peer ties it
        let mut best: Option<(usize, u64, u64)> = None;
        let mut many = false;
        for i in 0..peers.len() {
            let p = peers.peer(i);
            if p.backup != backup || tried(i) || !p.available(now) {
                continue;
            }
            let (c, w) = (p.conns as u64, p.weight.max(1) as u64);
            match best {
                None => best = Some((i, c, w)),
                Some((_, bc, bw)) => match (c * bw).cmp(&(bc * w)) {
                    Ordering::Less => {
                        best = Some((i, c, w));
                        many = false;
                    }
                    Ordering::Equal => many = true,
                    Ordering::Greater => {}
                },
            }
        }
        let Some((first, bc, bw)) = best else {
            continue;
        };
        if !many {
            return Some(first);
        }
        let same = |i: usize, p: &PeerState| {
            p.backup == backup
                && !tried(i)
                && p.available(now)
                && p.conns as u64 * bw == bc * p.weight.max(1) as u64
        };
        return smooth_wrr(peers, &same);
    }
    None
}

/// How many times a hash method looks for another server before falling back to round
/// robin (nginx's limit).
const HASH_TRIES: u32 = 20;
const _: () = assert!(
    HASH_TRIES < 100,
    "a retry number is written with two digits at most"
);

/// nginx's `hash KEY` (no `consistent`): ((crc32([REHASH] KEY) >> 16) & 0x7fff) summed
/// over attempts, modulo the total weight.
pub fn pick_hash_modula<P: Peers + ?Sized>(
    peers: &mut P,
    plan: &PlanView<'_>,
    key: &[u8],
    now: i64,
    tried: &(impl Fn(usize) -> bool + ?Sized),
) -> Option<usize> {
    if plan.primaries.len() < 2 || key.is_empty() || plan.total_weight == 0 {
        return None;
    }
    let mut hash: u64 = 0;
    let hashes = (0..=HASH_TRIES).map(|rehash| {
        let mut h = crc32fast::Hasher::new();
        if rehash > 0 {
            // the retry number in decimal, as nginx's "%ui" (no allocation: at most 2 digits)
            let digits = [b'0' + (rehash / 10) as u8, b'0' + (rehash % 10) as u8];
            h.update(if rehash < 10 {
                &digits[1..]
            } else {
                &digits[..]
            });
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
    plan: &PlanView<'_>,
    hashes: impl Iterator<Item = u64>,
    now: i64,
    tried: &(impl Fn(usize) -> bool + ?Sized),
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
    plan: &PlanView<'_>,
    addr: &[u8],
    now: i64,
    tried: &(impl Fn(usize) -> bool + ?Sized),
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
    plan: &PlanView<'_>,
    key: &[u8],
    now: i64,
    tried: &(impl Fn(usize) -> bool + ?Sized),
) -> Option<usize> {
    if plan.ring.is_empty() || plan.primaries.len() < 2 || key.is_empty() {
        return None;
    }
    let hash = crc32fast::hash(key);
    let start = plan.ring_start(hash);
    for k in 0..=HASH_TRIES as usize {
        let i = (plan.ring[(start + k) % plan.ring.len()] & 0xffff_ffff) as usize;
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
    plan: &PlanView<'_>,
    two: bool,
    now: i64,
    tried: &(impl Fn(usize) -> bool + ?Sized),
    rand: &mut (impl FnMut() -> u64 + ?Sized),
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
