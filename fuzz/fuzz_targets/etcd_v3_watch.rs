//! etcd v3 watch stream: registry::etcd_v3::watch_state, on the whole stream and on every
//! prefix of it (the poller calls it as bytes arrive); the kind of decision, once reached, must
//! not change when more bytes arrive.
#![no_main]
use libfuzzer_sys::fuzz_target;
use upsync_pure::registry::etcd_v3::{watch_state, WatchState};

fuzz_target!(|data: &[u8]| {
    let full = watch_state(data);
    if let WatchState::Error(e) | WatchState::Canceled(e) = &full {
        assert!(!e.contains('\n') && !e.contains('\r'), "line break in a log text: {e:?}");
    }
    let mut decided: Option<WatchState> = None;
    for cut in 0..=data.len() {
        let s = watch_state(&data[..cut]);
        if let Some(d) = &decided {
            // a number at the very end may still grow ("1" -> "12"): only the kind of
            // decision must stay the same
            assert_eq!(
                std::mem::discriminant(&s),
                std::mem::discriminant(d),
                "decision changed at {cut}: {d:?} -> {s:?}"
            );
        } else if s != WatchState::Waiting {
            decided = Some(s);
        }
    }
});
