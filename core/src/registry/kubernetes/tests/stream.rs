//! The list, the watch stream read as it arrives, 410 in both forms, quiet ends.

use serde_json::json;

use super::*;

#[test]
fn list_then_watch_requests() {
    let mut s = source(&["upsync_timeout=1m"]);
    let r = s.next_request();
    assert_eq!(
        r.path_and_query,
        "/apis/discovery.k8s.io/v1/namespaces/prod/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3Dweb"
    );
    assert!(!r.timeout_is_normal);
    assert_eq!(r.headers, vec!["Accept: application/json".to_string()]);
    s.start();
    let snap = s
        .handle(
            &head(200),
            &list(
                "100",
                vec![slice_obj(
                    "web-a",
                    "90",
                    "IPv4",
                    http_port(8080),
                    vec![ep("10.0.0.1", "r")],
                )],
            ),
        )
        .unwrap()
        .unwrap();
    assert!(snap.advanced);
    assert_eq!(
        lines(&snap),
        vec!["server 10.0.0.1:8080 weight=1 max_fails=2 fail_timeout=10s;"]
    );
    assert_eq!(s.position(), 100);
    let w = s.next_request();
    assert!(w.path_and_query.ends_with(
        "%3Dweb&watch=1&resourceVersion=100&allowWatchBookmarks=true&timeoutSeconds=58"
    ));
    assert!(w.timeout_is_normal);
    assert_eq!(w.timeout_ms, 60_000);
    assert_eq!(watch_timing(1000), (1, 3000));
    assert_eq!(percent_encode("1/2 3"), "1%2F2%203");
}

#[test]
fn events_apply_as_they_arrive_and_the_stream_stays_open() {
    let (mut s, _) = watching(
        &[],
        vec![slice_obj(
            "web-a",
            "90",
            "IPv4",
            http_port(8080),
            vec![ep("10.0.0.1", "r")],
        )],
    );
    s.start();
    let mut body = Vec::new();
    // a new slice, cut in the middle: nothing until it is complete
    let added = event(
        "ADDED",
        slice_obj(
            "web-b",
            "101",
            "IPv4",
            http_port(8080),
            vec![ep("10.0.0.2", "r")],
        ),
    );
    body.extend_from_slice(&added[..added.len() / 2]);
    assert!(!s.on_partial(&head(200), &body));
    assert_eq!(s.take_streamed(), None);
    body.extend_from_slice(&added[added.len() / 2..]);
    assert!(!s.on_partial(&head(200), &body), "the stream stays open");
    let snap = s.take_streamed().expect("a new set at once");
    assert_eq!(snap.servers.len(), 2);
    assert_eq!(s.take_streamed(), None);
    // a bookmark moves the position only
    body.extend(event(
        "BOOKMARK",
        json!({"kind": "EndpointSlice", "metadata": {"resourceVersion": "150"}}),
    ));
    assert!(!s.on_partial(&head(200), &body));
    assert_eq!(s.take_streamed(), None);
    assert_eq!(s.position(), 150);
    // modified: the Pod goes not ready; then deleted slice
    body.extend(event(
        "MODIFIED",
        slice_obj(
            "web-b",
            "151",
            "IPv4",
            http_port(8080),
            vec![ep("10.0.0.2", "n")],
        ),
    ));
    assert!(!s.on_partial(&head(200), &body));
    assert_eq!(s.take_streamed().unwrap().servers.len(), 1);
    body.extend(event(
        "DELETED",
        slice_obj("web-a", "152", "IPv4", http_port(8080), vec![]),
    ));
    assert!(!s.on_partial(&head(200), &body));
    assert!(s.take_streamed().unwrap().servers.is_empty());
    // a change that leaves the merged set as it is gives no new set
    body.extend(event(
        "MODIFIED",
        slice_obj(
            "web-b",
            "153",
            "IPv4",
            http_port(8080),
            vec![ep("10.0.0.2", "t")],
        ),
    ));
    assert!(!s.on_partial(&head(200), &body));
    assert_eq!(s.take_streamed(), None);
    // the server ends the watch (timeoutSeconds): watch again from the last version
    assert_eq!(s.handle(&head(200), &body).unwrap(), None);
    assert!(s
        .next_request()
        .path_and_query
        .contains("resourceVersion=153&"));
    // the client's deadline ends a watch without handle(): the next one starts from
    // the last version seen too
    s.start();
    let bm = event("BOOKMARK", json!({"metadata": {"resourceVersion": "170"}}));
    assert!(!s.on_partial(&head(200), &bm));
    s.start();
    assert!(s
        .next_request()
        .path_and_query
        .contains("resourceVersion=170&"));
}

#[test]
fn final_chunk_events_are_applied_when_the_watch_ends() {
    let (mut s, _) = watching(&[], vec![]);
    s.start();
    let body = event(
        "ADDED",
        slice_obj(
            "web-a",
            "101",
            "IPv4",
            http_port(80),
            vec![ep("10.0.0.9", "")],
        ),
    );
    // the last chunk arrived with the end of the response: no on_partial call
    let snap = s.handle(&head(200), &body).unwrap().unwrap();
    assert!(snap.advanced);
    assert_eq!(
        lines(&snap),
        vec!["server 10.0.0.9:80 weight=1 max_fails=2 fail_timeout=10s;"]
    );
    assert!(s
        .next_request()
        .path_and_query
        .contains("resourceVersion=101&"));
}

