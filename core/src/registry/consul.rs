//! Consul: KV prefixes (`upsync_type=consul`) and services (`consul_services`, catalog or
//! health endpoint), both as blocking queries on `X-Consul-Index`.

use base64::Engine as _;
use serde::Deserialize;

use super::{excerpt, RegistryError, Request, Snapshot, Source};
use crate::conf::{Credential, SourceKind, UpsyncSpec};
use crate::http::Head;
use crate::servers::{apply_json_attrs, apply_tags, parse_addr, ServerSpec};

/// Consul caps `wait` at 10 minutes.
const MAX_WAIT_MS: u64 = 600_000;

/// Splits `upsync_timeout` into the `wait=` sent to Consul and the client's own deadline:
/// Consul may answer up to wait/16 late (jitter), so the deadline leaves that plus a margin.
pub fn wait_and_deadline(timeout_ms: u64) -> (u64, u64) {
    let margin = 2_000;
    let wait = (timeout_ms.saturating_sub(margin) / 17)
        .saturating_mul(16)
        .clamp(1_000, MAX_WAIT_MS);
    let deadline = timeout_ms.max(wait + wait / 16 + margin);
    (wait, deadline)
}

/// Consul's index rules: an index that went backwards (snapshot restore) starts over from
/// 0; an index of 0 is treated as 1 so a blocking query never degenerates into a busy loop.
pub fn next_index(last: u64, returned: u64) -> u64 {
    if returned < last {
        0
    } else {
        returned.max(1)
    }
}

pub struct Consul {
    kind: SourceKind,
    path: String,
    user_query: String,
    /// The KV prefix below /v1/kv/, with its trailing slash.
    kv_prefix: String,
    index: u64,
    wait_ms: u64,
    deadline_ms: u64,
    /// `X-Consul-Token: ...` (a header, never the `?token=` form that ends up in logs).
    token_header: Option<String>,
}

impl Consul {
    pub fn with_credential(mut self, cred: Option<&Credential>) -> Consul {
        self.token_header = match cred {
            Some(Credential::Token(t)) => Some(format!("X-Consul-Token: {t}")),
            _ => None,
        };
        self
    }

    pub fn new(spec: &UpsyncSpec) -> Consul {
        let (wait_ms, deadline_ms) = wait_and_deadline(spec.timeout_ms);
        let path = spec.endpoint.path.clone();
        let kv_prefix = path
            .find("/v1/kv/")
            .map(|i| path[i + "/v1/kv/".len()..].to_string())
            .unwrap_or_default();
        Consul {
            kind: spec.kind,
            path,
            user_query: spec.endpoint.query.clone(),
            kv_prefix,
            index: 0,
            wait_ms,
            deadline_ms,
            token_header: None,
        }
    }
}

impl Source for Consul {
    fn next_request(&self) -> Request {
        let mut q = String::new();
        if self.kind == SourceKind::ConsulKv {
            q.push_str("recurse&");
        }
        if self.kind == SourceKind::ConsulHealth
            && !self
                .user_query
                .split('&')
                .any(|p| p == "passing" || p.starts_with("passing="))
        {
            q.push_str("passing&");
        }
        q.push_str(&format!("index={}&wait={}ms", self.index, self.wait_ms));
        if !self.user_query.is_empty() {
            q.push('&');
            q.push_str(&self.user_query);
        }
        let timeout = if self.index == 0 {
            self.deadline_ms.min(30_000)
        } else {
            self.deadline_ms
        };
        let mut r = Request::get(format!("{}?{}", self.path, q), timeout);
        r.headers.extend(self.token_header.clone());
        r
    }

    fn handle(&mut self, head: &Head, body: &[u8]) -> Result<Option<Snapshot>, RegistryError> {
        let empty_kv = head.status == 404 && self.kind == SourceKind::ConsulKv;
        if head.status != 200 && !empty_kv {
            return Err(RegistryError::Status {
                code: head.status,
                body: excerpt(body),
            });
        }
        if head
            .header("x-consul-results-filtered-by-acls")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
        {
            return Err(RegistryError::AclFiltered);
        }
        let raw = head
            .header("x-consul-index")
            .ok_or(RegistryError::MissingHeader("X-Consul-Index"))?;
        let returned: u64 = raw
            .parse()
            .map_err(|_| RegistryError::BadHeader("X-Consul-Index", excerpt(raw.as_bytes())))?;
        let servers = if empty_kv {
            Vec::new()
        } else if self.kind == SourceKind::ConsulKv {
            parse_kv(body, &self.kv_prefix)?
        } else {
            parse_services(body)?
        };
        let advanced = returned != self.index;
        self.index = next_index(self.index, returned);
        Ok(Some(Snapshot::new(servers, advanced)))
    }

    fn reset(&mut self) {
        self.index = 0;
    }

    fn secrets(&self) -> Vec<String> {
        self.token_header
            .as_deref()
            .and_then(|h| h.strip_prefix("X-Consul-Token: "))
            .map(|t| vec![t.to_string()])
            .unwrap_or_default()
    }

    fn position(&self) -> u64 {
        self.index
    }
}

