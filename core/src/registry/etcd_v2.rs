//! etcd v2 (`upsync_type=etcd`): a recursive read of the directory, then a recursive
//! watch from the next index. Any event means "read again" (one extra round trip, and no
//! chance of drifting from the real state); the read tells where to watch from next.
//!
//! Facts this follows (checked against etcd 3.4 and 3.5 with `--enable-v2`):
//! - a read answers `X-Etcd-Index` = the store's current index: watch from index + 1;
//! - a missing directory is 404 with body errorCode 100 (and an index): no servers;
//! - a watch sends its status line and headers at once and the (chunked) body only when
//!   an event fires; the server never ends it, so the client's timeout is normal;
//! - a watch from an index older than the last 1000 events is 400 with errorCode 401
//!   ("the event in requested index is outdated and cleared"): read everything again.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::Deserialize;

use super::{excerpt, Listing, RegistryError, Request, Snapshot, Source};
use crate::conf::{Credential, UpsyncSpec};
use crate::http::Head;
use crate::servers::{apply_json_attrs, parse_addr, ServerSpec};

pub struct EtcdV2 {
    path: String,
    user_query: String,
    /// Next index to watch from; 0 = read everything first.
    wait_index: u64,
    /// Index of the last read, for status output.
    read_index: u64,
    timeout_ms: u64,
    note: Option<String>,
    /// `Authorization: Basic ...` when `token_file=` holds USER:PASSWORD.
    auth_header: Option<String>,
    /// The password and its basic-auth encoding, to keep out of logs.
    secrets: Vec<String>,
}

#[derive(Deserialize)]
struct Node {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    dir: bool,
    #[serde(default)]
    nodes: Vec<Node>,
}

#[derive(Deserialize)]
struct Response {
    #[serde(default)]
    action: String,
    node: Option<Node>,
}

#[derive(Deserialize)]
struct EtcdError {
    #[serde(rename = "errorCode")]
    error_code: u64,
    #[serde(default)]
    message: String,
}

impl EtcdV2 {
    pub fn new(spec: &UpsyncSpec) -> EtcdV2 {
        EtcdV2 {
            path: spec.endpoint.path.clone(),
            user_query: spec.endpoint.query.clone(),
            wait_index: 0,
            read_index: 0,
            timeout_ms: spec.timeout_ms,
            note: None,
            auth_header: None,
            secrets: Vec::new(),
        }
    }

    pub fn with_credential(mut self, cred: Option<&Credential>) -> EtcdV2 {
        self.auth_header = None;
        self.secrets.clear();
        if let Some(Credential::UserPassword { user, password }) = cred {
            let basic = B64.encode(format!("{user}:{password}"));
            self.auth_header = Some(format!("Authorization: Basic {basic}"));
            self.secrets = vec![password.clone(), basic];
        }
        self
    }

    fn request(&self) -> Request {
        let extra = if self.user_query.is_empty() {
            String::new()
        } else {
            format!("&{}", self.user_query)
        };
        if self.wait_index == 0 {
            Request::get(
                format!("{}?recursive=true{extra}", self.path),
                self.timeout_ms.min(30_000),
            )
        } else {
            Request {
                timeout_is_normal: true,
                ..Request::get(
                    format!(
                        "{}?wait=true&recursive=true&waitIndex={}{extra}",
                        self.path, self.wait_index
                    ),
                    self.timeout_ms,
                )
            }
        }
    }

    fn handle_response(
        &mut self,
        head: &Head,
        body: &[u8],
        watching: bool,
    ) -> Result<Option<Snapshot>, RegistryError> {
        if head.status != 200 {
            let err: Option<EtcdError> = serde_json::from_slice(body).ok();
            return match (head.status, err) {
                (404, Some(e)) if e.error_code == 100 && !watching => {
                    let index = Self::etcd_index(head)?;
                    self.read_index = index;
                    self.wait_index = index.saturating_add(1);
                    Ok(Some(Snapshot::new(Vec::new(), true)))
                }
                (400, Some(e)) if e.error_code == 401 && watching => {
                    // History cleared past our index: read everything again.
                    self.note = Some(format!(
                        "etcd no longer has the events since index {} (it keeps the last 1000); reading everything again",
                        self.wait_index
                    ));
                    self.wait_index = 0;
                    Ok(None)
                }
                (code, Some(e)) => Err(RegistryError::Status {
                    code,
                    body: format!(
                        "etcd error {}: {}",
                        e.error_code,
                        excerpt(e.message.as_bytes())
                    ),
                }),
                (code, None) => Err(RegistryError::Status {
                    code,
                    body: excerpt(body),
                }),
            };
        }
        if watching {
            // An event: make sure it is well formed, then read the whole directory again.
            let r: Response =
                serde_json::from_slice(body).map_err(|e| RegistryError::Json(e.to_string()))?;
            if r.action.is_empty() {
                return Err(RegistryError::Json("watch event has no \"action\"".into()));
            }
            self.wait_index = 0;
            return Ok(None);
        }
        let index = Self::etcd_index(head)?;
        // Watch from this index even when the listing is bad: its next change (the fix,
        // usually) is then read at once.
        self.read_index = index;
        self.wait_index = index.saturating_add(1);
        let listing = parse_listing(body)?;
        Ok(Some(Snapshot::of(listing, true)))
    }

