//! Tests of the report: the layouts, the requests, and the streaming renderer against
//! the one-shot rendering it replaced (`reference`): the same bytes for every format,
//! filter and batch size, bounded work per step, and what a reader sees when the set
//! changes in the middle of a report.

use super::reference;
use super::stream::HOLD_MAX;
use super::*;

/// The body of the streamed response (its head cut off).
fn body(format: Format, v: &[UpstreamView]) -> String {
    let resp = String::from_utf8(render(
        &ShowRequest {
            format,
            upstream: None,
        },
        v,
    ))
    .unwrap();
    resp.split_once("\r\n\r\n").unwrap().1.to_string()
}

fn text(v: &[UpstreamView]) -> String {
    body(Format::Text, v)
}

fn views() -> Vec<UpstreamView> {
    let s1 = ServerView {
        address: "127.0.0.1:8088".into(),
        weight: 40,
        max_fails: 2,
        fail_timeout: 10,
        active: 3,
        total: 10,
        ..Default::default()
    };
    let s2 = ServerView {
        address: "127.0.0.1:8089".into(),
        weight: 20,
        fail_timeout: 30,
        failed_until: Some(1_700_000_030),
        health: Some(HealthView {
            state: "unhealthy",
            consecutive_fails: 2,
            last_check_ms: 1_700_000_001_500,
            last_failure: "connect refused".into(),
            checks: 9,
            checks_failed: 3,
            ..Default::default()
        }),
        ..Default::default()
    };
    vec![UpstreamView {
        name: "test".into(),
        servers: vec![s1, s2],
        source: Some(SourceView {
            kind: "consul".into(),
            address: "127.0.0.1:8500/v1/kv/upstreams/test/".into(),
            generation: 7,
            ..Default::default()
        }),
    }]
}

#[test]
fn text_matches_reference_layout() {
    let body = text(&views());
    assert_eq!(
        body,
        "Upstream name: test; Backend server count: 2\n        server 127.0.0.1:8088 weight=40 max_fails=2 fail_timeout=10s;\n        server 127.0.0.1:8089 weight=20 max_fails=0 fail_timeout=30s;\n\n"
    );
    let resp = String::from_utf8(render(&ShowRequest::default(), &views())).unwrap();
    assert!(resp.starts_with("HTTP/1.0 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\n"));
    assert!(resp.contains(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )));
    assert!(resp.ends_with(&body));
    assert_eq!(text(&[]), "No upstreams defined\n");
}

#[test]
fn requests() {
    let r = |s: &str| parse_request(s.as_bytes());
    assert_eq!(r("GET / HTTP/1.0"), ShowRequest::default());
    assert_eq!(r("GET /upstream_list HTTP/1.1").format, Format::Text);
    assert_eq!(r("GET /?format=json HTTP/1.1").format, Format::Json);
    assert_eq!(r("GET /metrics HTTP/1.1").format, Format::Prometheus);
    assert_eq!(r("GET /status.json HTTP/1.1").format, Format::Json);
    let q = r("GET /?format=json&upstream=my%20up HTTP/1.1");
    assert_eq!(
        (q.format, q.upstream.as_deref()),
        (Format::Json, Some("my up"))
    );
    assert_eq!(r(""), ShowRequest::default());
    assert_eq!(r("garbage"), ShowRequest::default());
    assert_eq!(
        r("GET /?upstream=%zz HTTP/1.1").upstream.as_deref(),
        Some("%zz")
    );
}

