//! Unit tests of the pure health-check logic: directive values, match rules (`\xHH`,
//! literal and regex expectations), thresholds and transitions, and scheduling against a
//! fake clock.

use super::*;
use crate::policy::Rng;

#[test]
fn health_check_defaults_and_every_parameter() {
    let d = parse_health_check(&[]).unwrap();
    assert_eq!(d, HealthCheckSpec::default());
    assert_eq!(
        (d.interval_ms, d.jitter_ms, d.fails, d.passes),
        (5000, 0, 1, 1)
    );
    let s = parse_health_check(&[
        "interval=500ms",
        "jitter=1s",
        "fails=3",
        "passes=2",
        "port=8080",
        "udp",
        "match=banner",
        "mandatory",
        "persistent",
    ])
    .unwrap();
    assert_eq!(
        s,
        HealthCheckSpec {
            interval_ms: 500,
            jitter_ms: 1000,
            fails: 3,
            passes: 2,
            port: Some(8080),
            udp: true,
            match_name: Some("banner".into()),
            mandatory: true,
            persistent: true,
        }
    );
    assert_eq!(parse_health_check(&["jitter=0"]).unwrap().jitter_ms, 0);
    assert_eq!(
        parse_health_check(&["interval=1m"]).unwrap().interval_ms,
        60_000
    );
}

#[test]
fn health_check_errors() {
    let err = |a: &[&str]| parse_health_check(a).unwrap_err().to_string();
    assert!(err(&["intervals=5s"])
        .starts_with("unknown parameter \"intervals=5s\"; accepted: interval="));
    assert!(err(&["udp=on"]).starts_with("unknown parameter \"udp=on\""));
    assert!(err(&["interval"]).starts_with("unknown parameter \"interval\""));
    assert_eq!(err(&["fails=2", "fails=3"]), "\"fails=\" is given twice");
    assert_eq!(err(&["udp", "udp"]), "\"udp\" is given twice");
    assert_eq!(
        err(&["interval=0"]),
        "invalid interval \"0\": expected an nginx time such as 500ms, 5s or 1m, at most 7d, not 0"
    );
    assert!(err(&["interval=soon"]).starts_with("invalid interval \"soon\""));
    assert!(err(&["jitter=-1"]).starts_with("invalid jitter \"-1\""));
    assert!(err(&["interval=8d"]).starts_with("invalid interval \"8d\""));
    for bad in ["fails=0", "fails=x", "fails=+1", "fails=1000001", "fails="] {
        assert!(err(&[bad]).starts_with("invalid fails"), "{bad}");
    }
    assert!(
        err(&["passes=0"]).starts_with("invalid passes \"0\": expected a number from 1 to 1000000")
    );
    for bad in ["port=0", "port=65536", "port=http", "port=+80"] {
        assert!(err(&[bad]).starts_with("invalid port"), "{bad}");
    }
    assert!(err(&["match="]).starts_with("invalid match name \"\""));
    assert_eq!(
        err(&["persistent"]),
        "\"persistent\" needs \"mandatory\" (health_check ... mandatory persistent)"
    );
    assert_eq!(parse_timeout("500ms"), Ok(500));
    assert!(parse_timeout("0").is_err());
    assert!(parse_timeout("forever").is_err());
}

#[test]
fn hex_escapes() {
    assert_eq!(decode_escapes("PING\\x0d\\x0A").unwrap(), b"PING\r\n");
    assert_eq!(
        decode_escapes("\\x80\\xff\\x00").unwrap(),
        vec![0x80, 0xff, 0]
    );
    assert_eq!(decode_escapes("a\\b").unwrap(), b"a\\b");
    assert_eq!(decode_escapes("\\\\").unwrap(), b"\\\\");
    assert_eq!(decode_escapes("").unwrap(), b"");
    for bad in ["\\x", "\\x8", "\\xZZ", "ab\\x1g", "\\x\u{e9}\u{e9}"] {
        assert_eq!(
            decode_escapes(bad),
            Err(HealthConfError::Escape(bad.to_string())),
            "{bad}"
        );
    }
}

