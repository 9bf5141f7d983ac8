//! Consul catalog/health service listing: registry::consul::parse_services.
#![no_main]
use libfuzzer_sys::fuzz_target;
use upsync_fuzz::check;
use upsync_core::registry::consul::parse_services;

fuzz_target!(|data: &[u8]| {
    match parse_services(data) {
        Ok(list) => check::listing(&list),
        Err(e) => check::error(&e),
    }
});
