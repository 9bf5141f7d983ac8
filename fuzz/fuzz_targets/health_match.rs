//! Health checks (upsync_core::health): `health_check` arguments, `match` lines with
//! `\xHH` escapes, and the judging of answers that arrive in arbitrary pieces. No panic;
//! a literal `expect` passes exactly when the answer starts with it, and a verdict
//! reached on a prefix holds for the whole answer; the pass/fail counters follow the
//! thresholds (one of them is always 0, a state changes only at its threshold).
#![no_main]
use libfuzzer_sys::fuzz_target;
use upsync_core::health::{
    decode_escapes, parse_health_check, Change, Expect, Health, HealthState, MatchBuilder,
    RegexMatch, Thresholds, Verdict,
};

/// A stand-in for PCRE: the pattern as a substring.
struct Contains(Vec<u8>);

impl RegexMatch for Contains {
    fn is_match(&self, data: &[u8]) -> bool {
        self.0.is_empty() || data.windows(self.0.len()).any(|w| w == self.0.as_slice())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    // health_check arguments
    let args: Vec<&str> = text.split(' ').collect();
    if let Ok(spec) = parse_health_check(&args) {
        assert!(spec.interval_ms > 0 && spec.fails >= 1 && spec.passes >= 1);
        assert!(!spec.persistent || spec.mandatory);
    }
    let _ = decode_escapes(&text);
    // a match block from the first line, an answer from the rest, cut into pieces
    let (line, answer) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let line = String::from_utf8_lossy(line);
    let words: Vec<&str> = line.split(' ').collect();
    let mut b = MatchBuilder::new("m");
    if b.line("expect", &words).is_err() {
        return;
    }
    let rule = b.finish();
    let re = match &rule.expect {
        Some(Expect::Regex { pattern, .. }) => Contains(pattern.as_bytes().to_vec()),
        _ => Contains(Vec::new()),
    };
    let step = (mode as usize % 7) + 1;
    let mut seen = 0;
    let mut decided: Option<bool> = None;
    while seen < answer.len() {
        seen = (seen + step).min(answer.len());
        match rule.judge(&answer[..seen], false, Some(&re)) {
            Verdict::Pass => {
                decided.get_or_insert(true);
            }
            Verdict::Fail(_) => {
                decided.get_or_insert(false);
            }
            Verdict::More => assert!(decided.is_none() || !matches!(rule.expect, Some(Expect::Literal(_)))),
        }
    }
    let whole = rule.judge(answer, true, Some(&re));
    if let Some(Expect::Literal(lit)) = &rule.expect {
        assert_eq!(whole == Verdict::Pass, answer.starts_with(lit));
        if let Some(d) = decided {
            assert_eq!(d, whole == Verdict::Pass, "a verdict on a prefix holds");
        }
    }
    // thresholds and transitions, driven by the answer's bits
    let th = Thresholds {
        fails: (mode % 4) as u32 + 1,
        passes: (mode / 4 % 4) as u32 + 1,
    };
    let mut h = Health::new(if mode & 0x80 != 0 {
        HealthState::Checking
    } else {
        HealthState::Up
    });
    for (i, &byte) in answer.iter().enumerate() {
        let was = h;
        let change = h.record(byte & 1 == 1, th, i as u64);
        assert!(h.passes == 0 || h.fails == 0);
        assert_eq!(h.checks, was.checks + 1);
        match change {
            Change::Unhealthy => assert!(
                was.state == HealthState::Checking || h.fails >= th.fails
            ),
            Change::Healthy { .. } => assert!(
                was.state == HealthState::Checking || h.passes >= th.passes
            ),
            Change::Unchanged => assert_eq!(h.state, was.state),
        }
    }
});