#[test]
fn json_and_prometheus() {
    let j: serde_json::Value = serde_json::from_str(&body(Format::Json, &views())).unwrap();
    let t = &j["upstreams"]["test"];
    assert_eq!(t["server_count"], 2);
    assert_eq!(t["servers"][0]["active"], 3);
    assert_eq!(t["servers"][1]["state"], "failed");
    assert_eq!(t["upsync"]["generation"], 7);
    assert_eq!(t["upsync"]["last_error"], serde_json::Value::Null);
    assert_eq!(t["servers"][0]["health"], serde_json::Value::Null);
    let h = &t["servers"][1]["health"];
    assert_eq!(h["state"], "unhealthy");
    assert_eq!(h["consecutive_fails"], 2);
    assert_eq!(h["consecutive_passes"], 0);
    assert_eq!(h["last_check"], 1_700_000_001.5);
    assert_eq!(h["last_failure"], "connect refused");
    assert_eq!(
        (h["checks"].as_u64(), h["checks_failed"].as_u64()),
        (Some(9), Some(3))
    );
    let p = body(Format::Prometheus, &views());
    assert!(p.contains("upsync_upstream_servers{upstream=\"test\"} 2\n"));
    assert!(p.contains(
        "upsync_server_active_connections{upstream=\"test\",server=\"127.0.0.1:8088\"} 3\n"
    ));
    assert!(p.contains(
        "upsync_server_state{upstream=\"test\",server=\"127.0.0.1:8089\",state=\"failed\"} 1\n"
    ));
    assert!(p.contains("# TYPE upsync_server_connections_total counter\n"));
    assert!(p.contains(
        "upsync_server_health{upstream=\"test\",server=\"127.0.0.1:8089\",health=\"unhealthy\"} 1\n"
    ));
    assert!(p.contains(
        "upsync_server_health{upstream=\"test\",server=\"127.0.0.1:8089\",health=\"up\"} 0\n"
    ));
    assert!(p.contains(
        "upsync_server_health_checks_failed_total{upstream=\"test\",server=\"127.0.0.1:8089\"} 3\n"
    ));
    assert!(p.contains("upsync_server_health_last_check_timestamp_seconds{upstream=\"test\",server=\"127.0.0.1:8089\"} 1700000001.500\n"));
    assert!(p.contains(
        "upsync_server_health_last_failure_info{upstream=\"test\",server=\"127.0.0.1:8089\",reason=\"connect refused\"} 1\n"
    ));
    assert!(!p.contains(
        "upsync_server_health_last_failure_info{upstream=\"test\",server=\"127.0.0.1:8088\""
    ));
    // servers of upstreams without checks have no health series
    assert!(!p.contains("upsync_server_health{upstream=\"test\",server=\"127.0.0.1:8088\""));
    // the text view is unchanged by health data
    assert!(!text(&views()).contains("unhealthy"));
    let filtered = String::from_utf8(render(
        &ShowRequest {
            format: Format::Json,
            upstream: Some("nope".into()),
        },
        &views(),
    ))
    .unwrap();
    assert!(filtered.starts_with("HTTP/1.0 404 Not Found\r\n"));
    assert_eq!(prom::label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
}

/// A pseudo-random report: synced and static upstreams, some empty, some checked, names
/// that need escaping, servers in every state.
fn many(servers: usize) -> Vec<UpstreamView> {
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut server = |i: usize, checked: bool| {
        let address = if i % 17 == 5 {
            format!("[::1]:{}", 1000 + i)
        } else {
            format!("127.0.0.{}:{}", 1 + i / 60000, 1000 + i % 60000)
        };
        ServerView {
            address,
            weight: 1 + rnd(100) as u32,
            max_fails: rnd(3) as u32,
            fail_timeout: 10 * rnd(4) as i64,
            max_conns: if rnd(4) == 0 { rnd(50) as u32 } else { 0 },
            down: rnd(9) == 0,
            backup: rnd(7) == 0,
            active: rnd(20) as u32,
            fails: rnd(3) as u32,
            total: rnd(1 << 40),
            failed_until: (rnd(5) == 0).then_some(1_700_000_000 + rnd(100) as i64),
            health: checked.then(|| HealthView {
                state: ["up", "unhealthy", "checking"][rnd(3) as usize],
                consecutive_passes: rnd(5) as u32,
                consecutive_fails: rnd(5) as u32,
                last_check_ms: if rnd(4) == 0 {
                    0
                } else {
                    1_700_000_000_000 + rnd(1_000_000)
                },
                last_failure: if rnd(2) == 0 {
                    String::new()
                } else {
                    "refused \"x\"\n\\".into()
                },
                checks: rnd(1000),
                checks_failed: rnd(100),
            }),
        }
    };
    let source = |g: u64| SourceView {
        kind: "consul".into(),
        address: "127.0.0.1:8500/v1/kv/upstreams/app/".into(),
        in_use: if g % 2 == 0 {
            String::new()
        } else {
            "127.0.0.1:8500".into()
        },
        lb: "round_robin".into(),
        position: 42 + g,
        last_sync_ms: 1_700_000_000_250 * (g % 2),
        last_change_ms: 1_700_000_000_001,
        last_error: if g == 1 {
            "503 \"Service Unavailable\"".into()
        } else {
            String::new()
        },
        consecutive_failures: g,
        generation: g,
        updates: 3 * g,
        poller_pid: 1234,
        skipped: (0..g)
            .map(|i| (format!("key{i}"), "bad \"weight\"".into()))
            .collect(),
        skipped_count: g * 2,
        memory_used: 1 << 20,
        memory_cap: if g == 2 { 1 << 24 } else { 0 },
        zone_free: 1 << 26,
        zone_size: 1 << 27,
    };
    let mut next = 0;
    let mut list = |n: usize, checked: bool| {
        let v: Vec<ServerView> = (next..next + n).map(|i| server(i, checked)).collect();
        next += n;
        v
    };
    vec![
        UpstreamView {
            name: "zeta".into(),
            servers: list(servers, true),
            source: Some(source(1)),
        },
        UpstreamView {
            name: "plain".into(),
            servers: list(3, false),
            source: None,
        },
        UpstreamView {
            name: "empty".into(),
            servers: Vec::new(),
            source: Some(source(2)),
        },
        UpstreamView {
            name: "we\"ird\\name\n".into(),
            servers: list(2, false),
            source: None,
        },
        UpstreamView {
            name: "alpha".into(),
            servers: list(servers / 3, false),
            source: Some(source(3)),
        },
    ]
}

/// The streamed response, chunk by chunk, and whether any step read or rendered more
/// than `batch` servers.
fn stream(req: &ShowRequest, v: &[UpstreamView], batch: usize, hold_all: bool) -> Vec<Vec<u8>> {
    let mut src = Counting {
        inner: Views(v),
        given: 0,
    };
    let mut r = Renderer::new(req, &mut src, batch);
    if hold_all {
        r = r.hold_all();
    }
    let mut chunks = Vec::new();
    for _ in 0..1_000_000 {
        src.given = 0;
        let mut out = Vec::new();
        let done = r.step(&mut src, &mut out);
        assert!(src.given <= batch, "a step read {} servers", src.given);
        chunks.push(out);
        if done {
            return chunks;
        }
    }
    panic!("the renderer does not finish");
}

/// Counts the servers a source gives (and the heads it reads).
struct Counting<'a> {
    inner: Views<'a>,
    given: usize,
}