#[test]
fn match_blocks() {
    let mut b = MatchBuilder::new("redis");
    b.line("send", &["PING\\x0d\\x0a"]).unwrap();
    b.line("expect", &["+PONG"]).unwrap();
    assert_eq!(
        b.line("send", &["x"]).unwrap_err().to_string(),
        "\"send\" is given twice"
    );
    assert_eq!(
        b.line("expect", &["x"]).unwrap_err().to_string(),
        "\"expect\" is given twice"
    );
    assert!(b
        .line("status", &["200"])
        .unwrap_err()
        .to_string()
        .starts_with("unknown directive \"status\" in match {}; accepted: send, expect"));
    let r = b.finish();
    assert_eq!(r.send, b"PING\r\n");
    assert_eq!(r.expect, Some(Expect::Literal(b"+PONG".to_vec())));
    assert_eq!(
        parse_expect(&["~*", "200 ok"]),
        Ok(Expect::Regex {
            pattern: "200 ok".into(),
            caseless: true
        })
    );
    assert_eq!(
        parse_expect(&["~", "^\\x80"]),
        Ok(Expect::Regex {
            pattern: "^\\x80".into(),
            caseless: false
        })
    );
    assert_eq!(
        parse_expect(&["\\x80ok"]),
        Ok(Expect::Literal(b"\x80ok".to_vec()))
    );
    assert_eq!(parse_expect(&[""]), Err(HealthConfError::EmptyExpect));
    assert_eq!(parse_expect(&["~", ""]), Err(HealthConfError::EmptyExpect));
    assert_eq!(parse_expect(&["=", "x"]), Err(HealthConfError::Expect));
    assert_eq!(parse_expect(&[]), Err(HealthConfError::Expect));
    let mut b = MatchBuilder::new("x");
    assert_eq!(b.line("send", &[]), Err(HealthConfError::SendArgs));
    assert_eq!(b.line("send", &["a", "b"]), Err(HealthConfError::SendArgs));
}

fn rule(expect: Option<Expect>) -> MatchRule {
    MatchRule {
        name: "m".into(),
        send: Vec::new(),
        expect,
    }
}

#[test]
fn literal_expect_is_a_prefix_decided_early() {
    let r = rule(Some(Expect::Literal(b"+OK ready".to_vec())));
    let mismatch = Verdict::Fail(ProbeFailure::Mismatch("m".into()));
    assert_eq!(r.judge(b"+OK", false, None), Verdict::More);
    assert_eq!(r.judge(b"+OK ready\r\n", false, None), Verdict::Pass);
    assert_eq!(r.judge(b"+OK ready", true, None), Verdict::Pass);
    // a differing byte decides at once, before the whole literal arrived
    assert_eq!(r.judge(b"-E", false, None), mismatch);
    assert_eq!(r.judge(b"+OK", true, None), mismatch);
    assert_eq!(
        r.judge(b"", true, None),
        Verdict::Fail(ProbeFailure::Closed)
    );
    assert_eq!(r.judge(b"", false, None), Verdict::More);
    // binary literals from \xHH
    let bin = rule(Some(parse_expect(&["\\x80\\x00ok"]).unwrap()));
    assert_eq!(bin.judge(b"\x80\x00ok!", false, None), Verdict::Pass);
    assert_eq!(
        bin.judge(b"\x80\x01", false, None),
        Verdict::Fail(ProbeFailure::Mismatch("m".into()))
    );
    assert_eq!(rule(None).judge(b"", false, None), Verdict::Pass);
    assert!(!rule(None).expects());
}

