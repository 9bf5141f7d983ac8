//! The session against hostile or odd servers: malformed frames, replies out of order,
//! expiry or a moved session in a reply, a handshake without a session, and bounds on
//! what accumulates.

use super::*;

/// A session with one watch, established against the fake (nothing in flight).
fn established() -> Rig {
    let mut r = Rig::new(WatchMode::Persistent);
    r.s.watch("/svc", r.now).unwrap();
    r.connect().unwrap();
    r.events();
    r
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut v = (body.len() as i32).to_be_bytes().to_vec();
    v.extend_from_slice(body);
    v
}

#[test]
fn hostile_frames_close_the_connection_and_the_session_survives() {
    let hdr = |xid: i32, err: i32| {
        let mut b = Vec::new();
        ReplyHeader { xid, zxid: 1, err }.encode(&mut b);
        b
    };
    let mut huge = 0x7fff_fff0_i32.to_be_bytes().to_vec();
    huge.extend_from_slice(&[0; 8]);
    let truncated_event = {
        let mut b = hdr(-1, 0);
        b.extend_from_slice(&[0, 0, 0, 3, 0, 0, 0, 3, 0x7f, 0xff, 0xff, 0xff, b'/']);
        frame(&b)
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("huge length", huge),
        ("negative length", (-5i32).to_be_bytes().to_vec()),
        ("zero length", vec![0, 0, 0, 0]),
        ("short header", frame(&[0, 0, 0, 1])),
        ("truncated event", truncated_event),
        ("reply to nothing", frame(&hdr(77, 0))),
    ];
    for (what, bytes) in cases {
        let mut r = established();
        let err = r.s.on_data(&bytes, r.now).unwrap_err();
        assert!(!r.s.is_established(), "{what}: {err}");
        assert!(r.s.take_output().is_empty());
        // the session is kept and resumes
        r.f.disconnect();
        r.connect().unwrap();
        assert_eq!(r.f.connects.last().unwrap().session_id, 0x101, "{what}");
    }
}

#[test]
fn hostile_replies_to_reads() {
    let mut r = Rig::new(WatchMode::Persistent);
    r.s.watch("/svc", r.now).unwrap();
    r.s.on_connected(r.now);
    let out = r.s.take_output();
    let hs = r.f.serve(&out);
    r.s.on_data(&hs, r.now).unwrap();
    let out = r.s.take_output();
    let mut d = jute::FrameDecoder::new(1 << 20);
    d.push(&out);
    let mut xids = Vec::new();
    while let Some(f) = d.next_frame().unwrap() {
        xids.push(
            jute::RequestHeader::decode(&mut Reader::new(&f))
                .unwrap()
                .xid,
        );
    }
    // [addWatch, getChildren2]
    let reply = |xid: i32, body: &[u8]| {
        let mut b = Vec::new();
        ReplyHeader {
            xid,
            zxid: 5,
            err: 0,
        }
        .encode(&mut b);
        b.extend_from_slice(body);
        frame(&b)
    };
    // a negative children count
    let mut input = reply(xids[0], &[0, 0, 0, 0]);
    input.extend(reply(xids[1], &[0xff, 0xff, 0xff, 0xf0]));
    let err = r.s.on_data(&input, r.now).unwrap_err();
    assert!(
        matches!(err, ZkError::Malformed(JuteError::NegativeLength { .. })),
        "{err}"
    );
    // replies out of order
    let mut r = Rig::new(WatchMode::Persistent);
    r.s.watch("/svc", r.now).unwrap();
    r.s.on_connected(r.now);
    let out = r.s.take_output();
    let hs = r.f.serve(&out);
    r.s.on_data(&hs, r.now).unwrap();
    r.s.take_output();
    let err = r.s.on_data(&reply(xids[1], &[]), r.now).unwrap_err();
    assert_eq!(
        err,
        ZkError::XidMismatch {
            got: xids[1],
            expected: xids[0]
        }
    );
    // a children count larger than the frame
    let mut r = Rig::new(WatchMode::Persistent);
    r.s.watch("/svc", r.now).unwrap();
    r.s.on_connected(r.now);
    let out = r.s.take_output();
    let hs = r.f.serve(&out);
    r.s.on_data(&hs, r.now).unwrap();
    r.s.take_output();
    let mut input = reply(xids[0], &[0, 0, 0, 0]);
    input.extend(reply(xids[1], &[0x10, 0, 0, 0, 0, 0, 0, 1, b'a']));
    assert!(matches!(
        r.s.on_data(&input, r.now),
        Err(ZkError::Malformed(JuteError::Truncated { .. }))
    ));
}

#[test]
fn session_expired_or_moved_in_a_reply_closes_the_connection() {
    for (code, want) in [
        (-112, ZkError::SessionExpired { id: 0x101 }),
        (-118, ZkError::SessionMoved),
    ] {
        let mut r = established();
        r.f.set("/svc/10.0.0.1:80", b"x");
        let note = r.f.serve(&[]);
        r.s.on_data(&note, r.now).unwrap();
        let mut d = jute::FrameDecoder::new(1 << 20);
        d.push(&r.s.take_output());
        let f = d.next_frame().unwrap().unwrap();
        let xid = jute::RequestHeader::decode(&mut Reader::new(&f))
            .unwrap()
            .xid;
        let mut b = Vec::new();
        ReplyHeader {
            xid,
            zxid: 0,
            err: code,
        }
        .encode(&mut b);
        assert_eq!(r.s.on_data(&frame(&b), r.now), Err(want.clone()));
        assert_eq!(r.s.session_id().is_some(), code == -118, "{want}");
    }
}

#[test]
fn a_connect_response_without_a_session_is_refused() {
    let mut s = Session::new(cfg(WatchMode::Auto));
    s.on_connected(0);
    let mut b = Vec::new();
    ConnectResponse {
        protocol_version: 0,
        timeout_ms: 4000,
        session_id: 0,
        passwd: vec![],
        read_only: false,
    }
    .encode(&mut b);
    assert!(matches!(
        s.on_data(&frame(&b), 0),
        Err(ZkError::Malformed(_))
    ));
}

#[test]
fn listings_are_coalesced_and_events_bounded() {
    let mut r = established();
    for i in 0..3000 {
        r.f.set(
            "/svc/10.0.0.1:80",
            format!("{{\"weight\":{}}}", i % 7 + 1).as_bytes(),
        );
        r.run().unwrap();
    }
    let ev = r.events();
    assert_eq!(ev.len(), 1, "only the latest listing of a watch is kept");
}
