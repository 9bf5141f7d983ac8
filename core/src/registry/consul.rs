//! Consul: KV prefixes (`upsync_type=consul`) and services (`consul_services`, catalog or
//! health endpoint), both as blocking queries on `X-Consul-Index`.

use base64::Engine as _;
use serde::Deserialize;

use super::{excerpt, Listing, RegistryError, Request, Snapshot, Source};
use crate::conf::{Credential, SourceKind, UpsyncSpec};
use crate::http::Head;
use crate::servers::{apply_json_attrs, apply_tags, parse_addr, ServerSpec, SpecError};

/// Answers in a row whose index goes back before polls slow down to upsync_interval (one
/// is a snapshot restore: read again at once).
const BACKWARDS_STREAK: u32 = 2;

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

/// Whether an answer is go-connlimit's refusal of a client over Consul's per-client
/// connection limit (`limits.http_max_conns_per_client`): HTTP 429 with "Your IP is
/// issuing too many concurrent connections, please rate limit your calls", written as
/// soon as the connection is accepted, before the request is read.
pub fn is_connection_limit_answer(code: u16, body: &str) -> bool {
    code == 429 && body.contains("too many concurrent connections")
}

/// The log line for a Consul connection turned away before any answer: go-connlimit's
/// 429 (or a reset, when the client's request arrives after Consul closed; releases
/// from before mid-2020, consul#8221, only closed). Constant for an address, so an
/// outage logs it once whichever way each refusal looked.
pub fn turned_away_message(addr: impl std::fmt::Display) -> String {
    format!(
        "the registry at {addr} turned the connection away before answering (HTTP 429, or closed or reset before any byte): is this address over Consul's per-client connection limit (limits.http_max_conns_per_client, 200 by default)?"
    )
}

/// A KV path split after its `/v1/kv/`: (the path up to and with it, the key prefix
/// below it); None for a path that is not a KV read.
pub fn split_kv_path(path: &str) -> Option<(&str, &str)> {
    let at = path.find("/v1/kv/")? + "/v1/kv/".len();
    Some(path.split_at(at))
}