    fn etcd_index(head: &Head) -> Result<u64, RegistryError> {
        let raw = head
            .header("x-etcd-index")
            .ok_or(RegistryError::MissingHeader("X-Etcd-Index"))?;
        raw.parse()
            .map_err(|_| RegistryError::BadHeader("X-Etcd-Index", excerpt(raw.as_bytes())))
    }
}

fn collect(node: &Node, out: &mut Listing) {
    if node.dir {
        for n in &node.nodes {
            collect(n, out);
        }
        return;
    }
    let name = node.key.rsplit('/').next().unwrap_or("");
    let entry = parse_addr(name).and_then(|addr| {
        let mut spec = ServerSpec::new(addr);
        apply_json_attrs(&mut spec, node.value.as_deref().unwrap_or("").as_bytes())?;
        Ok(spec)
    });
    out.push(&node.key, entry);
}

/// The servers of a recursive read's body (keys that are not servers skipped).
pub fn parse_listing(body: &[u8]) -> Result<Listing, RegistryError> {
    let r: Response =
        serde_json::from_slice(body).map_err(|e| RegistryError::Json(e.to_string()))?;
    let node = r
        .node
        .ok_or_else(|| RegistryError::Json("response has no \"node\"".into()))?;
    let mut out = Listing::default();
    if node.dir {
        collect(&node, &mut out);
    } else {
        return Err(RegistryError::Json(format!(
            "\"{}\" is a key, not a directory",
            excerpt(node.key.as_bytes())
        )));
    }
    Ok(out)
}

impl Source for EtcdV2 {
    fn next_request(&self) -> Request {
        let mut r = self.request();
        r.headers.extend(self.auth_header.clone());
        r
    }

    fn handle(&mut self, head: &Head, body: &[u8]) -> Result<Option<Snapshot>, RegistryError> {
        let watching = self.wait_index != 0;
        if head.status == 401 {
            // Basic auth refused or missing (errorCode 401 of a watch comes as HTTP 400).
            let why = serde_json::from_slice::<EtcdError>(body)
                .map(|e| excerpt(e.message.as_bytes()))
                .unwrap_or_else(|_| excerpt(body));
            let hint = if self.auth_header.is_some() {
                "the user and password of token_file= were refused"
            } else {
                "etcd requires a user and password: set token_file= to a file holding USER:PASSWORD"
            };
            return Err(RegistryError::Auth(format!("{hint} (HTTP 401: \"{why}\")")));
        }
        self.handle_response(head, body, watching)
    }

    fn take_note(&mut self) -> Option<String> {
        self.note.take()
    }

    fn reset(&mut self) {
        self.wait_index = 0;
    }
    fn secrets(&self) -> Vec<String> {
        self.secrets.clone()
    }

