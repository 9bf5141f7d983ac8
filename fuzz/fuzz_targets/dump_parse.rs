//! The dump file parser (dump::parse): no panic on any text, and what it accepts renders
//! back (dump::render) to text that parses to the same servers.
#![no_main]
use libfuzzer_sys::fuzz_target;
use upsync_pure::dump;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match dump::parse(&text) {
        Ok(list) => {
            let rendered = dump::render(&list);
            let again = dump::parse(&rendered)
                .unwrap_or_else(|e| panic!("rendered dump does not parse: {e}\n{rendered}"));
            assert_eq!(again, list, "dump round trip");
        }
        Err(e) => assert!(e.starts_with("line "), "{e}"),
    }
});