pub struct Consul {
    kind: SourceKind,
    path: String,
    user_query: String,
    /// The KV prefix below /v1/kv/, with its trailing slash.
    kv_prefix: String,
    index: u64,
    /// The index the registry returned last (the index sent next may be 0 after a step
    /// back), answers in a row whose index went back, and whether that was logged.
    last_returned: u64,
    backwards_streak: u32,
    backwards_noted: bool,
    note: Option<String>,
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
        let kv_prefix = split_kv_path(&path).map_or(String::new(), |(_, p)| p.to_string());
        Consul {
            kind: spec.kind,
            path,
            user_query: spec.endpoint.query.clone(),
            kv_prefix,
            index: 0,
            last_returned: 0,
            backwards_streak: 0,
            backwards_noted: false,
            note: None,
            wait_ms,
            deadline_ms,
            token_header: None,
        }
    }

    /// Applies Consul's rules to one answer (its status, the ACL filter header, the
    /// index and its steps back) and reads the body with `read`: `None` for an empty KV
    /// prefix (404 with an index), else the body. Returns what `read` made and whether
    /// the registry's position moved (a change may have happened).
    pub fn answer<T>(
        &mut self,
        head: &Head,
        body: &[u8],
        read: impl FnOnce(Option<&[u8]>) -> Result<T, RegistryError>,
    ) -> Result<(T, bool), RegistryError> {
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
        let read = read(if empty_kv { None } else { Some(body) });
        let went_back = returned < self.last_returned;
        let from = self.last_returned;
        self.last_returned = returned;
        let advanced = returned != self.index;
        // The index moves on even when the data is bad: the next blocking query then waits
        // for the next change (the fix, usually) instead of re-reading the bad data.
        self.index = next_index(self.index, returned);
        let read = read?;
        let mut advanced = advanced;
        if went_back {
            // A snapshot restore moves the index back once. An index that goes back on
            // answer after answer (a load balancer mixing registry servers) would make
            // every query return at once: such answers count as no progress, so polls
            // wait upsync_interval, and the episode is logged once.
            self.backwards_streak = self.backwards_streak.saturating_add(1);
            if self.backwards_streak >= BACKWARDS_STREAK {
                advanced = false;
                if !self.backwards_noted {
                    self.backwards_noted = true;
                    self.note = Some(format!(
                        "the registry's index went back on {} answers in a row (last {from} -> {returned}): a load balancer mixing registry servers? Polling at upsync_interval until it moves forward again",
                        self.backwards_streak
                    ));
                }
            }
        } else if advanced {
            self.backwards_streak = 0;
            self.backwards_noted = false;
        }
        Ok((read, advanced))
    }

    /// Reads the KV prefix `prefix` (below /v1/kv/, with its trailing slash) instead
    /// of the configured one: a Consul KV group reads its members' parent.
    pub fn with_kv_prefix(mut self, prefix: &str) -> Consul {
        let base = split_kv_path(&self.path).map_or("", |(b, _)| b);
        self.path = format!("{base}{prefix}");
        self.kv_prefix = prefix.to_string();
        self
    }

    /// The path read (`.../v1/kv/PREFIX`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The KV prefix read, below /v1/kv/ (with its trailing slash).
    pub fn kv_prefix(&self) -> &str {
        &self.kv_prefix
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
        let kv = self.kind == SourceKind::ConsulKv;
        let prefix = self.kv_prefix.clone();
        let (listing, advanced) = self.answer(head, body, |body| match body {
            None => Ok(Listing::default()),
            Some(b) if kv => parse_kv(b, &prefix),
            Some(b) => parse_services(b),
        })?;
        Ok(Some(Snapshot::of(listing, advanced)))
    }

    fn set_poll_cap(&mut self, cap_ms: u64) {
        // Consul answers up to wait/16 late: the whole long poll stays within the cap
        self.wait_ms = self.wait_ms.min((cap_ms / 17 * 16).max(1_000));
    }

    fn reset(&mut self) {
        self.index = 0;
        self.last_returned = 0;
    }

    fn take_note(&mut self) -> Option<String> {
        self.note.take()
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

/// One entry of a KV listing (`GET /v1/kv/<prefix>?recurse`).
#[derive(Deserialize)]
pub struct KvEntry {
    #[serde(rename = "Key")]
    pub key: String,
    #[serde(rename = "Value")]
    pub value: Option<String>,
}

/// The entries of a KV listing, as Consul sent them (sorted by key).
pub fn kv_entries(body: &[u8]) -> Result<Vec<KvEntry>, RegistryError> {
    serde_json::from_slice(body).map_err(|e| RegistryError::Json(e.to_string()))
}

/// `GET /v1/kv/<prefix>?recurse`: one server per key; the key's last path component is the
/// address and the value (base64 JSON) its settings. Folder keys (ending in `/`) are not
/// servers; keys that are not valid servers are skipped (see `Listing`).
pub fn parse_kv(body: &[u8], prefix: &str) -> Result<Listing, RegistryError> {
    Ok(kv_listing(&kv_entries(body)?, prefix))
}

/// The servers of the entries under `prefix` (the rules of [`parse_kv`]).
pub fn kv_listing<'a>(entries: impl IntoIterator<Item = &'a KvEntry>, prefix: &str) -> Listing {
    let mut out = Listing::default();
    for e in entries {
        if e.key.ends_with('/') || !e.key.starts_with(prefix) {
            continue;
        }
        out.push(&e.key, kv_server(e));
    }
    out
}

fn kv_server(e: &KvEntry) -> Result<ServerSpec, SpecError> {
    let name = e.key.rsplit('/').next().unwrap_or("");
    let addr = parse_addr(name)?;
    let mut spec = ServerSpec::new(addr);
    let value = match &e.value {
        Some(v) => base64::engine::general_purpose::STANDARD
            .decode(v)
            .map_err(|err| SpecError::NotObject(format!("value is not base64: {err}")))?,
        None => Vec::new(),
    };
    apply_json_attrs(&mut spec, &value)?;
    Ok(spec)
}