/// A stand-in for PCRE: a substring test, optionally caseless.
struct Contains(&'static str, bool);

impl RegexMatch for Contains {
    fn is_match(&self, data: &[u8]) -> bool {
        let (hay, needle) = if self.1 {
            (
                String::from_utf8_lossy(data).to_lowercase(),
                self.0.to_lowercase(),
            )
        } else {
            (
                String::from_utf8_lossy(data).into_owned(),
                self.0.to_string(),
            )
        };
        hay.contains(&needle)
    }
}

#[test]
fn regex_expect_waits_for_a_match_up_to_the_limit() {
    let r = rule(Some(Expect::Regex {
        pattern: "200 OK".into(),
        caseless: true,
    }));
    let re = Contains("200 ok", true);
    assert_eq!(r.judge(b"HTTP/1.0 2", false, Some(&re)), Verdict::More);
    assert_eq!(
        r.judge(b"HTTP/1.0 200 OK\r\n", false, Some(&re)),
        Verdict::Pass
    );
    assert_eq!(
        r.judge(b"HTTP/1.0 500 Oops\r\n", true, Some(&re)),
        Verdict::Fail(ProbeFailure::Mismatch("m".into()))
    );
    assert_eq!(
        r.judge(b"", true, Some(&re)),
        Verdict::Fail(ProbeFailure::Closed)
    );
    let big = vec![b'x'; RESPONSE_LIMIT];
    assert_eq!(
        r.judge(&big, false, Some(&re)),
        Verdict::Fail(ProbeFailure::TooLong(RESPONSE_LIMIT))
    );
    // only the first RESPONSE_LIMIT bytes are examined
    let mut late = vec![b'x'; RESPONSE_LIMIT];
    late.extend_from_slice(b"200 OK");
    assert_eq!(
        r.judge(&late, true, Some(&re)),
        Verdict::Fail(ProbeFailure::Mismatch("m".into()))
    );
    // an empty answer is never a match, even for a pattern that matches nothing
    let any = Contains("", false);
    assert_eq!(r.judge(b"", false, Some(&any)), Verdict::More);
    // no compiled regex (cannot happen in nginx): never a pass
    assert_eq!(
        r.judge(b"200 OK", false, None),
        Verdict::Fail(ProbeFailure::Mismatch("m".into()))
    );
}

const TH: Thresholds = Thresholds {
    fails: 3,
    passes: 2,
};

#[test]
fn fails_then_passes_thresholds() {
    let mut h = Health::new(HealthState::Up);
    assert_eq!(h.record(false, TH, 1), Change::Unchanged);
    assert_eq!(h.record(false, TH, 2), Change::Unchanged);
    // a pass in between starts the count over
    assert_eq!(h.record(true, TH, 3), Change::Unchanged);
    assert_eq!((h.fails, h.passes), (0, 1));
    assert_eq!(h.record(false, TH, 4), Change::Unchanged);
    assert_eq!(h.record(false, TH, 5), Change::Unchanged);
    assert_eq!(h.record(false, TH, 6), Change::Unhealthy);
    assert_eq!(h.state, HealthState::Unhealthy);
    assert_eq!(h.record(false, TH, 7), Change::Unchanged);
    assert_eq!(h.record(true, TH, 8), Change::Unchanged);
    assert_eq!(
        h.record(true, TH, 9),
        Change::Healthy {
            after: 3,
            was: HealthState::Unhealthy
        }
    );
    assert_eq!(h.state, HealthState::Up);
    assert_eq!((h.checks, h.failed, h.last_check_ms), (9, 6, 9));
    assert_eq!((h.passes, h.fails, h.since_change), (2, 0, 0));
}

#[test]
fn defaults_one_failure_one_pass() {
    let th = Thresholds {
        fails: 1,
        passes: 1,
    };
    let mut h = Health::default();
    assert_eq!(h.state, HealthState::Up);
    assert_eq!(h.record(true, th, 1), Change::Unchanged);
    assert_eq!(h.record(false, th, 2), Change::Unhealthy);
    assert_eq!(
        h.record(true, th, 3),
        Change::Healthy {
            after: 1,
            was: HealthState::Unhealthy
        }
    );
}

#[test]
fn checking_is_decided_by_the_first_check() {
    assert_eq!(HealthState::initial(true), HealthState::Checking);
    assert_eq!(HealthState::initial(false), HealthState::Up);
    assert!(!HealthState::Checking.in_traffic() && !HealthState::Unhealthy.in_traffic());
    let mut h = Health::new(HealthState::Checking);
    assert_eq!(
        h.record(true, TH, 1),
        Change::Healthy {
            after: 1,
            was: HealthState::Checking
        }
    );
    let mut h = Health::new(HealthState::Checking);
    assert_eq!(h.record(false, TH, 1), Change::Unhealthy);
    assert_eq!(h.state, HealthState::Unhealthy);
    // then it needs `passes` passes like any unhealthy server
    assert_eq!(h.record(true, TH, 2), Change::Unchanged);
    assert!(matches!(h.record(true, TH, 3), Change::Healthy { .. }));
    h.restart(HealthState::Checking);
    assert_eq!(
        (h.state, h.passes, h.fails, h.checks),
        (HealthState::Checking, 0, 0, 3)
    );
    assert_eq!(
        [
            HealthState::Up,
            HealthState::Unhealthy,
            HealthState::Checking
        ]
        .map(HealthState::name),
        ["up", "unhealthy", "checking"]
    );
}

#[test]
fn failure_texts() {
    assert_eq!(ProbeFailure::Refused.to_string(), "connect refused");
    // no implicit padding: the record goes whole into shared memory
    assert_eq!(std::mem::size_of::<Health>(), 8 * 3 + 4 * 3 + 1 + 3);
    assert_eq!(
        ProbeFailure::Timeout(5000).to_string(),
        "no matching response within 5000ms"
    );
    assert_eq!(
        ProbeFailure::Mismatch("banner".into()).to_string(),
        "the response does not match \"banner\""
    );
    assert_eq!(
        ProbeFailure::Unreachable.to_string(),
        "port unreachable (ICMP)"
    );
}

/// Runs a prober's loop over a fake clock: each due server is probed (taking no time)
/// and rescheduled. Returns each server's probe times.
fn simulate(servers: u32, interval: u64, jitter: u64, until: u64) -> Vec<Vec<u64>> {
    let mut rng = Rng::new(7);
    let mut tt = Timetable::default();
    for s in 0..servers {
        tt.add(s, first_due(0, interval, false, &mut rng));
    }
    let mut probes = vec![Vec::new(); servers as usize];
    let mut now = 0;
    while let Some(due) = tt.next_due() {
        if due > until {
            break;
        }
        now = now.max(due);
        while let Some(s) = tt.pop_due(now) {
            probes[s as usize].push(now);
            tt.add(s, next_due(now, interval, jitter, &mut rng));
        }
    }
    probes
}

#[test]
fn one_probe_per_interval_spread_over_it() {
    let probes = simulate(1000, 5000, 0, 60_000 - 1);
    for p in &probes {
        assert_eq!(p.len(), 12, "one probe per 5 s over a minute");
        assert!(p.windows(2).all(|w| w[1] - w[0] == 5000));
    }
    // the first probes spread over the interval: every second of it gets about a fifth
    let mut per_second = [0u32; 5];
    for p in &probes {
        per_second[(p[0] / 1000) as usize] += 1;
    }
    for n in per_second {
        assert!((150..250).contains(&n), "{per_second:?}");
    }
}

#[test]
fn jitter_delays_each_probe_within_bounds() {
    let probes = simulate(200, 1000, 300, 30_000);
    let mut gaps: Vec<u64> = probes
        .iter()
        .flat_map(|p| p.windows(2).map(|w| w[1] - w[0]).collect::<Vec<_>>())
        .collect();
    gaps.sort_unstable();
    assert!(gaps[0] >= 1000 && *gaps.last().unwrap() <= 1300);
    // the delays are spread, not constant
    assert!(gaps[gaps.len() / 10] < 1100 && gaps[gaps.len() * 9 / 10] > 1200);
}

#[test]
fn timetable_replaces_and_forgets() {
    let mut rng = Rng::new(1);
    assert_eq!(first_due(100, 5000, true, &mut rng), 100);
    assert!((100..5100).contains(&first_due(100, 5000, false, &mut rng)));
    let mut tt: Timetable<u32> = Timetable::default();
    tt.add(1, 50);
    tt.add(2, 10);
    tt.add(1, 5); // earlier now
    assert_eq!(tt.len(), 2);
    assert_eq!(tt.next_due(), Some(5));
    assert_eq!(tt.pop_due(4), None);
    assert_eq!(tt.pop_due(100), Some(1));
    assert_eq!(tt.pop_due(100), Some(2));
    assert_eq!(tt.pop_due(100), None);
    tt.add(3, 1);
    tt.add(4, 2);
    tt.remove(&3);
    assert!(!tt.contains(&3) && tt.contains(&4));
    assert_eq!(tt.pop_due(100), Some(4));
    assert!(tt.is_empty());
    assert_eq!(tt.next_due(), None);
    // re-adding one key many times keeps the heap small
    for i in 0..10_000 {
        tt.add(9, i);
    }
    assert!(tt.heap.len() < 200);
    assert_eq!(tt.pop_due(u64::MAX), Some(9));
}

#[test]
fn every_method_skips_unhealthy_servers_and_backups_take_over() {
    use crate::balancer::{pick, Method, PeerState, Plan, PlanPeer};
    let names: Vec<String> = (0..4).map(|i| format!("127.0.0.1:{}", 9000 + i)).collect();
    // 0, 1: primaries; 2: backup; 3: primary marked down by the registry
    let mut peers: Vec<PeerState> = (0..4)
        .map(|i| PeerState {
            weight: 1,
            effective_weight: 1,
            backup: i == 2,
            down: i == 3,
            ..Default::default()
        })
        .collect();
    let pp: Vec<PlanPeer> = peers
        .iter()
        .zip(&names)
        .map(|(p, n)| PlanPeer {
            name: n,
            weight: 1,
            down: p.down,
            backup: p.backup,
        })
        .collect();
    let methods = [
        Method::RoundRobin,
        Method::LeastConn,
        Method::IpHash,
        Method::HashModula,
        Method::HashKetama,
        Method::Random { two: false },
        Method::Random { two: true },
    ];
    let mut rng = Rng::new(3);
    let mut picks = |peers: &mut Vec<PeerState>, m: Method| -> Vec<Option<usize>> {
        let plan = Plan::build(&pp, m);
        let mut cursors = [0u64; 2];
        (0..40u32)
            .map(|k| {
                let key = k.to_be_bytes();
                pick(
                    peers.as_mut_slice(),
                    &plan.view(),
                    m,
                    &key,
                    &mut cursors,
                    None,
                    0,
                    0,
                    &|_| false,
                    &mut || rng.next_u64(),
                )
            })
            .collect()
    };
    for m in methods {
        // server 0 unhealthy: everything goes to 1 (never the backup, never the down one)
        peers[0].unhealthy = true;
        assert!(picks(&mut peers, m).iter().all(|p| *p == Some(1)), "{m:?}");
        // no primary healthy: the backup serves
        peers[1].unhealthy = true;
        assert!(picks(&mut peers, m).iter().all(|p| *p == Some(2)), "{m:?}");
        // nothing healthy: nothing is picked (the registry's down one neither)
        peers[2].unhealthy = true;
        assert!(picks(&mut peers, m).iter().all(|p| p.is_none()), "{m:?}");
        // the registry's down wins over a healthy check
        peers[3].unhealthy = false;
        assert!(picks(&mut peers, m).iter().all(|p| p.is_none()), "{m:?}");
        for p in peers.iter_mut() {
            p.unhealthy = false;
        }
    }
}