#[derive(Deserialize)]
struct KvEntry {
    #[serde(rename = "Key")]
    key: String,
    #[serde(rename = "Value")]
    value: Option<String>,
}

/// `GET /v1/kv/<prefix>?recurse`: one server per key; the key's last path component is the
/// address and the value (base64 JSON) its settings. Folder keys (ending in `/`) are skipped.
pub fn parse_kv(body: &[u8], prefix: &str) -> Result<Vec<ServerSpec>, RegistryError> {
    let entries: Vec<KvEntry> =
        serde_json::from_slice(body).map_err(|e| RegistryError::Json(e.to_string()))?;
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        if e.key.ends_with('/') || !e.key.starts_with(prefix) {
            continue;
        }
        let name = e.key.rsplit('/').next().unwrap_or("");
        let entry_err = |err| RegistryError::Entry {
            key: excerpt(e.key.as_bytes()),
            err,
        };
        let mut spec = ServerSpec::new(parse_addr(name).map_err(entry_err)?);
        let value = match &e.value {
            Some(v) => base64::engine::general_purpose::STANDARD
                .decode(v)
                .map_err(|err| RegistryError::Entry {
                    key: excerpt(e.key.as_bytes()),
                    err: crate::servers::SpecError::NotObject(format!(
                        "value is not base64: {err}"
                    )),
                })?,
            None => Vec::new(),
        };
        apply_json_attrs(&mut spec, &value).map_err(entry_err)?;
        out.push(spec);
    }
    Ok(out)
}

