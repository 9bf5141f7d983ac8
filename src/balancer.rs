//! Load-balancing algorithms over a list of peers, independent of where the peers live
//! (plain slices in tests, the shared zone in nginx).

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
}

impl PeerState {
    /// Whether the peer may take a new connection at time `now` (seconds).
    pub fn available(&self, now: i64) -> bool {
        if self.down {
            return false;
        }
        if self.max_fails > 0 && self.fails >= self.max_fails && now - self.checked <= self.fail_timeout {
            return false;
        }
        if self.max_conns > 0 && self.conns >= self.max_conns {
            return false;
        }
        true
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

/// nginx's smooth weighted round robin among the peers with `backup == want_backup` that
/// are available and not yet tried by this session (`tried(i)`). Returns the chosen index.
pub fn smooth_wrr<P: Peers + ?Sized>(
    peers: &mut P,
    want_backup: bool,
    now: i64,
    tried: impl Fn(usize) -> bool,
) -> Option<usize> {
    let mut best: Option<usize> = None;
    let mut best_cw = i64::MIN;
    let mut total = 0i64;
    for i in 0..peers.len() {
        if tried(i) {
            continue;
        }
        let p = peers.peer(i);
        if p.backup != want_backup || !p.available(now) {
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
    let p = peers.peer(b);
    p.current_weight -= total;
    if now - p.checked > p.fail_timeout {
        p.checked = now;
    }
    Some(b)
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

    #[test]
    fn smooth_sequence_matches_nginx() {
        // nginx's documented example: weights 5,1,1 give a a b a c a a
        let mut v = vec![peer(5), peer(1), peer(1)];
        let seq: Vec<usize> = (0..7).map(|_| smooth_wrr(v.as_mut_slice(), false, 0, |_| false).unwrap()).collect();
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn weights_proportional_and_states_respected() {
        let mut v = vec![peer(3), peer(1), peer(1)];
        v[2].down = true;
        let mut counts = [0; 3];
        for _ in 0..400 {
            counts[smooth_wrr(v.as_mut_slice(), false, 0, |_| false).unwrap()] += 1;
        }
        assert_eq!(counts, [300, 100, 0]);
    }

    #[test]
    fn backup_only_when_asked_and_failures_expire() {
        let mut v = vec![peer(1), peer(1)];
        v[1].backup = true;
        assert_eq!(smooth_wrr(v.as_mut_slice(), false, 100, |_| false), Some(0));
        v[0].release(true, 100);
        v[0].release(true, 100);
        assert_eq!(smooth_wrr(v.as_mut_slice(), false, 105, |_| false), None);
        assert_eq!(smooth_wrr(v.as_mut_slice(), true, 105, |_| false), Some(1));
        // fail_timeout passed: the primary is tried again
        assert_eq!(smooth_wrr(v.as_mut_slice(), false, 111, |_| false), Some(0));
        v[0].connected();
        assert_eq!(v[0].fails, 0);
    }

    #[test]
    fn tried_and_max_conns_skip() {
        let mut v = vec![peer(1), peer(1)];
        assert_eq!(smooth_wrr(v.as_mut_slice(), false, 0, |i| i == 0), Some(1));
        v[1].max_conns = 1;
        v[1].conns = 1;
        assert_eq!(smooth_wrr(v.as_mut_slice(), false, 0, |i| i == 0), None);
    }
}
