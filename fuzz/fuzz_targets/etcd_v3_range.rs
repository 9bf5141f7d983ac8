//! etcd v3 range response: registry::etcd_v3::parse_range.
#![no_main]
use libfuzzer_sys::fuzz_target;
use upsync_fuzz::check;
use upsync_core::registry::etcd_v3::parse_range;

fuzz_target!(|data: &[u8]| {
    for prefix in ["/upstreams/x/", ""] {
        match parse_range(data, prefix) {
            Ok((list, _rev)) => check::listing(&list),
            Err(e) => check::error(&e),
        }
    }
});
