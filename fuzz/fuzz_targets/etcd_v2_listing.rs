//! etcd v2 recursive directory read: registry::etcd_v2::parse_listing.
#![no_main]
use libfuzzer_sys::fuzz_target;
use upsync_fuzz::check;
use upsync_core::registry::etcd_v2::parse_listing;

fuzz_target!(|data: &[u8]| {
    match parse_listing(data) {
        Ok(list) => check::listing(&list),
        Err(e) => check::error(&e),
    }
});
