//! The least_conn tree against the linear scan (nginx's rules): same pick and same
//! round-robin state whatever happens to the servers, while ties are few; a weighted
//! rotation among many ties.

use super::*;
use crate::policy::Rng;

fn peer(weight: i64) -> PeerState {
    PeerState {
        weight,
        effective_weight: weight,
        max_fails: 2,
        fail_timeout: 10,
        ..Default::default()
    }
}

fn mem(n: usize) -> Vec<LcNode> {
    vec![LcNode::EMPTY; LcTree::nodes_for(n)]
}

/// A random set: weights 1-5, some backups, some down, some with max_conns.
fn random_set(rng: &mut Rng, n: usize) -> Vec<PeerState> {
    (0..n)
        .map(|_| {
            let mut p = peer(1 + (rng.next_u64() % 5) as i64);
            p.backup = rng.next_u64() % 6 == 0;
            p.down = rng.next_u64() % 10 == 0;
            p.unhealthy = rng.next_u64() % 12 == 0;
            if rng.next_u64() % 5 == 0 {
                p.max_conns = 1 + (rng.next_u64() % 3) as u32;
            }
            p
        })
        .collect()
}

/// Runs the same random life (picks with retries, sessions ending, failures, time
/// passing) on two copies of a set, one picked by the scan and one by the tree, and
/// checks every pick and the peers' state stay the same.
fn differential(seed: u64, n: usize, steps: usize) {
    let mut rng = Rng::new(seed);
    let mut scan = random_set(&mut rng, n);
    let mut treed = scan.clone();
    let mut nodes = mem(n);
    let mut tree = LcTree::new(&mut nodes, n).unwrap();
    let mut now = 100i64;
    tree.build(treed.as_mut_slice(), now);
    let mut open: Vec<usize> = Vec::new();
    let mut cursor = 0u64;
    for step in 0..steps {
        match rng.next_u64() % 10 {
            // a session: picks, retrying past a failed attempt
            0..=4 => {
                let mut tried: Vec<usize> = Vec::new();
                for _ in 0..3 {
                    let t = |i: usize| tried.contains(&i);
                    let a = pick_least_conn(scan.as_mut_slice(), now, &t);
                    let b = tree.pick(treed.as_mut_slice(), now, &t, &mut cursor);
                    assert_eq!(a, b, "seed {seed} step {step}: scan and tree differ");
                    let Some(i) = a else { break };
                    for (v, tr) in [(&mut scan, false), (&mut treed, true)] {
                        v[i].picked(now);
                        v[i].conns += 1;
                        if tr {
                            tree.update(i, &v[i], now);
                        }
                    }
                    if rng.next_u64() % 4 == 0 {
                        // the attempt failed
                        for (v, tr) in [(&mut scan, false), (&mut treed, true)] {
                            v[i].release(true, now);
                            if tr {
                                tree.update(i, &v[i], now);
                            }
                        }
                        tried.push(i);
                        continue;
                    }
                    open.push(i);
                    break;
                }
            }
            // a session ends
            5..=7 if !open.is_empty() => {
                let i = open.swap_remove((rng.next_u64() % open.len() as u64) as usize);
                for (v, tr) in [(&mut scan, false), (&mut treed, true)] {
                    v[i].release(false, now);
                    if tr {
                        tree.update(i, &v[i], now);
                    }
                }
            }
            // time passes (failure windows end)
            _ => now += (rng.next_u64() % 7) as i64,
        }
        assert_eq!(
            format!("{scan:?}"),
            format!("{treed:?}"),
            "seed {seed} step {step}: state differs"
        );
    }
}

#[test]
fn tree_picks_what_the_scan_picks() {
    // up to FEW_TIES servers: ties are always few, so the picks are nginx's exactly
    for seed in 0..60 {
        differential(seed, 1 + (seed as usize * 7) % FEW_TIES as usize, 600);
    }
}

/// (backup, connections per weight) of a server: what least_conn minimizes.
fn key(p: &PeerState) -> (bool, u64, u64) {
    (p.backup, p.conns as u64, p.weight.max(1) as u64)
}

fn same_key(a: (bool, u64, u64), b: (bool, u64, u64)) -> bool {
    a.0 == b.0 && a.1 * b.2 == b.1 * a.2
}

