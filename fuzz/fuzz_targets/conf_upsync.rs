//! `upsync` directive values (conf::parse_upsync): no panic; an accepted directive gives
//! a registry source whose first request is well formed, and whose timing arithmetic
//! (Consul wait/deadline, retry backoff) holds for the accepted values. The last
//! argument doubles as a token_file's content: an accepted credential gives requests
//! whose header lines stay well formed (no CR/LF smuggled in by the secret).
#![no_main]
use libfuzzer_sys::fuzz_target;
use upsync_fuzz::check;
use upsync_core::conf::{parse_credential, parse_upsync};
use upsync_core::policy::retry_delay_ms;
use upsync_core::registry::{consul::wait_and_deadline, source_for};

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
    let cred = parse_credential(spec.kind, args.last().copied().unwrap_or("")).ok();
    for c in [None, cred.as_ref()] {
        // ZooKeeper has no HTTP source: its session is fuzzed by zk_session
        if let Some(source) = source_for(&spec, c) {
            check::next_request(source.as_ref(), &spec.endpoint);
        }
    }
    let (wait, deadline) = wait_and_deadline(spec.timeout_ms);
    assert!(deadline >= wait);
    for failures in 1..=4 {
        let d = retry_delay_ms(spec.interval_ms, failures, 0.999);
        assert!(d >= spec.interval_ms.max(50), "retry delay {d} for interval {}", spec.interval_ms);
    }
});
