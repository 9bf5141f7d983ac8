//! The `upstream_show` report: the C module's text (byte-compatible, the default), JSON
//! (`GET /?format=json`) and Prometheus text exposition (`GET /metrics`), optionally
//! for one upstream (`?upstream=NAME`).

use std::fmt::Write as _;

/// One server as the report shows it.
#[derive(Debug, Clone, Default)]
pub struct ServerView {
    /// The C module's `server ...;` line (text format).
    pub line: String,
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

/// The text body: `Upstream name: NAME; Backend server count: N`, the servers indented by
/// eight spaces, a blank line after each upstream; `No upstreams defined` when there are
/// none.
pub fn render_text(upstreams: &[UpstreamView]) -> String {
    if upstreams.is_empty() {
        return "No upstreams defined\n".to_string();
    }
    let mut out = String::new();
    for u in upstreams {
        let _ = writeln!(
            out,
            "Upstream name: {}; Backend server count: {}",
            u.name,
            u.servers.len()
        );
        for s in &u.servers {
            out.push_str("        ");
            out.push_str(&s.line);
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

pub fn render_json(upstreams: &[UpstreamView]) -> String {
    use serde_json::{json, Map, Value};
    let mut ups = Map::new();
    for u in upstreams {
        let servers: Vec<Value> = u
            .servers
            .iter()
            .map(|s| {
                json!({
                    "server": s.address,
                    "weight": s.weight,
                    "max_fails": s.max_fails,
                    "fail_timeout": s.fail_timeout,
                    "max_conns": s.max_conns,
                    "backup": s.backup,
                    "down": s.down,
                    "state": s.state(),
                    "failed_until": s.failed_until,
                    "active": s.active,
                    "fails": s.fails,
                    "connections": s.total,
                    "health": s.health.as_ref().map(health_json),
                })
            })
            .collect();
        let mut obj = Map::new();
        obj.insert("servers".into(), Value::Array(servers));
        obj.insert("server_count".into(), json!(u.servers.len()));
        if let Some(src) = &u.source {
            obj.insert(
                "upsync".into(),
                json!({
                    "type": src.kind,
                    "registry": src.address,
                    "registry_in_use": if src.in_use.is_empty() { Value::Null } else { json!(src.in_use) },
                    "lb": src.lb,
                    "index": src.position,
                    "last_sync": if src.last_sync_ms > 0 { json!(src.last_sync_ms as f64 / 1000.0) } else { Value::Null },
                    "last_change": if src.last_change_ms > 0 { json!(src.last_change_ms as f64 / 1000.0) } else { Value::Null },
                    "last_error": if src.last_error.is_empty() { Value::Null } else { json!(src.last_error) },
                    "consecutive_failures": src.consecutive_failures,
                    "generation": src.generation,
                    "updates": src.updates,
                    "poller_pid": src.poller_pid,
                    "skipped_count": src.skipped_count,
                    "skipped": src.skipped.iter().map(|(k, c)| json!({"key": k, "cause": c})).collect::<Vec<_>>(),
                    "memory": {
                        "used": src.memory_used,
                        "cap": if src.memory_cap > 0 { json!(src.memory_cap) } else { Value::Null },
                        "zone_free": src.zone_free,
                        "zone_size": src.zone_size,
                    },
                }),
            );
        }
        ups.insert(u.name.clone(), Value::Object(obj));
    }
    let mut s = serde_json::to_string_pretty(&json!({ "upstreams": ups })).unwrap_or_default();
    s.push('\n');
    s
}

fn health_json(h: &HealthView) -> serde_json::Value {
    use serde_json::{json, Value};
    json!({
        "state": h.state,
        "consecutive_passes": h.consecutive_passes,
        "consecutive_fails": h.consecutive_fails,
        "last_check": if h.last_check_ms > 0 { json!(h.last_check_ms as f64 / 1000.0) } else { Value::Null },
        "last_failure": if h.last_failure.is_empty() { Value::Null } else { json!(h.last_failure) },
        "checks": h.checks,
        "checks_failed": h.checks_failed,
    })
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render_prometheus(upstreams: &[UpstreamView]) -> String {
    let mut out = String::new();
    let mut metric = |name: &str, help: &str, kind: &str, rows: Vec<(String, String)>| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in rows {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    };
    let per_upstream = |f: &dyn Fn(&UpstreamView) -> Option<String>| -> Vec<(String, String)> {
        upstreams
            .iter()
            .filter_map(|u| f(u).map(|v| (format!("upstream=\"{}\"", label(&u.name)), v)))
            .collect()
    };
    let per_server = |f: &dyn Fn(&ServerView) -> String| -> Vec<(String, String)> {
        upstreams
            .iter()
            .flat_map(|u| {
                u.servers
                    .iter()
                    .map(|s| {
                        (
                            format!(
                                "upstream=\"{}\",server=\"{}\"",
                                label(&u.name),
                                label(&s.address)
                            ),
                            f(s),
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    metric(
        "upsync_upstream_servers",
        "Servers in the upstream.",
        "gauge",
        per_upstream(&|u| Some(u.servers.len().to_string())),
    );
    metric(
        "upsync_upstream_generation",
        "Generation of the synced server set.",
        "gauge",
        per_upstream(&|u| u.source.as_ref().map(|s| s.generation.to_string())),
    );
    metric(
        "upsync_upstream_updates_total",
        "Server set changes applied from the registry.",
        "counter",
        per_upstream(&|u| u.source.as_ref().map(|s| s.updates.to_string())),
    );
    metric(
        "upsync_upstream_skipped_entries",
        "Registry entries that are not valid servers (skipped; the others apply).",
        "gauge",
        per_upstream(&|u| u.source.as_ref().map(|s| s.skipped_count.to_string())),
    );
    metric(
        "upsync_upstream_memory_bytes",
        "Shared memory the upstream uses (servers, their state, the plan).",
        "gauge",
        per_upstream(&|u| u.source.as_ref().map(|s| s.memory_used.to_string())),
    );
    if let Some(src) = upstreams.iter().find_map(|u| u.source.as_ref()) {
        metric(
            "upsync_shared_zone_free_bytes",
            "Free memory in the shared zone all upsync upstreams use.",
            "gauge",
            vec![(String::new(), src.zone_free.to_string())],
        );
        metric(
            "upsync_shared_zone_size_bytes",
            "Size of the shared zone (upsync_zone_size).",
            "gauge",
            vec![(String::new(), src.zone_size.to_string())],
        );
    }
    metric(
        "upsync_upstream_index",
        "Registry index or revision of the last successful read.",
        "gauge",
        per_upstream(&|u| u.source.as_ref().map(|s| s.position.to_string())),
    );
    metric(
        "upsync_upstream_consecutive_failures",
        "Failed registry exchanges since the last success.",
        "gauge",
        per_upstream(&|u| {
            u.source
                .as_ref()
                .map(|s| s.consecutive_failures.to_string())
        }),
    );
    metric(
        "upsync_upstream_last_sync_timestamp_seconds",
        "Time of the last successful registry read.",
        "gauge",
        per_upstream(&|u| {
            u.source
                .as_ref()
                .map(|s| format!("{:.3}", s.last_sync_ms as f64 / 1000.0))
        }),
    );
    metric(
        "upsync_server_weight",
        "Configured weight.",
        "gauge",
        per_server(&|s| s.weight.to_string()),
    );
    metric(
        "upsync_server_active_connections",
        "Open connections, all workers.",
        "gauge",
        per_server(&|s| s.active.to_string()),
    );
    metric(
        "upsync_server_connections_total",
        "Connections handed to the server.",
        "counter",
        per_server(&|s| s.total.to_string()),
    );
    metric(
        "upsync_server_fails",
        "Failures in the current fail_timeout window.",
        "gauge",
        per_server(&|s| s.fails.to_string()),
    );
    let per_checked = |f: &dyn Fn(&HealthView) -> String| -> Vec<(String, String)> {
        upstreams
            .iter()
            .flat_map(|u| {
                u.servers
                    .iter()
                    .filter_map(|s| {
                        s.health.as_ref().map(|h| {
                            (
                                format!(
                                    "upstream=\"{}\",server=\"{}\"",
                                    label(&u.name),
                                    label(&s.address)
                                ),
                                f(h),
                            )
                        })
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    metric(
        "upsync_server_health_checks_total",
        "Active health checks of the server.",
        "counter",
        per_checked(&|h| h.checks.to_string()),
    );
    metric(
        "upsync_server_health_checks_failed_total",
        "Active health checks of the server that failed.",
        "counter",
        per_checked(&|h| h.checks_failed.to_string()),
    );
    metric(
        "upsync_server_health_consecutive_passes",
        "Passed health checks in a row.",
        "gauge",
        per_checked(&|h| h.consecutive_passes.to_string()),
    );
    metric(
        "upsync_server_health_consecutive_fails",
        "Failed health checks in a row.",
        "gauge",
        per_checked(&|h| h.consecutive_fails.to_string()),
    );
    metric(
        "upsync_server_health_last_check_timestamp_seconds",
        "When the last health check completed (0: never).",
        "gauge",
        per_checked(&|h| format!("{:.3}", h.last_check_ms as f64 / 1000.0)),
    );
    let health: Vec<(String, String)> = upstreams
        .iter()
        .flat_map(|u| {
            u.servers.iter().flat_map(move |s| {
                let h = s.health.as_ref();
                ["up", "unhealthy", "checking"]
                    .into_iter()
                    .filter(move |_| h.is_some())
                    .map(move |st| {
                        (
                            format!(
                                "upstream=\"{}\",server=\"{}\",health=\"{st}\"",
                                label(&u.name),
                                label(&s.address)
                            ),
                            u8::from(h.is_some_and(|h| h.state == st)).to_string(),
                        )
                    })
            })
        })
        .collect();
    metric(
        "upsync_server_health",
        "1 for the server's active health-check state.",
        "gauge",
        health,
    );
    let states: Vec<(String, String)> = upstreams
        .iter()
        .flat_map(|u| {
            u.servers.iter().flat_map(move |s| {
                ["up", "down", "backup", "failed"]
                    .into_iter()
                    .map(move |st| {
                        (
                            format!(
                                "upstream=\"{}\",server=\"{}\",state=\"{st}\"",
                                label(&u.name),
                                label(&s.address)
                            ),
                            u8::from(s.state() == st).to_string(),
                        )
                    })
            })
        })
        .collect();
    metric(
        "upsync_server_state",
        "1 for the server's current state.",
        "gauge",
        states,
    );
    out
}

/// The response for a request: the C module's head (same headers, same order).
pub fn render(req: &ShowRequest, upstreams: &[UpstreamView]) -> Vec<u8> {
    let (body, ctype, status) = match &req.upstream {
        Some(n) if !upstreams.iter().any(|u| &u.name == n) => (
            format!("No upstream named \"{n}\"\n"),
            "text/plain",
            "404 Not Found",
        ),
        _ => {
            let selected: Vec<UpstreamView> = match &req.upstream {
                Some(n) => upstreams.iter().filter(|u| &u.name == n).cloned().collect(),
                None => upstreams.to_vec(),
            };
            match req.format {
                Format::Text => (render_text(&selected), "text/plain", "200 OK"),
                Format::Json => (render_json(&selected), "application/json", "200 OK"),
                Format::Prometheus => (
                    render_prometheus(&selected),
                    "text/plain; version=0.0.4",
                    "200 OK",
                ),
            }
        }
    };
    let mut out = format!(
        "HTTP/1.0 {status}\r\nServer: nginx\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn views() -> Vec<UpstreamView> {
        let s1 = ServerView {
            line: "server 127.0.0.1:8088 weight=40 max_fails=2 fail_timeout=10s;".into(),
            address: "127.0.0.1:8088".into(),
            weight: 40,
            max_fails: 2,
            fail_timeout: 10,
            active: 3,
            total: 10,
            ..Default::default()
        };
        let s2 = ServerView {
            line: "server 127.0.0.1:8089 weight=20 max_fails=0 fail_timeout=30s;".into(),
            address: "127.0.0.1:8089".into(),
            weight: 20,
            fail_timeout: 30,
            failed_until: Some(1_700_000_030),
            health: Some(HealthView {
                state: "unhealthy",
                consecutive_fails: 2,
                last_check_ms: 1_700_000_001_500,
                last_failure: "connect refused".into(),
                checks: 9,
                checks_failed: 3,
                ..Default::default()
            }),
            ..Default::default()
        };
        vec![UpstreamView {
            name: "test".into(),
            servers: vec![s1, s2],
            source: Some(SourceView {
                kind: "consul".into(),
                address: "127.0.0.1:8500/v1/kv/upstreams/test/".into(),
                generation: 7,
                ..Default::default()
            }),
        }]
    }

    #[test]
    fn text_matches_reference_layout() {
        let body = render_text(&views());
        assert_eq!(
            body,
            "Upstream name: test; Backend server count: 2\n        server 127.0.0.1:8088 weight=40 max_fails=2 fail_timeout=10s;\n        server 127.0.0.1:8089 weight=20 max_fails=0 fail_timeout=30s;\n\n"
        );
        let resp = String::from_utf8(render(&ShowRequest::default(), &views())).unwrap();
        assert!(
            resp.starts_with("HTTP/1.0 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\n")
        );
        assert!(resp.contains(&format!(
            "Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )));
        assert!(resp.ends_with(&body));
        assert_eq!(render_text(&[]), "No upstreams defined\n");
    }

    #[test]
    fn requests() {
        let r = |s: &str| parse_request(s.as_bytes());
        assert_eq!(r("GET / HTTP/1.0"), ShowRequest::default());
        assert_eq!(r("GET /upstream_list HTTP/1.1").format, Format::Text);
        assert_eq!(r("GET /?format=json HTTP/1.1").format, Format::Json);
        assert_eq!(r("GET /metrics HTTP/1.1").format, Format::Prometheus);
        assert_eq!(r("GET /status.json HTTP/1.1").format, Format::Json);
        let q = r("GET /?format=json&upstream=my%20up HTTP/1.1");
        assert_eq!(
            (q.format, q.upstream.as_deref()),
            (Format::Json, Some("my up"))
        );
        assert_eq!(r(""), ShowRequest::default());
        assert_eq!(r("garbage"), ShowRequest::default());
        assert_eq!(
            r("GET /?upstream=%zz HTTP/1.1").upstream.as_deref(),
            Some("%zz")
        );
    }

    #[test]
    fn json_and_prometheus() {
        let j: serde_json::Value = serde_json::from_str(&render_json(&views())).unwrap();
        let t = &j["upstreams"]["test"];
        assert_eq!(t["server_count"], 2);
        assert_eq!(t["servers"][0]["active"], 3);
        assert_eq!(t["servers"][1]["state"], "failed");
        assert_eq!(t["upsync"]["generation"], 7);
        assert_eq!(t["upsync"]["last_error"], serde_json::Value::Null);
        assert_eq!(t["servers"][0]["health"], serde_json::Value::Null);
        let h = &t["servers"][1]["health"];
        assert_eq!(h["state"], "unhealthy");
        assert_eq!(h["consecutive_fails"], 2);
        assert_eq!(h["consecutive_passes"], 0);
        assert_eq!(h["last_check"], 1_700_000_001.5);
        assert_eq!(h["last_failure"], "connect refused");
        assert_eq!(
            (h["checks"].as_u64(), h["checks_failed"].as_u64()),
            (Some(9), Some(3))
        );
        let p = render_prometheus(&views());
        assert!(p.contains("upsync_upstream_servers{upstream=\"test\"} 2\n"));
        assert!(p.contains(
            "upsync_server_active_connections{upstream=\"test\",server=\"127.0.0.1:8088\"} 3\n"
        ));
        assert!(p.contains(
            "upsync_server_state{upstream=\"test\",server=\"127.0.0.1:8089\",state=\"failed\"} 1\n"
        ));
        assert!(p.contains("# TYPE upsync_server_connections_total counter\n"));
        assert!(p.contains(
            "upsync_server_health{upstream=\"test\",server=\"127.0.0.1:8089\",health=\"unhealthy\"} 1\n"
        ));
        assert!(p.contains(
            "upsync_server_health{upstream=\"test\",server=\"127.0.0.1:8089\",health=\"up\"} 0\n"
        ));
        assert!(p.contains(
            "upsync_server_health_checks_failed_total{upstream=\"test\",server=\"127.0.0.1:8089\"} 3\n"
        ));
        assert!(p.contains("upsync_server_health_last_check_timestamp_seconds{upstream=\"test\",server=\"127.0.0.1:8089\"} 1700000001.500\n"));
        // servers of upstreams without checks have no health series
        assert!(!p.contains("upsync_server_health{upstream=\"test\",server=\"127.0.0.1:8088\""));
        // the text view is unchanged by health data
        assert!(!render_text(&views()).contains("unhealthy"));
        let filtered = String::from_utf8(render(
            &ShowRequest {
                format: Format::Json,
                upstream: Some("nope".into()),
            },
            &views(),
        ))
        .unwrap();
        assert!(filtered.starts_with("HTTP/1.0 404 Not Found\r\n"));
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