/// `/v1/catalog/service/NAME` (flat entries) or `/v1/health/service/NAME` (nested Node and
/// Service). Address: the service's, else the node's. Settings from tags; weight from
/// `Weights.Passing` when no `weight=` tag says otherwise.
pub fn parse_services(body: &[u8]) -> Result<Listing, RegistryError> {
    use serde_json::Value;
    let entries: Vec<Value> =
        serde_json::from_slice(body).map_err(|e| RegistryError::Json(e.to_string()))?;
    let mut out = Listing::default();
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
            id
        };
        let host = if svc_addr.is_empty() {
            node_addr
        } else {
            svc_addr
        };
        let entry = service_addr(&host, port).and_then(|addr| {
            let mut spec = ServerSpec::new(addr);
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
            apply_tags(&mut spec, tags)?;
            Ok(spec)
        });
        out.push(&key, entry);
    }
    Ok(out)
}

/// A service instance's address: an IP address (host names are not resolved) and a
/// port from 1 to 65535, each refused with its own reason.
fn service_addr(
    host: &str,
    port: Option<&serde_json::Value>,
) -> Result<std::net::SocketAddr, SpecError> {
    let port = match port.and_then(serde_json::Value::as_u64) {
        Some(p) if (1..=65535).contains(&p) => p as u16,
        Some(p) => {
            return Err(SpecError::Port(excerpt(p.to_string().as_bytes())));
        }
        None => {
            return Err(SpecError::Port(
                port.map(|p| excerpt(p.to_string().as_bytes()))
                    .unwrap_or_else(|| "none".into()),
            ))
        }
    };
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(std::net::SocketAddr::new(ip, port)),
        Err(_) => Err(SpecError::Address(excerpt(host.as_bytes()))),
    }
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
    fn kv_errors_and_bad_entries() {
        let mut c = kv_source();
        c.handle(&head(200, Some("9")), b"[]").unwrap();
        // an error status keeps the position: the next query asks again from 9
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
        assert_eq!(c.position(), 9);
        // a body that is not a listing is a data error; the index moves on, so the next
        // blocking query waits for the next change instead of re-reading the bad data
        let err = c.handle(&head(200, Some("10")), b"[{\"Key\":").unwrap_err();
        assert!(matches!(err, RegistryError::Json(_)) && err.is_data_error());
        assert_eq!(c.position(), 10);
        assert!(matches!(
            c.handle(&head(200, Some("11")), br#"{"Key":"a"}"#),
            Err(RegistryError::Json(_))
        ));
        // bad entries are skipped, the others apply
        let body = format!(
            r#"[{{"Key":"upstreams/test/127.0.0.1:1","Value":"{}"}},
                {{"Key":"upstreams/test/localhost:80","Value":null}},
                {{"Key":"upstreams/test/127.0.0.1:2","Value":"{}"}},
                {{"Key":"upstreams/test/127.0.0.1:3","Value":"{}"}}]"#,
            b64(r#"{"weight":-1}"#),
            b64(r#"{"weight":2}"#),
            b64("not json")
        );
        let s = c
            .handle(&head(200, Some("12")), body.as_bytes())
            .unwrap()
            .unwrap();
        assert_eq!(s.servers.len(), 1);
        assert_eq!(s.servers[0].addr.to_string(), "127.0.0.1:2");
        let keys: Vec<&str> = s.skipped.iter().map(|k| k.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "upstreams/test/127.0.0.1:1",
                "upstreams/test/127.0.0.1:3",
                "upstreams/test/localhost:80"
            ]
        );
        assert!(
            s.skipped[0].cause.contains("\"weight\": -1"),
            "{:?}",
            s.skipped
        );
        assert!(s.skipped[2].cause.contains("invalid server address"));
        assert_eq!(c.position(), 12);
    }

    #[test]
    fn index_going_back_on_every_answer_is_slowed_and_noted_once() {
        let mut c = kv_source();
        c.handle(&head(200, Some("100")), b"[]").unwrap();
        // one step back (a snapshot restore): read again at once
        let s = c.handle(&head(200, Some("50")), b"[]").unwrap().unwrap();
        assert!(s.advanced);
        assert!(c.take_note().is_none());
        let mut d = kv_source();
        d.handle(&head(200, Some("100")), b"[]").unwrap();
        let mut slow = 0;
        let mut noted = 0;
        for idx in [90u64, 80, 70, 60, 50, 40] {
            let s = d
                .handle(&head(200, Some(&idx.to_string())), b"[]")
                .unwrap()
                .unwrap();
            slow += !s.advanced as u32;
            noted += d.take_note().is_some() as u32;
        }
        assert_eq!(slow, 5, "every answer after the first step back waits");
        assert_eq!(noted, 1, "logged once");
        // moving forward again ends the episode
        let s = d.handle(&head(200, Some("41")), b"[]").unwrap().unwrap();
        assert!(s.advanced);
    }

    #[test]
    fn a_poll_cap_shortens_the_wait() {
        let mut c = kv_source();
        c.handle(&head(200, Some("5")), b"[]").unwrap();
        assert!(c.next_request().path_and_query.contains("&wait="));
        c.set_poll_cap(1_500);
        assert!(
            c.next_request()
                .path_and_query
                .contains("index=5&wait=1408ms"),
            "{}",
            c.next_request().path_and_query
        );
        c.set_poll_cap(100);
        assert!(
            c.next_request().path_and_query.contains("wait=1000ms"),
            "at least 1 s"
        );
    }

    #[test]
    fn connection_limit_answers() {
        let body = excerpt(
            b"Your IP is issuing too many concurrent connections, please rate limit your calls\n",
        );
        assert!(is_connection_limit_answer(429, &body));
        assert!(!is_connection_limit_answer(429, "rate limit exceeded"));
        assert!(!is_connection_limit_answer(500, &body));
        let m = turned_away_message("127.0.0.1:8500");
        assert!(m.contains("127.0.0.1:8500") && m.contains("limits.http_max_conns_per_client"));
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
        let s = parse_services(catalog).unwrap().servers;
        assert_eq!(s[0].addr.to_string(), "10.0.0.1:8080");
        assert_eq!((s[0].weight, s[0].backup), (3, true));
        assert_eq!(s[1].addr.to_string(), "127.0.0.2:8081");
        assert_eq!(s[1].weight, 7);
        let health = br#"[{"Node":{"Node":"n","Address":"127.0.0.1"},"Service":{"ID":"a","Service":"web","Address":"","Port":9000,"Tags":["down"]},"Checks":[]}]"#;
        let s = parse_services(health).unwrap().servers;
        assert_eq!(s[0].addr.to_string(), "127.0.0.1:9000");
        assert!(s[0].down);
        // bad instances are skipped with their own cause
        let skipped = |body: &[u8]| {
            let l = parse_services(body).unwrap();
            assert!(l.servers.is_empty());
            l.skipped[0].cause.clone()
        };
        assert!(
            skipped(br#"[{"Node":{"Address":"x.example"},"Service":{"ID":"a","Port":1}}]"#)
                .contains("invalid server address \"x.example\"")
        );
        assert_eq!(
            skipped(br#"[{"ServiceID":"a","Address":"127.0.0.1","ServicePort":0}]"#),
            "invalid port 0 (expected 1 to 65535)"
        );
        assert!(skipped(br#"[{"ServiceID":"a","Address":"127.0.0.1","ServicePort":1,"ServiceTags":["weight=0"]}]"#).contains("weight"));
        assert!(
            parse_services(b"{}").is_err(),
            "not a list: the whole answer is refused"
        );
    }
}
