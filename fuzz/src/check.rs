//! Invariants every accepted result must satisfy, shared by the fuzz targets. A violation
//! panics, which libFuzzer reports as a crash (the same as a panic inside the parser).

use upsync_core::dump;
use upsync_core::conf::Endpoint;
use upsync_core::http::build_request;
use upsync_core::registry::{Listing, RegistryError, Snapshot, Source};
use upsync_core::servers::{ServerSpec, MAX_COUNT, MAX_FAIL_TIMEOUT, MAX_MAPPED_WEIGHT};

/// A server the registry handed us: within nginx's limits, and its `server` line (dump
/// file, upstream_show) reads back as the same server.
pub fn server(s: &ServerSpec) {
    assert!(s.addr.port() != 0, "port 0 accepted: {s:?}");
    assert!((1..=MAX_MAPPED_WEIGHT).contains(&s.weight), "weight out of range: {s:?}");
    assert!(s.max_fails <= MAX_COUNT, "max_fails out of range: {s:?}");
    assert!(s.max_conns <= MAX_COUNT, "max_conns out of range: {s:?}");
    assert!(s.fail_timeout <= MAX_FAIL_TIMEOUT, "fail_timeout out of range: {s:?}");
    assert!(s.slow_start <= MAX_FAIL_TIMEOUT, "slow_start out of range: {s:?}");
    let line = s.line();
    assert!(
        !line.bytes().any(|b| b < b' ' || b == 0x7f),
        "control character in a server line: {line:?}"
    );
    let back = dump::parse(&format!("{line}\n")).unwrap_or_else(|e| panic!("{line:?}: {e}"));
    let mut want = s.clone();
    want.slow_start = 0; // not part of the line
    assert_eq!(back, vec![want], "dump round trip of {line:?}");
}

/// A list of servers as parsed from one response.
pub fn servers(list: &[ServerSpec]) {
    for s in list {
        server(s);
    }
}

/// A listing: valid servers, and skipped entries whose key and cause are single,
/// bounded lines.
pub fn listing(l: &Listing) {
    servers(&l.servers);
    for s in &l.skipped {
        for text in [&s.key, &s.cause] {
            assert!(
                !text.bytes().any(|b| b == b'\n' || b == b'\r' || b == 0),
                "control character in a skipped entry: {s:?}"
            );
            assert!(text.len() <= 1024, "skipped entry text of {} bytes", text.len());
        }
    }
}

/// A snapshot: normalized (sorted, one entry per address) and every server valid.
pub fn snapshot(s: &Snapshot) {
    servers(&s.servers);
    for w in s.servers.windows(2) {
        assert!(w[0].addr < w[1].addr, "snapshot not sorted/unique: {:?}", s.servers);
    }
}

/// An error that ends up in error.log: bounded, and no line breaks (log forging).
pub fn error(e: &RegistryError) {
    let text = e.to_string();
    assert!(
        !text.bytes().any(|b| b == b'\n' || b == b'\r' || b == 0),
        "control character in a log message: {text:?}"
    );
    assert!(text.len() <= 4096, "log message of {} bytes", text.len());
}

/// The next request of a source, as the poller would send it to the first address:
/// header lines free of control bytes (no CR/LF smuggled in by a value or a secret),
/// and a well-formed request head.
pub fn next_request(source: &dyn Source, endpoint: &Endpoint) {
    let req = source.next_request();
    for h in &req.headers {
        assert!(!h.bytes().any(|b| b < b' ' || b == 0x7f), "control byte in header {h:?}");
    }
    request(&build_request(
        req.method,
        &req.path_and_query,
        &endpoint.hosts[0].authority(),
        &req.headers,
        &req.body,
    ));
}

/// A request line and headers built from state we derived: one line, no injection.
pub fn request(bytes: &[u8]) {
    let head_end = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("request has a head");
    let head = &bytes[..head_end];
    let first = head.split(|&b| b == b'\n').next().unwrap();
    let first = first.strip_suffix(b"\r").unwrap_or(first);
    assert_eq!(
        first.iter().filter(|&&b| b == b' ').count(),
        2,
        "request line {:?}",
        String::from_utf8_lossy(first)
    );
    for line in head.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        assert!(
            !line.iter().any(|&b| b == b'\r' || b == 0),
            "bare CR or NUL in the request head: {:?}",
            String::from_utf8_lossy(head)
        );
    }
}
