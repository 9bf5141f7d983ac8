//! etcd v3 watch stream: registry::etcd_v3::watch_state, on the whole stream and on every
//! prefix of it (the poller calls it as bytes arrive); a "read again" decision, once reached, must
//! not change when more bytes arrive.
#![no_main]
use libfuzzer_sys::fuzz_target;
use upsync_core::registry::etcd_v3::{watch_state, WatchState};

fuzz_target!(|data: &[u8]| {
    let full = watch_state(data);
    if let WatchState::Error(e) | WatchState::Failed(e) | WatchState::Canceled(e) = &full {
        assert!(!e.contains('\n') && !e.contains('\r'), "line break in a log text: {e:?}");
    }
    // Once a prefix says "read again" (events, or a cancelled watch), the poller ends the
    // exchange: a longer stream must say the same. (An error may still turn into
    // "waiting": a number at the very end of a buffer can grow, "0" -> "0.5".)
    for cut in 0..=data.len() {
        let s = watch_state(&data[..cut]);
        if matches!(s, WatchState::Reread | WatchState::Canceled(_)) {
            assert_eq!(
                std::mem::discriminant(&watch_state(data)),
                std::mem::discriminant(&s),
                "prefix {cut} decided {s:?}, the whole stream {full:?}"
            );
            break;
        }
    }
});
