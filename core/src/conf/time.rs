//! nginx time and size syntax (`500ms`, `1m30s`, `6m`, `10`; `1m`, `512k`), parsed the way
//! `ngx_parse_time` / `ngx_parse_size` do, so a value means the same here as in any other
//! nginx directive.

/// Parses an nginx time value into milliseconds. A bare number means seconds.
/// Units must appear from largest to smallest (`1h30m`, not `30m1h`).
pub fn parse_time_ms(s: &str) -> Option<u64> {
    // Units in decreasing order; a unit may only follow a larger one.
    const UNITS: &[(&str, u64)] = &[
        ("y", 365 * 86_400_000),
        ("M", 30 * 86_400_000),
        ("w", 7 * 86_400_000),
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("ms", 1),
        ("m", 60_000),
        ("s", 1000),
    ];
    // rank of each unit in nginx's order (ms is the smallest)
    fn rank(unit: &str) -> u8 {
        match unit {
            "y" => 1,
            "M" => 2,
            "w" => 3,
            "d" => 4,
            "h" => 5,
            "m" => 6,
            "s" => 7,
            _ => 8, // ms
        }
    }
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut rest = s;
    let mut total: u64 = 0;
    let mut last_rank = 0u8;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let value: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        if rest.is_empty() {
            // bare trailing number: seconds, only after units larger than seconds
            if last_rank >= rank("s") {
                return None;
            }
            let t = total.checked_add(value.checked_mul(1000)?)?;
            return (t <= i64::MAX as u64).then_some(t);
        }
        let (unit, scale) = UNITS.iter().find(|(u, _)| rest.starts_with(u))?;
        let r = rank(unit);
        if r <= last_rank {
            return None;
        }
        last_rank = r;
        rest = rest[unit.len()..].trim_start_matches(' ');
        total = total.checked_add(value.checked_mul(*scale)?)?;
    }
    if total > i64::MAX as u64 {
        return None;
    }
    Some(total)
}

/// Parses an nginx size (`1024`, `64k`, `4m`) into bytes.
pub fn parse_size(s: &str) -> Option<usize> {
    let (num, scale) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1024usize),
        b'm' | b'M' => (&s[..s.len() - 1], 1024 * 1024),
        b'g' | b'G' => (&s[..s.len() - 1], 1024 * 1024 * 1024),
        _ => (s, 1),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    num.parse::<usize>().ok()?.checked_mul(scale)
}

/// Renders milliseconds the shortest way nginx would accept back (`500ms`, `5s`, `6m`).
pub fn format_ms(ms: u64) -> String {
    if ms % 60_000 == 0 && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_like_nginx() {
        let cases: &[(&str, Option<u64>)] = &[
            ("500ms", Some(500)),
            ("5s", Some(5000)),
            ("5", Some(5000)),
            ("6m", Some(360_000)),
            ("1m30s", Some(90_000)),
            ("1h", Some(3_600_000)),
            ("1d", Some(86_400_000)),
            ("1m 30s", Some(90_000)),
            ("1m500ms", Some(60_500)),
            ("0", Some(0)),
            ("0s", Some(0)),
            ("", None),
            ("s", None),
            ("5x", None),
            ("-5s", None),
            ("30s1m", None),
            ("5ss", None),
            ("1.5s", None),
            ("5s5", None),
            ("9223372036854775807", None),
            ("99999999999999999999s", None),
        ];
        for (input, want) in cases {
            assert_eq!(parse_time_ms(input), *want, "input {input:?}");
        }
    }

    #[test]
    fn sizes_like_nginx() {
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("4M"), Some(4 << 20));
        assert_eq!(parse_size("k"), None);
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("1t"), None);
        assert_eq!(parse_size(""), None);
    }

    #[test]
    fn format_round_trips() {
        for ms in [0u64, 500, 1000, 5000, 60_000, 360_000, 90_000, 1500] {
            assert_eq!(parse_time_ms(&format_ms(ms)), Some(ms));
        }
    }
}