impl ShowSource for Counting<'_> {
    fn names(&self) -> Vec<String> {
        self.inner.names()
    }
    fn head(&mut self, i: usize) -> UpstreamHead {
        self.given += 1;
        self.inner.head(i)
    }
    fn servers(&mut self, i: usize, cursor: &mut Cursor, max: usize) -> Batch {
        let b = self.inner.servers(i, cursor, max);
        self.given += b.servers.len();
        b
    }
}

fn all_requests() -> Vec<ShowRequest> {
    let mut out = Vec::new();
    for format in [Format::Text, Format::Json, Format::Prometheus] {
        for upstream in [
            None,
            Some("zeta"),
            Some("empty"),
            Some("we\"ird\\name\n"),
            Some("nope"),
        ] {
            out.push(ShowRequest {
                format,
                upstream: upstream.map(String::from),
            });
        }
    }
    out
}

#[test]
fn streamed_is_the_one_shot_rendering() {
    let v = many(41);
    for req in all_requests() {
        let want = reference::render(&req, &v);
        for batch in [1, 2, 3, 7, 40, 41, 64, usize::MAX] {
            let got = stream(&req, &v, batch, true).concat();
            assert!(
                got == want,
                "{req:?} batch {batch}:\n{}\n---- want:\n{}",
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&want)
            );
        }
        assert_eq!(render(&req, &v), want, "{req:?}");
    }
    // no upstreams at all
    for req in all_requests() {
        assert_eq!(render(&req, &[]), reference::render(&req, &[]), "{req:?}");
    }
    // the same name twice: JSON keeps the last, as a map does
    let mut twice = many(5);
    twice[1].name = "zeta".into();
    for req in all_requests() {
        assert_eq!(
            render(&req, &twice),
            reference::render(&req, &twice),
            "{req:?}"
        );
    }
}

