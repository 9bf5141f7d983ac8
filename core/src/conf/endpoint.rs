//! Registry addresses: `[https://]HOST[:PORT][,HOST[:PORT]...]/PATH` and what it
//! resolves to.

use std::fmt;

use super::ConfError;

/// One registry address: a host name or IP literal (without brackets) and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl HostPort {
    /// `host:port` as sent in the Host header and shown in logs.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Where a registry lives: `[http://|https://]HOST[:PORT][,HOST[:PORT]...]/PATH[?QUERY]`.
/// Several hosts form a failover list, tried in order. The port is 80 when omitted (as
/// in the C module), 443 with `https://`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// At least one; the first is tried first.
    pub hosts: Vec<HostPort>,
    /// `https://`: TLS to the registry.
    pub tls: bool,
    /// Path with its leading `/`, without the query.
    pub path: String,
    /// The user's own query parameters (without `?`), kept and sent along.
    pub query: String,
}

impl Endpoint {
    /// Every address, comma-separated, as configured.
    pub fn authorities(&self) -> String {
        self.hosts
            .iter()
            .map(HostPort::authority)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.tls {
            f.write_str("https://")?;
        }
        write!(f, "{}{}", self.authorities(), self.path)?;
        if !self.query.is_empty() {
            write!(f, "?{}", self.query)?;
        }
        Ok(())
    }
}

/// One resolved registry address and the configured host it came from (an index into
/// `Endpoint::hosts`, for the Host header and the TLS name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub addr: std::net::SocketAddr,
    pub host: usize,
}

/// Most registry addresses in one failover list.
pub const MAX_HOSTS: usize = 16;

pub(super) fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && (host.parse::<std::net::Ipv6Addr>().is_ok()
            || host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_'))
}

/// One `HOST[:PORT]` of the address list.
fn parse_host_port(hostport: &str, default_port: u16, arg: &str) -> Result<HostPort, ConfError> {
    let bad = || ConfError::Address(arg.to_string());
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(bad)?;
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad());
        }
        match after {
            "" => (h, None),
            p if p.starts_with(':') => (h, Some(&p[1..])),
            _ => return Err(bad()),
        }
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.contains(':') && !hostport.starts_with('[') || !valid_host(host) {
        return Err(bad());
    }
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(ConfError::Port(arg.to_string())),
        },
    };
    Ok(HostPort {
        host: host.to_string(),
        port,
    })
}

/// Splits `[http://|https://]HOST[:PORT][,HOST[:PORT]...]/PATH[?QUERY]`.
pub fn parse_endpoint(arg: &str) -> Result<Endpoint, ConfError> {
    let (tls, rest) = match arg.strip_prefix("https://") {
        Some(r) => (true, r),
        None => (false, arg.strip_prefix("http://").unwrap_or(arg)),
    };
    let slash = rest
        .find('/')
        .ok_or_else(|| ConfError::Address(arg.to_string()))?;
    let (hostlist, path_query) = rest.split_at(slash);
    let (path, query) = match path_query.split_once('?') {
        Some((p, q)) => (p, q),
        None => (path_query, ""),
    };
    // No spaces or control characters anywhere in what goes on the request line: they
    // would let a configuration inject headers into registry requests.
    let unsafe_byte = |b: u8| b <= b' ' || b == 0x7f;
    if hostlist.is_empty()
        || path.len() < 2
        || path.bytes().any(unsafe_byte)
        || query.bytes().any(unsafe_byte)
    {
        return Err(ConfError::Address(arg.to_string()));
    }
    let default_port = if tls { 443 } else { 80 };
    let hosts = hostlist
        .split(',')
        .map(|hp| parse_host_port(hp, default_port, arg))
        .collect::<Result<Vec<_>, _>>()?;
    if hosts.len() > MAX_HOSTS {
        return Err(ConfError::TooManyHosts(arg.to_string()));
    }
    Ok(Endpoint {
        hosts,
        tls,
        path: path.to_string(),
        query: query.to_string(),
    })
}
