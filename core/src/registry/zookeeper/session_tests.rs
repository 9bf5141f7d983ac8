//! The session machine against the fake server (and hand-made frames): handshake,
//! timers on a fake clock, reconnects, expiry, auth, both watch modes, the fallback, and
//! hostile frames.

use super::super::fake_server::Fake;
use super::*;

struct Rig {
    s: Session,
    f: Fake,
    now: u64,
}

type Listed = (WatchId, bool, Vec<(String, String)>);

fn cfg(mode: WatchMode) -> ZkConfig {
    ZkConfig {
        session_timeout_ms: 6000,
        watch_mode: mode,
        ..Default::default()
    }
}

impl Rig {
    fn new(mode: WatchMode) -> Rig {
        Rig::with(cfg(mode))
    }

    fn with(c: ZkConfig) -> Rig {
        let mut f = Fake::new();
        f.set("/svc", b"");
        f.set("/svc/10.0.0.1:80", b"");
        f.set("/svc/10.0.0.2:80", br#"{"weight":2}"#);
        Rig {
            s: Session::new(c),
            f,
            now: 1000,
        }
    }

    /// Client and server talk until both are quiet; the client's first error ends it
    /// (the connection is then closed on both sides).
    fn run(&mut self) -> Result<(), ZkError> {
        for _ in 0..10_000 {
            let out = self.s.take_output();
            let answer = self.f.serve(&out);
            if out.is_empty() && answer.is_empty() {
                return Ok(());
            }
            if let Err(e) = self.s.on_data(&answer, self.now) {
                self.f.disconnect();
                return Err(e);
            }
        }
        panic!("client and server never went quiet");
    }

    fn connect(&mut self) -> Result<(), ZkError> {
        self.f.disconnect();
        self.s.on_connected(self.now);
        self.run()
    }

    /// Moves the clock to `to`, running every timer due on the way (pings answered).
    fn advance(&mut self, to: u64) -> Result<(), ZkError> {
        while let Some(d) = self.s.next_deadline().filter(|d| *d <= to) {
            self.now = d.max(self.now);
            self.s.on_timer(self.now)?;
            self.run()?;
        }
        self.now = to;
        Ok(())
    }

    fn drop_conn(&mut self) {
        self.s.on_disconnected(self.now);
        self.f.disconnect();
    }

    fn events(&mut self) -> Vec<Event> {
        self.s.take_events()
    }

    fn listings(&mut self) -> Vec<Listed> {
        listings(&self.events())
    }

    /// The requests the server read since the last call: (op, path, watch).
    fn seen(&mut self) -> Vec<(i32, String, bool)> {
        std::mem::take(&mut self.f.seen)
            .into_iter()
            .map(|s| (s.op, s.path, s.watch))
            .collect()
    }
}

fn listings(events: &[Event]) -> Vec<Listed> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Listing {
                watch,
                exists,
                children,
            } => Some((
                *watch,
                *exists,
                children
                    .iter()
                    .map(|c| {
                        (
                            c.name.clone(),
                            String::from_utf8_lossy(&c.data).into_owned(),
                        )
                    })
                    .collect(),
            )),
            _ => None,
        })
        .collect()
}

