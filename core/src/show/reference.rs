//! The one-shot renderers `upstream_show` used before it streamed, kept verbatim as the
//! oracle the streaming renderer is tested against (same bytes for the same views).

use std::fmt::Write as _;

use super::{Format, HealthView, ServerView, ShowRequest, UpstreamView};
use crate::servers::server_line;

fn line(s: &ServerView) -> String {
    server_line(
        &s.address,
        s.weight,
        s.max_fails,
        s.fail_timeout,
        s.max_conns,
        s.backup,
        s.down,
    )
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
            out.push_str(&line(s));
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
    let failures: Vec<(String, String)> = upstreams
        .iter()
        .flat_map(|u| {
            u.servers.iter().filter_map(move |s| {
                let h = s.health.as_ref().filter(|h| !h.last_failure.is_empty())?;
                Some((
                    format!(
                        "upstream=\"{}\",server=\"{}\",reason=\"{}\"",
                        label(&u.name),
                        label(&s.address),
                        label(&h.last_failure)
                    ),
                    "1".to_string(),
                ))
            })
        })
        .collect();
    metric(
        "upsync_server_health_last_failure_info",
        "1, with the reason of the server's last failed health check.",
        "gauge",
        failures,
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
