//! Load balancing: per-server state (`PeerState`), the method, and `pick`, independent of
//! where the peers live (plain slices in tests, the shared zone in nginx). The per-set
//! structures are in `plan` (built once per change), the methods in `picks`.

#[cfg(test)]
mod lc_tests;
mod lc_tree;
mod picks;
mod plan;
#[cfg(test)]
mod tests;

pub use lc_tree::{LcNode, LcTree, FEW_TIES};
pub use picks::{
    pick_hash_modula, pick_ip_hash, pick_ketama, pick_least_conn, pick_random, pick_round_robin,
    smooth_wrr,
};
pub use plan::{Plan, PlanPeer, PlanView, MAX_RING_POINTS, MAX_SCHEDULE, MIN_RING_CAP};

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
    /// Out of traffic by the active health check (unhealthy, or checking); written by
    /// the upstream's prober.
    pub unhealthy: bool,
    /// slow_start window (ms; 0: none) and when the current ramp began (ms).
    pub slow_start_ms: u64,
    pub ramp_start_ms: u64,
}

impl PeerState {
    /// Whether a `slow_start` ramp may be under way (`ramp` says how far it is).
    #[inline]
    pub fn ramping(&self) -> bool {
        self.slow_start_ms != 0 && self.ramp_start_ms != 0
    }

    /// While ramping after `slow_start`: the fraction of its share the peer gets now.
    pub fn ramp(&self, now_ms: u64) -> Option<f64> {
        let elapsed = now_ms.saturating_sub(self.ramp_start_ms);
        if self.slow_start_ms == 0 || self.ramp_start_ms == 0 || elapsed >= self.slow_start_ms {
            return None;
        }
        Some(elapsed as f64 / self.slow_start_ms as f64)
    }

    /// Until when the peer is out after failing (`failed_until`).
    pub fn failed_until(&self, now: i64) -> Option<i64> {
        failed_until(
            self.max_fails,
            self.fails,
            self.checked,
            self.fail_timeout,
            now,
        )
    }

    /// Out of the choice whatever the time: down, unhealthy, or at its `max_conns`.
    #[inline]
    pub fn blocked(&self) -> bool {
        self.down || self.unhealthy || (self.max_conns > 0 && self.conns >= self.max_conns)
    }

    /// Whether the peer may take a new connection at time `now` (seconds).
    #[inline]
    pub fn available(&self, now: i64) -> bool {
        !self.blocked() && self.failed_until(now).is_none()
    }

    /// The peer was chosen: open a new failure window if the last one expired (nginx).
    #[inline]
    pub fn picked(&mut self, now: i64) {
        if now - self.checked > self.fail_timeout {
            self.checked = now;
        }
    }

    /// Records the end of a connection attempt (nginx's `free` rules).
    #[inline]
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
        } else {
            self.connected();
        }
        self.conns = self.conns.saturating_sub(1);
    }

    /// A connection to the peer succeeded: a server that was failing is live again.
    #[inline]
    pub fn connected(&mut self) {
        if self.accessed < self.checked {
            self.fails = 0;
        }
    }
}

/// nginx's failure window: a server that failed `max_fails` times within its window
/// (opened at `checked`) takes no connection until `checked + fail_timeout` (seconds).
#[inline]
pub fn failed_until(
    max_fails: u32,
    fails: u32,
    checked: i64,
    fail_timeout: i64,
    now: i64,
) -> Option<i64> {
    (max_fails > 0 && fails >= max_fails && now - checked <= fail_timeout)
        .then_some(checked + fail_timeout)
}

/// Any indexable list of peers.
pub trait Peers {
    fn len(&self) -> usize;
    fn peer(&mut self, i: usize) -> &mut PeerState;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
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

/// Picks a server with `method`; hash and random methods fall back to round robin (as
/// nginx does) when they find nothing, and backups serve when no primary can. A server
/// in its `slow_start` ramp is passed over with probability 1 - ramp (a few times at
/// most, so a lone ramping server still serves). `lc` is the set's least_conn tree,
/// when it has one (least_conn then picks in O(log n); without it, by a scan).
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn pick<P, T, R>(
    peers: &mut P,
    plan: &PlanView<'_>,
    method: Method,
    key: &[u8],
    cursors: &mut [u64; 2],
    lc: Option<&mut LcTree<'_>>,
    now: i64,
    now_ms: u64,
    tried: &T,
    rand: &mut R,
) -> Option<usize>
where
    P: Peers + ?Sized,
    T: Fn(usize) -> bool + ?Sized,
    R: FnMut() -> u64 + ?Sized,
{
    let mut lc = lc;
    let first = pick_once(
        peers,
        plan,
        method,
        key,
        cursors,
        lc.as_deref_mut(),
        now,
        tried,
        rand,
    )?;
    if !peers.peer(first).ramping() {
        return Some(first);
    }
    // a ramping server: passed over with probability 1 - ramp, at most three times
    let mut skipped: [usize; 3] = [usize::MAX; 3];
    let mut last = first;
    let mut chosen = Some(first);
    for attempt in 0..=skipped.len() {
        if attempt > 0 {
            let skip = skipped;
            let excluded = |i: usize| tried(i) || skip.contains(&i);
            let lc = lc.as_deref_mut();
            chosen = pick_once(peers, plan, method, key, cursors, lc, now, &excluded, rand);
        }
        let Some(i) = chosen else {
            return Some(last);
        };
        last = i;
        match peers.peer(i).ramp(now_ms) {
            Some(frac)
                if attempt < skipped.len() && (rand() % 10_000) as f64 >= frac * 10_000.0 =>
            {
                skipped[attempt] = i;
            }
            _ => return Some(i),
        }
    }
    Some(last)
}

#[allow(clippy::too_many_arguments)]
#[inline]
fn pick_once<P, T, R>(
    peers: &mut P,
    plan: &PlanView<'_>,
    method: Method,
    key: &[u8],
    cursors: &mut [u64; 2],
    lc: Option<&mut LcTree<'_>>,
    now: i64,
    tried: &T,
    rand: &mut R,
) -> Option<usize>
where
    P: Peers + ?Sized,
    T: Fn(usize) -> bool + ?Sized,
    R: FnMut() -> u64 + ?Sized,
{
    let chosen = match method {
        Method::RoundRobin => None,
        Method::LeastConn => {
            return match lc {
                Some(tree) => tree.pick(peers, now, tried, &mut cursors[0]),
                None => pick_least_conn(peers, now, tried),
            }
        }
        Method::IpHash => pick_ip_hash(peers, plan, key, now, tried),
        Method::HashModula => pick_hash_modula(peers, plan, key, now, tried),
        Method::HashKetama => pick_ketama(peers, plan, key, now, tried),
        Method::Random { two } => pick_random(peers, plan, two, now, tried, rand),
    };
    chosen
        .or_else(|| pick_round_robin(peers, plan, false, &mut cursors[0], now, tried))
        .or_else(|| pick_round_robin(peers, plan, true, &mut cursors[1], now, tried))
}
