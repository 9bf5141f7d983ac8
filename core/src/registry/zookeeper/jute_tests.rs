//! Golden bytes for every record (checked against the jute definitions), round trips,
//! and hostile input for the reader and the frame decoder.

use super::*;

/// Bytes from a hex string with spaces; `'..'` quotes ASCII.
fn hex(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        if c == ' ' || c == '\n' {
            rest = &rest[1..];
        } else if c == '\'' {
            let end = rest[1..].find('\'').unwrap() + 1;
            out.extend_from_slice(&rest.as_bytes()[1..end]);
            rest = &rest[end + 1..];
        } else {
            out.push(u8::from_str_radix(&rest[..2], 16).unwrap());
            rest = &rest[2..];
        }
    }
    out
}

fn enc<R: Record>(r: &R) -> Vec<u8> {
    let mut v = Vec::new();
    r.encode(&mut v);
    v
}

fn dec<R: Record>(b: &[u8]) -> Result<R, JuteError> {
    R::decode(&mut Reader::new(b))
}

/// Encodes to `golden` and decodes back to the same record.
fn golden<R: Record + PartialEq + std::fmt::Debug>(r: R, golden: &str) {
    let len = hex(golden).len();
    golden_opt_tail(r, golden, len);
}

/// Like `golden`, for a record whose fields after `required` bytes are optional.
fn golden_opt_tail<R: Record + PartialEq + std::fmt::Debug>(r: R, golden: &str, required: usize) {
    let want = hex(golden);
    assert_eq!(enc(&r), want, "{r:?}");
    assert_eq!(dec::<R>(&want).unwrap(), r);
    // every shorter prefix is truncated, never a panic
    for cut in 0..required {
        assert!(dec::<R>(&want[..cut]).is_err(), "{r:?} cut at {cut}");
    }
}

fn stat() -> Stat {
    Stat {
        czxid: 1,
        mzxid: 2,
        ctime: 3,
        mtime: 4,
        version: 5,
        cversion: 6,
        aversion: 7,
        ephemeral_owner: 8,
        data_length: 9,
        num_children: 10,
        pzxid: 11,
    }
}

const STAT: &str = "0000000000000001 0000000000000002 0000000000000003 0000000000000004
    00000005 00000006 00000007 0000000000000008 00000009 0000000a 000000000000000b";

#[test]
fn connect_request() {
    let mut passwd = vec![0u8; 16];
    passwd[15] = 0x7f;
    // readOnly (the last byte) is optional on the wire
    golden_opt_tail(
        ConnectRequest {
            protocol_version: 0,
            last_zxid: 0x1_0000_0005,
            timeout_ms: 30_000,
            session_id: 0x0100_0abc_def0_0001,
            passwd,
            read_only: false,
        },
        "00000000 0000000100000005 00007530 01000abcdef00001
         00000010 000000000000000000000000 0000007f 00",
        44,
    );
}

#[test]
fn connect_response_with_and_without_read_only() {
    let passwd = vec![0xaa; 16];
    let r = ConnectResponse {
        protocol_version: 0,
        timeout_ms: 4000,
        session_id: 0x0100_0abc_def0_0001,
        passwd: passwd.clone(),
        read_only: false,
    };
    let body = "00000000 00000fa0 01000abcdef00001 00000010 aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    assert_eq!(enc(&r), hex(&format!("{body} 00")));
    assert!(
        dec::<ConnectResponse>(&hex(&format!("{body} 01")))
            .unwrap()
            .read_only
    );
    // servers before 3.4 send no readOnly byte
    assert_eq!(dec::<ConnectResponse>(&hex(body)).unwrap(), r);
    // expired: timeout 0, session 0, an empty password
    let expired = dec::<ConnectResponse>(&hex("00000000 00000000 0000000000000000 00000000 00"));
    assert_eq!(expired.unwrap().timeout_ms, 0);
}

#[test]
fn headers() {
    golden(
        RequestHeader {
            xid: 7,
            op: op::GET_CHILDREN2,
        },
        "00000007 0000000c",
    );
    golden(
        RequestHeader {
            xid: XID_PING,
            op: op::PING,
        },
        "fffffffe 0000000b",
    );
    golden(
        ReplyHeader {
            xid: XID_NOTIFICATION,
            zxid: 0x10,
            err: -101,
        },
        "ffffffff 0000000000000010 ffffff9b",
    );
}

#[test]
fn auth_packet() {
    golden(
        AuthPacket {
            auth_type: 0,
            scheme: "digest".into(),
            auth: b"u:p".to_vec(),
        },
        "00000000 00000006 'digest' 00000003 'u:p'",
    );
    let shown = format!(
        "{:?}",
        AuthPacket {
            auth_type: 0,
            scheme: "digest".into(),
            auth: b"u:secret".to_vec()
        }
    );
    assert!(!shown.contains("secret"), "{shown}");
}

#[test]
fn path_requests() {
    golden(
        PathWatch {
            path: "/s".into(),
            watch: true,
        },
        "00000002 '/s' 01",
    );
    golden(
        AddWatchRequest {
            path: "/s".into(),
            mode: ADD_WATCH_PERSISTENT_RECURSIVE,
        },
        "00000002 '/s' 00000001",
    );
}

