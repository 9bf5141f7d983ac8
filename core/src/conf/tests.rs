//! Directive values against what nginx -t must accept and refuse.

use super::*;

fn ok(args: &[&str]) -> UpsyncSpec {
    parse_upsync(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

#[test]
fn seed_configurations() {
    let s = ok(&[
        "127.0.0.1:8500/v1/kv/upstreams/my_tcp_backend/",
        "upsync_type=consul",
        "upsync_interval=500ms",
        "upsync_timeout=6m",
        "strong_dependency=on",
    ]);
    assert_eq!(s.kind, SourceKind::ConsulKv);
    assert_eq!(s.endpoint.hosts[0].host, "127.0.0.1");
    assert_eq!(s.endpoint.hosts[0].port, 8500);
    assert_eq!(s.tls, None);
    assert_eq!(s.endpoint.path, "/v1/kv/upstreams/my_tcp_backend/");
    assert_eq!(
        (s.interval_ms, s.timeout_ms, s.strong_dependency),
        (500, 360_000, true)
    );

    let s = ok(&[
        "127.0.0.1:8500/v1/health/service/my-service",
        "upsync_type=consul_services",
    ]);
    assert_eq!(s.kind, SourceKind::ConsulServices);
    assert_eq!(
        (s.interval_ms, s.timeout_ms, s.strong_dependency),
        (5000, 360_000, false)
    );

    let s = ok(&[
        "127.0.0.1:2379/v2/keys/upstreams/my_backend",
        "upsync_type=etcd",
    ]);
    assert_eq!(s.endpoint.path, "/v2/keys/upstreams/my_backend/");
}

#[test]
fn endpoint_forms() {
    let e = parse_endpoint("consul.service:8500/v1/kv/a/").unwrap();
    assert_eq!(
        (e.hosts[0].host.as_str(), e.hosts[0].port),
        ("consul.service", 8500)
    );
    let e = parse_endpoint("consul/v1/kv/a/").unwrap();
    assert_eq!(e.hosts[0].port, 80);
    let e = parse_endpoint("[::1]:8500/v1/kv/a/?dc=dc2").unwrap();
    assert_eq!(
        (e.hosts[0].host.as_str(), e.hosts[0].port, e.query.as_str()),
        ("::1", 8500, "dc=dc2")
    );
    assert_eq!(e.to_string(), "[::1]:8500/v1/kv/a/?dc=dc2");
    let e = parse_endpoint("http://127.0.0.1:8500/v1/kv/a/").unwrap();
    assert_eq!(e.authorities(), "127.0.0.1:8500");
    assert!(!e.tls);
}

#[test]
fn failover_lists_and_tls() {
    let e = parse_endpoint("https://10.0.0.1:2379,etcd-b,[::1]:2381/v2/keys/x/").unwrap();
    assert!(e.tls);
    assert_eq!(e.authorities(), "10.0.0.1:2379,etcd-b:443,[::1]:2381");
    assert_eq!(
        e.to_string(),
        "https://10.0.0.1:2379,etcd-b:443,[::1]:2381/v2/keys/x/"
    );
    for bad in [
        "a:1,/v1/kv/x/",
        ",a:1/v1/kv/x/",
        "a:1,,b:2/v1/kv/x/",
        "::1/v1/kv/x/",
        "https:///v1/kv/x/",
    ] {
        assert!(
            matches!(parse_endpoint(bad), Err(ConfError::Address(_))),
            "{bad}"
        );
    }
    assert!(matches!(
        parse_endpoint("a:1,b:x/v1/kv/x/"),
        Err(ConfError::Port(_))
    ));
    let many = vec!["h:1"; MAX_HOSTS + 1].join(",") + "/v1/kv/x/";
    assert!(matches!(
        parse_endpoint(&many),
        Err(ConfError::TooManyHosts(_))
    ));

    let s = ok(&["https://127.0.0.1:2379/p/", "upsync_type=etcdv3"]);
    assert_eq!(
        s.tls,
        Some(TlsSpec {
            verify: true,
            trusted_certificate: None,
            certificate: None,
            name: None
        })
    );
    let s = ok(&[
        "https://127.0.0.1:2379/p/",
        "upsync_type=etcdv3",
        "ssl_verify=off",
        "ssl_trusted_certificate=/ca.pem",
        "ssl_certificate=/c.pem",
        "ssl_certificate_key=/k.pem",
        "ssl_name=etcd.internal",
    ]);
    let t = s.tls.unwrap();
    assert!(!t.verify);
    assert_eq!(t.trusted_certificate.as_deref(), Some("/ca.pem"));
    assert_eq!(t.certificate, Some(("/c.pem".into(), "/k.pem".into())));
    assert_eq!(t.name.as_deref(), Some("etcd.internal"));
    let err = |a: &[&str]| parse_upsync(a).unwrap_err();
    assert_eq!(
        err(&["127.0.0.1:2379/p/", "upsync_type=etcdv3", "ssl_verify=off"]),
        ConfError::TlsOnly("ssl_verify=")
    );
    assert_eq!(
        err(&["https://h:1/p/", "upsync_type=etcdv3", "ssl_certificate=/c"]),
        ConfError::CertWithoutKey
    );
    assert_eq!(
        err(&["https://h:1/p/", "upsync_type=etcdv3", "ssl_name=a b"]),
        ConfError::TlsName("a b".into())
    );
}

#[test]
fn credentials_per_registry() {
    assert_eq!(
        parse_credential(SourceKind::ConsulKv, "  abc-123\n"),
        Ok(Credential::Token("abc-123".into()))
    );
    assert_eq!(
        parse_credential(SourceKind::EtcdV3, "root:pa:ss\n"),
        Ok(Credential::UserPassword {
            user: "root".into(),
            password: "pa:ss".into()
        })
    );
    for (kind, bad) in [
        (SourceKind::EtcdV2, "nopassword"),
        (SourceKind::EtcdV2, ":pw"),
        (SourceKind::EtcdV3, "user:"),
        (SourceKind::ConsulKv, ""),
        (SourceKind::ConsulKv, "a\nb"),
    ] {
        assert!(parse_credential(kind, bad).is_err(), "{bad:?}");
    }
    let dbg = format!(
        "{:?}",
        Credential::UserPassword {
            user: "u".into(),
            password: "s3cret".into()
        }
    );
    assert!(!dbg.contains("s3cret"), "{dbg}");
}

#[test]
fn rejects_with_specific_errors() {
    use ConfError::*;
    type Case<'a> = (&'a [&'a str], fn(&ConfError) -> bool);
    let cases: &[Case] = &[
        (&["127.0.0.1:8500"], |e| matches!(e, Address(_))),
        (&["127.0.0.1:8500/", "upsync_type=consul"], |e| {
            matches!(e, Address(_))
        }),
        (&[":8500/v1/kv/a/", "upsync_type=consul"], |e| {
            matches!(e, Address(_))
        }),
        (&["127.0.0.1:0/v1/kv/a/", "upsync_type=consul"], |e| {
            matches!(e, Port(_))
        }),
        (&["127.0.0.1:70000/v1/kv/a/", "upsync_type=consul"], |e| {
            matches!(e, Port(_))
        }),
        (&["127.0.0.1:/v1/kv/a/", "upsync_type=consul"], |e| {
            matches!(e, Port(_))
        }),
        (&["127.0.0.1:85a/v1/kv/a/", "upsync_type=consul"], |e| {
            matches!(e, Port(_))
        }),
        (&["127.0.0.1:8500/v1/kv/a/"], |e| matches!(e, MissingType)),
        (&["127.0.0.1:8500/v1/kv/a/", "upsync_type=zk"], |e| {
            matches!(e, UnknownType(_))
        }),
        (&["127.0.0.1:8500/v1/kv/a/", "upsync_type=Consul"], |e| {
            matches!(e, UnknownType(_))
        }),
        (
            &[
                "127.0.0.1:8500/v1/kv/a/",
                "upsync_type=consul",
                "upsync_interval=5x",
            ],
            |e| matches!(e, Time(_)),
        ),
        (
            &[
                "127.0.0.1:8500/v1/kv/a/",
                "upsync_type=consul",
                "upsync_timeout=-1",
            ],
            |e| matches!(e, Time(_)),
        ),
        (
            &[
                "127.0.0.1:8500/v1/kv/a/",
                "upsync_type=consul",
                "strong_dependency=yes",
            ],
            |e| matches!(e, OnOff(_)),
        ),
        (
            &["127.0.0.1:8500/v1/kv/a/", "upsync_type=consul", "foo=bar"],
            |e| matches!(e, UnknownParam(_)),
        ),
        (
            &["127.0.0.1:8500/v1/kv/a/", "upsync_type=consul", "bare"],
            |e| matches!(e, UnknownParam(_)),
        ),
        (
            &[
                "127.0.0.1:8500/v1/kv/a/",
                "upsync_type=consul",
                "zone_size=1k",
            ],
            |e| matches!(e, ZoneSize(_)),
        ),
        (
            &[
                "127.0.0.1:8500/v1/kv/a/",
                "upsync_type=consul",
                "zone_size=lots",
            ],
            |e| matches!(e, ZoneSize(_)),
        ),
        (
            &[
                "127.0.0.1:8500/v1/kv/a/",
                "upsync_type=consul",
                "upsync_type=etcd",
            ],
            |e| matches!(e, Duplicate(_)),
        ),
        (&["127.0.0.1:8500/v2/keys/a/", "upsync_type=consul"], |e| {
            matches!(e, PathForKind { .. })
        }),
        (&["127.0.0.1:8500/v1/kv/", "upsync_type=consul"], |e| {
            matches!(e, PathForKind { .. })
        }),
        (
            &[
                "127.0.0.1:8500/v1/kv/a/",
                "upsync_type=consul",
                "ssl_name=x",
            ],
            |e| matches!(e, TlsOnly(_)),
        ),
    ];
    for (args, check) in cases {
        let err = parse_upsync(args).expect_err(&format!("{args:?} should fail"));
        assert!(check(&err), "{args:?}: unexpected {err:?}");
        assert!(!err.to_string().is_empty());
    }
}

#[test]
fn zero_time_means_default_like_c_module() {
    let s = ok(&[
        "h:1/v1/kv/a/",
        "upsync_type=consul",
        "upsync_interval=0",
        "upsync_timeout=0s",
    ]);
    assert_eq!(
        (s.interval_ms, s.timeout_ms),
        (DEFAULT_INTERVAL_MS, DEFAULT_TIMEOUT_MS)
    );
}

#[test]
fn lb_methods() {
    let m = |a: &[&str]| parse_lb(a).map(|s| (s.method, s.key));
    assert_eq!(m(&["roundrobin"]), Ok((Method::RoundRobin, None)));
    assert_eq!(m(&["round_robin"]), Ok((Method::RoundRobin, None)));
    assert_eq!(m(&["least_conn"]), Ok((Method::LeastConn, None)));
    assert_eq!(m(&["ip_hash"]), Ok((Method::IpHash, None)));
    assert_eq!(m(&["hash_modula"]), Ok((Method::HashModula, None)));
    assert_eq!(
        m(&["hash_ketama", "$remote_port"]),
        Ok((Method::HashKetama, Some("$remote_port".into())))
    );
    assert_eq!(
        m(&["hash", "$x"]),
        Ok((Method::HashModula, Some("$x".into())))
    );
    assert_eq!(
        m(&["hash", "$x", "consistent"]),
        Ok((Method::HashKetama, Some("$x".into())))
    );
    assert_eq!(m(&["random"]), Ok((Method::Random { two: false }, None)));
    assert_eq!(
        m(&["random", "two", "least_conn"]),
        Ok((Method::Random { two: true }, None))
    );
    for bad in [
        &["rr"][..],
        &["least_conn", "x"],
        &["hash"],
        &["hash", "$x", "ring"],
        &["random", "three"],
        &["ip_hash", "$x"],
    ] {
        let e = parse_lb(bad).unwrap_err();
        assert!(e.to_string().contains("accepted: roundrobin"), "{e}");
    }
}
