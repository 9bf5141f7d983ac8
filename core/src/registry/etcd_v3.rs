//! etcd v3 through its JSON gateway (`upsync_type=etcdv3`). The `upsync` path is the key
//! prefix: `upsync 127.0.0.1:2379/upstreams/NAME/ upsync_type=etcdv3` syncs the keys
//! `/upstreams/NAME/<ip:port>`.
//!
//! A range read (`POST /v3/kv/range` over the prefix) gives the servers and the store
//! revision; then a watch (`POST /v3/watch` from revision + 1) streams chunked JSON
//! messages. The first message with events — or a cancellation, as when the start
//! revision was compacted — ends the exchange and the prefix is read again. int64 fields
//! arrive as JSON strings; empty results omit `kvs`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::Value;

use super::{excerpt, Listing, RegistryError, Request, Snapshot, Source};
use crate::conf::{Credential, UpsyncSpec};
use crate::http::Head;
use crate::servers::{apply_json_attrs, parse_addr, ServerSpec};

pub struct EtcdV3 {
    prefix: String,
    /// Revision to watch from; 0 = read the range first.
    watch_from: u64,
    revision: u64,
    timeout_ms: u64,
    note: Option<String>,
    /// Bytes of the current watch stream already parsed.
    scanned: usize,
    /// User and password from `token_file=`: requests carry a token from
    /// `/v3/auth/authenticate`, fetched first and again when etcd stops accepting it.
    credential: Option<(String, String)>,
    token: Option<String>,
    /// The token etcd refused last (it may still be quoted in an error).
    old_token: Option<String>,
    /// The token was just issued: if etcd refuses it anyway, authenticating again would
    /// loop, so that is an error.
    fresh_token: bool,
}

/// Whether an etcd error text says the request lacks a valid auth token (none sent, or
/// one that expired, was revoked, or came from a member that restarted).
fn token_rejected(text: &str) -> bool {
    text.contains("invalid auth token")
        || text.contains("permission denied")
        || text.contains("user name is empty")
}

/// The end of a prefix range: the prefix with its last byte incremented.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

/// An int64 field, sent by the gateway as a string (or, by some proxies, a number).
fn int64(v: Option<&Value>) -> Option<u64> {
    match v? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

fn b64_field(v: Option<&Value>) -> Result<Vec<u8>, String> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => B64.decode(s).map_err(|e| format!("not base64: {e}")),
        Some(other) => Err(format!(
            "unexpected {}",
            excerpt(other.to_string().as_bytes())
        )),
    }
}

/// The servers of a range response and its revision.
pub fn parse_range(body: &[u8], prefix: &str) -> Result<(Listing, u64), RegistryError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| RegistryError::Json(e.to_string()))?;
    if let Some(e) = v
        .get("error")
        .or_else(|| v.get("message").filter(|_| v.get("code").is_some()))
    {
        return Err(RegistryError::Status {
            code: 200,
            body: excerpt(e.to_string().as_bytes()),
        });
    }
    let revision = int64(v.get("header").and_then(|h| h.get("revision")))
        .ok_or_else(|| RegistryError::Json("response has no header.revision".into()))?;
    let mut out = Listing::default();
    let kvs = match v.get("kvs") {
        None | Some(Value::Null) => return Ok((out, revision)),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(RegistryError::Json("\"kvs\" is not a list".into())),
    };
    for kv in kvs {
        let key_bytes =
            b64_field(kv.get("key")).map_err(|e| RegistryError::Json(format!("key {e}")))?;
        let key = String::from_utf8_lossy(&key_bytes).into_owned();
        if key.ends_with('/') || !key.starts_with(prefix) {
            continue;
        }
        let name = key.rsplit('/').next().unwrap_or("");
        let entry = parse_addr(name).and_then(|addr| {
            let mut spec = ServerSpec::new(addr);
            let value = b64_field(kv.get("value"))
                .map_err(|e| crate::servers::SpecError::NotObject(format!("value {e}")))?;
            apply_json_attrs(&mut spec, &value)?;
            Ok(spec)
        });
        out.push(&key, entry);
    }
    Ok((out, revision))
}