#[test]
fn set_watches_v1_and_v2() {
    let sw = SetWatches {
        relative_zxid: 9,
        data: vec!["/a".into()],
        exist: vec![],
        child: vec!["/b".into()],
        persistent: vec![],
        persistent_recursive: vec!["/c".into()],
    };
    assert!(sw.needs_v2());
    let v1 = "0000000000000009 00000001 00000002 '/a' 00000000 00000001 00000002 '/b'";
    let v2 = format!("{v1} 00000000 00000001 00000002 '/c'");
    let mut b = Vec::new();
    sw.encode_v(&mut b, false);
    assert_eq!(b, hex(v1));
    let mut b = Vec::new();
    sw.encode_v(&mut b, true);
    assert_eq!(b, hex(&v2));
    assert_eq!(
        SetWatches::decode_v(&mut Reader::new(&b), true).unwrap(),
        sw
    );
    let back = SetWatches::decode_v(&mut Reader::new(&hex(v1)), false).unwrap();
    assert_eq!(back.child, vec!["/b".to_string()]);
    assert!(!back.needs_v2());
}

#[test]
fn stat_and_responses() {
    assert_eq!(hex(STAT).len(), 68);
    golden(stat(), STAT);
    golden(
        GetChildren2Response {
            children: vec!["a".into(), "bc".into()],
            stat: stat(),
        },
        &format!("00000002 00000001 'a' 00000002 'bc' {STAT}"),
    );
    golden(
        GetDataResponse {
            data: b"xy".to_vec(),
            stat: stat(),
        },
        &format!("00000002 'xy' {STAT}"),
    );
    // null data and a null children vector read as empty
    let d: GetDataResponse = dec(&hex(&format!("ffffffff {STAT}"))).unwrap();
    assert!(d.data.is_empty());
    let c: GetChildren2Response = dec(&hex(&format!("ffffffff {STAT}"))).unwrap();
    assert!(c.children.is_empty());
}

#[test]
fn watcher_event() {
    golden(
        WatcherEvent {
            event_type: event::NODE_CHILDREN_CHANGED,
            state: 3,
            path: "/s".into(),
        },
        "00000004 00000003 00000002 '/s'",
    );
}

#[test]
fn hostile_lengths_and_counts() {
    // negative lengths other than -1
    let e = dec::<GetDataResponse>(&hex(&format!("fffffffe {STAT}"))).unwrap_err();
    assert!(
        matches!(e, JuteError::NegativeLength { len: -2, .. }),
        "{e}"
    );
    let e = dec::<GetChildren2Response>(&hex("80000000")).unwrap_err();
    assert!(matches!(e, JuteError::NegativeLength { .. }), "{e}");
    // a count the remaining bytes cannot hold is refused before allocating
    let e = dec::<GetChildren2Response>(&hex("7fffffff 00000001 'a'")).unwrap_err();
    assert!(matches!(e, JuteError::Truncated { .. }), "{e}");
    // a string longer than the frame
    let e = dec::<WatcherEvent>(&hex("00000001 00000003 7fffffff '/s'")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "WatcherEvent.path is truncated (needs 2147483647 more bytes, 2 left)"
    );
    // invalid UTF-8 is replaced, not a panic
    let ev: WatcherEvent = dec(&hex("00000001 00000003 00000002 2fff")).unwrap();
    assert_eq!(ev.path, "/\u{fffd}");
}

#[test]
fn frame_decoder_splits_and_bounds() {
    let mut out = Vec::new();
    put_request(&mut out, 1, op::GET_DATA, |b| {
        PathWatch {
            path: "/x".into(),
            watch: false,
        }
        .encode(b)
    });
    put_request(&mut out, XID_PING, op::PING, |_| {});
    assert_eq!(
        out,
        hex("0000000f 00000001 00000004 00000002 '/x' 00  00000008 fffffffe 0000000b")
    );
    // byte by byte
    let mut d = FrameDecoder::new(64);
    let mut frames = Vec::new();
    for b in &out {
        d.push(std::slice::from_ref(b));
        while let Some(f) = d.next_frame().unwrap() {
            frames.push(f);
        }
    }
    assert_eq!(frames.len(), 2);
    assert_eq!(frames[1], hex("fffffffe 0000000b"));
    assert_eq!(d.buffered(), 0);
    // a length over the limit fails as soon as it is read, with no body buffered
    let mut d = FrameDecoder::new(64);
    d.push(&hex("00000041"));
    assert!(matches!(
        d.next_frame(),
        Err(JuteError::FrameLength { len: 65, max: 64 })
    ));
    for bad in ["00000000", "ffffffff", "80000000"] {
        let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
        d.push(&hex(bad));
        assert!(d.next_frame().is_err(), "{bad}");
    }
    // a partial frame waits
    let mut d = FrameDecoder::new(64);
    d.push(&hex("00000004 0000"));
    assert_eq!(d.next_frame().unwrap(), None);
    assert_eq!(d.buffered(), 6);
}
