//! Unit tests of the Kubernetes source, with the helpers that build API objects:
//! `stream` (list, watch events as they arrive, 410 in both forms, quiet watch ends),
//! `data` (slice merge, port selection, endpoint conditions, bad data, token rotation).

mod data;
mod stream;

use serde_json::{json, Value};

use super::*;
use crate::conf::parse_upsync;

pub fn head(status: u16) -> Head {
    Head {
        status,
        http11: true,
        headers: vec![],
    }
}

pub fn source(extra: &[&str]) -> Kubernetes {
    let mut args = vec!["https://127.0.0.1:6443/prod/web", "upsync_type=kubernetes"];
    args.extend_from_slice(extra);
    Kubernetes::new(&parse_upsync(&args).unwrap())
}

/// An endpoint: `state` r = ready, d = serving + terminating, n = not ready,
/// t = terminating and not serving, "" = no conditions at all.
pub fn ep(addr: &str, state: &str) -> Value {
    let conditions = match state {
        "r" => json!({"ready": true, "serving": true, "terminating": false}),
        "d" => json!({"ready": false, "serving": true, "terminating": true}),
        "n" => json!({"ready": false, "serving": false, "terminating": false}),
        "t" => json!({"ready": false, "serving": false, "terminating": true}),
        _ => Value::Null,
    };
    let mut e =
        json!({"addresses": [addr], "targetRef": {"kind": "Pod", "name": format!("pod-{addr}")}});
    if !conditions.is_null() {
        e["conditions"] = conditions;
    }
    e
}

pub fn slice_obj(name: &str, rv: &str, family: &str, ports: Value, endpoints: Vec<Value>) -> Value {
    json!({
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"name": name, "namespace": "prod", "resourceVersion": rv,
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": family,
        "ports": ports,
        "endpoints": endpoints,
    })
}

pub fn http_port(n: u16) -> Value {
    json!([{"name": "http", "port": n, "protocol": "TCP"}])
}

pub fn list(rv: &str, items: Vec<Value>) -> Vec<u8> {
    json!({"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
           "metadata": {"resourceVersion": rv}, "items": items})
    .to_string()
    .into_bytes()
}

pub fn event(kind: &str, obj: Value) -> Vec<u8> {
    let mut v = json!({"type": kind, "object": obj})
        .to_string()
        .into_bytes();
    v.push(b'\n');
    v
}

pub fn lines(snap: &Snapshot) -> Vec<String> {
    snap.servers.iter().map(ServerSpec::line).collect()
}

/// A source that has listed `items` at resourceVersion 100 and now watches.
pub fn watching(extra: &[&str], items: Vec<Value>) -> (Kubernetes, Snapshot) {
    let mut s = source(extra);
    s.start();
    let snap = s.handle(&head(200), &list("100", items)).unwrap().unwrap();
    (s, snap)
}
