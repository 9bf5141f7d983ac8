//! Tests of the picks against nginx's own rules.

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
    Plan::build(&pp, method)
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
        .map(|_| pick_round_robin(v.as_mut_slice(), &plan.view(), false, &mut cur, 0, &no).unwrap())
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
            &plan.view(),
            Method::RoundRobin,
            b"",
            &mut cursors,
            None,
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
            &plan.view(),
            Method::RoundRobin,
            b"",
            &mut cursors,
            None,
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
            &plan.view(),
            Method::RoundRobin,
            b"",
            &mut cursors,
            None,
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
            &plan.view(),
            Method::RoundRobin,
            b"",
            &mut cursors,
            None,
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
            pick_hash_modula(v.as_mut_slice(), &plan.view(), key.as_bytes(), 0, &no),
            Some(nginx_walk(&ws, h % total))
        );
        let addr = [10u8, 0, (k / 7) as u8, k as u8];
        let mut hh = 89u64;
        for &b in &addr[..3] {
            hh = (hh * 113 + b as u64) % 6271;
        }
        assert_eq!(
            pick_ip_hash(v.as_mut_slice(), &plan.view(), &addr, 0, &no),
            Some(nginx_walk(&ws, hh % total))
        );
    }
    // an unavailable server: the key moves on (rehash), not to nothing
    v[nginx_walk(&ws, ((crc32fast::hash(b"x") >> 16) & 0x7fff) as u64 % total)].down = true;
    assert!(pick_hash_modula(v.as_mut_slice(), &plan.view(), b"x", 0, &no).is_some());
}

#[test]
fn ketama_ring_like_nginx() {
    let v = vec![peer(1), peer(2)];
    let n = names(2);
    let plan = plan_for(&v, &n, Method::HashKetama);
    assert!(plan.ring.len() > 470 && plan.ring.len() <= 480);
    assert!(plan.ring.windows(2).all(|w| w[0] >> 32 < w[1] >> 32));
    // first point of 127.0.0.1:8000: crc32("127.0.0.1" "\0" "8000" 00 00 00 00)
    let mut b = b"127.0.0.1\x008000".to_vec();
    b.extend_from_slice(&0u32.to_le_bytes());
    let first = crc32fast::hash(&b);
    assert!(plan.ring.contains(&((first as u64) << 32)));
    for h in [0u32, 1, first, first.wrapping_add(1), 0x8000_0000, u32::MAX] {
        assert_eq!(
            plan.view().ring_start(h),
            plan.ring.partition_point(|&p| ((p >> 32) as u32) < h),
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
            pick_ketama(four.as_mut_slice(), &p4.view(), key.as_bytes(), 0, &no)
                != pick_ketama(five.as_mut_slice(), &p5.view(), key.as_bytes(), 0, &no)
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
            pick_random(v.as_mut_slice(), &plan.view(), true, 0, &no, &mut r),
            Some(1)
        );
    }
    let mut counts = [0; 2];
    v[0].conns = 0;
    for _ in 0..2000 {
        counts[pick_random(v.as_mut_slice(), &plan.view(), false, 0, &no, &mut r).unwrap()] += 1;
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
                    &plan.view(),
                    Method::RoundRobin,
                    b"",
                    &mut cursors,
                    None,
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
            &p1.view(),
            Method::RoundRobin,
            b"",
            &mut cursors,
            None,
            0,
            1_001,
            &no,
            &mut r
        ),
        Some(0)
    );
}
