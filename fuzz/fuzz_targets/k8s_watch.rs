//! Kubernetes (`registry::kubernetes`): the list-then-watch state machine driven by a
//! sequence of synthetic answers, each watch body offered to `on_partial` as it would
//! stream in. Two sources get the same answers: one byte by byte (with `take_streamed`
//! after every byte, as the poller does), one in a single piece. Whatever the API server
//! sends: no panic, every set handed out is valid, errors and notes are loggable and
//! never show the token, the next request is well formed, and both sources end each
//! exchange the same way with the same server set (streaming changes nothing).
//!
//! Input (plain bytes, so crashing inputs can be written by hand):
//!   OPTIONS STEP [0xFF 0xFF STEP]...
//! OPTIONS bits: 1 k8s_port=tcp, 2 k8s_protocol=UDP, 4 k8s_port=8080,
//! 8 k8s_address_type=IPv6, 16 a bearer token.
//! STEP: "STATUS\nFLAGS\nBODY" -- FLAGS may contain 'r' (reset() afterwards).
#![no_main]
use libfuzzer_sys::fuzz_target;
use upsync_core::conf::{parse_upsync, Credential};
use upsync_core::http::Head;
use upsync_core::registry::kubernetes::Kubernetes;
use upsync_core::registry::{redact, RegistryError, Snapshot, Source};
use upsync_core::servers::ServerSpec;
use upsync_fuzz::{check, split_steps};

const SECRET: &str = "fuzz-secret-token";

/// How an exchange ended, for comparing the two sources.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Again,
    Set,
    Error,
}

fn record(
    r: Result<Option<Snapshot>, RegistryError>,
    source: &dyn Source,
    last: &mut Option<Vec<ServerSpec>>,
) -> Outcome {
    match r {
        Ok(Some(snap)) => {
            check::snapshot(&snap);
            *last = Some(snap.servers);
            Outcome::Set
        }
        Ok(None) => Outcome::Again,
        Err(e) => {
            check::error(&e);
            // (a token is configured only with OPTIONS bit 16; without one, the
            // "secret" in an answer is no secret of this source)
            let shown = redact(&e.to_string(), source);
            assert!(
                source.secrets().is_empty() || !shown.contains(SECRET),
                "{shown}"
            );
            Outcome::Error
        }
    }
}

fn notes(source: &mut dyn Source) {
    if let Some(note) = source.take_note() {
        assert!(!note.contains('\n'), "line break in a note: {note:?}");
        assert!(
            source.secrets().is_empty() || !redact(&note, source).contains(SECRET),
            "{note}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&opts, rest)) = data.split_first() else {
        return;
    };
    let mut args = vec![
        "https://127.0.0.1:6443/prod/web",
        "upsync_type=kubernetes",
        "upsync_timeout=10s",
    ];
    if opts & 1 != 0 {
        args.push("k8s_port=tcp");
    } else if opts & 4 != 0 {
        args.push("k8s_port=8080");
    }
    if opts & 2 != 0 {
        args.push("k8s_protocol=UDP");
    }
    if opts & 8 != 0 {
        args.push("k8s_address_type=IPv6");
    }
    if opts & 16 != 0 {
        args.push("token_file=/nonexistent/upsync-fuzz-token");
    }
    let spec = parse_upsync(&args).unwrap();
    let cred = Credential::Token(SECRET.into());
    let new = || Kubernetes::new(&spec).with_credential(&spec, Some(&cred));
    let (mut a, mut b) = (new(), new());
    let (mut last_a, mut last_b) = (None, None);
    for step in split_steps(rest).into_iter().take(12) {
        let mut parts = step.splitn(3, |&x| x == b'\n');
        let status = parts.next().unwrap_or(b"");
        let flags = parts.next().unwrap_or(b"");
        let body = parts.next().unwrap_or(b"");
        let status: u16 = std::str::from_utf8(status)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(200);
        let head = Head {
            status,
            http11: true,
            headers: vec![("content-type".into(), "application/json".into())],
        };
        for s in [&a, &b] {
            check::next_request(s, &spec.endpoint);
        }
        assert_eq!(
            a.next_request(),
            b.next_request(),
            "the two sources diverged"
        );
        a.start();
        b.start();
        // a: byte by byte, applying what streams out
        let mut end_a = body.len();
        for cut in 0..=body.len() {
            let done = a.on_partial(&head, &body[..cut]);
            if let Some(snap) = a.take_streamed() {
                assert!(!done, "a set handed out with the end of the exchange");
                check::snapshot(&snap);
                last_a = Some(snap.servers);
            }
            notes(&mut a);
            if done {
                end_a = cut;
                break;
            }
        }
        let ra = a.handle(&head, &body[..end_a]);
        let oa = record(ra, &a, &mut last_a);
        // b: in one piece
        let done = b.on_partial(&head, body);
        if let Some(snap) = b.take_streamed() {
            check::snapshot(&snap);
            last_b = Some(snap.servers);
        }
        let _ = done;
        let rb = b.handle(&head, body);
        let ob = record(rb, &b, &mut last_b);
        notes(&mut a);
        notes(&mut b);
        assert_eq!(oa, ob, "streaming changed how the exchange ended");
        assert_eq!(last_a, last_b, "streaming changed the server set");
        let _ = (a.position(), b.position());
        if flags.contains(&b'r') || oa == Outcome::Error {
            a.reset();
            b.reset();
        }
    }
});