/// What a watch stream has said so far.
#[derive(Debug, PartialEq, Eq)]
pub enum WatchState {
    /// Only "created" (or nothing complete yet): keep waiting.
    Waiting,
    /// The server reported a failure in the stream (it stopped, a leader change, ...).
    Failed(String),
    /// Events: read again.
    Reread,
    /// The watch was cancelled (its start revision was compacted): read again.
    Canceled(String),
    Error(String),
}

/// Reads the complete JSON messages of a watch stream.
pub fn watch_state(body: &[u8]) -> WatchState {
    watch_state_from(body, &mut 0)
}

/// Like `watch_state`, starting at `*scanned` and advancing it past every complete
/// message that decided nothing, so a long stream is parsed once, not once per chunk.
pub fn watch_state_from(body: &[u8], scanned: &mut usize) -> WatchState {
    let start = (*scanned).min(body.len());
    let mut it = serde_json::Deserializer::from_slice(&body[start..]).into_iter::<Value>();
    loop {
        let next = it.next();
        if let Some(Ok(_)) = &next {
            *scanned = start + it.byte_offset();
        }
        match next {
            None => return WatchState::Waiting,
            Some(Err(e)) if e.is_eof() => return WatchState::Waiting,
            Some(Err(e)) => return WatchState::Error(format!("invalid JSON in watch stream: {e}")),
            Some(Ok(msg)) => {
                if let Some(e) = msg.get("error") {
                    let text = e
                        .get("message")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .unwrap_or_else(|| e.to_string());
                    return WatchState::Failed(format!(
                        "watch error: {}",
                        excerpt(text.as_bytes())
                    ));
                }
                let Some(r) = msg.get("result") else {
                    return WatchState::Error(format!(
                        "unexpected watch message {}",
                        excerpt(msg.to_string().as_bytes())
                    ));
                };
                let events = r
                    .get("events")
                    .and_then(Value::as_array)
                    .is_some_and(|e| !e.is_empty());
                if r.get("canceled").and_then(Value::as_bool).unwrap_or(false) {
                    let why = match int64(r.get("compact_revision")) {
                        Some(c) if c > 0 => format!("compacted up to revision {c}"),
                        _ => r
                            .get("cancel_reason")
                            .and_then(Value::as_str)
                            .unwrap_or("no reason given")
                            .to_string(),
                    };
                    return WatchState::Canceled(why);
                }
                if events {
                    return WatchState::Reread;
                }
            }
        }
    }
}

impl EtcdV3 {
    pub fn new(spec: &UpsyncSpec) -> EtcdV3 {
        EtcdV3 {
            prefix: spec.endpoint.path.clone(),
            watch_from: 0,
            revision: 0,
            timeout_ms: spec.timeout_ms,
            note: None,
            scanned: 0,
            credential: None,
            token: None,
            old_token: None,
            fresh_token: false,
        }
    }

    pub fn with_credential(mut self, cred: Option<&Credential>) -> EtcdV3 {
        self.credential = match cred {
            Some(Credential::UserPassword { user, password }) => {
                Some((user.clone(), password.clone()))
            }
            _ => None,
        };
        self
    }

    fn authenticating(&self) -> bool {
        self.credential.is_some() && self.token.is_none()
    }

