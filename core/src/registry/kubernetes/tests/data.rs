//! Slices and endpoints: merge, ports, conditions, families, bad data; token rotation.

use serde_json::{json, Value};

use super::*;
use crate::registry::redact;

#[test]
fn three_slices_merge_by_name_and_address() {
    let (_, snap) = watching(
        &[],
        vec![
            slice_obj(
                "web-a",
                "1",
                "IPv4",
                http_port(8080),
                vec![ep("10.0.0.1", "r"), ep("10.0.0.2", "d")],
            ),
            slice_obj(
                "web-b",
                "2",
                "IPv4",
                http_port(8080),
                vec![ep("10.0.0.3", "r")],
            ),
            // the same Pod listed twice while it moves between slices: ready wins
            slice_obj(
                "web-c",
                "3",
                "IPv4",
                http_port(8080),
                vec![ep("10.0.0.2", "r"), ep("10.0.0.4", "n")],
            ),
        ],
    );
    assert_eq!(snap.duplicates, 0);
    assert_eq!(
        lines(&snap),
        vec![
            "server 10.0.0.1:8080 weight=1 max_fails=2 fail_timeout=10s;",
            "server 10.0.0.2:8080 weight=1 max_fails=2 fail_timeout=10s;",
            "server 10.0.0.3:8080 weight=1 max_fails=2 fail_timeout=10s;",
        ]
    );
}

#[test]
fn endpoint_conditions() {
    let (_, snap) = watching(
        &[],
        vec![slice_obj(
            "web-a",
            "1",
            "IPv4",
            http_port(8080),
            vec![
                ep("10.0.0.1", "r"),
                ep("10.0.0.2", "d"),
                ep("10.0.0.3", "n"),
                ep("10.0.0.4", "t"),
                ep("10.0.0.5", ""),
            ],
        )],
    );
    assert_eq!(
        lines(&snap),
        vec![
            "server 10.0.0.1:8080 weight=1 max_fails=2 fail_timeout=10s;",
            "server 10.0.0.2:8080 weight=1 max_fails=2 fail_timeout=10s down;",
            "server 10.0.0.5:8080 weight=1 max_fails=2 fail_timeout=10s;",
        ]
    );
    // serving absent: as ready (not ready, terminating -> left out)
    let spec = source(&[]).spec;
    let only_terminating =
        json!({"addresses": ["10.0.0.6"], "conditions": {"ready": false, "terminating": true}});
    let s = slice::parse_slice(
        &slice_obj("x", "1", "IPv4", http_port(1), vec![only_terminating]),
        &spec,
    )
    .unwrap()
    .unwrap();
    assert!(s.servers.is_empty());
}

#[test]
fn ports_per_slice_by_name_number_and_protocol() {
    let two = json!([{"name": "http", "port": 8080, "protocol": "TCP"},
                     {"name": "dns", "port": 53, "protocol": "UDP"},
                     {"name": "metrics", "port": 9090}]);
    let parse = |extra: &[&str], ports: &Value| {
        let spec = source(extra).spec;
        slice::parse_slice(
            &slice_obj(
                "web-a",
                "1",
                "IPv4",
                ports.clone(),
                vec![ep("10.0.0.1", "r")],
            ),
            &spec,
        )
    };
    let port = |extra: &[&str], ports: &Value| {
        parse(extra, ports)
            .unwrap()
            .unwrap()
            .servers
            .first()
            .map(|s| s.addr.port())
    };
    assert_eq!(port(&["k8s_port=http"], &two), Some(8080));
    assert_eq!(
        port(&["k8s_port=metrics"], &two),
        Some(9090),
        "protocol absent = TCP"
    );
    assert_eq!(port(&["k8s_port=dns", "k8s_protocol=UDP"], &two), Some(53));
    assert_eq!(port(&["k8s_port=dns"], &two), None, "dns is UDP");
    assert_eq!(port(&["k8s_port=9090"], &two), Some(9090));
    assert_eq!(
        port(&["k8s_protocol=udp"], &two),
        Some(53),
        "the only UDP port"
    );
    // several TCP ports and no k8s_port=: the slice is skipped, saying what to set
    let sk = parse(&[], &two).unwrap().unwrap().skipped;
    let e = format!("{}: {}", sk[0].key, sk[0].cause);
    assert!(
        e.contains("several TCP ports") && e.contains("k8s_port="),
        "{e}"
    );
    // an unnamed port is the default one
    let unnamed = json!([{"port": 5432, "protocol": "TCP"}, {"name": "x", "port": 1}]);
    assert_eq!(port(&[], &unnamed), Some(5432));
    // a slice without the port contributes nothing and says why
    let s = parse(&["k8s_port=grpc"], &two).unwrap().unwrap();
    assert!(s.servers.is_empty());
    let why = s.unused.unwrap();
    assert!(
        why.contains("no TCP port \"grpc\"") && why.contains("8080/TCP \"http\""),
        "{why}"
    );
    // "all ports" (no number) works only with a number
    let all = json!([{"name": "", "protocol": "TCP"}]);
    assert_eq!(port(&["k8s_port=7000"], &all), Some(7000));
    assert_eq!(port(&[], &all), None);
    // slices of one Service may carry different numbers for one name
    let (_, snap) = watching(
        &["k8s_port=http"],
        vec![
            slice_obj(
                "web-a",
                "1",
                "IPv4",
                http_port(8080),
                vec![ep("10.0.0.1", "r")],
            ),
            slice_obj(
                "web-b",
                "2",
                "IPv4",
                http_port(8081),
                vec![ep("10.0.0.2", "r")],
            ),
        ],
    );
    let ports: Vec<u16> = snap.servers.iter().map(|s| s.addr.port()).collect();
    assert_eq!(ports, vec![8080, 8081]);
}