#[test]
fn large_reports_stream() {
    let v = many(3000);
    for format in [Format::Json, Format::Prometheus] {
        let req = ShowRequest {
            format,
            upstream: None,
        };
        let chunks = stream(&req, &v, 100, false);
        let first = chunks.iter().position(|c| !c.is_empty()).unwrap();
        assert!(
            first < chunks.len() / 4,
            "{format:?}: first bytes at step {first} of {}",
            chunks.len()
        );
        // never much more than a step's worth (or the held start) at once
        let most = chunks.iter().map(Vec::len).max().unwrap();
        assert!(
            most < HOLD_MAX + 100 * 1024,
            "{format:?}: a chunk of {most} bytes"
        );
        let got = String::from_utf8(chunks.concat()).unwrap();
        let want = String::from_utf8(reference::render(&req, &v)).unwrap();
        let (head, body) = got.split_once("\r\n\r\n").unwrap();
        let (want_head, want_body) = want.split_once("\r\n\r\n").unwrap();
        assert!(body == want_body, "{format:?}: bodies differ");
        assert!(!head.contains("Content-Length"), "{head}");
        // the same head as before without the length
        let without: Vec<&str> = want_head
            .split("\r\n")
            .filter(|l| !l.starts_with("Content-Length"))
            .collect();
        assert_eq!(head, without.join("\r\n"));
    }
    // the text report keeps its Content-Length: it comes whole, at the last step
    let req = ShowRequest::default();
    let chunks = stream(&req, &v, 100, false);
    assert!(chunks.len() > 40);
    assert!(chunks[..chunks.len() - 1].iter().all(Vec::is_empty));
    assert_eq!(chunks.concat(), reference::render(&req, &v));
    // small reports are whole, with their length, in every format
    for req in all_requests() {
        let small = many(3);
        let chunks = stream(&req, &small, 2, false);
        assert_eq!(chunks.concat(), reference::render(&req, &small), "{req:?}");
    }
}

#[test]
fn resume_index_goes_on_after_the_last_server_given() {
    let list = |ports: &[u16]| -> Vec<std::net::SocketAddr> {
        ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}").parse().unwrap())
            .collect()
    };
    let at = |l: &[std::net::SocketAddr], next: usize, after: Option<u16>| {
        let c = Cursor {
            next,
            after: after.map(|p| format!("127.0.0.1:{p}").parse().unwrap()),
        };
        resume_index(&c, l.len(), |i| l[i])
    };
    let l = list(&[10, 20, 30, 40, 50]);
    assert_eq!(at(&l, 0, None), 0);
    assert_eq!(at(&l, 2, Some(20)), 2); // unchanged
                                        // 15 came in before the cursor: go on after 20 all the same
    let l2 = list(&[10, 15, 20, 30, 40, 50]);
    assert_eq!(at(&l2, 2, Some(20)), 3);
    // 20 left: the next one after it
    let l3 = list(&[10, 30, 40, 50]);
    assert_eq!(at(&l3, 2, Some(20)), 1);
    // everything after it left, or the list emptied
    assert_eq!(at(&list(&[10]), 2, Some(20)), 1);
    assert_eq!(at(&list(&[]), 2, Some(20)), 0);
    assert_eq!(at(&l, 5, Some(50)), 5);
}

/// A synced upstream's list as the zone keeps it: sorted by address, a version that
/// changes with it; `change` runs after every batch read.
struct Sorted {
    name: String,
    servers: Vec<ServerView>,
    version: u64,
    reads: usize,
    change: fn(&mut Sorted),
}

fn addr(s: &ServerView) -> std::net::SocketAddr {
    s.address.parse().unwrap()
}

impl ShowSource for Sorted {
    fn names(&self) -> Vec<String> {
        vec![self.name.clone()]
    }
    fn head(&mut self, _: usize) -> UpstreamHead {
        UpstreamHead {
            name: self.name.clone(),
            server_count: self.servers.len(),
            version: self.version,
            ..Default::default()
        }
    }
    fn servers(&mut self, _: usize, cursor: &mut Cursor, max: usize) -> Batch {
        let len = self.servers.len();
        let from = resume_index(cursor, len, |i| addr(&self.servers[i]));
        let to = from.saturating_add(max).min(len);
        let b = Batch {
            servers: self.servers[from..to].to_vec(),
            end: to == len,
            version: self.version,
        };
        cursor.next = to;
        cursor.after = b.servers.last().map(addr).or(cursor.after);
        self.reads += 1;
        (self.change)(self);
        b
    }
}

