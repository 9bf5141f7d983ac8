//! Microbenchmark of server selection (scripts/bench/select): nanoseconds per pick for
//! each method at 10 and 10,000 servers, using the module's own balancer code.
//! least_conn is measured as connections come and go (each pick opens a session, the
//! oldest of the open ones closes; both update the state the next pick reads): with
//! the module's tree, and with the linear scan nginx uses, as the baseline.
//! Usage: selectbench [PICKS]

use std::hint::black_box;
use std::time::Instant;

use std::collections::VecDeque;

use upsync_core::balancer::{
    pick, pick_least_conn, LcNode, LcTree, Method, PeerState, Plan, PlanPeer,
};

fn peers_of(n: usize) -> Vec<PeerState> {
    (0..n)
        .map(|i| {
            let w = 1 + (i % 5) as i64;
            PeerState {
                weight: w,
                effective_weight: w,
                max_fails: 1,
                fail_timeout: 10,
                ..Default::default()
            }
        })
        .collect()
}

/// least_conn with sessions: each pick opens one, and once `n` are open the oldest
/// closes; ns per pick (with its open and close). `tree`: the module's tree, else the
/// linear scan.
fn run_least_conn(n: usize, tree: bool, picks: u64) -> f64 {
    let mut peers = peers_of(n);
    let mut nodes = vec![LcNode::EMPTY; LcTree::nodes_for(n)];
    let mut lc = LcTree::new(&mut nodes, n).expect("sized for n");
    lc.build(peers.as_mut_slice(), 0);
    let mut open: VecDeque<usize> = VecDeque::with_capacity(n + 1);
    let mut cursor = 0u64;
    let no = |_: usize| false;
    let start = Instant::now();
    for _ in 0..picks {
        let i = if tree {
            lc.pick(peers.as_mut_slice(), 0, &no, &mut cursor)
        } else {
            pick_least_conn(peers.as_mut_slice(), 0, &no)
        };
        let i = black_box(i).expect("a server");
        peers[i].conns += 1;
        if tree {
            lc.update(i, &peers[i], 0);
        }
        open.push_back(i);
        if open.len() > n {
            let j = open.pop_front().expect("open sessions");
            peers[j].conns -= 1;
            if tree {
                lc.update(j, &peers[j], 0);
            }
        }
    }
    start.elapsed().as_nanos() as f64 / picks as f64
}

fn run(n: usize, method: Method, picks: u64) -> f64 {
    let names: Vec<String> = (0..n)
        .map(|i| format!("127.0.0.{}:{}", 1 + i / 60000, 1024 + i % 60000))
        .collect();
    let mut peers = peers_of(n);
    let pp: Vec<PlanPeer> = names
        .iter()
        .zip(&peers)
        .map(|(nm, p)| PlanPeer {
            name: nm,
            weight: p.weight as u32,
            down: false,
            backup: false,
        })
        .collect();
    let plan = Plan::build(&pp, method);
    let plan = plan.view();
    let keys: Vec<String> = (0..1024)
        .map(|k| format!("10.{}.{}.{}", k % 7, k / 7 % 256, k % 256))
        .collect();
    let addrs: Vec<[u8; 4]> = (0..1024u32)
        .map(|k| k.wrapping_mul(2654435761).to_be_bytes())
        .collect();
    let mut cursors = [0u64; 2];
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let no = |_: usize| false;
    let start = Instant::now();
    for i in 0..picks {
        let k = (i % 1024) as usize;
        let key: &[u8] = match method {
            Method::IpHash => &addrs[k],
            _ => keys[k].as_bytes(),
        };
        let got = pick(
            peers.as_mut_slice(),
            &plan,
            method,
            key,
            &mut cursors,
            None,
            0,
            0,
            &no,
            &mut rand,
        );
        black_box(got);
    }
    start.elapsed().as_nanos() as f64 / picks as f64
}

fn main() {
    let picks: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let methods = [
        ("roundrobin", Method::RoundRobin),
        ("ip_hash", Method::IpHash),
        ("hash_modula", Method::HashModula),
        ("hash_ketama", Method::HashKetama),
        ("random", Method::Random { two: false }),
        ("random two", Method::Random { two: true }),
    ];
    println!("| method | ns/pick, 10 servers | ns/pick, 10,000 servers | ratio |");
    println!("|---|---|---|---|");
    for (name, m) in methods {
        let small = run(10, m, picks);
        let large = run(10_000, m, picks);
        println!(
            "| {name} | {small:.0} | {large:.0} | {:.2} |",
            large / small
        );
    }
    let small = run_least_conn(10, true, picks);
    let large = run_least_conn(10_000, true, picks);
    println!(
        "| least_conn (tree; pick + session open/close) | {small:.0} | {large:.0} | {:.2} |",
        large / small
    );
    // the scan visits every server: fewer picks keep it bounded
    let small = run_least_conn(10, false, picks / 100);
    let large = run_least_conn(10_000, false, picks / 100);
    println!(
        "| least_conn (nginx's scan, baseline) | {small:.0} | {large:.0} | {:.2} |",
        large / small
    );
}