#[test]
fn unused_slices_are_noted_once() {
    let (mut s, snap) = watching(
        &["k8s_port=grpc"],
        vec![slice_obj(
            "web-a",
            "1",
            "IPv4",
            http_port(8080),
            vec![ep("10.0.0.1", "r")],
        )],
    );
    assert!(snap.servers.is_empty());
    let note = s.take_note().unwrap();
    assert!(
        note.contains("endpointslice \"web-a\" of Service prod/web: it has no TCP port \"grpc\""),
        "{note}"
    );
    s.start();
    let body = event(
        "MODIFIED",
        slice_obj(
            "web-a",
            "2",
            "IPv4",
            http_port(8080),
            vec![ep("10.0.0.1", "r")],
        ),
    );
    assert!(!s.on_partial(&head(200), &body));
    assert_eq!(s.take_note(), None, "not again for the same reason");
}

#[test]
fn ipv6_dual_stack_and_fqdn() {
    let items = || {
        vec![
            slice_obj(
                "web-v4",
                "1",
                "IPv4",
                http_port(80),
                vec![ep("10.0.0.1", "r")],
            ),
            slice_obj(
                "web-v6",
                "2",
                "IPv6",
                http_port(80),
                vec![ep("fd00::1", "r")],
            ),
            slice_obj(
                "web-fq",
                "3",
                "FQDN",
                http_port(80),
                vec![ep("db.example.org", "r")],
            ),
        ]
    };
    let (mut s, snap) = watching(&[], items());
    assert_eq!(
        lines(&snap),
        vec![
            "server 10.0.0.1:80 weight=1 max_fails=2 fail_timeout=10s;",
            "server [fd00::1]:80 weight=1 max_fails=2 fail_timeout=10s;",
        ]
    );
    assert!(s.take_note().unwrap().contains("FQDN"));
    let (_, snap) = watching(&["k8s_address_type=IPv6"], items());
    assert_eq!(snap.servers.len(), 1);
    assert!(snap.servers[0].addr.is_ipv6());
    // an address of the wrong family is bad data naming the slice and the endpoint
    let bad = slice_obj(
        "web-v6",
        "2",
        "IPv6",
        http_port(80),
        vec![ep("10.0.0.7", "r")],
    );
    let snap = source(&[])
        .handle(&head(200), &list("5", vec![bad]))
        .unwrap()
        .unwrap();
    let sk = &snap.skipped[0];
    assert_eq!(
        format!("{}: {}", sk.key, sk.cause),
        "endpointslice \"web-v6\", endpoint 0 (pod-10.0.0.7): address \"10.0.0.7\" is not an IPv6 address"
    );
}

