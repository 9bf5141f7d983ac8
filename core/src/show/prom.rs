//! The Prometheus text exposition of the report: its metric families in order, each a
//! `# HELP`/`# TYPE` header and its rows. Per-upstream families are written from the
//! upstreams' heads; per-server families one batch of servers at a time (all of a
//! family's rows stay together, as the format requires).

use std::io::Write as _;

use super::{HealthView, ServerView, SourceView, UpstreamHead};

/// Where a family's rows come from.
pub enum Rows {
    /// One row per upstream that has a value.
    Upstream(fn(&UpstreamHead) -> Option<u64>),
    /// The same, a time in milliseconds written as seconds.
    UpstreamSeconds(fn(&UpstreamHead) -> Option<u64>),
    /// One row without labels, from the first synced upstream (the shared zone).
    Zone(fn(&SourceView) -> u64),
    /// One row per server.
    Server(fn(&ServerView) -> u64),
    /// One row per server the health check knows.
    Checked(fn(&HealthView) -> u64),
    /// The same, a time in milliseconds written as seconds.
    CheckedSeconds(fn(&HealthView) -> u64),
    /// Three rows per server the health check knows: 1 for its state.
    Health,
    /// One row per server whose health check has failed: its last reason as a label.
    LastFailure,
    /// Four rows per server: 1 for its state.
    State,
}

impl Rows {
    /// Rows per server: the family walks the servers.
    pub fn per_server(&self) -> bool {
        !matches!(
            self,
            Rows::Upstream(_) | Rows::UpstreamSeconds(_) | Rows::Zone(_)
        )
    }

    /// Rows only for servers with health views.
    pub fn needs_health(&self) -> bool {
        matches!(
            self,
            Rows::Checked(_) | Rows::CheckedSeconds(_) | Rows::Health | Rows::LastFailure
        )
    }
}

pub struct Family {
    pub name: &'static str,
    help: &'static str,
    kind: &'static str,
    pub rows: Rows,
}

const fn gauge(name: &'static str, help: &'static str, rows: Rows) -> Family {
    Family {
        name,
        help,
        kind: "gauge",
        rows,
    }
}

const fn counter(name: &'static str, help: &'static str, rows: Rows) -> Family {
    Family {
        name,
        help,
        kind: "counter",
        rows,
    }
}

/// Every family, in output order.
pub static FAMILIES: [Family; 22] = [
    gauge(
        "upsync_upstream_servers",
        "Servers in the upstream.",
        Rows::Upstream(|u| Some(u.server_count as u64)),
    ),
    gauge(
        "upsync_upstream_generation",
        "Generation of the synced server set.",
        Rows::Upstream(|u| u.source.as_ref().map(|s| s.generation)),
    ),
    counter(
        "upsync_upstream_updates_total",
        "Server set changes applied from the registry.",
        Rows::Upstream(|u| u.source.as_ref().map(|s| s.updates)),
    ),
    gauge(
        "upsync_upstream_skipped_entries",
        "Registry entries that are not valid servers (skipped; the others apply).",
        Rows::Upstream(|u| u.source.as_ref().map(|s| s.skipped_count)),
    ),
    gauge(
        "upsync_upstream_memory_bytes",
        "Shared memory the upstream uses (servers, their state, the plan).",
        Rows::Upstream(|u| u.source.as_ref().map(|s| s.memory_used)),
    ),
    gauge(
        "upsync_shared_zone_free_bytes",
        "Free memory in the shared zone all upsync upstreams use.",
        Rows::Zone(|s| s.zone_free),
    ),
    gauge(
        "upsync_shared_zone_size_bytes",
        "Size of the shared zone (upsync_zone_size).",
        Rows::Zone(|s| s.zone_size),
    ),
    gauge(
        "upsync_upstream_index",
        "Registry index or revision of the last successful read.",
        Rows::Upstream(|u| u.source.as_ref().map(|s| s.position)),
    ),
    gauge(
        "upsync_upstream_consecutive_failures",
        "Failed registry exchanges since the last success.",
        Rows::Upstream(|u| u.source.as_ref().map(|s| s.consecutive_failures)),
    ),
    gauge(
        "upsync_upstream_last_sync_timestamp_seconds",
        "Time of the last successful registry read.",
        Rows::UpstreamSeconds(|u| u.source.as_ref().map(|s| s.last_sync_ms)),
    ),
    gauge(
        "upsync_server_weight",
        "Configured weight.",
        Rows::Server(|s| s.weight as u64),
    ),
    gauge(
        "upsync_server_active_connections",
        "Open connections, all workers.",
        Rows::Server(|s| s.active as u64),
    ),
    counter(
        "upsync_server_connections_total",
        "Connections handed to the server.",
        Rows::Server(|s| s.total),
    ),
    gauge(
        "upsync_server_fails",
        "Failures in the current fail_timeout window.",
        Rows::Server(|s| s.fails as u64),
    ),
    counter(
        "upsync_server_health_checks_total",
        "Active health checks of the server.",
        Rows::Checked(|h| h.checks),
    ),
    counter(
        "upsync_server_health_checks_failed_total",
        "Active health checks of the server that failed.",
        Rows::Checked(|h| h.checks_failed),
    ),
    gauge(
        "upsync_server_health_consecutive_passes",
        "Passed health checks in a row.",
        Rows::Checked(|h| h.consecutive_passes as u64),
    ),
    gauge(
        "upsync_server_health_consecutive_fails",
        "Failed health checks in a row.",
        Rows::Checked(|h| h.consecutive_fails as u64),
    ),
    gauge(
        "upsync_server_health_last_check_timestamp_seconds",
        "When the last health check completed (0: never).",
        Rows::CheckedSeconds(|h| h.last_check_ms),
    ),
    gauge(
        "upsync_server_health",
        "1 for the server's active health-check state.",
        Rows::Health,
    ),
    gauge(
        "upsync_server_health_last_failure_info",
        "1, with the reason of the server's last failed health check.",
        Rows::LastFailure,
    ),
    gauge(
        "upsync_server_state",
        "1 for the server's current state.",
        Rows::State,
    ),
];