#[test]
fn tree_picks_the_fewest_connections_per_weight_on_larger_sets() {
    // 200 servers: the tree's pick always has the scan's key (the pick itself may
    // differ among many ties, which rotate by weight instead)
    for seed in 100..104 {
        let mut rng = Rng::new(seed);
        let n = 200;
        let mut v: Vec<PeerState> = (0..n)
            .map(|_| peer(1 + (rng.next_u64() % 4) as i64))
            .collect();
        for (i, p) in v.iter_mut().enumerate() {
            p.conns = (i as u32 * 7919) % 97;
            p.backup = i % 50 == 7;
        }
        let mut nodes = mem(n);
        let mut tree = LcTree::new(&mut nodes, n).unwrap();
        tree.build(v.as_mut_slice(), 0);
        let mut cursor = 0;
        let mut open: Vec<usize> = Vec::new();
        for step in 0..4000 {
            if rng.next_u64() % 3 == 0 && !open.is_empty() {
                let i = open.swap_remove((rng.next_u64() % open.len() as u64) as usize);
                v[i].conns -= 1;
                tree.update(i, &v[i], 0);
                continue;
            }
            let mut copy = v.clone();
            let a = pick_least_conn(copy.as_mut_slice(), 0, &|_| false).unwrap();
            let b = tree
                .pick(v.as_mut_slice(), 0, &|_| false, &mut cursor)
                .unwrap();
            assert!(same_key(key(&v[a]), key(&v[b])), "step {step}: {a} {b}");
            v[b].conns += 1;
            tree.update(b, &v[b], 0);
            open.push(b);
        }
    }
}

#[test]
fn many_ties_rotate_by_weight() {
    // 1,000 idle servers, weights 1 and 3: every pick is a tie among all of them
    let n = 1000;
    let mut v: Vec<PeerState> = (0..n)
        .map(|i| peer(if i % 2 == 0 { 1 } else { 3 }))
        .collect();
    let mut nodes = mem(n);
    let mut tree = LcTree::new(&mut nodes, n).unwrap();
    tree.build(v.as_mut_slice(), 0);
    let mut cursor = 0;
    let mut count = vec![0u32; n];
    // short sessions: each closes before the next pick
    for _ in 0..4 * 2000 {
        let i = tree
            .pick(v.as_mut_slice(), 0, &|_| false, &mut cursor)
            .unwrap();
        count[i] += 1;
    }
    // one full rotation over the 2,000 weight units, twice... four times
    for (i, &c) in count.iter().enumerate() {
        assert_eq!(c, if i % 2 == 0 { 4 } else { 12 }, "server {i}");
    }
}

#[test]
fn failure_windows_end_with_time() {
    let mut v = vec![peer(1), peer(1)];
    v[0].conns = 5;
    let mut nodes = mem(2);
    let mut tree = LcTree::new(&mut nodes, 2).unwrap();
    tree.build(v.as_mut_slice(), 0);
    let mut cursor = 0;
    // server 1 fails twice at t=100: out until 110
    for _ in 0..2 {
        v[1].picked(100);
        v[1].release(true, 100);
    }
    tree.update(1, &v[1], 100);
    assert_eq!(
        tree.pick(v.as_mut_slice(), 105, &|_| false, &mut cursor),
        Some(0)
    );
    assert_eq!(
        tree.pick(v.as_mut_slice(), 110, &|_| false, &mut cursor),
        Some(0)
    );
    // the window is over: the idle server 1 is back (and takes one probe)
    assert_eq!(
        tree.pick(v.as_mut_slice(), 111, &|_| false, &mut cursor),
        Some(1)
    );
}

#[test]
fn backups_only_when_no_primary_can() {
    let mut v = vec![peer(1), peer(1), peer(1)];
    v[2].backup = true;
    v[0].conns = 50;
    v[1].max_conns = 1;
    v[1].conns = 1;
    let mut nodes = mem(3);
    let mut tree = LcTree::new(&mut nodes, 3).unwrap();
    tree.build(v.as_mut_slice(), 0);
    let mut cursor = 0;
    assert_eq!(
        tree.pick(v.as_mut_slice(), 0, &|_| false, &mut cursor),
        Some(0)
    );
    v[0].down = true;
    tree.update(0, &v[0], 0);
    assert_eq!(
        tree.pick(v.as_mut_slice(), 0, &|_| false, &mut cursor),
        Some(2)
    );
    assert_eq!(
        tree.pick(v.as_mut_slice(), 0, &|i| i == 2, &mut cursor),
        None
    );
}

#[test]
fn many_tried_servers_fall_back_to_the_scan() {
    // every server tried but the last: more than the tree sets aside
    let n = 100;
    let mut v: Vec<PeerState> = (0..n).map(|_| peer(1)).collect();
    v[99].conns = 3;
    let mut nodes = mem(n);
    {
        let mut tree = LcTree::new(&mut nodes, n).unwrap();
        tree.build(v.as_mut_slice(), 0);
        let mut cursor = 0;
        let got = tree.pick(v.as_mut_slice(), 0, &|i| i < 99, &mut cursor);
        assert_eq!(got, Some(99));
    }
    // and the servers set aside are back: the tree is the one a build makes
    let mut fresh = mem(n);
    LcTree::new(&mut fresh, n)
        .unwrap()
        .build(v.as_mut_slice(), 0);
    assert_eq!(nodes, fresh);
}
