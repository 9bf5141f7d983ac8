//! ZooKeeper session: arbitrary bytes from the server after a handshake, split into chunks
//! with timer calls between them, through registry::zookeeper::Session. No panic; output,
//! events and buffers stay bounded; no text carries the password; an error drops the
//! connection and the session reconnects (a new handshake, so later bytes reach a resumed
//! session too); listed children that map to servers (both layouts) are valid servers.
//!
//! Input: byte 0 picks the watch mode and chroot, byte 1 the chunk size, the rest is the
//! server's stream. Requests are numbered 1, 2, 3... after each handshake, so replies
//! can be found.
#![no_main]
use libfuzzer_sys::fuzz_target;
use upsync_core::registry::zookeeper::jute::{put_frame, ConnectResponse, Record};
use upsync_core::registry::zookeeper::{
    servers_from, Event, Layout, Session, WatchMode, ZkConfig,
};
use upsync_fuzz::check;

const PASSWORD: &str = "fuzz-Secret-9";

fn handshake() -> Vec<u8> {
    let mut out = Vec::new();
    put_frame(&mut out, |b| {
        ConnectResponse {
            protocol_version: 0,
            timeout_ms: 3000,
            session_id: 0x4242,
            passwd: vec![7; 16],
            read_only: false,
        }
        .encode(b)
    });
    out
}

fn drain(s: &mut Session) {
    let out = s.take_output();
    assert!(out.len() < 8 << 20, "{} bytes of output at once", out.len());
    let events = s.take_events();
    assert!(events.len() <= 1100, "{} events", events.len());
    let shown = format!("{events:?}");
    assert!(!shown.contains(PASSWORD), "password in an event: {shown}");
    for ev in &events {
        if let Event::Listing { children, .. } = ev {
            assert!(children.len() <= 1000, "more children than the limit");
            assert!(children.windows(2).all(|w| w[0].name < w[1].name), "unsorted");
            for layout in [Layout::IpPort, Layout::Curator] {
                let (ok, bad) = servers_from(layout, children);
                ok.iter().for_each(check::server);
                for b in &bad {
                    let t = b.to_string();
                    assert!(!t.contains('\n') && !t.contains('\r'), "line break: {t:?}");
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let mode = match data[0] % 3 {
        0 => WatchMode::Auto,
        1 => WatchMode::Persistent,
        _ => WatchMode::OneShot,
    };
    let cfg = ZkConfig {
        session_timeout_ms: 3000,
        auth: Some(format!("upsync:{PASSWORD}")),
        chroot: if data[0] & 4 != 0 { "/app".into() } else { String::new() },
        watch_mode: mode,
        max_children: 1000,
        max_frame: 1 << 20,
    };
    let chunk = 1 + data[1] as usize % 64;
    let mut s = Session::new(cfg);
    let _ = s.watch("/svc", 0);
    let _ = s.watch("/", 0);
    let mut now = 0u64;
    s.on_connected(now);
    s.on_data(&handshake(), now).expect("a valid handshake");
    drain(&mut s);
    let mut reconnects = 0;
    for piece in data[2..].chunks(chunk) {
        now += piece[0] as u64 * 7;
        let res = s.on_data(piece, now).and_then(|_| {
            if s.next_deadline().is_some_and(|d| d <= now) {
                s.on_timer(now)
            } else {
                Ok(())
            }
        });
        drain(&mut s);
        if let Err(e) = res {
            let t = e.to_string();
            assert!(!t.contains(PASSWORD), "password in an error: {t}");
            assert!(!t.contains('\n'), "line break in an error: {t:?}");
            assert!(!s.is_established(), "an error left the connection up");
            s.on_disconnected(now);
            reconnects += 1;
            if reconnects > 20 {
                return;
            }
            s.on_connected(now);
            if s.on_data(&handshake(), now).is_err() {
                return;
            }
            drain(&mut s);
        }
    }
});
