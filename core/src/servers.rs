//! The server-set model: one `ServerSpec` per backend, as the registry describes it, with
//! nginx's defaults and limits; validation of registry values; and the `server ...;` line
//! that both the dump file and `upstream_show` print.

use std::fmt::Write as _;
use std::net::SocketAddr;

use crate::conf::time::parse_time_ms;

/// nginx's defaults for a `server` line, which the C module also applies to registry values.
pub const DEFAULT_WEIGHT: u32 = 1;
pub const DEFAULT_MAX_FAILS: u32 = 2;
pub const DEFAULT_FAIL_TIMEOUT: u32 = 10;

/// Upper bounds for registry values: anything an operator would write, and far from
/// overflow in the balancer's arithmetic (weight sums over 100,000 servers). Larger
/// weights are invalid entries (a 10,000:1 ratio is more than any set needs).
pub const MAX_WEIGHT: u32 = 10_000;
/// The largest weight a registry's own scale maps to (Nacos: float weights x 100). The
/// balancer bounds what any weight costs (schedule, ring, tables).
pub const MAX_MAPPED_WEIGHT: u32 = 1_000_000;
pub const MAX_COUNT: u32 = 1_000_000;
pub const MAX_FAIL_TIMEOUT: u32 = 365 * 86_400;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerSpec {
    /// Canonical `ip:port` or `[ipv6]:port`.
    pub addr: SocketAddr,
    pub weight: u32,
    pub max_fails: u32,
    /// Seconds.
    pub fail_timeout: u32,
    pub max_conns: u32,
    pub down: bool,
    pub backup: bool,
    /// Seconds over which a new or recovered server's share ramps up (0: none). Not part
    /// of the `server` line: stock nginx does not accept it there.
    pub slow_start: u32,
}

impl ServerSpec {
    pub fn new(addr: SocketAddr) -> Self {
        ServerSpec {
            addr,
            weight: DEFAULT_WEIGHT,
            max_fails: DEFAULT_MAX_FAILS,
            fail_timeout: DEFAULT_FAIL_TIMEOUT,
            max_conns: 0,
            down: false,
            backup: false,
            slow_start: 0,
        }
    }

    /// The C module's line shape (see `server_line`).
    pub fn line(&self) -> String {
        server_line(
            &self.addr.to_string(),
            self.weight,
            self.max_fails,
            self.fail_timeout as i64,
            self.max_conns,
            self.backup,
            self.down,
        )
    }
}

/// `server ADDR weight=W max_fails=F fail_timeout=Ts[ max_conns=N][ backup][ down];` —
/// `max_conns` and `backup` only when set, so output for plain servers is byte-identical
/// to the C module's.
pub fn server_line(
    name: &str,
    weight: u32,
    max_fails: u32,
    fail_timeout: i64,
    max_conns: u32,
    backup: bool,
    down: bool,
) -> String {
    let mut s = String::with_capacity(80);
    let _ = write!(
        s,
        "server {name} weight={weight} max_fails={max_fails} fail_timeout={fail_timeout}s"
    );
    if max_conns > 0 {
        let _ = write!(s, " max_conns={max_conns}");
    }
    if backup {
        s.push_str(" backup");
    }
    if down {
        s.push_str(" down");
    }
    s.push(';');
    s
}

/// Untrusted text made safe for a log line: control characters shown as `.`, at most
/// `max` bytes (cut on a character boundary) with `...` when cut.
pub fn printable(text: &str, max: usize) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { '.' } else { c })
        .collect();
    if out.len() > max {
        let mut cut = max;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str("...");
    }
    out
}

/// Why one registry entry could not become a server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("invalid server address \"{0}\" (expected ip:port or [ipv6]:port; host names are not resolved)")]
    Address(String),
    #[error("invalid value for \"{key}\": {value} ({expected})")]
    Attribute {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("value is not a JSON object: {0}")]
    NotObject(String),
    #[error("invalid port {0} (expected 1 to 65535)")]
    Port(String),
}

/// Parses a server address as registries store it: `ip:port`, `[ipv6]:port`, or the same
/// with `%3A` for the colon (some Consul versions reject `:` in keys).
pub fn parse_addr(raw: &str) -> Result<SocketAddr, SpecError> {
    let s = raw.trim();
    let decoded;
    let s = if s.contains("%3A") || s.contains("%3a") {
        decoded = s.replace("%3A", ":").replace("%3a", ":");
        decoded.as_str()
    } else {
        s
    };
    match s.parse::<SocketAddr>() {
        Ok(a) if a.port() != 0 => Ok(a),
        _ => Err(SpecError::Address(printable(raw, 128))),
    }
}

