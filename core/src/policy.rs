//! The poller's decisions, written against a clock passed in (milliseconds of a
//! monotonic clock) so they are unit-tested without nginx: request pacing (the
//! hot-loop guard), failover across registry addresses with backoff, error
//! de-duplication per outage, the polling lease, and the jitter generator.

/// Hot-loop guard: requests are spaced by `MIN_GAP_MS` once the registry has answered
/// `FAST_STREAK` requests in a row within `MIN_GAP_MS` without any progress (a server
/// that does not block), or once more than `MAX_PER_SECOND` requests went out in the
/// current second. Quick answers that carry changes are followed at full speed.
pub const MIN_GAP_MS: u64 = 20;
pub const FAST_STREAK: u32 = 3;
pub const MAX_PER_SECOND: u32 = 100;

/// Request pacing for one poller.
#[derive(Debug, Default, Clone)]
pub struct Pacer {
    last_request: u64,
    /// Consecutive exchanges that completed in under MIN_GAP_MS with no progress.
    fast_streak: u32,
    window_start: u64,
    window_count: u32,
}

impl Pacer {
    /// Whether a request may go out at `now`: `None` (go; it is counted as sent) or
    /// `Some(ms)` to wait first.
    pub fn admit(&mut self, now: u64) -> Option<u64> {
        if now.saturating_sub(self.window_start) >= 1000 {
            self.window_start = now;
            self.window_count = 0;
        }
        let gap = self.last_request + MIN_GAP_MS;
        if (self.fast_streak >= FAST_STREAK || self.window_count >= MAX_PER_SECOND) && now < gap {
            return Some(gap - now);
        }
        self.window_count += 1;
        self.last_request = now;
        None
    }

    /// An exchange that started at `started` ended at `now`; `progress`: it brought a
    /// change (or a watch fired).
    pub fn answered(&mut self, started: u64, now: u64, progress: bool) {
        let fast = now.saturating_sub(started) < MIN_GAP_MS;
        self.fast_streak = if fast && !progress {
            self.fast_streak.saturating_add(1)
        } else {
            0
        };
    }
}

/// The delay before retrying after `failures` failed rounds: `interval_ms` (at least
/// 50 ms), doubled up to 4x, plus up to 20 % of jitter (`jitter` in 0..1).
pub fn retry_delay_ms(interval_ms: u64, failures: u32, jitter: f64) -> u64 {
    let base = interval_ms.max(50);
    let factor = 1u64 << failures.saturating_sub(1).min(2);
    let d = base.saturating_mul(factor);
    d.saturating_add((d as f64 * 0.2 * jitter.clamp(0.0, 1.0)) as u64)
}

/// What to do after a failed exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Try the next registry address at once (the round of addresses is not done).
    Next,
    /// Every address of the round failed: wait this long, then start a round again.
    Backoff(u64),
}

/// Failover across the registry addresses of one upstream: the poller stays on the
/// address that works; a failure moves to the next one at once until every address
/// failed once, then the next round waits (`retry_delay_ms`).
#[derive(Debug, Clone)]
pub struct Failover {
    addresses: usize,
    index: usize,
    failures: u32,
}

impl Failover {
    pub fn new(addresses: usize) -> Failover {
        Failover {
            addresses: addresses.max(1),
            index: 0,
            failures: 0,
        }
    }

    /// The address to use now (an index into the address list).
    pub fn current(&self) -> usize {
        self.index % self.addresses
    }

    /// Consecutive failed exchanges.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    pub fn failed(&mut self, interval_ms: u64, jitter: f64) -> Retry {
        self.failures = self.failures.saturating_add(1);
        self.index = self.index.wrapping_add(1);
        let n = self.addresses as u32;
        if n > 1 && self.failures % n != 0 {
            Retry::Next
        } else {
            let rounds = self.failures.div_ceil(n);
            Retry::Backoff(retry_delay_ms(interval_ms, rounds, jitter))
        }
    }

    /// An exchange succeeded: returns how many had failed before (0: none).
    pub fn succeeded(&mut self) -> u32 {
        std::mem::take(&mut self.failures)
    }

    /// Whether there is more than one address.
    pub fn is_list(&self) -> bool {
        self.addresses > 1
    }
}

