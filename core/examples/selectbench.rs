//! Microbenchmark of server selection (scripts/bench/select): nanoseconds per pick for
//! each method at 10 and 10,000 servers, using the module's own balancer code.
//! Usage: selectbench [PICKS]

use std::hint::black_box;
use std::time::Instant;

use upsync_core::balancer::{pick, Method, PeerState, Plan, PlanPeer};

fn run(n: usize, method: Method, picks: u64) -> f64 {
    let names: Vec<String> = (0..n)
        .map(|i| format!("127.0.0.{}:{}", 1 + i / 60000, 1024 + i % 60000))
        .collect();
    let mut peers: Vec<PeerState> = (0..n)
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
        .collect();
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
        ("least_conn", Method::LeastConn),
    ];
    println!("| method | ns/pick, 10 servers | ns/pick, 10,000 servers | ratio |");
    println!("|---|---|---|---|");
    for (name, m) in methods {
        // least_conn scans every server, as nginx's does: fewer picks keep it bounded
        let p = if m == Method::LeastConn {
            picks / 100
        } else {
            picks
        };
        let small = run(10, m, p);
        let large = run(10_000, m, p);
        println!(
            "| {name} | {small:.0} | {large:.0} | {:.2} |",
            large / small
        );
    }
}