fn kids(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

fn two() -> Vec<(String, String)> {
    kids(&[("10.0.0.1:80", ""), ("10.0.0.2:80", r#"{"weight":2}"#)])
}

fn req(op: i32, path: &str, watch: bool) -> (i32, String, bool) {
    (op, path.to_string(), watch)
}

#[test]
fn handshake_then_full_listing_with_persistent_watch() {
    let mut r = Rig::new(WatchMode::Auto);
    let w = r.s.watch("/svc", r.now).unwrap();
    r.connect().unwrap();
    let c = &r.f.connects[0];
    assert_eq!((c.session_id, c.last_zxid, c.timeout_ms), (0, 0, 6000));
    assert_eq!(c.passwd, vec![0; 16]);
    let ev = r.events();
    assert_eq!(
        ev[0],
        Event::Session(SessionEvent::Established {
            id: 0x101,
            timeout_ms: 6000,
            resumed: false
        })
    );
    assert_eq!(
        ev[1],
        Event::Session(SessionEvent::ModeDetected(WatchMode::Persistent))
    );
    assert_eq!(listings(&ev), vec![(w, true, two())]);
    // the watch is added before anything is read, so no change is missed
    assert_eq!(
        r.seen(),
        vec![
            req(op::ADD_WATCH, "/svc", false),
            req(op::GET_CHILDREN2, "/svc", false),
            req(op::GET_DATA, "/svc/10.0.0.1:80", false),
            req(op::GET_DATA, "/svc/10.0.0.2:80", false),
        ]
    );
    assert_eq!(r.s.mode(), Some(WatchMode::Persistent));
    assert_eq!(r.s.session_id(), Some(0x101));
}

#[test]
fn persistent_events_reread_only_what_changed() {
    let mut r = Rig::new(WatchMode::Persistent);
    let w = r.s.watch("/svc", r.now).unwrap();
    r.connect().unwrap();
    r.events();
    r.seen();
    // data change: one getData
    r.f.set("/svc/10.0.0.1:80", br#"{"down":1}"#);
    r.run().unwrap();
    assert_eq!(r.seen(), vec![req(op::GET_DATA, "/svc/10.0.0.1:80", false)]);
    let l = r.listings();
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].2[0].1, r#"{"down":1}"#);
    // created child: the list again (a transaction may hold more), and its data
    r.f.set("/svc/10.0.0.3:80", b"");
    r.run().unwrap();
    let seen = r.seen();
    assert!(
        seen.contains(&req(op::GET_CHILDREN2, "/svc", false)),
        "{seen:?}"
    );
    assert!(
        seen.contains(&req(op::GET_DATA, "/svc/10.0.0.3:80", false)),
        "{seen:?}"
    );
    assert_eq!(seen.len(), 2);
    assert_eq!(r.listings()[0].2.len(), 3);
    // deleted child: the list again, no data read
    r.f.delete("/svc/10.0.0.2:80");
    r.run().unwrap();
    assert_eq!(r.seen(), vec![req(op::GET_CHILDREN2, "/svc", false)]);
    let l = r.listings();
    assert_eq!(l[0].0, w);
    assert_eq!(
        l[0].2.iter().map(|c| c.0.as_str()).collect::<Vec<_>>(),
        ["10.0.0.1:80", "10.0.0.3:80"]
    );
    // grandchildren and data of the path itself are ignored
    r.f.set("/svc/10.0.0.1:80/x", b"");
    r.f.set("/svc", b"new");
    r.run().unwrap();
    assert!(r.seen().is_empty());
    assert!(r.events().is_empty());
    // same data written again: read, but no new listing
    r.f.set("/svc/10.0.0.3:80", b"");
    r.run().unwrap();
    assert_eq!(r.seen().len(), 1);
    assert!(r.listings().is_empty());
}

#[test]
fn children_deleted_together_are_reported_together() {
    // one transaction deletes both children: the server notifies one by one, and the
    // list read after the first notification already lacks both
    let mut r = Rig::new(WatchMode::Persistent);
    let w = r.s.watch("/svc", r.now).unwrap();
    r.connect().unwrap();
    r.events();
    r.seen();
    r.f.delete("/svc/10.0.0.1:80");
    r.f.delete("/svc/10.0.0.2:80");
    r.run().unwrap();
    assert_eq!(r.listings(), vec![(w, true, vec![])]);
}

#[test]
fn oneshot_watches_are_rearmed_by_the_read_that_follows_them() {
    let mut r = Rig::new(WatchMode::OneShot);
    let w = r.s.watch("/svc", r.now).unwrap();
    r.connect().unwrap();
    assert_eq!(r.listings(), vec![(w, true, two())]);
    assert_eq!(
        r.seen(),
        vec![
            req(op::GET_CHILDREN2, "/svc", true),
            req(op::GET_DATA, "/svc/10.0.0.1:80", true),
            req(op::GET_DATA, "/svc/10.0.0.2:80", true),
        ]
    );
    r.f.set("/svc/10.0.0.2:80", br#"{"weight":9}"#);
    r.run().unwrap();
    assert_eq!(r.seen(), vec![req(op::GET_DATA, "/svc/10.0.0.2:80", true)]);
    assert_eq!(r.listings()[0].2[1].1, r#"{"weight":9}"#);
    // the re-armed watch fires again
    r.f.set("/svc/10.0.0.2:80", br#"{"weight":3}"#);
    r.run().unwrap();
    assert_eq!(r.listings()[0].2[1].1, r#"{"weight":3}"#);
    r.seen();
    r.f.set("/svc/10.0.0.3:80", b"");
    r.run().unwrap();
    assert_eq!(
        r.seen(),
        vec![
            req(op::GET_CHILDREN2, "/svc", true),
            req(op::GET_DATA, "/svc/10.0.0.3:80", true),
        ]
    );
    assert_eq!(r.listings()[0].2.len(), 3);
    r.f.delete("/svc/10.0.0.1:80");
    r.run().unwrap();
    assert_eq!(r.listings()[0].2.len(), 2);
    assert!(r.seen().iter().all(|s| s.0 != op::ADD_WATCH));
}

#[test]
fn auto_mode_falls_back_to_oneshot_on_an_old_server() {
    let mut r = Rig::new(WatchMode::Auto);
    r.f.old = true;
    let w = r.s.watch("/svc", r.now).unwrap();
    let err = r.connect().unwrap_err();
    assert_eq!(err, ZkError::AddWatchUnsupported { fallback: true });
    assert!(err.to_string().contains("using one-shot watches"), "{err}");
    let ev = r.events();
    assert!(ev.contains(&Event::Session(SessionEvent::ModeDetected(
        WatchMode::OneShot
    ))));
    assert!(listings(&ev).is_empty());
    // the connection is gone; the session is resumed in one-shot mode
    r.drop_conn();
    r.seen();
    r.connect().unwrap();
    assert_eq!(r.f.connects[1].session_id, 0x101);
    let ev = r.events();
    assert!(ev.contains(&Event::Session(SessionEvent::Established {
        id: 0x101,
        timeout_ms: 6000,
        resumed: true
    })));
    assert_eq!(listings(&ev), vec![(w, true, two())]);
    let seen = r.seen();
    assert!(seen.iter().all(|s| s.0 != op::ADD_WATCH && s.2), "{seen:?}");
    // and it follows changes
    r.f.set("/svc/10.0.0.3:80", b"");
    r.run().unwrap();
    assert_eq!(r.listings()[0].2.len(), 3);
}

#[test]
fn forced_persistent_mode_on_an_old_server_is_an_error_without_fallback() {
    let mut r = Rig::new(WatchMode::Persistent);
    r.f.old = true;
    r.s.watch("/svc", r.now).unwrap();
    let err = r.connect().unwrap_err();
    assert_eq!(err, ZkError::AddWatchUnsupported { fallback: false });
    assert_eq!(r.s.mode(), Some(WatchMode::Persistent));
}

#[test]
fn pings_and_read_timeout_follow_the_negotiated_timeout() {
    let mut r = Rig::new(WatchMode::Persistent);
    r.s.watch("/svc", r.now).unwrap();
    r.connect().unwrap();
    let t0 = r.now;
    // 6000 ms negotiated: ping after 2000 ms without sending, read timeout 4000 ms
    assert_eq!(r.s.next_deadline(), Some(t0 + 2000));
    r.s.on_timer(t0 + 1999).unwrap();
    assert!(r.s.take_output().is_empty());
    r.s.on_timer(t0 + 2000).unwrap();
    let ping = r.s.take_output();
    assert_eq!(ping, [0, 0, 0, 8, 0xff, 0xff, 0xff, 0xfe, 0, 0, 0, 11]);
    // one ping in flight: the next deadline is the read timeout
    assert_eq!(r.s.next_deadline(), Some(t0 + 4000));
    r.s.on_timer(t0 + 3000).unwrap();
    assert!(r.s.take_output().is_empty());
    // the answer at +2100 moves both timers
    let answer = r.f.serve(&ping);
    r.s.on_data(&answer, t0 + 2100).unwrap();
    assert_eq!(r.s.next_deadline(), Some(t0 + 4000));
    r.s.on_timer(t0 + 4000).unwrap();
    assert_eq!(r.s.take_output().len(), 12);
    assert_eq!(r.s.next_deadline(), Some(t0 + 2100 + 4000));
    let err = r.s.on_timer(t0 + 6100).unwrap_err();
    assert_eq!(err, ZkError::ReadTimeout { ms: 4000 });
    assert!(!r.s.is_established());
    // the session is kept: its expiry is the next deadline
    assert_eq!(r.s.next_deadline(), Some(t0 + 2100 + 6000));
}

#[test]
fn pings_at_least_every_ten_seconds() {
    let mut r = Rig::new(WatchMode::Persistent);
    r.f.timeout_ms = 60_000;
    r.connect().unwrap();
    assert_eq!(r.s.negotiated_timeout_ms(), 60_000);
    assert_eq!(r.s.next_deadline(), Some(r.now + 10_000));
}

#[test]
fn handshake_timeout() {
    let mut r = Rig::new(WatchMode::Persistent);
    r.s.on_connected(0);
    assert_eq!(r.s.next_deadline(), Some(4000));
    let err = r.s.on_timer(4000).unwrap_err();
    assert_eq!(err, ZkError::HandshakeTimeout { ms: 4000 });
    assert_eq!(r.s.next_deadline(), None);
}

#[test]
fn oneshot_reconnect_resumes_and_hands_back_watches_with_set_watches() {
    let mut r = Rig::new(WatchMode::OneShot);
    let w = r.s.watch("/svc", r.now).unwrap();
    r.connect().unwrap();
    r.events();
    let zxid = r.f.zxid;
    r.drop_conn();
    // changes while disconnected
    r.f.set("/svc/10.0.0.1:80", b"{\"down\":true}");
    r.f.set("/svc/10.0.0.4:80", b"");
    r.seen();
    r.connect().unwrap();
    let c = r.f.connects[1].clone();
    assert_eq!((c.session_id, c.last_zxid), (0x101, zxid));
    assert_eq!(c.passwd, vec![0x01; 16]);
    let (code, sw) = r.f.set_watches[0].clone();
    assert_eq!(code, op::SET_WATCHES);
    assert_eq!(sw.relative_zxid, zxid);
    assert_eq!(sw.child, vec!["/svc".to_string()]);
    assert_eq!(
        sw.data,
        vec![
            "/svc/10.0.0.1:80".to_string(),
            "/svc/10.0.0.2:80".to_string()
        ]
    );
    // the server's catch-up events lead to exactly the reads needed
    let mut seen = r.seen();
    assert_eq!(seen[0].0, op::SET_WATCHES);
    seen.sort();
    assert_eq!(
        seen[..3],
        [
            req(op::GET_DATA, "/svc/10.0.0.1:80", true),
            req(op::GET_DATA, "/svc/10.0.0.4:80", true),
            req(op::GET_CHILDREN2, "/svc", true),
        ]
    );
    let l = r.listings();
    assert_eq!(l.len(), 1);
    assert_eq!(l[0].0, w);
    assert_eq!(l[0].2.len(), 3);
    assert_eq!(l[0].2[0].1, "{\"down\":true}");
}

#[test]
fn persistent_reconnect_adds_the_watch_again_and_rereads_everything() {
    let mut r = Rig::new(WatchMode::Persistent);
    let w = r.s.watch("/svc", r.now).unwrap();
    r.connect().unwrap();
    r.events();
    r.drop_conn();
    r.f.set("/svc/10.0.0.2:80", b"");
    r.seen();
    r.connect().unwrap();
    assert_eq!(
        r.seen(),
        vec![
            req(op::ADD_WATCH, "/svc", false),
            req(op::GET_CHILDREN2, "/svc", false),
            req(op::GET_DATA, "/svc/10.0.0.1:80", false),
            req(op::GET_DATA, "/svc/10.0.0.2:80", false),
        ]
    );
    let l = r.listings();
    assert_eq!(
        l,
        vec![(w, true, kids(&[("10.0.0.1:80", ""), ("10.0.0.2:80", "")]))]
    );
}

#[test]
fn reads_in_flight_when_the_connection_drops_are_sent_again() {
    let mut r = Rig::new(WatchMode::OneShot);
    let w = r.s.watch("/svc", r.now).unwrap();
    r.s.on_connected(r.now);
    let out = r.s.take_output();
    let hs = r.f.serve(&out);
    r.s.on_data(&hs, r.now).unwrap();
    let out = r.s.take_output(); // getChildren2 in flight
    let list = r.f.serve(&out);
    r.s.on_data(&list, r.now).unwrap();
    let _lost = r.s.take_output(); // two getData, never answered
    r.drop_conn();
    r.connect().unwrap();
    assert_eq!(r.listings(), vec![(w, true, two())]);
}

#[test]
fn set_watches_is_split_at_128_kib() {
    let mut r = Rig::new(WatchMode::OneShot);
    let long = "x".repeat(200);
    for i in 0..1500 {
        r.f.set(&format!("/svc/{long}{i:04}"), b"");
    }
    r.s.watch("/svc", r.now).unwrap();
    r.connect().unwrap();
    assert_eq!(r.listings()[0].2.len(), 1502);
    r.drop_conn();
    r.connect().unwrap();
    let batches = &r.f.set_watches;
    assert!(batches.len() >= 3, "{}", batches.len());
    let mut total = 0;
    for (_, b) in batches {
        let size: usize = b.data.iter().chain(&b.child).map(|p| p.len()).sum();
        assert!(size < 128 * 1024 + 300, "{size}");
        total += b.data.len() + b.child.len();
    }
    assert_eq!(total, 1503);
}

#[test]
fn server_side_expiry_starts_a_new_session_and_reads_everything() {
    let mut r = Rig::new(WatchMode::Persistent);
    let w = r.s.watch("/svc", r.now).unwrap();
    r.connect().unwrap();
    r.events();
    r.drop_conn();
    r.f.expire(0x101);
    let err = r.connect().unwrap_err();
    assert_eq!(err, ZkError::SessionExpired { id: 0x101 });
    assert_eq!(
        r.events(),
        vec![Event::Session(SessionEvent::Expired {
            id: 0x101,
            by_client: false
        })]
    );
    r.drop_conn();
    r.connect().unwrap();
    let c = r.f.connects.last().unwrap();
    assert_eq!((c.session_id, c.last_zxid), (0, 0));
    let ev = r.events();
    assert!(ev.contains(&Event::Session(SessionEvent::Established {
        id: 0x102,
        timeout_ms: 6000,
        resumed: false
    })));
    assert_eq!(listings(&ev), vec![(w, true, two())]);
}

#[test]
fn client_side_expiry_while_partitioned() {
    let mut r = Rig::new(WatchMode::Persistent);
    r.s.watch("/svc", r.now).unwrap();
    r.connect().unwrap(); // heard at 1000
    r.events();
    r.s.on_disconnected(2000);
    assert_eq!(r.s.next_deadline(), Some(7000));
    r.s.on_timer(6999).unwrap();
    assert!(r.events().is_empty());
    // a member accepts TCP but never answers (SIGSTOP): the handshake hangs
    r.s.on_connected(6000);
    let err = r.s.on_timer(7000).unwrap_err();
    assert_eq!(
        err,
        ZkError::SessionLost {
            id: 0x101,
            timeout_ms: 6000
        }
    );
    assert_eq!(
        r.events(),
        vec![Event::Session(SessionEvent::Expired {
            id: 0x101,
            by_client: true
        })]
    );
    assert_eq!(r.s.session_id(), None);
    // while disconnected, the timer only reports
    let mut r2 = Rig::new(WatchMode::Persistent);
    r2.connect().unwrap();
    r2.s.on_disconnected(1500);
    r2.s.on_timer(7000).unwrap();
    assert!(matches!(
        r2.events()[1],
        Event::Session(SessionEvent::Expired {
            by_client: true,
            ..
        })
    ));
    assert_eq!(r2.s.next_deadline(), None);
    // the next connection opens a new session and reads everything
    r.now = 8000;
    r.f.disconnect();
    r.connect().unwrap();
    assert_eq!(r.f.connects.last().unwrap().session_id, 0);
    assert_eq!(r.listings().len(), 1);
}

#[test]
fn digest_auth_is_sent_after_connect_and_a_refusal_never_shows_the_password() {
    let mut c = cfg(WatchMode::Persistent);
    c.auth = Some("upsync:pa55-w0rd".into());
    let mut r = Rig::with(c.clone());
    r.s.watch("/svc", r.now).unwrap();
    r.connect().unwrap();
    assert_eq!(r.f.auths[0].scheme, "digest");
    assert_eq!(r.f.auths[0].auth, b"upsync:pa55-w0rd");
    assert_eq!(r.listings().len(), 1);
    assert_eq!(
        r.s.secrets(),
        vec!["upsync:pa55-w0rd".to_string(), "pa55-w0rd".into()]
    );

    let mut r = Rig::with(c);
    r.f.refuse_auth = true;
    r.s.watch("/svc", r.now).unwrap();
    let err = r.connect().unwrap_err();
    assert_eq!(
        err.to_string(),
        "the server refused digest authentication as \"upsync\" (AuthFailed (-115))"
    );
    let ev = r.events();
    assert!(ev.contains(&Event::Session(SessionEvent::AuthFailed)));
    assert!(listings(&ev).is_empty());
    assert!(!format!("{ev:?} {err:?}").contains("pa55"));
}

#[test]
fn chroot_prefixes_paths_sent_and_is_stripped_from_events() {
    let mut c = cfg(WatchMode::Persistent);
    c.chroot = "/prod/".into();
    let mut r = Rig::with(c);
    r.f.set("/prod", b"");
    r.f.set("/prod/svc", b"");
    r.f.set("/prod/svc/10.1.1.1:1", b"");
    let w = r.s.watch("/svc", r.now).unwrap();
    r.connect().unwrap();
    assert_eq!(
        r.seen()[..2],
        [
            req(op::ADD_WATCH, "/prod/svc", false),
            req(op::GET_CHILDREN2, "/prod/svc", false)
        ]
    );
    assert_eq!(r.listings(), vec![(w, true, kids(&[("10.1.1.1:1", "")]))]);
    r.f.set("/prod/svc/10.1.1.2:1", b"");
    r.run().unwrap();
    assert_eq!(r.listings()[0].2.len(), 2);
    // the same path outside the chroot is not this watch
    r.f.set("/svc/10.0.0.9:80", b"");
    r.run().unwrap();
    assert!(r.events().is_empty());
    // a watch on "/" under a chroot is the chroot itself
    let root = r.s.watch("/", r.now).unwrap();
    r.run().unwrap();
    assert_eq!(r.listings(), vec![(root, true, kids(&[("svc", "")]))]);
}

#[test]
fn missing_path_lists_empty_and_is_followed_until_created() {
    for mode in [WatchMode::Persistent, WatchMode::OneShot] {
        let mut r = Rig::new(mode);
        let w = r.s.watch("/other", r.now).unwrap();
        r.connect().unwrap();
        assert_eq!(r.listings(), vec![(w, false, vec![])], "{mode:?}");
        r.f.set("/other", b"");
        r.f.set("/other/10.0.0.5:1", b"");
        r.run().unwrap();
        let l = r.listings();
        assert_eq!(l.last().unwrap().2, kids(&[("10.0.0.5:1", "")]), "{mode:?}");
        r.f.delete("/other/10.0.0.5:1");
        r.f.delete("/other");
        r.run().unwrap();
        assert_eq!(
            r.listings().last().unwrap(),
            &(w, false, vec![]),
            "{mode:?}"
        );
    }
}

#[test]
fn too_many_children_is_an_error_until_the_list_shrinks() {
    for mode in [WatchMode::Persistent, WatchMode::OneShot] {
        let mut c = cfg(mode);
        c.max_children = 2;
        let mut r = Rig::with(c);
        r.f.set("/svc/10.0.0.3:80", b"");
        let w = r.s.watch("/svc", r.now).unwrap();
        r.connect().unwrap();
        let ev = r.events();
        assert!(listings(&ev).is_empty(), "{mode:?}");
        assert!(
            matches!(&ev[ev.len() - 1], Event::Error { watch: Some(x), err: ZkError::TooManyChildren { count: 3, max: 2, .. } } if *x == w),
            "{ev:?}"
        );
        r.f.delete("/svc/10.0.0.3:80");
        r.run().unwrap();
        assert_eq!(r.listings(), vec![(w, true, two())], "{mode:?}");
    }
}

#[test]
fn a_refused_read_is_reported_once_and_retried() {
    let mut r = Rig::new(WatchMode::OneShot);
    r.f.no_auth.insert("/svc/10.0.0.2:80".into());
    let w = r.s.watch("/svc", r.now).unwrap();
    r.connect().unwrap();
    let ev = r.events();
    let errs: Vec<_> = ev
        .iter()
        .filter(|e| matches!(e, Event::Error { .. }))
        .collect();
    assert_eq!(errs.len(), 1);
    let Event::Error { watch, err } = errs[0] else {
        unreachable!()
    };
    assert_eq!(*watch, Some(w));
    assert!(
        err.to_string()
            .starts_with("getData /svc/10.0.0.2:80: NoAuth (-102)"),
        "{err}"
    );
    assert!(listings(&ev).is_empty());
    let retry = r.now + RETRY_MS;
    assert!(r.s.next_deadline().unwrap() <= retry);
    r.advance(retry - 1).unwrap();
    assert!(r.events().is_empty(), "no retry before its time");
    r.f.no_auth.clear();
    r.advance(retry).unwrap();
    assert_eq!(r.listings(), vec![(w, true, two())]);
    assert!(r.s.is_established());
}

#[test]
fn data_reads_are_paced() {
    let mut r = Rig::new(WatchMode::Persistent);
    for i in 0..1000 {
        r.f.set(&format!("/svc/10.1.{}.{}:80", i / 250, i % 250), b"");
    }
    r.s.watch("/svc", r.now).unwrap();
    r.s.on_connected(r.now);
    let out = r.s.take_output();
    let hs = r.f.serve(&out);
    r.s.on_data(&hs, r.now).unwrap();
    let out = r.s.take_output();
    let list = r.f.serve(&out);
    r.s.on_data(&list, r.now).unwrap();
    r.seen();
    let out = r.s.take_output();
    r.f.serve(&out);
    assert_eq!(r.seen().len(), MAX_DATA_IN_FLIGHT);
}

#[test]
fn unwatch_and_close() {
    let mut r = Rig::new(WatchMode::Persistent);
    let a = r.s.watch("/svc", r.now).unwrap();
    let b = r.s.watch("/svc", r.now).unwrap();
    r.connect().unwrap();
    assert_eq!(r.listings().len(), 2);
    r.s.unwatch(a);
    r.f.set("/svc/10.0.0.7:80", b"");
    r.run().unwrap();
    assert_eq!(r.listings().iter().map(|l| l.0).collect::<Vec<_>>(), [b]);
    r.seen();
    r.s.close(r.now);
    r.run().unwrap();
    assert_eq!(r.seen(), vec![req(op::CLOSE_SESSION, "", false)]);
    assert_eq!(r.s.session_id(), None);
    assert!(r.f.sessions.is_empty());
}

#[test]
fn invalid_watch_paths_are_refused() {
    let mut s = Session::new(cfg(WatchMode::Auto));
    assert!(matches!(
        s.watch("svc", 0),
        Err(ZkError::InvalidPath { .. })
    ));
    assert!(matches!(
        s.watch("/svc/", 0),
        Err(ZkError::InvalidPath { .. })
    ));
}

#[path = "session_hostile_tests.rs"]
mod hostile;
