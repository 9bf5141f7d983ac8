//! The health-check directive values, with NGINX Plus's names and defaults:
//! `health_check [interval=5s] [jitter=0] [fails=1] [passes=1] [port=N] [udp] [match=NAME]
//! [mandatory [persistent]]`, `health_check_timeout` (5s) and the `send` / `expect` lines
//! of a `match NAME { }` block, with `\xHH` escapes.

use crate::conf::time::parse_time_ms;

use super::matching::{Expect, MatchRule};

pub const DEFAULT_INTERVAL_MS: u64 = 5_000;
pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;
/// Longest interval, jitter or timeout accepted (as for the other time values).
const MAX_TIME_MS: u64 = 7 * 86_400_000;
/// Largest `fails=` / `passes=`.
const MAX_COUNT: u32 = 1_000_000;

/// One `health_check` directive.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HealthCheckSpec {
    pub interval_ms: u64,
    /// Each probe is delayed by a random time up to this (0: none).
    pub jitter_ms: u64,
    /// Consecutive failed checks that make a healthy server unhealthy.
    pub fails: u32,
    /// Consecutive passed checks that make an unhealthy server healthy again.
    pub passes: u32,
    /// Probe this port instead of the server's own.
    pub port: Option<u16>,
    pub udp: bool,
    pub match_name: Option<String>,
    /// New servers start "checking" (out of traffic) until their first check completes.
    pub mandatory: bool,
    /// The state a server had before `nginx -s reload` is kept (with `mandatory`).
    pub persistent: bool,
}

impl Default for HealthCheckSpec {
    fn default() -> Self {
        HealthCheckSpec {
            interval_ms: DEFAULT_INTERVAL_MS,
            jitter_ms: 0,
            fails: 1,
            passes: 1,
            port: None,
            udp: false,
            match_name: None,
            mandatory: false,
            persistent: false,
        }
    }
}

/// A health-check directive value nginx must refuse. The Display text is the `nginx -t`
/// message; the handler prefixes the directive name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HealthConfError {
    #[error("unknown parameter \"{0}\"; accepted: interval=, jitter=, fails=, passes=, port=, udp, match=, mandatory, persistent")]
    UnknownParam(String),
    #[error("\"{0}\" is given twice")]
    Duplicate(String),
    #[error("invalid {param} \"{value}\": expected an nginx time such as 500ms, 5s or 1m, at most 7d{}", if *.zero_ok { "" } else { ", not 0" })]
    Time {
        param: &'static str,
        value: String,
        zero_ok: bool,
    },
    #[error("invalid {param} \"{value}\": expected a number from 1 to 1000000")]
    Count { param: &'static str, value: String },
    #[error("invalid port \"{0}\": expected a number from 1 to 65535")]
    Port(String),
    #[error("invalid match name \"{0}\": expected the name of a match {{}} block")]
    MatchName(String),
    #[error("\"persistent\" needs \"mandatory\" (health_check ... mandatory persistent)")]
    PersistentWithoutMandatory,
    #[error(
        "invalid \\x escape in \"{0}\": expected \\x followed by two hex digits, such as \\x80"
    )]
    Escape(String),
    #[error("invalid expect: expected \"STRING\", ~ \"REGEX\" or ~* \"REGEX\"")]
    Expect,
    #[error("empty expect string: it would match anything")]
    EmptyExpect,
    #[error("unknown directive \"{0}\" in match {{}}; accepted: send, expect")]
    MatchDirective(String),
    #[error("invalid number of arguments in \"send\": expected one string")]
    SendArgs,
}

fn time(param: &'static str, value: &str, zero_ok: bool) -> Result<u64, HealthConfError> {
    parse_time_ms(value)
        .filter(|&ms| ms <= MAX_TIME_MS && (zero_ok || ms > 0))
        .ok_or_else(|| HealthConfError::Time {
            param,
            value: value.to_string(),
            zero_ok,
        })
}

fn count(param: &'static str, value: &str) -> Result<u32, HealthConfError> {
    value
        .parse::<u32>()
        .ok()
        .filter(|n| (1..=MAX_COUNT).contains(n) && !value.starts_with('+'))
        .ok_or_else(|| HealthConfError::Count {
            param,
            value: value.to_string(),
        })
}