fn sorted(ports: std::ops::Range<u16>, change: fn(&mut Sorted)) -> Sorted {
    Sorted {
        name: "app".into(),
        servers: ports
            .map(|p| ServerView {
                address: format!("127.0.0.1:{p}"),
                weight: 1,
                ..Default::default()
            })
            .collect(),
        version: 1,
        reads: 0,
        change,
    }
}

/// Replaces the server on port `gone` by one on port `new`, as a publish does.
fn swap(s: &mut Sorted, gone: u16, new: u16) {
    s.servers.retain(|v| addr(v).port() != gone);
    s.servers.push(ServerView {
        address: format!("127.0.0.1:{new}"),
        weight: 1,
        ..Default::default()
    });
    s.servers.sort_by_key(addr);
    s.version += 1;
}

fn run(src: &mut Sorted, format: Format, batch: usize) -> String {
    let req = ShowRequest {
        format,
        upstream: None,
    };
    let mut r = Renderer::new(&req, src, batch).hold_all();
    let mut out = Vec::new();
    while !r.step(src, &mut out) {}
    let resp = String::from_utf8(out).unwrap();
    resp.split_once("\r\n\r\n").unwrap().1.to_string()
}

#[test]
fn a_set_that_changes_mid_report() {
    // text: the upstream is read again, so its count and its lines agree
    let mut src = sorted(1000..1100, |s| {
        if s.reads == 3 {
            swap(s, 1001, 1500); // a server already shown leaves, one after the cursor comes
        }
    });
    let text = run(&mut src, Format::Text, 10);
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("        server"))
        .collect();
    assert!(text.starts_with("Upstream name: app; Backend server count: 100\n"));
    assert_eq!(lines.len(), 100);
    assert!(!text.contains(":1001 ") && text.contains(":1500 "));
    // a list that changes all the time: read again three times, then shown as it goes
    let mut src = sorted(1000..1100, |s| {
        let n = 2000 + s.reads as u16;
        swap(s, 1000 + s.reads as u16, n)
    });
    let text = run(&mut src, Format::Text, 10);
    assert!(text.starts_with("Upstream name: app; Backend server count: 100\n"));
    // (servers that came in behind the cursor are listed too: more lines than the count)
    let n = text
        .lines()
        .filter(|l| l.starts_with("        server"))
        .count();
    assert!(n > 100 && text.ends_with(";\n\n"), "{n} lines");
    assert!(src.reads > 12 && src.reads < 40, "{} reads", src.reads);

    // JSON: streamed as it is read. A server that stays is listed once, one that
    // leaves before its batch is not listed, one that comes after the cursor is.
    let mut src = sorted(1000..1100, |s| {
        if s.reads == 3 {
            swap(s, 1001, 1500);
            swap(s, 1090, 1005);
        }
    });
    let j: serde_json::Value = serde_json::from_str(&run(&mut src, Format::Json, 10)).unwrap();
    let listed: Vec<u16> = j["upstreams"]["app"]["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s["server"]
                .as_str()
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    let mut want: Vec<u16> = (1000..1100).filter(|&p| p != 1090).collect();
    want.push(1500);
    assert_eq!(
        listed, want,
        "1001 was shown before it left; 1005 came in behind the cursor"
    );
    assert_eq!(j["upstreams"]["app"]["server_count"], 100);
}

#[test]
fn lists_read_whole_with_their_head() {
    struct Whole<'a>(Views<'a>);
    impl ShowSource for Whole<'_> {
        fn names(&self) -> Vec<String> {
            self.0.names()
        }
        fn head(&mut self, i: usize) -> UpstreamHead {
            let mut h = self.0.head(i);
            h.whole = Some(self.0 .0[i].servers.clone());
            h
        }
        fn servers(&mut self, _: usize, _: &mut Cursor, _: usize) -> Batch {
            panic!("a whole list is never read in batches");
        }
    }
    let v = many(30);
    for req in all_requests() {
        let mut src = Whole(Views(&v));
        let mut r = Renderer::new(&req, &mut src, 4).hold_all();
        let mut out = Vec::new();
        while !r.step(&mut src, &mut out) {}
        assert_eq!(out, reference::render(&req, &v), "{req:?}");
    }
}