#[test]
fn too_old_resource_version_in_both_forms_lists_again() {
    // HTTP 410 answering the watch
    let (mut s, _) = watching(&[], vec![]);
    s.start();
    let gone = br#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"too old resource version: 100 (2000)","reason":"Expired","code":410}"#;
    assert!(!s.on_partial(&head(410), gone));
    assert_eq!(s.handle(&head(410), gone).unwrap(), None);
    let note = s.take_note().unwrap();
    assert_eq!(
        note,
        "the watch from resourceVersion 100 is too old for the API server (Expired: too old resource version: 100 (2000)); listing again"
    );
    assert!(!s.next_request().path_and_query.contains("watch=1"));
    // an ERROR event with code 410 inside a 200 stream ends the exchange at once
    let (mut s, _) = watching(&[], vec![]);
    s.start();
    let mut body = event(
        "ADDED",
        slice_obj(
            "web-a",
            "101",
            "IPv4",
            http_port(80),
            vec![ep("10.0.0.1", "r")],
        ),
    );
    assert!(!s.on_partial(&head(200), &body));
    assert_eq!(s.take_streamed().unwrap().servers.len(), 1);
    body.extend(event(
        "ERROR",
        json!({"kind": "Status", "status": "Failure", "reason": "Expired", "code": 410,
               "message": "The resourceVersion for the provided watch is too old."}),
    ));
    assert!(s.on_partial(&head(200), &body), "the exchange ends");
    assert_eq!(s.handle(&head(200), &body).unwrap(), None);
    assert!(s
        .take_note()
        .unwrap()
        .contains("from resourceVersion 100 is too old"));
    assert!(!s.next_request().path_and_query.contains("watch=1"));
    // other ERROR events are errors (the poller lists again after its backoff)
    let (mut s, _) = watching(&[], vec![]);
    s.start();
    let body = event(
        "ERROR",
        json!({"kind": "Status", "code": 500, "message": "internal error"}),
    );
    assert!(s.on_partial(&head(200), &body));
    let e = s.handle(&head(200), &body).unwrap_err().to_string();
    assert!(
        e.contains("500") && e.contains("watch ERROR event: internal error"),
        "{e}"
    );
}

#[test]
fn quiet_watch_ends_rewatch_at_once_then_paced() {
    let (mut s, _) = watching(
        &[],
        vec![slice_obj(
            "web-a",
            "90",
            "IPv4",
            http_port(80),
            vec![ep("10.0.0.1", "r")],
        )],
    );
    for _ in 0..2 {
        s.start();
        let bm = event("BOOKMARK", json!({"metadata": {"resourceVersion": "120"}}));
        assert!(!s.on_partial(&head(200), &bm));
        assert_eq!(
            s.handle(&head(200), &bm).unwrap(),
            None,
            "something came: at once"
        );
    }
    assert!(s
        .next_request()
        .path_and_query
        .contains("resourceVersion=120&"));
    s.start();
    assert_eq!(
        s.handle(&head(200), b"").unwrap(),
        None,
        "first quiet end: at once"
    );
    s.start();
    let snap = s.handle(&head(200), b"").unwrap().unwrap();
    assert!(
        !snap.advanced,
        "second quiet end in a row: paced by the interval"
    );
    assert_eq!(snap.servers.len(), 1);
    assert!(s
        .next_request()
        .path_and_query
        .contains("resourceVersion=120&"));
}

#[test]
fn long_streams_are_restarted_before_the_size_limit() {
    let (mut s, _) = watching(&[], vec![]);
    s.start();
    let bm = event("BOOKMARK", json!({"metadata": {"resourceVersion": "7"}}));
    let mut body = Vec::new();
    while body.len() < RESTART_AFTER_BYTES {
        body.extend_from_slice(&bm);
    }
    assert!(s.on_partial(&head(200), &body));
    assert_eq!(s.handle(&head(200), &body).unwrap(), None);
    assert!(s
        .next_request()
        .path_and_query
        .contains("resourceVersion=7&"));
}

#[test]
fn errors_from_the_api_server() {
    let mut s = source(&[]);
    let e = s
        .handle(
            &head(403),
            br#"{"kind":"Status","status":"Failure","message":"endpointslices.discovery.k8s.io is forbidden: User \"system:serviceaccount:prod:nginx\" cannot list resource","reason":"Forbidden","code":403}"#,
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("namespace \"prod\"") && e.contains("list and watch on endpointslices"),
        "{e}"
    );
    let e = s
        .handle(
            &head(401),
            br#"{"kind":"Status","reason":"Unauthorized","code":401}"#,
        )
        .unwrap_err();
    assert!(e.to_string().contains("set token_file="), "{e}");
    let e = s.handle(&head(500), b"oops").unwrap_err();
    assert_eq!(e.to_string(), "unexpected HTTP status 500: \"oops\"");
}