/// The distinct errors of the current outage, each logged once (at most `LIMIT`
/// remembered; the oldest is forgotten first).
#[derive(Debug, Default, Clone)]
pub struct ErrorDedup {
    seen: Vec<String>,
}

impl ErrorDedup {
    const LIMIT: usize = 16;

    /// True the first time `msg` is seen in this outage.
    pub fn first_time(&mut self, msg: &str) -> bool {
        if self.seen.iter().any(|m| m == msg) {
            return false;
        }
        if self.seen.len() >= Self::LIMIT {
            self.seen.remove(0);
        }
        self.seen.push(msg.to_string());
        true
    }

    /// The outage is over.
    pub fn clear(&mut self) {
        self.seen.clear();
    }
}

/// The polling lease as the zone holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Holder's pid (0: nobody).
    pub holder: i64,
    /// Until when (monotonic ms).
    pub until_ms: u64,
}

/// What a worker's election tick decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseDecision {
    /// This worker holds the lease: renew it.
    Renew,
    /// Nobody holds it, it ran out, or its holder is gone: take it.
    Take,
    /// Another live worker holds it.
    Wait,
}

/// The election rule: renew our own lease; take one that is free, expired or held by a
/// dead process (`holder_alive` is asked only then); otherwise wait.
pub fn decide_lease(
    lease: Lease,
    me: i64,
    now: u64,
    holder_alive: impl FnOnce(i64) -> bool,
) -> LeaseDecision {
    if lease.holder == me {
        LeaseDecision::Renew
    } else if lease.holder == 0 || lease.until_ms < now || !holder_alive(lease.holder) {
        LeaseDecision::Take
    } else {
        LeaseDecision::Wait
    }
}

/// How long a lease lasts for a poller with this interval: a dead poller is replaced at
/// the next tick (its pid is gone); the lease only matters for a live worker that stopped
/// ticking (hung, or starved of CPU), so it is long enough not to flip between busy
/// workers.
pub fn lease_ms(interval_ms: u64) -> u64 {
    interval_ms.saturating_mul(3).clamp(3_000, 30_000)
}

/// How often a worker runs its election tick.
pub fn tick_ms(interval_ms: u64) -> u64 {
    (interval_ms / 2).clamp(100, 2000)
}

/// The largest registry response read for an upstream that may use `memory` bytes of
/// shared memory: 8 times that (a server takes about 250 bytes in the zone and at most
/// about 2 KB in the most verbose answers, Consul's health listings), at least 8 MiB.
/// So any set that fits the zone can be read, and the limit follows `zone_size=` /
/// `upsync_zone_size`.
pub fn response_limit(memory: u64) -> usize {
    const MIN: u64 = 8 << 20;
    memory.saturating_mul(8).max(MIN).min(usize::MAX as u64) as usize
}

