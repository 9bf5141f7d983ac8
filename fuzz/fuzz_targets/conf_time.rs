//! nginx time and size syntax (conf::time::parse_time_ms, parse_size): no panic, no
//! overflow, and format_ms renders an accepted time back to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use upsync_core::conf::time::{format_ms, parse_size, parse_time_ms};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Some(ms) = parse_time_ms(&text) {
        assert!(ms <= i64::MAX as u64);
        let f = format_ms(ms);
        assert_eq!(parse_time_ms(&f), Some(ms), "format_ms({ms}) = {f:?}");
    }
    let _ = parse_size(&text);
});
