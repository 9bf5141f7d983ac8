//! The JSON report written in pieces, in serde_json's pretty layout (two-space indent,
//! object keys in the sorted order its map keeps), so that the pieces of a streamed
//! report join into the document `serde_json::to_string_pretty` makes of the whole.

use std::io::Write as _;

use serde_json::{json, Value};

use super::{HealthView, ServerView, SourceView};

/// A JSON string (quoted, escaped).
fn string(out: &mut Vec<u8>, s: &str) {
    let _ = serde_json::to_writer(&mut *out, s);
}

/// Milliseconds as seconds (`1700000001.5`), null for 0 (never).
fn seconds_or_null(out: &mut Vec<u8>, ms: u64) {
    if ms > 0 {
        let _ = serde_json::to_writer(&mut *out, &(ms as f64 / 1000.0));
    } else {
        out.extend_from_slice(b"null");
    }
}

/// The document's start: `{"upstreams": {`.
pub fn begin(out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\n  \"upstreams\": {");
}

/// The document's end; `any`: at least one upstream was written.
pub fn end(out: &mut Vec<u8>, any: bool) {
    if any {
        out.extend_from_slice(b"\n  }\n}\n");
    } else {
        out.extend_from_slice(b"}\n}\n");
    }
}

/// An upstream's key, its `server_count` and the opening of its `servers` array.
pub fn upstream_open(out: &mut Vec<u8>, first: bool, name: &str, server_count: usize) {
    if !first {
        out.push(b',');
    }
    out.extend_from_slice(b"\n    ");
    string(out, name);
    let _ = write!(
        out,
        ": {{\n      \"server_count\": {server_count},\n      \"servers\": ["
    );
}

/// One element of `servers`; `first`: the array's first.
pub fn server(out: &mut Vec<u8>, first: bool, s: &ServerView) {
    if !first {
        out.push(b',');
    }
    const I: &str = "\n          ";
    let _ = write!(
        out,
        "\n        {{{I}\"active\": {},{I}\"backup\": {},{I}\"connections\": {},{I}\"down\": {},{I}\"fail_timeout\": {},{I}\"failed_until\": ",
        s.active, s.backup, s.total, s.down, s.fail_timeout
    );
    match s.failed_until {
        Some(t) => {
            let _ = write!(out, "{t}");
        }
        None => out.extend_from_slice(b"null"),
    }
    let _ = write!(out, ",{I}\"fails\": {},{I}\"health\": ", s.fails);
    match &s.health {
        Some(h) => health(out, h),
        None => out.extend_from_slice(b"null"),
    }
    let _ = write!(
        out,
        ",{I}\"max_conns\": {},{I}\"max_fails\": {},{I}\"server\": ",
        s.max_conns, s.max_fails
    );
    string(out, &s.address);
    let _ = write!(
        out,
        ",{I}\"state\": \"{}\",{I}\"weight\": {}\n        }}",
        s.state(),
        s.weight
    );
}

/// A server's `health` object (at the depth of a server's fields).
fn health(out: &mut Vec<u8>, h: &HealthView) {
    const I: &str = "\n            ";
    let _ = write!(
        out,
        "{{{I}\"checks\": {},{I}\"checks_failed\": {},{I}\"consecutive_fails\": {},{I}\"consecutive_passes\": {},{I}\"last_check\": ",
        h.checks, h.checks_failed, h.consecutive_fails, h.consecutive_passes
    );
    seconds_or_null(out, h.last_check_ms);
    let _ = write!(out, ",{I}\"last_failure\": ");
    if h.last_failure.is_empty() {
        out.extend_from_slice(b"null");
    } else {
        string(out, &h.last_failure);
    }
    let _ = write!(out, ",{I}\"state\": ");
    string(out, h.state);
    out.extend_from_slice(b"\n          }");
}

/// Closes the `servers` array (`written` elements), adds the `upsync` object of a
/// synced upstream and closes the upstream.
pub fn upstream_close(out: &mut Vec<u8>, written: usize, source: Option<&SourceView>) {
    if written == 0 {
        out.push(b']');
    } else {
        out.extend_from_slice(b"\n      ]");
    }
    if let Some(src) = source {
        out.extend_from_slice(b",\n      \"upsync\": ");
        let text = serde_json::to_string_pretty(&source_value(src)).unwrap_or_default();
        // nested six spaces deep (JSON strings hold no raw newline)
        for (k, line) in text.split('\n').enumerate() {
            if k > 0 {
                out.extend_from_slice(b"\n      ");
            }
            out.extend_from_slice(line.as_bytes());
        }
    }
    out.extend_from_slice(b"\n    }");
}

fn source_value(src: &SourceView) -> Value {
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
    })
}