/// A label value, escaped.
pub fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn header(out: &mut Vec<u8>, f: &Family) {
    let _ = write!(
        out,
        "# HELP {} {}\n# TYPE {} {}\n",
        f.name, f.help, f.name, f.kind
    );
}

fn seconds(out: &mut Vec<u8>, ms: u64) {
    let _ = write!(out, "{:.3}", ms as f64 / 1000.0);
}

/// The rows of a per-upstream or zone family, from every selected upstream's head.
pub fn upstream_rows(out: &mut Vec<u8>, f: &Family, heads: &[UpstreamHead]) {
    match f.rows {
        Rows::Upstream(get) | Rows::UpstreamSeconds(get) => {
            for h in heads {
                let Some(v) = get(h) else { continue };
                let _ = write!(out, "{}{{upstream=\"{}\"}} ", f.name, label(&h.name));
                if matches!(f.rows, Rows::UpstreamSeconds(_)) {
                    seconds(out, v);
                } else {
                    let _ = write!(out, "{v}");
                }
                out.push(b'\n');
            }
        }
        Rows::Zone(get) => {
            if let Some(src) = heads.iter().find_map(|h| h.source.as_ref()) {
                let _ = writeln!(out, "{}{{}} {}", f.name, get(src));
            }
        }
        _ => {}
    }
}

/// Whether a per-upstream or zone family has a header (the one-shot rendering writes
/// the zone families only when some upstream is synced).
pub fn has_header(f: &Family, heads: &[UpstreamHead]) -> bool {
    match f.rows {
        Rows::Zone(_) => heads.iter().any(|h| h.source.is_some()),
        _ => true,
    }
}

/// The rows of a per-server family for one server; `up`: its upstream's label.
pub fn server_rows(out: &mut Vec<u8>, f: &Family, up: &str, s: &ServerView) {
    let start = |out: &mut Vec<u8>| {
        let _ = write!(
            out,
            "{}{{upstream=\"{up}\",server=\"{}\"",
            f.name,
            label(&s.address)
        );
    };
    match f.rows {
        Rows::Server(get) => {
            start(out);
            let _ = writeln!(out, "}} {}", get(s));
        }
        Rows::Checked(get) | Rows::CheckedSeconds(get) => {
            let Some(h) = &s.health else { return };
            start(out);
            out.extend_from_slice(b"} ");
            if matches!(f.rows, Rows::CheckedSeconds(_)) {
                seconds(out, get(h));
            } else {
                let _ = write!(out, "{}", get(h));
            }
            out.push(b'\n');
        }
        Rows::Health => {
            let Some(h) = &s.health else { return };
            for st in ["up", "unhealthy", "checking"] {
                start(out);
                let _ = writeln!(out, ",health=\"{st}\"}} {}", u8::from(h.state == st));
            }
        }
        Rows::LastFailure => {
            let Some(h) = s.health.as_ref().filter(|h| !h.last_failure.is_empty()) else {
                return;
            };
            start(out);
            let _ = writeln!(out, ",reason=\"{}\"}} 1", label(&h.last_failure));
        }
        Rows::State => {
            let state = s.state();
            for st in ["up", "down", "backup", "failed"] {
                start(out);
                let _ = writeln!(out, ",state=\"{st}\"}} {}", u8::from(state == st));
            }
        }
        _ => {}
    }
}
