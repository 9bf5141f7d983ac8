//! The Nacos source's state machine: API detection, login, token renewal and refusal,
//! change detection.

use super::*;
use crate::conf::parse_upsync;
use crate::registry::redact;

fn head(status: u16) -> Head {
    Head {
        status,
        http11: true,
        headers: vec![],
    }
}

fn source(extra: &[&str]) -> Nacos {
    let mut args = vec![
        "127.0.0.1:8848/orders",
        "upsync_type=nacos",
        "upsync_interval=1s",
    ];
    args.extend_from_slice(extra);
    Nacos::new(&parse_upsync(&args).unwrap())
}

fn with_user(extra: &[&str]) -> Nacos {
    source(extra).with_credential(Some(&Credential::UserPassword {
        user: "upsync".into(),
        password: "s3cr&t pw".into(),
    }))
}

/// One exchange as the poller drives it, at time `now`.
fn exchange(
    s: &mut Nacos,
    now: u64,
    status: u16,
    body: &str,
) -> (Request, Result<Option<Snapshot>, RegistryError>) {
    s.set_now(now);
    s.start();
    let r = s.next_request();
    (r, s.handle(&head(status), body.as_bytes()))
}

const V1_ONE: &str = r#"{"hosts":[{"ip":"10.0.0.1","port":80,"weight":1.0,"healthy":true,"enabled":true}],"lastRefTime":1}"#;
const V1_TWO: &str = r#"{"hosts":[{"ip":"10.0.0.1","port":80,"weight":1.0},{"ip":"10.0.0.2","port":80,"weight":0.5}],"lastRefTime":2}"#;
const V2_ONE: &str =
    r#"{"code":0,"message":"success","data":{"hosts":[{"ip":"10.0.0.1","port":80,"weight":1.0}]}}"#;
const V3_ONE: &str =
    r#"{"code":0,"message":"success","data":[{"ip":"10.0.0.1","port":80,"weight":1.0}]}"#;

#[test]
fn auto_detects_newest_first_and_notes_what_it_skipped() {
    let mut s = source(&[]);
    let (r, res) = exchange(&mut s, 0, 404, "");
    assert_eq!(
        r.path_and_query,
        "/nacos/v3/client/ns/instance/list?serviceName=orders&groupName=DEFAULT_GROUP&namespaceId=public&healthyOnly=false"
    );
    assert_eq!(res.unwrap(), None);
    // a Spring-style 404 page is "no such path", not "no such service"
    let (r, res) = exchange(
        &mut s,
        0,
        404,
        r#"{"timestamp":"x","status":404,"error":"Not Found","path":"/nacos/v2/ns/instance/list"}"#,
    );
    assert!(
        r.path_and_query.starts_with("/nacos/v2/ns/instance/list?"),
        "{}",
        r.path_and_query
    );
    assert_eq!(res.unwrap(), None);
    let (r, res) = exchange(&mut s, 0, 200, V1_ONE);
    assert!(r.path_and_query.starts_with("/nacos/v1/ns/instance/list?"));
    let snap = res.unwrap().unwrap();
    assert_eq!((snap.servers.len(), snap.advanced), (1, true));
    let note = s.take_note().unwrap();
    assert_eq!(
        note,
        "reading the Nacos v1 instance-list API (v3: HTTP 404; v2: HTTP 404)"
    );
    // the API stays after an error elsewhere (reset)
    s.reset();
    let (r, _) = exchange(&mut s, 0, 200, V1_ONE);
    assert!(r.path_and_query.starts_with("/nacos/v1/"));
}

#[test]
fn auto_accepts_v3_and_v2_shapes_and_moves_on_for_other_shapes() {
    let mut s = source(&[]);
    let snap = exchange(&mut s, 0, 200, V3_ONE).1.unwrap().unwrap();
    assert_eq!(snap.servers.len(), 1);
    assert_eq!(s.api(), NacosApi::V3);
    assert!(s.take_note().unwrap().contains("v3"));

    let mut s = source(&[]);
    // 410: Nacos 3.0/3.1 with the API switched off; a 200 in another shape (a console
    // page's JSON) moves on too
    assert_eq!(exchange(&mut s, 0, 410, "").1.unwrap(), None);
    assert_eq!(s.api(), NacosApi::V2);
    assert_eq!(
        exchange(&mut s, 0, 200, V2_ONE)
            .1
            .unwrap()
            .unwrap()
            .servers
            .len(),
        1
    );
    assert_eq!(s.api(), NacosApi::V2);

    let mut s = source(&[]);
    assert_eq!(
        exchange(&mut s, 0, 200, V1_ONE).1.unwrap(),
        None,
        "v1 shape is not v3"
    );
    assert_eq!(
        exchange(&mut s, 0, 200, "<html>console</html>").1.unwrap(),
        None
    );
    assert_eq!(s.api(), NacosApi::V1);
}