pub(crate) fn attr_err(
    key: &'static str,
    v: &serde_json::Value,
    expected: &'static str,
) -> SpecError {
    SpecError::Attribute {
        key,
        value: printable(&v.to_string(), 64),
        expected,
    }
}

/// What `weight` accepts (kept in step with `MAX_WEIGHT`).
const WEIGHT_RANGE: &str = "an integer from 1 to 10000";

/// An integer attribute: a JSON number or a string of digits, within `min..=max`.
fn int_attr(
    key: &'static str,
    v: &serde_json::Value,
    min: u32,
    max: u32,
) -> Result<u32, SpecError> {
    let expected = if key == "weight" {
        WEIGHT_RANGE
    } else if min > 0 {
        "a positive integer"
    } else {
        "a non-negative integer"
    };
    let n = match v {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse::<u64>().ok()
        }
        _ => None,
    };
    match n {
        Some(n) if n >= min as u64 && n <= max as u64 => Ok(n as u32),
        _ => Err(attr_err(key, v, expected)),
    }
}

/// `fail_timeout`: seconds as a number, or any nginx time string ("10", "10s", "1m").
fn time_attr(key: &'static str, v: &serde_json::Value) -> Result<u32, SpecError> {
    let expected = "seconds, or an nginx time such as \"10s\"";
    let secs = match v {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => parse_time_ms(s).map(|ms| ms / 1000),
        _ => None,
    };
    match secs {
        Some(s) if s <= MAX_FAIL_TIMEOUT as u64 => Ok(s as u32),
        _ => Err(attr_err(key, v, expected)),
    }
}

/// A flag: 0/1, true/false, or those as strings.
fn bool_attr(key: &'static str, v: &serde_json::Value) -> Result<bool, SpecError> {
    match v {
        serde_json::Value::Bool(b) => Ok(*b),
        serde_json::Value::Number(n) if n.as_u64() == Some(0) => Ok(false),
        serde_json::Value::Number(n) if n.as_u64() == Some(1) => Ok(true),
        serde_json::Value::String(s) => match s.as_str() {
            "0" | "false" | "off" | "" => Ok(false),
            "1" | "true" | "on" => Ok(true),
            _ => Err(attr_err(key, v, "0, 1, true or false")),
        },
        serde_json::Value::Null => Ok(false),
        _ => Err(attr_err(key, v, "0, 1, true or false")),
    }
}

/// Applies a registry value (a JSON object of attributes; empty means all defaults) to a
/// server. Unknown attributes are ignored, so newer writers do not break older readers.
pub fn apply_json_attrs(spec: &mut ServerSpec, value: &[u8]) -> Result<(), SpecError> {
    let trimmed = value.trim_ascii();
    if trimmed.is_empty() {
        return Ok(());
    }
    let v: serde_json::Value =
        serde_json::from_slice(trimmed).map_err(|e| SpecError::NotObject(format!("{e}")))?;
    let obj = match v {
        serde_json::Value::Object(o) => o,
        serde_json::Value::Null => return Ok(()),
        other => return Err(SpecError::NotObject(printable(&other.to_string(), 64))),
    };
    apply_json_object(spec, &obj)
}

/// Applies the attributes of a JSON object already parsed (a registry value's, or the
/// part of a larger document that carries them), as `apply_json_attrs`.
pub fn apply_json_object(
    spec: &mut ServerSpec,
    obj: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), SpecError> {
    for (k, v) in obj {
        match k.as_str() {
            "weight" => spec.weight = int_attr("weight", v, 1, MAX_WEIGHT)?,
            "max_fails" => spec.max_fails = int_attr("max_fails", v, 0, MAX_COUNT)?,
            "max_conns" => spec.max_conns = int_attr("max_conns", v, 0, MAX_COUNT)?,
            "fail_timeout" => spec.fail_timeout = time_attr("fail_timeout", v)?,
            "slow_start" => spec.slow_start = time_attr("slow_start", v)?,
            "down" => spec.down = bool_attr("down", v)?,
            "backup" => spec.backup = bool_attr("backup", v)?,
            _ => {}
        }
    }
    Ok(())
}