    fn position(&self) -> u64 {
        self.read_index
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conf::parse_upsync;

    fn head(status: u16, index: Option<u64>) -> Head {
        let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
        if let Some(i) = index {
            headers.push(("x-etcd-index".to_string(), i.to_string()));
        }
        Head {
            status,
            http11: true,
            headers,
        }
    }

    fn source() -> EtcdV2 {
        EtcdV2::new(
            &parse_upsync(&["127.0.0.1:2379/v2/keys/upstreams/x", "upsync_type=etcd"]).unwrap(),
        )
    }

    #[test]
    fn read_then_watch_then_read() {
        let mut s = source();
        let r = s.next_request();
        assert_eq!(r.path_and_query, "/v2/keys/upstreams/x/?recursive=true");
        assert!(!r.timeout_is_normal);
        // captured from etcd 3.4
        let body = br#"{"action":"get","node":{"key":"/upstreams/x","dir":true,"nodes":[{"key":"/upstreams/x/127.0.0.1:8080","value":"{\"weight\":2}","modifiedIndex":4,"createdIndex":4}],"modifiedIndex":4,"createdIndex":4}}"#;
        let snap = s.handle(&head(200, Some(4)), body).unwrap().unwrap();
        assert_eq!(snap.servers.len(), 1);
        assert_eq!(snap.servers[0].weight, 2);
        let r = s.next_request();
        assert_eq!(
            r.path_and_query,
            "/v2/keys/upstreams/x/?wait=true&recursive=true&waitIndex=5"
        );
        assert!(r.timeout_is_normal);
        let event = br#"{"action":"set","node":{"key":"/upstreams/x/127.0.0.1:8081","value":"","modifiedIndex":5,"createdIndex":5}}"#;
        assert_eq!(s.handle(&head(200, Some(4)), event).unwrap(), None);
        assert!(s.next_request().path_and_query.ends_with("?recursive=true"));
        assert_eq!(s.position(), 4);
    }

    #[test]
    fn missing_dir_is_empty_and_cleared_history_rereads() {
        let mut s = source();
        let body = br#"{"errorCode":100,"message":"Key not found","cause":"/upstreams","index":3}"#;
        let snap = s.handle(&head(404, Some(3)), body).unwrap().unwrap();
        assert!(snap.servers.is_empty());
        assert!(s.next_request().path_and_query.contains("waitIndex=4"));
        let cleared = br#"{"errorCode":401,"message":"The event in requested index is outdated and cleared","cause":"the requested history has been cleared [1008/4]","index":2007}"#;
        assert_eq!(s.handle(&head(400, Some(2007)), cleared).unwrap(), None);
        // on a read (not a watch) it is an error, not a reason to read again at once
        assert!(matches!(
            s.handle(&head(400, Some(2007)), cleared),
            Err(RegistryError::Status { code: 400, .. })
        ));
        assert!(s.next_request().path_and_query.ends_with("?recursive=true"));
    }

    #[test]
    fn nested_dirs_and_errors() {
        let body = br#"{"action":"get","node":{"key":"/u","dir":true,"nodes":[{"key":"/u/sub","dir":true,"nodes":[{"key":"/u/sub/127.0.0.1:1","value":""}]},{"key":"/u/127.0.0.1:2"}]}}"#;
        assert_eq!(parse_listing(body).unwrap().servers.len(), 2);
        assert!(
            parse_listing(br#"{"action":"get","node":{"key":"/u/127.0.0.1:1","value":""}}"#)
                .is_err()
        );
        let l = parse_listing(br#"{"action":"get","node":{"key":"/u","dir":true,"nodes":[{"key":"/u/host:1","value":""},{"key":"/u/127.0.0.1:5","value":""}]}}"#).unwrap();
        assert_eq!(
            (l.servers.len(), l.skipped[0].key.as_str()),
            (1, "/u/host:1")
        );
        assert!(parse_listing(b"{").is_err());
        let mut s = source();
        assert!(matches!(
            s.handle(&head(500, Some(1)), b"oops"),
            Err(RegistryError::Status { code: 500, .. })
        ));
        assert!(matches!(
            s.handle(
                &head(403, None),
                br#"{"errorCode":110,"message":"The request requires user authentication"}"#
            ),
            Err(RegistryError::Status { code: 403, .. })
        ));
        assert!(matches!(
            s.handle(&head(200, None), br#"{"action":"get","node":{"dir":true}}"#),
            Err(RegistryError::MissingHeader(_))
        ));
    }

    #[test]
    fn basic_auth() {
        let spec =
            crate::conf::parse_upsync(&["127.0.0.1:2379/v2/keys/u", "upsync_type=etcd"]).unwrap();
        let cred = crate::conf::Credential::UserPassword {
            user: "root".into(),
            password: "s3cret".into(),
        };
        let mut s = EtcdV2::new(&spec).with_credential(Some(&cred));
        assert_eq!(
            s.next_request().headers,
            vec![format!(
                "Authorization: Basic {}",
                B64.encode("root:s3cret")
            )]
        );
        let e = s
            .handle(
                &head(401, None),
                br#"{"message":"Insufficient credentials"}"#,
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("were refused") && e.contains("Insufficient credentials"),
            "{e}"
        );
        assert!(!e.contains("s3cret"));
        let mut anon = EtcdV2::new(&spec);
        assert!(anon.next_request().headers.is_empty());
        let e = anon.handle(&head(401, None), b"").unwrap_err().to_string();
        assert!(e.contains("USER:PASSWORD"), "{e}");
    }
}