/// `/v1/catalog/service/NAME` (flat entries) or `/v1/health/service/NAME` (nested Node and
/// Service). Address: the service's, else the node's. Settings from tags; weight from
/// `Weights.Passing` when no `weight=` tag says otherwise.
pub fn parse_services(body: &[u8]) -> Result<Vec<ServerSpec>, RegistryError> {
    use serde_json::Value;
    let entries: Vec<Value> =
        serde_json::from_slice(body).map_err(|e| RegistryError::Json(e.to_string()))?;
    let mut out = Vec::with_capacity(entries.len());
    for e in &entries {
        let str_of = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("").to_string();
        let (id, svc_addr, node_addr, port, tags, weights) = if let Some(svc) = e.get("Service") {
            (
                str_of(svc.get("ID")),
                str_of(svc.get("Address")),
                str_of(e.get("Node").and_then(|n| n.get("Address"))),
                svc.get("Port"),
                svc.get("Tags"),
                svc.get("Weights"),
            )
        } else {
            (
                str_of(e.get("ServiceID")),
                str_of(e.get("ServiceAddress")),
                str_of(e.get("Address")),
                e.get("ServicePort"),
                e.get("ServiceTags"),
                e.get("ServiceWeights"),
            )
        };
        let key = if id.is_empty() {
            "(service without ID)".to_string()
        } else {
            excerpt(id.as_bytes())
        };
        let entry_err = |err| RegistryError::Entry {
            key: key.clone(),
            err,
        };
        let host = if svc_addr.is_empty() {
            node_addr
        } else {
            svc_addr
        };
        let port = port
            .and_then(Value::as_u64)
            .filter(|p| (1..=65535).contains(p));
        let addr_text = match (host.parse::<std::net::IpAddr>(), port) {
            (Ok(std::net::IpAddr::V6(ip)), Some(p)) => format!("[{ip}]:{p}"),
            (_, Some(p)) => format!("{host}:{p}"),
            (_, None) => format!("{host}:?"),
        };
        let mut spec = ServerSpec::new(parse_addr(&addr_text).map_err(entry_err)?);
        if let Some(w) = weights
            .and_then(|w| w.get("Passing"))
            .and_then(Value::as_u64)
        {
            if (1..=crate::servers::MAX_WEIGHT as u64).contains(&w) {
                spec.weight = w as u32;
            }
        }
        let tags: Vec<&str> = tags
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        apply_tags(&mut spec, tags).map_err(entry_err)?;
        out.push(spec);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conf::parse_upsync;

    fn head(status: u16, index: Option<&str>) -> Head {
        let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
        if let Some(i) = index {
            headers.push(("x-consul-index".to_string(), i.to_string()));
        }
        Head {
            status,
            http11: true,
            headers,
        }
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn kv_source() -> Consul {
        Consul::new(
            &parse_upsync(&[
                "127.0.0.1:8500/v1/kv/upstreams/test",
                "upsync_type=consul",
                "upsync_timeout=6m",
            ])
            .unwrap(),
        )
    }

    #[test]
    fn kv_request_uses_index_and_wait() {
        let mut c = kv_source();
        let r = c.next_request();
        assert!(
            r.path_and_query
                .starts_with("/v1/kv/upstreams/test/?recurse&index=0&wait="),
            "{}",
            r.path_and_query
        );
        let body = format!(
            r#"[{{"Key":"upstreams/test/127.0.0.1:8089","Value":null}},{{"Key":"upstreams/test/","Value":null}},{{"Key":"upstreams/test/127.0.0.1:8088","Value":"{}"}}]"#,
            b64(r#"{"weight":40}"#)
        );
        let snap = c
            .handle(&head(200, Some("17")), body.as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(snap.servers.len(), 2);
        assert_eq!(snap.servers[0].addr.port(), 8088);
        assert_eq!(snap.servers[0].weight, 40);
        assert!(snap.advanced);
        assert!(c.next_request().path_and_query.contains("index=17&"));
        assert!(c.next_request().headers.is_empty());
        let mut t = kv_source().with_credential(Some(&Credential::Token("s3cr3t".into())));
        assert_eq!(
            t.next_request().headers,
            vec!["X-Consul-Token: s3cr3t".to_string()]
        );
        assert!(!t.next_request().path_and_query.contains("s3cr3t"));
        t.reset();
        let (wait, deadline) = wait_and_deadline(360_000);
        assert!(deadline > wait * 17 / 16, "deadline {deadline} wait {wait}");
        assert_eq!(c.next_request().timeout_ms, deadline);
    }

    #[test]
    fn kv_404_with_index_is_empty() {
        let mut c = kv_source();
        let snap = c.handle(&head(404, Some("5")), b"").unwrap().unwrap();
        assert!(snap.servers.is_empty());
        assert_eq!(c.position(), 5);
    }

    #[test]
    fn kv_errors_keep_position() {
        let mut c = kv_source();
        c.handle(&head(200, Some("9")), b"[]").unwrap();
        assert!(matches!(
            c.handle(&head(500, Some("10")), b"rpc error"),
            Err(RegistryError::Status { code: 500, .. })
        ));
        assert!(matches!(
            c.handle(&head(200, None), b"[]"),
            Err(RegistryError::MissingHeader(_))
        ));
        assert!(matches!(
            c.handle(&head(200, Some("x")), b"[]"),
            Err(RegistryError::BadHeader(..))
        ));
        assert!(matches!(
            c.handle(&head(200, Some("10")), b"[{\"Key\":"),
            Err(RegistryError::Json(_))
        ));
        assert!(matches!(
            c.handle(&head(200, Some("10")), br#"{"Key":"a"}"#),
            Err(RegistryError::Json(_))
        ));
        let bad = format!(
            r#"[{{"Key":"upstreams/test/127.0.0.1:1","Value":"{}"}}]"#,
            b64(r#"{"weight":-1}"#)
        );
        let err = c
            .handle(&head(200, Some("10")), bad.as_bytes())
            .unwrap_err();
        assert!(
            err.to_string().contains("upstreams/test/127.0.0.1:1"),
            "{err}"
        );
        let err = c
            .handle(
                &head(200, Some("10")),
                br#"[{"Key":"upstreams/test/localhost:80","Value":null}]"#,
            )
            .unwrap_err();
        assert!(err.to_string().contains("invalid server address"), "{err}");
        assert_eq!(c.position(), 9);
    }

    #[test]
    fn index_rules() {
        assert_eq!(next_index(10, 12), 12);
        assert_eq!(next_index(10, 3), 0);
        assert_eq!(next_index(0, 0), 1);
        let mut c = kv_source();
        c.handle(&head(200, Some("50")), b"[]").unwrap();
        let s = c.handle(&head(200, Some("50")), b"[]").unwrap().unwrap();
        assert!(!s.advanced);
        c.handle(&head(200, Some("2")), b"[]").unwrap();
        assert_eq!(c.position(), 0);
    }

    #[test]
    fn services_catalog_and_health() {
        let catalog = br#"[{"Node":"n1","Address":"10.0.0.1","ServiceID":"web1","ServiceAddress":"","ServicePort":8080,"ServiceTags":["weight=3","backup"]},
                           {"Node":"n2","Address":"10.0.0.2","ServiceID":"web2","ServiceAddress":"127.0.0.2","ServicePort":8081,"ServiceTags":[],"ServiceWeights":{"Passing":7,"Warning":1}}]"#;
        let s = parse_services(catalog).unwrap();
        assert_eq!(s[0].addr.to_string(), "10.0.0.1:8080");
        assert_eq!((s[0].weight, s[0].backup), (3, true));
        assert_eq!(s[1].addr.to_string(), "127.0.0.2:8081");
        assert_eq!(s[1].weight, 7);
        let health = br#"[{"Node":{"Node":"n","Address":"127.0.0.1"},"Service":{"ID":"a","Service":"web","Address":"","Port":9000,"Tags":["down"]},"Checks":[]}]"#;
        let s = parse_services(health).unwrap();
        assert_eq!(s[0].addr.to_string(), "127.0.0.1:9000");
        assert!(s[0].down);
        assert!(parse_services(
            br#"[{"Node":{"Address":"x.example"},"Service":{"ID":"a","Port":1}}]"#
        )
        .is_err());
        assert!(
            parse_services(br#"[{"ServiceID":"a","Address":"127.0.0.1","ServicePort":0}]"#)
                .is_err()
        );
        assert!(parse_services(br#"[{"ServiceID":"a","Address":"127.0.0.1","ServicePort":1,"ServiceTags":["weight=0"]}]"#).is_err());
    }
}
