//! Nacos instance-list answers in every shape: registry::nacos::list::parse_list, with
//! and without a cluster filter.
#![no_main]
use libfuzzer_sys::fuzz_target;
use upsync_core::conf::nacos::NacosApi;
use upsync_core::registry::nacos::list::parse_list;
use upsync_fuzz::check;

fuzz_target!(|data: &[u8]| {
    let clusters = ["DEFAULT".to_string()];
    for api in [NacosApi::V1, NacosApi::V2, NacosApi::V3] {
        for filter in [&[][..], &clusters[..]] {
            match parse_list(data, api, filter) {
                Ok(list) => check::listing(&list),
                Err(e) => check::error(&e),
            }
        }
    }
});
