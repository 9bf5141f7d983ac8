//! Consul KV listing (`GET /v1/kv/PREFIX/?recurse`): registry::consul::parse_kv.
#![no_main]
use libfuzzer_sys::fuzz_target;
use upsync_fuzz::check;
use upsync_core::registry::consul::parse_kv;

fuzz_target!(|data: &[u8]| {
    for prefix in ["upstreams/test/", ""] {
        match parse_kv(data, prefix) {
            Ok(list) => check::listing(&list),
            Err(e) => check::error(&e),
        }
    }
});
