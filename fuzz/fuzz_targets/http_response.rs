//! The incremental HTTP response parser (net::http::ResponseParser): the input is cut into
//! pieces at points chosen by the fuzzer and fed piece by piece, then EOF. Whatever the
//! cuts, the outcome must be the same as feeding everything at once (differential), the
//! body must respect the limit, and a complete response stays complete.
#![no_main]
use libfuzzer_sys::fuzz_target;
use upsync_core::http::{HttpError, ResponseParser};

#[derive(Debug, PartialEq)]
enum Outcome {
    Done { status: u16, body: Vec<u8>, keep_alive: bool },
    /// Still waiting after EOF was not sent (streaming, or the peer has more to say).
    Partial,
    Err(std::mem::Discriminant<HttpError>),
}

fn run(data: &[u8], cuts: &[usize], limit: usize, send_eof: bool) -> Outcome {
    let mut p = ResponseParser::new(limit);
    let mut start = 0;
    let mut points: Vec<usize> = cuts.iter().map(|&c| c.min(data.len())).collect();
    points.sort_unstable();
    points.push(data.len());
    for end in points {
        if end < start {
            continue;
        }
        match p.feed(&data[start..end]) {
            Ok(true) => {
                assert!(p.is_done());
                assert!(p.head().is_some());
            }
            Ok(false) => assert!(!p.is_done()),
            Err(e) => {
                let _ = e.to_string();
                return Outcome::Err(std::mem::discriminant(&e));
            }
        }
        assert!(p.body().len() <= limit, "body over the limit");
        start = end;
    }
    if !p.is_done() {
        if !send_eof {
            return Outcome::Partial;
        }
        if let Err(e) = p.eof() {
            return Outcome::Err(std::mem::discriminant(&e));
        }
    }
    assert!(p.is_done());
    let head = p.head().expect("a complete response has a head");
    assert!(!(100..200).contains(&head.status), "1xx returned as final");
    Outcome::Done {
        status: head.status,
        body: p.body().to_vec(),
        keep_alive: p.keep_alive(),
    }
}

fuzz_target!(|input: &[u8]| {
    // layout: [n_cuts][flags][cuts: n x u16 LE][data]
    if input.len() < 2 {
        return;
    }
    let n = (input[0] % 8) as usize;
    let flags = input[1];
    let rest = &input[2..];
    if rest.len() < n * 2 {
        return;
    }
    let (cut_bytes, data) = rest.split_at(n * 2);
    let cuts: Vec<usize> = cut_bytes
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]) as usize)
        .collect();
    let limit = if flags & 1 == 0 { 1 << 20 } else { 64 };
    let eof = flags & 2 == 0;
    let whole = run(data, &[], limit, eof);
    let split = run(data, &cuts, limit, eof);
    // One byte at a time, the worst case for the line-oriented states.
    let bytes: Vec<usize> = (1..data.len().min(512)).collect();
    let dribble = if data.len() <= 512 { Some(run(data, &bytes, limit, eof)) } else { None };
    assert_eq!(whole, split, "cuts {cuts:?} change the outcome");
    if let Some(d) = dribble {
        assert_eq!(whole, d, "byte-by-byte feeding changes the outcome");
    }
});
