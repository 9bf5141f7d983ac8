//! `upsync_lb` values (conf::parse_lb): no panic; an accepted method has a name.
#![no_main]
use libfuzzer_sys::fuzz_target;
use upsync_core::conf::parse_lb;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let args: Vec<&str> = text.split(' ').collect();
    if let Ok(spec) = parse_lb(&args) {
        assert!(!spec.name().is_empty());
        assert_ne!(spec.key.as_deref(), Some(""));
    }
});
