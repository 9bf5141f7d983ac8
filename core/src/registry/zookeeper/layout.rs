//! How the children of a watched path describe servers: `IpPort` (a child per server,
//! named `ip:port`) or `Curator` (Apache Curator / Spring Cloud ServiceDiscovery
//! instances). Each child maps on its own, so a bad entry is skipped and named.

use std::net::{IpAddr, SocketAddr};

use serde_json::Value;

use super::Child;
use crate::servers::{
    apply_json_attrs, apply_json_object, attr_err, parse_addr, printable, ServerSpec, SpecError,
};

pub use crate::conf::zookeeper::ZkLayout as Layout;

/// A child that does not describe a server, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("child \"{child}\": {err}")]
pub struct ChildError {
    pub child: String,
    pub err: SpecError,
}

/// One child as a server.
pub fn server_from(layout: Layout, child: &Child) -> Result<ServerSpec, ChildError> {
    let wrap = |err| ChildError {
        child: printable(&child.name, 128),
        err,
    };
    match layout {
        Layout::IpPort => {
            let mut spec = ServerSpec::new(parse_addr(&child.name).map_err(wrap)?);
            apply_json_attrs(&mut spec, &child.data).map_err(wrap)?;
            Ok(spec)
        }
        Layout::Curator => curator(&child.data).map_err(wrap),
    }
}

/// Every child as a server; the children that are not one, with the reason.
pub fn servers_from(layout: Layout, children: &[Child]) -> (Vec<ServerSpec>, Vec<ChildError>) {
    let mut ok = Vec::with_capacity(children.len());
    let mut bad = Vec::new();
    for c in children {
        match server_from(layout, c) {
            Ok(s) => ok.push(s),
            Err(e) => bad.push(e),
        }
    }
    (ok, bad)
}

/// The children as a registry listing: the servers, and the children that are not one
/// as skipped entries (keyed by the child's name).
pub fn listing(layout: Layout, children: &[Child]) -> crate::registry::Listing {
    let (servers, bad) = servers_from(layout, children);
    crate::registry::Listing {
        servers,
        skipped: bad
            .into_iter()
            .map(|e| crate::registry::Skipped::new(&e.child, e.err))
            .collect(),
    }
}

fn port_of(key: &'static str, v: &Value) -> Result<Option<u16>, SpecError> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => match n.as_u64() {
            Some(p) if (1..=65535).contains(&p) => Ok(Some(p as u16)),
            _ => Err(attr_err(key, v, "a port number 1-65535")),
        },
        _ => Err(attr_err(key, v, "a port number 1-65535")),
    }
}