#[test]
fn nothing_answers_is_an_error_and_detection_starts_over() {
    let mut s = source(&[]);
    assert_eq!(exchange(&mut s, 0, 404, "").1.unwrap(), None);
    assert_eq!(exchange(&mut s, 0, 501, "").1.unwrap(), None);
    let e = exchange(&mut s, 0, 405, "").1.unwrap_err().to_string();
    assert!(
        e.contains(
            "no Nacos instance-list API answers here (v3: HTTP 404; v2: HTTP 501; v1: HTTP 405)"
        ),
        "{e}"
    );
    assert_eq!(s.api(), NacosApi::V3);
    // a server error does not move detection on
    let e = exchange(&mut s, 0, 500, "boom").1.unwrap_err().to_string();
    assert!(e.contains("500"), "{e}");
    assert_eq!(s.api(), NacosApi::V3);
}

#[test]
fn a_detected_api_that_disappears_is_detected_again() {
    let mut s = source(&[]);
    exchange(&mut s, 0, 200, V3_ONE).1.unwrap().unwrap();
    s.take_note();
    // e.g. the failover list moved to a member running Nacos 2.x
    assert_eq!(exchange(&mut s, 0, 404, "").1.unwrap(), None);
    assert!(s.take_note().unwrap().contains("detecting the API again"));
    assert_eq!(s.api(), NacosApi::V3);
    assert_eq!(exchange(&mut s, 0, 404, "").1.unwrap(), None);
    assert!(exchange(&mut s, 0, 200, V2_ONE).1.unwrap().is_some());
    assert_eq!(s.api(), NacosApi::V2);
}

#[test]
fn a_fixed_api_skips_detection() {
    let mut s = source(&["nacos_api=v1", "nacos_clusters=A,B", "nacos_group=G 1"]);
    let (r, res) = exchange(&mut s, 0, 200, V1_ONE);
    assert_eq!(
        r.path_and_query,
        "/nacos/v1/ns/instance/list?serviceName=orders&groupName=G%201&namespaceId=public&healthyOnly=false&clusters=A,B"
    );
    assert!(res.unwrap().is_some());
    assert_eq!(s.take_note(), None);
    let e = exchange(&mut s, 0, 404, "").1.unwrap_err().to_string();
    assert!(e.contains("not served here (nacos_api=v1)"), "{e}");
    let mut s = source(&["nacos_api=v2", "nacos_clusters=A"]);
    assert!(exchange(&mut s, 0, 200, V2_ONE)
        .0
        .path_and_query
        .ends_with("&clusterName=A"));
    let e = exchange(&mut s, 0, 200, V1_ONE).1.unwrap_err().to_string();
    assert!(e.contains("not a Nacos v2 instance list"), "{e}");
}

#[test]
fn changes_are_reported_only_when_the_content_changes() {
    let mut s = source(&["nacos_api=v1"]);
    let a = exchange(&mut s, 0, 200, V1_ONE).1.unwrap().unwrap();
    assert!(a.advanced);
    let p1 = s.position();
    assert_ne!(p1, 0);
    // same hosts, new lastRefTime / checksum: no change
    let same = V1_ONE.replace("\"lastRefTime\":1", "\"lastRefTime\":99");
    let b = exchange(&mut s, 0, 200, &same).1.unwrap().unwrap();
    assert!(!b.advanced);
    assert_eq!(
        b.servers, a.servers,
        "still a snapshot: the poller keeps its status fresh"
    );
    let c = exchange(&mut s, 0, 200, V1_TWO).1.unwrap().unwrap();
    assert!(c.advanced);
    assert_eq!(c.servers[1].weight, 50);
    assert_ne!(s.position(), p1);
    // an order change is no change; an error keeps the last list to compare with
    let swapped = r#"{"hosts":[{"ip":"10.0.0.2","port":80,"weight":0.5},{"ip":"10.0.0.1","port":80,"weight":1.0}]}"#;
    assert!(exchange(&mut s, 0, 500, "").1.is_err());
    assert!(
        !exchange(&mut s, 0, 200, swapped)
            .1
            .unwrap()
            .unwrap()
            .advanced
    );
    // a host turning unhealthy leaves the set
    let unhealthy = r#"{"hosts":[{"ip":"10.0.0.2","port":80,"weight":0.5,"healthy":false},{"ip":"10.0.0.1","port":80}]}"#;
    let d = exchange(&mut s, 0, 200, unhealthy).1.unwrap().unwrap();
    assert!(d.advanced);
    assert_eq!(d.servers.len(), 1);
}

