//! `upsync` directive values (conf::parse_upsync): no panic; an accepted directive gives
//! a registry source whose first request is well formed, and whose timing arithmetic
//! (Consul wait/deadline, retry backoff) holds for the accepted values.
#![no_main]
use libfuzzer_sys::fuzz_target;
use upsync_pure::check;
use upsync_pure::conf::parse_upsync;
use upsync_pure::net::http::build_request;
use upsync_pure::registry::{consul::wait_and_deadline, retry_delay_ms, source_for};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // nginx hands the directive its arguments already split (quotes may put spaces and
    // other bytes inside one argument): split on NUL, or on spaces when there is none.
    let args: Vec<&str> = if text.contains('\0') {
        text.split('\0').collect()
    } else {
        text.split(' ').collect()
    };
    let Ok(spec) = parse_upsync(&args) else { return };
    let _ = spec.endpoint.to_string();
    let source = source_for(&spec, None);
    let req = source.next_request();
    check::request(&build_request(
        req.method,
        &req.path_and_query,
        &spec.endpoint.hosts[0].authority(),
        &req.headers,
        &req.body,
    ));
    let (wait, deadline) = wait_and_deadline(spec.timeout_ms);
    assert!(deadline >= wait);
    for failures in 1..=4 {
        let d = retry_delay_ms(spec.interval_ms, failures, 0.999);
        assert!(d >= spec.interval_ms.max(50), "retry delay {d} for interval {}", spec.interval_ms);
    }
});