/// Applies Consul service tags: `weight=N`, `max_fails=N`, `max_conns=N`,
/// `fail_timeout=10s`, `slow_start=30s`, `down`, `backup`. Other tags are ignored.
pub fn apply_tags<'a>(
    spec: &mut ServerSpec,
    tags: impl IntoIterator<Item = &'a str>,
) -> Result<(), SpecError> {
    for tag in tags {
        let (k, v) = match tag.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (tag.trim(), None),
        };
        let js = |v: Option<&str>| serde_json::Value::String(v.unwrap_or("").to_string());
        match (k, v) {
            ("weight", v) => spec.weight = int_attr("weight", &js(v), 1, MAX_WEIGHT)?,
            ("max_fails", v) => spec.max_fails = int_attr("max_fails", &js(v), 0, MAX_COUNT)?,
            ("max_conns", v) => spec.max_conns = int_attr("max_conns", &js(v), 0, MAX_COUNT)?,
            ("fail_timeout", v) => spec.fail_timeout = time_attr("fail_timeout", &js(v))?,
            ("slow_start", v) => spec.slow_start = time_attr("slow_start", &js(v))?,
            ("down", None) => spec.down = true,
            ("backup", None) => spec.backup = true,
            ("down", v) => spec.down = bool_attr("down", &js(v))?,
            ("backup", v) => spec.backup = bool_attr("backup", &js(v))?,
            _ => {}
        }
    }
    Ok(())
}

/// Puts a freshly parsed server list into canonical form: sorted by address, one entry per
/// address (the first one wins). Returns the addresses that were dropped as duplicates.
pub fn normalize(servers: &mut Vec<ServerSpec>) -> Vec<SocketAddr> {
    servers.sort_by_key(|s| s.addr);
    let mut dups = Vec::new();
    servers.dedup_by(|b, a| {
        if a.addr == b.addr {
            dups.push(b.addr);
            true
        } else {
            false
        }
    });
    dups
}

/// What changed between two normalized sets, for the log line of an update.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    pub added: usize,
    pub removed: usize,
    pub changed: usize,
}

impl Diff {
    pub fn between(old: &[ServerSpec], new: &[ServerSpec]) -> Diff {
        let mut d = Diff::default();
        let (mut i, mut j) = (0, 0);
        while i < old.len() || j < new.len() {
            match (old.get(i), new.get(j)) {
                (Some(a), Some(b)) if a.addr == b.addr => {
                    if a != b {
                        d.changed += 1;
                    }
                    i += 1;
                    j += 1;
                }
                (Some(a), Some(b)) if a.addr < b.addr => {
                    d.removed += 1;
                    i += 1;
                }
                (Some(_), None) => {
                    d.removed += 1;
                    i += 1;
                }
                _ => {
                    d.added += 1;
                    j += 1;
                }
            }
        }
        d
    }