/// Parses the arguments of `health_check` (without the directive name).
pub fn parse_health_check(args: &[&str]) -> Result<HealthCheckSpec, HealthConfError> {
    let mut spec = HealthCheckSpec::default();
    let mut seen: Vec<&str> = Vec::new();
    for arg in args {
        let (key, value) = match arg.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (*arg, None),
        };
        let known = [
            "interval",
            "jitter",
            "fails",
            "passes",
            "port",
            "match",
            "udp",
            "mandatory",
            "persistent",
        ];
        let Some(&name) = known.iter().find(|k| **k == key) else {
            return Err(HealthConfError::UnknownParam(arg.to_string()));
        };
        let flag = matches!(name, "udp" | "mandatory" | "persistent");
        if flag != value.is_none() {
            return Err(HealthConfError::UnknownParam(arg.to_string()));
        }
        if seen.contains(&name) {
            return Err(HealthConfError::Duplicate(if flag {
                name.to_string()
            } else {
                format!("{name}=")
            }));
        }
        seen.push(name);
        let v = value.unwrap_or_default();
        match name {
            "interval" => spec.interval_ms = time("interval", v, false)?,
            "jitter" => spec.jitter_ms = time("jitter", v, true)?,
            "fails" => spec.fails = count("fails", v)?,
            "passes" => spec.passes = count("passes", v)?,
            "port" => {
                spec.port = Some(
                    v.parse::<u16>()
                        .ok()
                        .filter(|p| *p > 0 && !v.starts_with('+'))
                        .ok_or_else(|| HealthConfError::Port(v.to_string()))?,
                )
            }
            "match" => {
                if v.is_empty() || v.contains(|c: char| c.is_whitespace() || c.is_control()) {
                    return Err(HealthConfError::MatchName(v.to_string()));
                }
                spec.match_name = Some(v.to_string());
            }
            "udp" => spec.udp = true,
            "mandatory" => spec.mandatory = true,
            _ => spec.persistent = true,
        }
    }
    if spec.persistent && !spec.mandatory {
        return Err(HealthConfError::PersistentWithoutMandatory);
    }
    Ok(spec)
}

/// Parses `health_check_timeout`'s value (milliseconds, not 0).
pub fn parse_timeout(value: &str) -> Result<u64, HealthConfError> {
    time("timeout", value, false)
}

/// Decodes `\xHH` escapes (two hex digits, either case) into bytes; every other byte,
/// including a backslash that does not start `\x`, is kept as it is (nginx's parser has
/// already turned `\"`, `\\`, `\t`, `\r` and `\n` into their characters).
pub fn decode_escapes(s: &str) -> Result<Vec<u8>, HealthConfError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && b.get(i + 1) == Some(&b'x') {
            let hex = b
                .get(i + 2..i + 4)
                .and_then(|h| std::str::from_utf8(h).ok());
            match hex
                .filter(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                Some(v) => {
                    out.push(v);
                    i += 4;
                    continue;
                }
                None => return Err(HealthConfError::Escape(s.to_string())),
            }
        }
        out.push(b[i]);
        i += 1;
    }
    Ok(out)
}

/// Parses the arguments of `expect` (without the directive name): `"STRING"` (a literal
/// the response starts with, `\xHH` decoded), `~ "REGEX"` or `~* "REGEX"` (case
/// insensitive; PCRE syntax, where `\xHH` is PCRE's own escape).
pub fn parse_expect(args: &[&str]) -> Result<Expect, HealthConfError> {
    match args {
        [lit] => {
            let bytes = decode_escapes(lit)?;
            if bytes.is_empty() {
                return Err(HealthConfError::EmptyExpect);
            }
            Ok(Expect::Literal(bytes))
        }
        [op @ ("~" | "~*"), re] if !re.is_empty() => Ok(Expect::Regex {
            pattern: re.to_string(),
            caseless: *op == "~*",
        }),
        ["~" | "~*", _] => Err(HealthConfError::EmptyExpect),
        _ => Err(HealthConfError::Expect),
    }
}

/// Collects the lines of one `match NAME { }` block.
#[derive(Debug, Clone)]
pub struct MatchBuilder {
    rule: MatchRule,
    send_seen: bool,
}

impl MatchBuilder {
    pub fn new(name: &str) -> MatchBuilder {
        MatchBuilder {
            rule: MatchRule {
                name: name.to_string(),
                send: Vec::new(),
                expect: None,
            },
            send_seen: false,
        }
    }

    /// One line of the block: the directive and its arguments.
    pub fn line(&mut self, directive: &str, args: &[&str]) -> Result<(), HealthConfError> {
        match directive {
            "send" => {
                if self.send_seen {
                    return Err(HealthConfError::Duplicate("send".into()));
                }
                let [s] = args else {
                    return Err(HealthConfError::SendArgs);
                };
                self.rule.send = decode_escapes(s)?;
                self.send_seen = true;
            }
            "expect" => {
                if self.rule.expect.is_some() {
                    return Err(HealthConfError::Duplicate("expect".into()));
                }
                self.rule.expect = Some(parse_expect(args)?);
            }
            other => return Err(HealthConfError::MatchDirective(other.to_string())),
        }
        Ok(())
    }

    pub fn finish(self) -> MatchRule {
        self.rule
    }
}