    /// The authenticate exchange's answer: the token, or why there is none.
    fn take_token(&mut self, head: &Head, body: &[u8]) -> Result<Option<Snapshot>, RegistryError> {
        let user = self.credential.as_ref().map(|c| c.0.as_str()).unwrap_or("");
        let v: Option<Value> = serde_json::from_slice(body).ok();
        let token = v
            .as_ref()
            .and_then(|v| v.get("token"))
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b > b' ' && b < 0x7f));
        match token {
            Some(t) if head.status == 200 => {
                self.token = Some(t.to_string());
                self.fresh_token = true;
                Ok(None)
            }
            _ => {
                let why = v
                    .as_ref()
                    .and_then(|v| v.get("message").or_else(|| v.get("error")))
                    .and_then(Value::as_str)
                    .map(|m| excerpt(m.as_bytes()))
                    .unwrap_or_else(|| format!("HTTP {}: {}", head.status, excerpt(body)));
                Err(RegistryError::Auth(format!(
                    "etcd refused user \"{}\" of token_file=: {why}",
                    excerpt(user.as_bytes())
                )))
            }
        }
    }

    /// A request was refused for its token: forget it and authenticate again at once,
    /// unless the token was brand new.
    fn token_refused(&mut self, why: &str) -> Result<Option<Snapshot>, RegistryError> {
        // Kept only so that text echoing it can still be redacted.
        self.old_token = self.token.take().or(self.old_token.take());
        if self.fresh_token || self.credential.is_none() {
            let hint = if self.credential.is_none() {
                "etcd requires authentication: set token_file= to a file holding USER:PASSWORD"
            } else {
                "etcd refuses a token it has just issued (check the user's role grants the prefix)"
            };
            return Err(RegistryError::Auth(format!(
                "{hint} ({})",
                excerpt(why.as_bytes())
            )));
        }
        self.watch_from = 0;
        self.note = Some(
            "the etcd auth token is no longer accepted (expired or revoked); authenticating again"
                .into(),
        );
        Ok(None)
    }

    fn range_json(&self) -> String {
        format!(
            "\"key\":\"{}\",\"range_end\":\"{}\"",
            B64.encode(self.prefix.as_bytes()),
            B64.encode(prefix_end(self.prefix.as_bytes()))
        )
    }
}

impl Source for EtcdV3 {
    fn next_request(&self) -> Request {
        let mut r = self.request();
        if let Some(t) = &self.token {
            r.headers.push(format!("Authorization: {t}"));
        }
        r
    }

    fn start(&mut self) {
        self.scanned = 0;
    }

    fn on_partial(&mut self, head: &Head, body: &[u8]) -> bool {
        self.watch_from != 0
            && !self.authenticating()
            && head.status == 200
            && watch_state_from(body, &mut self.scanned) != WatchState::Waiting
    }

    fn handle(&mut self, head: &Head, body: &[u8]) -> Result<Option<Snapshot>, RegistryError> {
        self.scanned = 0;
        if self.authenticating() {
            return self.take_token(head, body);
        }
        let result = self.handle_response(head, body);
        match &result {
            Err(RegistryError::Status { body: why, .. })
            | Err(RegistryError::Json(why))
            | Err(RegistryError::Server(why))
                if token_rejected(why) || (head.status == 401 && self.token.is_some()) =>
            {
                let why = why.clone();
                return self.token_refused(&why);
            }
            Err(RegistryError::Status {
                code: 401,
                body: why,
            }) => {
                let why = why.clone();
                return self.token_refused(&why);
            }
            // Any other answer means the token was accepted at least once.
            _ => self.fresh_token = false,
        }
        result
    }

    fn take_note(&mut self) -> Option<String> {
        self.note.take()
    }

    fn reset(&mut self) {
        self.watch_from = 0;
        self.scanned = 0;
        self.fresh_token = false;
    }

    fn position(&self) -> u64 {
        self.revision
    }

    fn secrets(&self) -> Vec<String> {
        let mut v: Vec<String> = self.credential.iter().map(|c| c.1.clone()).collect();
        v.extend(self.token.clone());
        v.extend(self.old_token.clone());
        v
    }
}

impl EtcdV3 {
    fn request(&self) -> Request {
        if let Some((user, password)) = self.credential.as_ref().filter(|_| self.authenticating()) {
            return Request {
                method: "POST",
                body: serde_json::json!({ "name": user, "password": password })
                    .to_string()
                    .into_bytes(),
                ..Request::get("/v3/auth/authenticate".into(), self.timeout_ms.min(30_000))
            };
        }
        if self.watch_from == 0 {
            Request {
                method: "POST",
                body: format!("{{{}}}", self.range_json()).into_bytes(),
                ..Request::get("/v3/kv/range".into(), self.timeout_ms.min(30_000))
            }
        } else {
            Request {
                method: "POST",
                body: format!(
                    "{{\"create_request\":{{{},\"start_revision\":\"{}\"}}}}",
                    self.range_json(),
                    self.watch_from
                )
                .into_bytes(),
                timeout_is_normal: true,
                ..Request::get("/v3/watch".into(), self.timeout_ms)
            }
        }
    }

