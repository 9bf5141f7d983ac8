//! The `upsync_lb` directive's methods.

use super::{ConfError, Method};

/// A parsed `upsync_lb`: the method, and the hash key when one was given (the hash
/// methods use `$remote_addr` by default).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LbSpec {
    pub method: Method,
    pub key: Option<String>,
}

impl LbSpec {
    pub const ACCEPTED: &'static str =
        "roundrobin, least_conn, ip_hash, hash_modula [KEY], hash_ketama [KEY], hash KEY [consistent], random [two [least_conn]]";

    /// The method's name as configured, for logs and status.
    pub fn name(&self) -> &'static str {
        match self.method {
            Method::RoundRobin => "roundrobin",
            Method::LeastConn => "least_conn",
            Method::IpHash => "ip_hash",
            Method::HashModula => "hash_modula",
            Method::HashKetama => "hash_ketama",
            Method::Random { two: false } => "random",
            Method::Random { two: true } => "random two",
        }
    }
}

/// Parses the arguments of `upsync_lb` (the C module's five names, plus nginx's own
/// `hash KEY [consistent]` and `random [two [least_conn]]` forms).
pub fn parse_lb(args: &[&str]) -> Result<LbSpec, ConfError> {
    let bad = || ConfError::UnknownLb(args.join(" "));
    let key = |a: Option<&&str>| a.map(|k| k.to_string());
    let spec = match args {
        ["roundrobin" | "round_robin"] => LbSpec {
            method: Method::RoundRobin,
            key: None,
        },
        ["least_conn"] => LbSpec {
            method: Method::LeastConn,
            key: None,
        },
        ["ip_hash"] => LbSpec {
            method: Method::IpHash,
            key: None,
        },
        ["hash_modula", rest @ ..] if rest.len() <= 1 => LbSpec {
            method: Method::HashModula,
            key: key(rest.first()),
        },
        ["hash_ketama", rest @ ..] if rest.len() <= 1 => LbSpec {
            method: Method::HashKetama,
            key: key(rest.first()),
        },
        ["hash", k] => LbSpec {
            method: Method::HashModula,
            key: Some(k.to_string()),
        },
        ["hash", k, "consistent"] => LbSpec {
            method: Method::HashKetama,
            key: Some(k.to_string()),
        },
        ["random"] => LbSpec {
            method: Method::Random { two: false },
            key: None,
        },
        ["random", "two"] | ["random", "two", "least_conn"] => LbSpec {
            method: Method::Random { two: true },
            key: None,
        },
        _ => return Err(bad()),
    };
    if spec.key.as_deref() == Some("") {
        return Err(bad());
    }
    Ok(spec)
}