fn curator(data: &[u8]) -> Result<ServerSpec, SpecError> {
    let v: Value = serde_json::from_slice(data.trim_ascii())
        .map_err(|e| SpecError::NotObject(format!("not a Curator ServiceInstance: {e}")))?;
    let Value::Object(obj) = &v else {
        return Err(SpecError::NotObject(printable(&v.to_string(), 64)));
    };
    let ip = match obj.get("address") {
        Some(Value::String(s)) => s
            .trim()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .map_err(|_| SpecError::Address(printable(s, 128)))?,
        Some(other) => return Err(attr_err("address", other, "an IP address")),
        None => return Err(SpecError::Address("(no \"address\")".into())),
    };
    let port = match obj
        .get("port")
        .map(|p| port_of("port", p))
        .transpose()?
        .flatten()
    {
        Some(p) => p,
        None => obj
            .get("sslPort")
            .map(|p| port_of("sslPort", p))
            .transpose()?
            .flatten()
            .ok_or_else(|| SpecError::Address(format!("{ip} (no \"port\" or \"sslPort\")")))?,
    };
    let mut spec = ServerSpec::new(SocketAddr::new(ip, port));
    match obj.get("enabled") {
        None | Some(Value::Null) | Some(Value::Bool(true)) => {}
        Some(Value::Bool(false)) => spec.down = true,
        Some(other) => return Err(attr_err("enabled", other, "true or false")),
    }
    if let Some(Value::Object(p)) = obj.get("payload") {
        apply_json_object(&mut spec, p)?;
        if let Some(Value::Object(m)) = p.get("metadata") {
            apply_json_object(&mut spec, m)?;
            if let Some(Value::String(status)) = m.get("instance_status") {
                if !status.eq_ignore_ascii_case("UP") {
                    spec.down = true;
                }
            }
        }
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn child(name: &str, data: &str) -> Child {
        Child {
            name: name.into(),
            data: data.as_bytes().to_vec(),
        }
    }

    #[test]
    fn ip_port_children_with_and_without_attributes() {
        let s = server_from(Layout::IpPort, &child("127.0.0.1:8080", "")).unwrap();
        assert_eq!(
            s.line(),
            "server 127.0.0.1:8080 weight=1 max_fails=2 fail_timeout=10s;"
        );
        let s = server_from(
            Layout::IpPort,
            &child("[::1]:81", r#"{"weight":5,"down":1,"fail_timeout":"20s"}"#),
        )
        .unwrap();
        assert_eq!(
            s.line(),
            "server [::1]:81 weight=5 max_fails=2 fail_timeout=20s down;"
        );
        let s = server_from(Layout::IpPort, &child("10.0.0.1%3A9000", "{}")).unwrap();
        assert_eq!(s.addr.to_string(), "10.0.0.1:9000");
    }

    #[test]
    fn bad_children_are_named_and_skipped() {
        let (ok, bad) = servers_from(
            Layout::IpPort,
            &[
                child("127.0.0.1:1", ""),
                child("web-1", ""),
                child("127.0.0.1:2", r#"{"weight":0}"#),
                child("127.0.0.1:3", "not json"),
            ],
        );
        assert_eq!(ok.len(), 1);
        let msgs: Vec<String> = bad.iter().map(|e| e.to_string()).collect();
        assert!(
            msgs[0].starts_with("child \"web-1\": invalid server address"),
            "{msgs:?}"
        );
        assert!(msgs[1].starts_with("child \"127.0.0.1:2\": invalid value for \"weight\""));
        assert!(msgs[2].starts_with("child \"127.0.0.1:3\": value is not a JSON object"));
    }

    #[test]
    fn curator_instances() {
        // as Curator's JsonInstanceSerializer writes it
        let plain = r#"{"name":"web","id":"4d2b5f0e","address":"10.1.2.3","port":8080,
            "sslPort":null,"payload":null,"registrationTimeUTC":1700000000000,
            "serviceType":"DYNAMIC","uriSpec":{"parts":[]}}"#;
        let s = server_from(Layout::Curator, &child("4d2b5f0e", plain)).unwrap();
        assert_eq!(
            s.line(),
            "server 10.1.2.3:8080 weight=1 max_fails=2 fail_timeout=10s;"
        );
        // Spring Cloud Zookeeper: metadata strings, instance status
        let spring = r#"{"name":"web","id":"a1","address":"10.1.2.4","port":9000,"sslPort":null,
            "payload":{"@class":"org.springframework.cloud.zookeeper.discovery.ZookeeperInstance",
            "id":"web-1","name":"web","metadata":{"weight":"3","max_fails":"0",
            "instance_status":"OUT_OF_SERVICE"}},"enabled":true}"#;
        let s = server_from(Layout::Curator, &child("a1", spring)).unwrap();
        assert_eq!(
            s.line(),
            "server 10.1.2.4:9000 weight=3 max_fails=0 fail_timeout=10s down;"
        );
        // sslPort only, disabled, attributes straight in the payload, IPv6
        let ssl = r#"{"address":"::1","port":null,"sslPort":8443,"enabled":false,
            "payload":{"weight":7,"backup":true}}"#;
        let s = server_from(Layout::Curator, &child("b", ssl)).unwrap();
        assert_eq!(
            s.line(),
            "server [::1]:8443 weight=7 max_fails=2 fail_timeout=10s backup down;"
        );
        // a payload that is not an object is ignored
        let odd = r#"{"address":"10.0.0.9","port":1,"payload":"opaque"}"#;
        assert!(server_from(Layout::Curator, &child("c", odd)).is_ok());
    }

    #[test]
    fn curator_errors_name_the_child_and_the_cause() {
        let cases = [
            (
                r#"{"address":"web.internal","port":80}"#,
                "invalid server address \"web.internal\"",
            ),
            (r#"{"port":80}"#, "(no \"address\")"),
            (r#"{"address":"10.0.0.1"}"#, "no \"port\" or \"sslPort\""),
            (
                r#"{"address":"10.0.0.1","port":70000}"#,
                "invalid value for \"port\"",
            ),
            (
                r#"{"address":"10.0.0.1","port":"80"}"#,
                "invalid value for \"port\"",
            ),
            (
                r#"{"address":"10.0.0.1","port":80,"enabled":"no"}"#,
                "\"enabled\"",
            ),
            (
                r#"{"address":"10.0.0.1","port":80,"payload":{"weight":-1}}"#,
                "\"weight\"",
            ),
            ("[1,2]", "not a JSON object"),
            ("", "not a Curator ServiceInstance"),
        ];
        for (data, want) in cases {
            let e = server_from(Layout::Curator, &child("id-1", data)).unwrap_err();
            assert_eq!(e.child, "id-1");
            assert!(e.to_string().contains(want), "{data}: {e}");
        }
    }

    #[test]
    fn listings_skip_and_name_bad_children() {
        let l = listing(
            Layout::IpPort,
            &[
                child("127.0.0.1:1", ""),
                child("web-1", ""),
                child("127.0.0.1:2", r#"{"weight":-5}"#),
            ],
        );
        assert_eq!(l.servers.len(), 1);
        assert_eq!(l.skipped.len(), 2);
        assert_eq!(l.skipped[0].key, "web-1");
        assert!(
            l.skipped[0].cause.starts_with("invalid server address"),
            "{:?}",
            l.skipped
        );
        assert_eq!(l.skipped[1].key, "127.0.0.1:2");
        assert!(
            l.skipped[1]
                .cause
                .starts_with("invalid value for \"weight\""),
            "{:?}",
            l.skipped
        );
    }

    #[test]
    fn layout_names() {
        assert_eq!(Layout::parse("ip_port"), Some(Layout::IpPort));
        assert_eq!(Layout::parse("curator"), Some(Layout::Curator));
        assert_eq!(Layout::parse("dubbo"), None);
    }
}
