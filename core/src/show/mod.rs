//! The `upstream_show` report: the C module's text (byte-compatible, the default), JSON
//! (`GET /?format=json`) and Prometheus text exposition (`GET /metrics`), optionally
//! for one upstream (`?upstream=NAME`). The views and the request live here; the
//! report is rendered a slice at a time by `stream::Renderer` (`json`, `prom` hold the
//! format details).

mod json;
mod prom;
#[cfg(test)]
mod reference;
mod stream;
#[cfg(test)]
mod tests;

pub use stream::{resume_index, Batch, Cursor, Renderer, ShowSource, UpstreamHead, Views};

use crate::servers::server_line;

/// One server as the report shows it.
#[derive(Debug, Clone, Default)]
pub struct ServerView {
    /// `ip:port` (or the name nginx gave a configured server).
    pub address: String,
    pub weight: u32,
    pub max_fails: u32,
    pub fail_timeout: i64,
    pub max_conns: u32,
    pub down: bool,
    pub backup: bool,
    pub active: u32,
    pub fails: u32,
    pub total: u64,
    /// Failed (max_fails reached) until this time, seconds since the epoch.
    pub failed_until: Option<i64>,
    /// The active health check's view of the server (None: the upstream has none).
    pub health: Option<HealthView>,
}

/// What the active health check knows about one server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthView {
    /// `up`, `unhealthy` or `checking`.
    pub state: &'static str,
    pub consecutive_passes: u32,
    pub consecutive_fails: u32,
    /// When the last check completed (ms since the epoch; 0: never).
    pub last_check_ms: u64,
    /// Why the last failed check failed (empty: none yet).
    pub last_failure: String,
    pub checks: u64,
    pub checks_failed: u64,
}

impl ServerView {
    /// The C module's `server ...;` line (text format).
    pub fn line(&self) -> String {
        server_line(
            &self.address,
            self.weight,
            self.max_fails,
            self.fail_timeout,
            self.max_conns,
            self.backup,
            self.down,
        )
    }

    pub fn state(&self) -> &'static str {
        if self.down {
            "down"
        } else if self.failed_until.is_some() {
            "failed"
        } else if self.backup {
            "backup"
        } else {
            "up"
        }
    }
}

/// Where an upsync upstream's servers come from, and how syncing goes.
#[derive(Debug, Clone, Default)]
pub struct SourceView {
    pub kind: String,
    pub address: String,
    /// The registry address that answered last (a member of a failover list).
    pub in_use: String,
    pub lb: String,
    /// Consul index / etcd index or revision of the last successful read.
    pub position: u64,
    pub last_sync_ms: u64,
    pub last_change_ms: u64,
    pub last_error: String,
    pub consecutive_failures: u64,
    pub generation: u64,
    pub updates: u64,
    /// Polling worker's pid (0: none right now).
    pub poller_pid: i64,
    /// Registry entries the last answer skipped (key, cause; at most 100 listed) and
    /// how many there were.
    pub skipped: Vec<(String, String)>,
    pub skipped_count: u64,
    /// Shared memory: what this upstream uses (bytes), its cap (`zone_size=`, 0:
    /// none), and the whole `upsync` zone's free bytes and size.
    pub memory_used: u64,
    pub memory_cap: u64,
    pub zone_free: u64,
    pub zone_size: u64,
}

/// One upstream as the report shows it.
#[derive(Debug, Clone, Default)]
pub struct UpstreamView {
    pub name: String,
    pub servers: Vec<ServerView>,
    /// None for upstreams nginx balances itself.
    pub source: Option<SourceView>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
    Prometheus,
}

/// What a client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShowRequest {
    pub format: Format,
    pub upstream: Option<String>,
}

impl Default for ShowRequest {
    fn default() -> Self {
        ShowRequest {
            format: Format::Text,
            upstream: None,
        }
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads the request line (`GET /metrics?upstream=x HTTP/1.1`). Anything that is not a
/// recognizable request asks for the default text report, as the C module answered
/// every connection with it.
pub fn parse_request(line: &[u8]) -> ShowRequest {
    let text = String::from_utf8_lossy(line);
    let mut words = text.split_ascii_whitespace();
    let target = match (words.next(), words.next()) {
        (Some(_method), Some(t)) => t,
        _ => return ShowRequest::default(),
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut req = ShowRequest::default();
    if path.trim_end_matches('/').ends_with("/metrics") {
        req.format = Format::Prometheus;
    } else if path.trim_end_matches('/').ends_with(".json")
        || path.trim_end_matches('/').ends_with("/json")
    {
        req.format = Format::Json;
    }
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "format" => {
                req.format = match v {
                    "json" => Format::Json,
                    "prometheus" | "metrics" => Format::Prometheus,
                    _ => Format::Text,
                }
            }
            "upstream" if !v.is_empty() => req.upstream = Some(percent_decode(v)),
            _ => {}
        }
    }
    req
}

/// The whole response for `req` over views in memory, with its Content-Length (what the
/// streaming renderer sends, produced in one call).
pub fn render(req: &ShowRequest, upstreams: &[UpstreamView]) -> Vec<u8> {
    let mut src = Views(upstreams);
    let mut r = Renderer::new(req, &mut src, usize::MAX).hold_all();
    let mut out = Vec::new();
    while !r.step(&mut src, &mut out) {}
    out
}