/// xorshift64*: spreads timers and jitters retries; not for anything secret.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15 | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A fraction in 0..1 (three decimals).
    pub fn fraction(&mut self) -> f64 {
        (self.next_u64() % 1000) as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_may_be_8_times_the_memory_an_upstream_may_use() {
        assert_eq!(response_limit(0), 8 << 20);
        assert_eq!(response_limit(1 << 20), 8 << 20);
        assert_eq!(response_limit(128 << 20), 1 << 30);
        assert_eq!(response_limit(u64::MAX), usize::MAX);
    }

    #[test]
    fn pacing_lets_changes_through_and_spaces_idle_answers() {
        let mut p = Pacer::default();
        let mut now = 1_000;
        // a registry that does not block: answers at once, no progress
        for _ in 0..FAST_STREAK {
            assert_eq!(p.admit(now), None);
            p.answered(now, now + 1, false);
            now += 1;
        }
        assert_eq!(
            p.admit(now),
            Some(MIN_GAP_MS - 1),
            "spaced after the streak"
        );
        now += MIN_GAP_MS;
        assert_eq!(p.admit(now), None);
        // a quick answer with a change resets the streak
        p.answered(now, now + 1, true);
        now += 1;
        assert_eq!(p.admit(now), None);
    }

    #[test]
    fn pacing_caps_requests_per_second() {
        let mut p = Pacer::default();
        let start = 10_000;
        let mut sent = 0;
        let mut now = start;
        while now < start + 1000 {
            match p.admit(now) {
                None => {
                    sent += 1;
                    p.answered(now, now + 50, true); // slow answers with progress
                }
                Some(wait) => now += wait - 1,
            }
            now += 1;
        }
        assert!(sent <= MAX_PER_SECOND + 1000 / MIN_GAP_MS as u32, "{sent}");
        assert!(sent >= MAX_PER_SECOND, "{sent}");
    }

    #[test]
    fn retry_delay_backs_off_and_is_bounded() {
        assert_eq!(retry_delay_ms(1000, 1, 0.0), 1000);
        assert_eq!(retry_delay_ms(1000, 2, 0.0), 2000);
        assert_eq!(retry_delay_ms(1000, 3, 0.0), 4000);
        assert_eq!(retry_delay_ms(1000, 50, 0.0), 4000);
        assert_eq!(retry_delay_ms(1000, 1, 0.99), 1198);
        assert!(retry_delay_ms(0, 1, 0.0) >= 50);
        assert_eq!(retry_delay_ms(u64::MAX, 9, 0.5), u64::MAX);
    }

    #[test]
    fn failover_tries_every_address_then_backs_off() {
        let mut f = Failover::new(3);
        assert_eq!(f.current(), 0);
        assert_eq!(f.failed(1000, 0.0), Retry::Next);
        assert_eq!(f.current(), 1);
        assert_eq!(f.failed(1000, 0.0), Retry::Next);
        assert_eq!(f.current(), 2);
        assert_eq!(f.failed(1000, 0.0), Retry::Backoff(1000));
        assert_eq!(f.current(), 0, "the next round starts over");
        assert_eq!(f.failed(1000, 0.0), Retry::Next);
        assert_eq!(f.failed(1000, 0.0), Retry::Next);
        assert_eq!(f.failed(1000, 0.0), Retry::Backoff(2000));
        assert_eq!(f.succeeded(), 6);
        assert_eq!(f.succeeded(), 0);
        assert_eq!(f.current(), 0, "stays on the address that works");
        // a single address: every failure backs off
        let mut one = Failover::new(1);
        assert_eq!(one.failed(500, 0.0), Retry::Backoff(500));
        assert_eq!(one.failed(500, 0.0), Retry::Backoff(1000));
        assert_eq!(one.failed(500, 0.0), Retry::Backoff(2000));
        assert_eq!(one.failed(500, 0.0), Retry::Backoff(2000));
    }

    #[test]
    fn errors_are_logged_once_per_outage() {
        let mut d = ErrorDedup::default();
        assert!(d.first_time("refused"));
        assert!(!d.first_time("refused"));
        assert!(d.first_time("timed out"));
        for i in 0..ErrorDedup::LIMIT {
            d.first_time(&format!("e{i}"));
        }
        assert!(d.first_time("refused"), "forgotten once the list is full");
        d.clear();
        assert!(d.first_time("timed out"));
    }

    #[test]
    fn lease_rules() {
        let held = Lease {
            holder: 7,
            until_ms: 5_000,
        };
        let alive = |_| true;
        let dead = |_| false;
        assert_eq!(decide_lease(held, 7, 4_000, alive), LeaseDecision::Renew);
        assert_eq!(decide_lease(held, 8, 4_000, alive), LeaseDecision::Wait);
        assert_eq!(decide_lease(held, 8, 4_000, dead), LeaseDecision::Take);
        assert_eq!(decide_lease(held, 8, 5_001, alive), LeaseDecision::Take);
        let free = Lease {
            holder: 0,
            until_ms: 0,
        };
        assert_eq!(
            decide_lease(free, 8, 0, |_| panic!("no holder to ask about")),
            LeaseDecision::Take
        );
        assert_eq!(lease_ms(100), 3_000);
        assert_eq!(lease_ms(5_000), 15_000);
        assert_eq!(lease_ms(u64::MAX), 30_000);
        assert_eq!(tick_ms(50), 100);
        assert_eq!(tick_ms(10_000), 2_000);
    }

    #[test]
    fn rng_spreads() {
        let mut r = Rng::new(42);
        let v: Vec<u64> = (0..1000).map(|_| r.next_u64() % 10).collect();
        for k in 0..10 {
            let n = v.iter().filter(|&&x| x == k).count();
            assert!((60..140).contains(&n), "{k}: {n}");
        }
        assert!((0.0..1.0).contains(&r.fraction()));
    }
}