    pub fn is_empty(&self) -> bool {
        *self == Diff::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(addr: &str) -> ServerSpec {
        ServerSpec::new(parse_addr(addr).unwrap())
    }

    #[test]
    fn addresses() {
        assert_eq!(
            parse_addr("127.0.0.1:8080").unwrap().to_string(),
            "127.0.0.1:8080"
        );
        assert_eq!(parse_addr("[::1]:8080").unwrap().to_string(), "[::1]:8080");
        assert_eq!(
            parse_addr("127.0.0.1%3A8080").unwrap().to_string(),
            "127.0.0.1:8080"
        );
        for bad in [
            "localhost:80",
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:70000",
            "",
            "::1:80",
            "1.2.3:80",
            "a b:1",
        ] {
            assert!(parse_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn line_format_matches_c_module() {
        let mut s = spec("127.0.0.1:8088");
        s.weight = 40;
        s.max_fails = 3;
        s.fail_timeout = 20;
        s.down = true;
        assert_eq!(
            s.line(),
            "server 127.0.0.1:8088 weight=40 max_fails=3 fail_timeout=20s down;"
        );
        let s = spec("127.0.0.1:8089");
        assert_eq!(
            s.line(),
            "server 127.0.0.1:8089 weight=1 max_fails=2 fail_timeout=10s;"
        );
        let mut s = spec("[::1]:1");
        s.backup = true;
        s.max_conns = 5;
        assert_eq!(
            s.line(),
            "server [::1]:1 weight=1 max_fails=2 fail_timeout=10s max_conns=5 backup;"
        );
    }

    /// weight, max_fails, fail_timeout, down, backup
    type Attrs = (u32, u32, u32, bool, bool);

    #[test]
    fn json_attributes() {
        let cases: &[(&str, Result<Attrs, ()>)] = &[
            ("", Ok((1, 2, 10, false, false))),
            ("{}", Ok((1, 2, 10, false, false))),
            ("null", Ok((1, 2, 10, false, false))),
            (
                r#"{"weight":40,"max_fails":3,"fail_timeout":20,"down":1}"#,
                Ok((40, 3, 20, true, false)),
            ),
            (
                r#"{"weight":"5","fail_timeout":"10s"}"#,
                Ok((5, 2, 10, false, false)),
            ),
            (r#"{"fail_timeout":"1m"}"#, Ok((1, 2, 60, false, false))),
            (r#"{"slow_start":"30s"}"#, Ok((1, 2, 10, false, false))),
            (r#"{"down":true,"backup":"1"}"#, Ok((1, 2, 10, true, true))),
            (r#"{"down":0}"#, Ok((1, 2, 10, false, false))),
            (r#"{"max_fails":0}"#, Ok((1, 0, 10, false, false))),
            (r#"{"other":"x"}"#, Ok((1, 2, 10, false, false))),
            (r#"{"weight":0}"#, Err(())),
            (r#"{"weight":-1}"#, Err(())),
            (r#"{"weight":1.5}"#, Err(())),
            (r#"{"weight":99999999999999999999}"#, Err(())),
            (r#"{"weight":"abc"}"#, Err(())),
            (r#"{"down":2}"#, Err(())),
            (r#"{"fail_timeout":"soon"}"#, Err(())),
            (r#"{"fail_timeout":-3}"#, Err(())),
            (r#"[1,2]"#, Err(())),
            (r#"{"weight":"#, Err(())),
            ("42", Err(())),
        ];
        for (input, want) in cases {
            let mut s = spec("127.0.0.1:1");
            let got = apply_json_attrs(&mut s, input.as_bytes())
                .map(|_| (s.weight, s.max_fails, s.fail_timeout, s.down, s.backup))
                .map_err(|_| ());
            assert_eq!(&got, want, "input {input}");
        }
    }

    #[test]
    fn hostile_text_is_clipped_and_printable() {
        // multi-byte characters at the cut, control characters (log forging)
        let mut s = spec("127.0.0.1:1");
        let v = format!(r#"{{"weight":"{}"}}"#, "é".repeat(100));
        let e = apply_json_attrs(&mut s, v.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("..."), "{e}");
        let e = parse_addr("1.2.3.4:80\n2026/01/01 [emerg] forged")
            .unwrap_err()
            .to_string();
        assert!(!e.contains('\n'), "{e}");
        assert_eq!(printable("a\u{7}b", 10), "a.b");
        assert!(apply_json_attrs(&mut s, "[\"é\"]".repeat(40).as_bytes()).is_err());
    }

    #[test]
    fn tags() {
        let mut s = spec("127.0.0.1:1");
        apply_tags(
            &mut s,
            [
                "weight=3",
                "fail_timeout=20s",
                "down",
                "primary",
                "max_conns=7",
            ],
        )
        .unwrap();
        assert_eq!(
            (s.weight, s.fail_timeout, s.down, s.max_conns),
            (3, 20, true, 7)
        );
        assert!(apply_tags(&mut s, ["weight=0"]).is_err());
        assert!(apply_tags(&mut s, ["weight=x"]).is_err());
    }

    #[test]
    fn normalize_and_diff() {
        let mut v = vec![
            spec("127.0.0.1:3"),
            spec("127.0.0.1:1"),
            spec("127.0.0.1:3"),
        ];
        let dups = normalize(&mut v);
        assert_eq!(dups.len(), 1);
        assert_eq!(
            v.iter().map(|s| s.addr.port()).collect::<Vec<_>>(),
            vec![1, 3]
        );
        let mut new = vec![spec("127.0.0.1:2"), spec("127.0.0.1:3")];
        new[1].weight = 5;
        assert_eq!(
            Diff::between(&v, &new),
            Diff {
                added: 1,
                removed: 1,
                changed: 1
            }
        );
        assert!(Diff::between(&v, &v).is_empty());
        assert_eq!(
            Diff::between(&[], &v),
            Diff {
                added: 2,
                removed: 0,
                changed: 0
            }
        );
    }
}
