//! The dump file parser (dump::parse): no panic on any text; what it accepts renders
//! back (dump::render) to text that parses to the same servers; and a number it accepts
//! is the number written (no silent wrap-around).
#![no_main]
use libfuzzer_sys::fuzz_target;
use upsync_core::conf::time::parse_time_ms;
use upsync_core::dump;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match dump::parse(&text) {
        Ok(list) => {
            let rendered = dump::render(&list);
            let again = dump::parse(&rendered)
                .unwrap_or_else(|e| panic!("rendered dump does not parse: {e}\n{rendered}"));
            assert_eq!(again, list, "dump round trip");
            // every fail_timeout= the parser accepted fits the u32 seconds it stores
            for w in text.split(|c: char| c.is_ascii_whitespace() || c == ';') {
                if let Some(v) = w.strip_prefix("fail_timeout=") {
                    if let Some(ms) = parse_time_ms(v) {
                        assert!(
                            ms / 1000 <= u32::MAX as u64,
                            "fail_timeout={v} accepted, but {} s does not fit: stored as {}",
                            ms / 1000,
                            (ms / 1000) as u32
                        );
                    }
                }
            }
        }
        Err(e) => assert!(e.to_string().starts_with("line "), "{e}"),
    }
});