#[test]
fn login_then_token_on_every_list_request() {
    let mut s = with_user(&["nacos_api=v1"]);
    let (r, res) = exchange(
        &mut s,
        1_000,
        200,
        r#"{"accessToken":"tok/1+x","tokenTtl":100,"globalAdmin":false}"#,
    );
    assert_eq!(
        (r.method, r.path_and_query.as_str()),
        ("POST", "/nacos/v1/auth/login")
    );
    assert_eq!(
        String::from_utf8(r.body).unwrap(),
        "username=upsync&password=s3cr%26t%20pw"
    );
    assert!(r
        .headers
        .contains(&"Content-Type: application/x-www-form-urlencoded".to_string()));
    assert_eq!(res.unwrap(), None);
    let (r, res) = exchange(&mut s, 2_000, 200, V1_ONE);
    assert!(
        r.path_and_query
            .ends_with("&healthyOnly=false&accessToken=tok%2F1%2Bx"),
        "{}",
        r.path_and_query
    );
    assert!(res.unwrap().is_some());
}

#[test]
fn the_token_is_renewed_at_80_percent_of_its_lifetime() {
    let mut s = with_user(&["nacos_api=v1"]);
    exchange(
        &mut s,
        10_000,
        200,
        r#"{"accessToken":"t1","tokenTtl":100}"#,
    )
    .1
    .unwrap();
    // 80 s after the login was sent: still t1 just before, a new login at the mark
    let (r, _) = exchange(&mut s, 89_999, 200, V1_ONE);
    assert!(r.path_and_query.ends_with("accessToken=t1"));
    let (r, res) = exchange(
        &mut s,
        90_000,
        200,
        r#"{"accessToken":"t2","tokenTtl":100}"#,
    );
    assert_eq!(r.path_and_query, "/nacos/v1/auth/login");
    assert_eq!(res.unwrap(), None);
    let (r, _) = exchange(&mut s, 90_010, 200, V1_ONE);
    assert!(r.path_and_query.ends_with("accessToken=t2"));
    // a 1-second token: a list request always follows each login (no login loop)
    exchange(&mut s, 200_000, 200, r#"{"accessToken":"t3","tokenTtl":1}"#)
        .1
        .unwrap();
    let (r, _) = exchange(&mut s, 205_000, 200, V1_ONE);
    assert!(r.path_and_query.ends_with("accessToken=t3"));
    assert_eq!(
        exchange(&mut s, 205_001, 200, "{}").0.path_and_query,
        "/nacos/v1/auth/login"
    );
    // no tokenTtl: Nacos's default of 18000 s
    let mut s = with_user(&["nacos_api=v1"]);
    exchange(&mut s, 0, 200, r#"{"code":0,"data":{"accessToken":"t9"}}"#)
        .1
        .unwrap();
    exchange(&mut s, 1, 200, V1_ONE).1.unwrap();
    assert!(exchange(&mut s, 14_399_999, 200, V1_ONE)
        .0
        .path_and_query
        .contains("t9"));
    assert!(!exchange(&mut s, 14_400_000, 200, "{}")
        .0
        .path_and_query
        .contains("t9"));
}

#[test]
fn a_refused_token_means_one_new_login() {
    let mut s = with_user(&["nacos_api=v1"]);
    exchange(&mut s, 0, 200, r#"{"accessToken":"t1","tokenTtl":18000}"#)
        .1
        .unwrap();
    exchange(&mut s, 1, 200, V1_ONE).1.unwrap().unwrap();
    // the server restarted (tokens gone) or the token expired early
    let refused = r#"{"timestamp":"x","status":403,"error":"Forbidden","message":"unknown user!","path":"/nacos/v1/ns/instance/list"}"#;
    assert_eq!(exchange(&mut s, 2, 403, refused).1.unwrap(), None);
    assert!(s.take_note().unwrap().contains("logging in again"));
    let (r, _) = exchange(&mut s, 3, 200, r#"{"accessToken":"t2","tokenTtl":18000}"#);
    assert_eq!(r.path_and_query, "/nacos/v1/auth/login");
    // the brand-new token refused too: an error, not a loop
    let e = exchange(&mut s, 4, 401, "token invalid!")
        .1
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("just issued") && e.contains("namespace \"public\""),
        "{e}"
    );
    // the refused token still counts as a secret (an error may echo it)
    assert!(s.secrets().contains(&"t1".to_string()));
}

#[test]
fn refused_credentials_and_missing_ones_are_clear_errors() {
    let mut s = with_user(&["nacos_api=v1"]);
    let e = exchange(&mut s, 0, 403, "unknown user!")
        .1
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("Nacos refused user \"upsync\" of token_file= at /nacos/v1/auth/login: HTTP 403: unknown user!"),
        "{e}"
    );
    assert!(!e.contains("s3cr"), "{e}");
    let mut anon = source(&["nacos_api=v1"]);
    let e = exchange(&mut anon, 0, 403, r#"{"message":"unknown user!"}"#)
        .1
        .unwrap_err()
        .to_string();
    assert!(e.contains("set token_file="), "{e}");
}

#[test]
fn the_login_api_is_found_like_the_list_api() {
    // Nacos 3.x without the v1 login: the v3 one, once
    let mut s = with_user(&[]);
    let (r, res) = exchange(&mut s, 0, 404, "");
    assert_eq!(r.path_and_query, "/nacos/v1/auth/login");
    assert_eq!(res.unwrap(), None);
    let (r, res) = exchange(
        &mut s,
        0,
        200,
        r#"{"code":0,"message":"success","data":{"accessToken":"t3","tokenTtl":18000}}"#,
    );
    assert_eq!(r.path_and_query, "/nacos/v3/auth/user/login");
    assert_eq!(res.unwrap(), None);
    let (r, _) = exchange(&mut s, 1, 200, V3_ONE);
    assert!(
        r.path_and_query
            .starts_with("/nacos/v3/client/ns/instance/list?")
            && r.path_and_query.ends_with("accessToken=t3")
    );
    // nacos_api=v3 starts with the v3 login; neither answering is an error
    let mut s = with_user(&["nacos_api=v3"]);
    assert_eq!(
        exchange(&mut s, 0, 404, "").0.path_and_query,
        "/nacos/v3/auth/user/login"
    );
    let e = exchange(&mut s, 0, 404, "").1.unwrap_err().to_string();
    assert!(e.contains("/nacos/v1/auth/login: HTTP 404"), "{e}");
}

#[test]
fn secrets_cover_the_password_and_tokens_in_every_form() {
    let mut s = with_user(&["nacos_api=v1"]);
    exchange(
        &mut s,
        0,
        200,
        r#"{"accessToken":"abc/def=","tokenTtl":18000}"#,
    )
    .1
    .unwrap();
    let echoed = "bad request: username=upsync&password=s3cr%26t%20pw and accessToken=abc%2Fdef%3D / abc/def=";
    let shown = redact(echoed, &s);
    assert!(!shown.contains("s3cr") && !shown.contains("abc"), "{shown}");
    assert!(shown.contains("username=upsync"), "{shown}");
}

#[test]
fn a_context_path_from_a_copied_url_is_used_for_every_request() {
    let spec = parse_upsync(&[
        "127.0.0.1:8848/registry/v1/ns/instance/list?serviceName=web&namespaceId=dev",
        "upsync_type=nacos",
        "nacos_api=v1",
    ])
    .unwrap();
    let mut s = Nacos::new(&spec).with_credential(Some(&Credential::UserPassword {
        user: "u".into(),
        password: "p".into(),
    }));
    assert_eq!(s.next_request().path_and_query, "/registry/v1/auth/login");
    exchange(&mut s, 0, 200, r#"{"accessToken":"t"}"#)
        .1
        .unwrap();
    assert_eq!(
        s.next_request().path_and_query,
        "/registry/v1/ns/instance/list?serviceName=web&groupName=DEFAULT_GROUP&namespaceId=dev&healthyOnly=false&accessToken=t"
    );
}