#[test]
fn bad_data_names_the_slice_and_endpoint() {
    let cases: Vec<(Value, &str)> = vec![
        (json!({"metadata": {"labels": {"kubernetes.io/service-name": "web"}}}), "an EndpointSlice: it has no metadata.name"),
        (slice_obj("s", "1", "IPv5", http_port(80), vec![]), "endpointslice \"s\": unknown addressType \"IPv5\""),
        (
            slice_obj("s", "1", "IPv4", http_port(80), vec![json!({"addresses": []})]),
            "endpointslice \"s\", endpoint 0: it has no addresses",
        ),
        (
            slice_obj("s", "1", "IPv4", http_port(80), vec![ep("10.0.0.1", "r"), ep("300.0.0.1", "r")]),
            "endpointslice \"s\", endpoint 1 (pod-300.0.0.1): address \"300.0.0.1\" is not an IPv4 address",
        ),
        (
            slice_obj("s", "1", "IPv4", json!([{"name": "http", "port": 0}]), vec![ep("10.0.0.1", "r")]),
            "endpointslice \"s\": port \"http\" has an invalid number 0",
        ),
        (
            slice_obj("s", "1", "IPv4", http_port(80), vec![json!({"addresses": ["10.0.0.1"], "conditions": {"ready": "yes"}})]),
            "endpointslice \"s\", endpoint 0: conditions.ready is not a boolean: \"yes\"",
        ),
    ];
    for (obj, want) in cases {
        let mut s = source(&[]);
        match s.handle(&head(200), &list("5", vec![obj])) {
            // an object without even a name: the answer is bad as a whole
            Err(e) => {
                assert_eq!(e.to_string(), want);
                assert!(!s.next_request().path_and_query.contains("watch=1"));
            }
            // a bad slice or endpoint: skipped and reported, the rest applies
            Ok(Some(snap)) => {
                let sk = snap.skipped.first().expect("skipped");
                assert_eq!(format!("{}: {}", sk.key, sk.cause), want);
            }
            Ok(None) => panic!("no answer for {want}"),
        }
    }
    // other Services' slices (a proxy ignoring the selector) are ignored
    let mut other = slice_obj(
        "db-a",
        "1",
        "IPv4",
        http_port(80),
        vec![ep("10.0.0.1", "r")],
    );
    other["metadata"]["labels"]["kubernetes.io/service-name"] = json!("db");
    let (_, snap) = watching(&[], vec![other]);
    assert!(snap.servers.is_empty());
    // a list without a resourceVersion cannot start a watch
    let e = source(&[])
        .handle(&head(200), br#"{"items":[]}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("metadata.resourceVersion"), "{e}");
    // a bad endpoint in the stream is skipped and reported; the watch stays open
    let (mut s, _) = watching(&[], vec![]);
    s.start();
    let body = event(
        "ADDED",
        slice_obj(
            "s",
            "101",
            "IPv4",
            http_port(80),
            vec![json!({}), ep("10.0.0.9", "r")],
        ),
    );
    assert!(!s.on_partial(&head(200), &body));
    let snap = s.take_streamed().expect("a new set");
    assert_eq!(snap.servers.len(), 1);
    assert_eq!(
        format!("{}: {}", snap.skipped[0].key, snap.skipped[0].cause),
        "endpointslice \"s\", endpoint 0: it has no addresses"
    );
}

fn temp_token(name: &str, content: &str) -> String {
    let dir = std::env::temp_dir().join(format!("upsync-k8s-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("token").to_string_lossy().into_owned();
    let tmp = format!("{path}.new");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

fn with_token(path: &str) -> Kubernetes {
    let token_file = format!("token_file={path}");
    let spec = parse_upsync(&[
        "https://127.0.0.1:6443/prod/web",
        "upsync_type=kubernetes",
        &token_file,
    ])
    .unwrap();
    let cred =
        crate::conf::parse_credential(spec.kind, &std::fs::read_to_string(path).unwrap()).unwrap();
    let mut s = Kubernetes::new(&spec).with_credential(&spec, Some(&cred));
    s.token_file_mut().unwrap().min_gap = std::time::Duration::ZERO;
    s
}

fn auth_header(s: &Kubernetes) -> String {
    s.next_request()
        .headers
        .into_iter()
        .find(|h| h.starts_with("Authorization"))
        .unwrap()
}

#[test]
fn token_rotation_on_disk_and_after_401() {
    let path = temp_token("rotate", "eyJhbGciOiJSUzI1NiJ9.one.sig\n");
    let mut s = with_token(&path);
    assert_eq!(
        auth_header(&s),
        "Authorization: Bearer eyJhbGciOiJSUzI1NiJ9.one.sig"
    );
    s.start();
    assert_eq!(s.take_note(), None);
    // the kubelet replaces the file: the next request carries the new token
    temp_token("rotate", "eyJhbGciOiJSUzI1NiJ9.two.sig");
    s.start();
    assert!(s.take_note().unwrap().contains("changed on disk"));
    assert_eq!(
        auth_header(&s),
        "Authorization: Bearer eyJhbGciOiJSUzI1NiJ9.two.sig"
    );
    // a 401 reads the file at once: a newer token there is retried at once
    std::thread::sleep(std::time::Duration::from_millis(5));
    temp_token("rotate", "eyJhbGciOiJSUzI1NiJ9.three.sig");
    let unauthorized = br#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}"#;
    assert_eq!(s.handle(&head(401), unauthorized).unwrap(), None);
    assert!(s
        .take_note()
        .unwrap()
        .contains("holds a new one: retrying with it"));
    assert_eq!(
        auth_header(&s),
        "Authorization: Bearer eyJhbGciOiJSUzI1NiJ9.three.sig"
    );
    // the same token refused again: an error naming the file, never the token
    let e = s.handle(&head(401), unauthorized).unwrap_err().to_string();
    assert!(
        e.contains(&format!("token_file \"{path}\"")) && !e.contains("three"),
        "{e}"
    );
    // every token used so far is redacted from echoed text
    let echoed = "proxy says: Bearer eyJhbGciOiJSUzI1NiJ9.one.sig / eyJhbGciOiJSUzI1NiJ9.three.sig";
    assert_eq!(redact(echoed, &s), "proxy says: Bearer <hidden> / <hidden>");
    // a token file that became unreadable: the token in use stays
    std::fs::remove_file(&path).unwrap();
    s.start();
    assert!(s
        .take_note()
        .unwrap()
        .contains("still using the token read before"));
    s.start();
    assert_eq!(s.take_note(), None, "noted once, not at every request");
    assert_eq!(
        auth_header(&s),
        "Authorization: Bearer eyJhbGciOiJSUzI1NiJ9.three.sig"
    );
}