    fn handle_response(
        &mut self,
        head: &Head,
        body: &[u8],
    ) -> Result<Option<Snapshot>, RegistryError> {
        if head.status != 200 {
            return Err(RegistryError::Status {
                code: head.status,
                body: excerpt(body),
            });
        }
        if self.watch_from != 0 {
            let from = std::mem::replace(&mut self.watch_from, 0);
            return match watch_state(body) {
                WatchState::Error(e) => Err(RegistryError::Json(e)),
                WatchState::Failed(e) => Err(RegistryError::Server(e)),
                WatchState::Canceled(why) => {
                    self.note = Some(format!("the watch from revision {from} was cancelled ({why}); reading everything again"));
                    Ok(None)
                }
                // events, or a stream the server ended: read again
                _ => Ok(None),
            };
        }
        let (listing, revision) = parse_range(body, &self.prefix)?;
        self.revision = revision;
        self.watch_from = revision.saturating_add(1);
        Ok(Some(Snapshot::of(listing, true)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conf::parse_upsync;

    fn head(status: u16) -> Head {
        Head {
            status,
            http11: true,
            headers: vec![],
        }
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn range_then_watch() {
        let mut s = EtcdV3::new(
            &parse_upsync(&["127.0.0.1:2379/upstreams/x", "upsync_type=etcdv3"]).unwrap(),
        );
        let r = s.next_request();
        assert_eq!(
            (r.method, r.path_and_query.as_str()),
            ("POST", "/v3/kv/range")
        );
        let body = String::from_utf8(r.body).unwrap();
        assert!(body.contains(&B64.encode("/upstreams/x/")), "{body}");
        let resp = format!(
            r#"{{"header":{{"cluster_id":"1","member_id":"2","revision":"7","raft_term":"2"}},"kvs":[{{"key":"{}","create_revision":"5","mod_revision":"6","version":"2","value":"{}"}}],"count":"1"}}"#,
            B64.encode("/upstreams/x/127.0.0.1:8080"),
            B64.encode(r#"{"weight":3}"#)
        );
        let snap = s.handle(&head(200), resp.as_bytes()).unwrap().unwrap();
        assert_eq!((snap.servers.len(), snap.servers[0].weight), (1, 3));
        let w = s.next_request();
        assert_eq!(w.path_and_query, "/v3/watch");
        assert!(w.timeout_is_normal);
        assert!(String::from_utf8(w.body)
            .unwrap()
            .contains("\"start_revision\":\"8\""));
        let created = br#"{"result":{"header":{"revision":"7"},"created":true}}"#;
        assert!(!s.on_partial(&head(200), created));
        let mut stream = created.to_vec();
        stream.extend_from_slice(b"\n{\"result\":{\"header\":{\"revision\":\"8\"},\"events\":[{\"kv\":{\"key\":\"eA==\"}}]");
        assert!(!s.on_partial(&head(200), &stream), "incomplete message");
        stream.extend_from_slice(b"}}\n");
        assert!(s.on_partial(&head(200), &stream));
        assert_eq!(s.handle(&head(200), &stream).unwrap(), None);
        assert_eq!(s.next_request().path_and_query, "/v3/kv/range");
    }

    #[test]
    fn empty_compacted_and_errors() {
        let (v, rev) = parse_range(br#"{"header":{"revision":"3"}}"#, "/u/").unwrap();
        assert!(v.servers.is_empty());
        assert_eq!(rev, 3);
        assert_eq!(
            watch_state(br#"{"result":{"header":{},"canceled":true,"compact_revision":"9"}}"#),
            WatchState::Canceled("compacted up to revision 9".into())
        );
        assert!(matches!(
            watch_state(br#"{"error":{"grpc_code":16,"message":"invalid auth token"}}"#),
            WatchState::Failed(_)
        ));
        assert!(matches!(watch_state(b"}{"), WatchState::Error(_)));
        // incremental: a long run of progress messages is parsed once
        let mut body = Vec::new();
        let mut scanned = 0;
        for _ in 0..1000 {
            body.extend_from_slice(br#"{"result":{"header":{"revision":"7"}}}"#);
            assert_eq!(watch_state_from(&body, &mut scanned), WatchState::Waiting);
        }
        assert_eq!(scanned, body.len());
        body.extend_from_slice(br#"{"result":{"header":{},"events":[{"kv":{}}]}}"#);
        assert_eq!(watch_state_from(&body, &mut scanned), WatchState::Reread);
        let bad = format!(
            r#"{{"header":{{"revision":"3"}},"kvs":[{{"key":"{}","value":""}}]}}"#,
            B64.encode("/u/not-an-address")
        );
        let (l, _) = parse_range(bad.as_bytes(), "/u/").unwrap();
        assert_eq!(l.skipped[0].key, "/u/not-an-address");
        assert!(parse_range(br#"{"kvs":[]}"#, "/u/").is_err());
    }

    #[test]
    fn token_auth_and_reauth() {
        let cred = Credential::UserPassword {
            user: "upsync".into(),
            password: "pw\"1".into(),
        };
        let mut s = EtcdV3::new(
            &parse_upsync(&["127.0.0.1:2379/upstreams/x", "upsync_type=etcdv3"]).unwrap(),
        )
        .with_credential(Some(&cred));
        let r = s.next_request();
        assert_eq!(r.path_and_query, "/v3/auth/authenticate");
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(
            (body["name"].as_str(), body["password"].as_str()),
            (Some("upsync"), Some("pw\"1"))
        );
        assert!(r.headers.is_empty());
        // refused credentials: a clear error naming the user, never the password
        let e = s
            .handle(
                &head(400),
                br#"{"error":"etcdserver: authentication failed, invalid user ID or password","code":3}"#,
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"upsync\"") && e.contains("invalid user ID") && !e.contains("pw"),
            "{e}"
        );
        assert_eq!(s.next_request().path_and_query, "/v3/auth/authenticate");
        // a token: every later request carries it
        assert_eq!(
            s.handle(&head(200), br#"{"header":{},"token":"tok.42"}"#)
                .unwrap(),
            None
        );
        let r = s.next_request();
        assert_eq!(r.path_and_query, "/v3/kv/range");
        assert_eq!(r.headers, vec!["Authorization: tok.42".to_string()]);
        let range = br#"{"header":{"revision":"3"}}"#;
        assert!(s.handle(&head(200), range).unwrap().is_some());
        // the token expires: authenticate again at once, with a note
        s.reset();
        let expired = br#"{"error":"etcdserver: invalid auth token","code":16,"message":"etcdserver: invalid auth token"}"#;
        assert_eq!(s.handle(&head(401), expired).unwrap(), None);
        assert!(s.take_note().unwrap().contains("authenticating again"));
        assert_eq!(s.next_request().path_and_query, "/v3/auth/authenticate");
        // a fresh token refused at once is an error, not a loop
        assert_eq!(
            s.handle(&head(200), br#"{"token":"tok.43"}"#).unwrap(),
            None
        );
        let e = s.handle(&head(401), expired).unwrap_err().to_string();
        assert!(e.contains("just issued"), "{e}");
        // no credentials configured, etcd wants them
        let mut anon = EtcdV3::new(
            &parse_upsync(&["127.0.0.1:2379/upstreams/x", "upsync_type=etcdv3"]).unwrap(),
        );
        let e = anon
            .handle(
                &head(401),
                br#"{"error":"etcdserver: user name is empty","code":16}"#,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("set token_file="), "{e}");
    }
}
