//! Nacos naming (`upsync_type=nacos`): the instance list of one service, polled at
//! `upsync_interval` (Nacos has no HTTP long poll for naming), through the v3, v2 or v1
//! API (detected, or fixed by `nacos_api=`), with a login token when `token_file=` holds
//! `USER:PASSWORD`. A change is reported only when the list's content changed.
//!
//! UDP push (v1 clients that pass `udpPort`) is left out on purpose: it needs a UDP
//! socket in every poller, an ack protocol, and Nacos 3 drops it; polling bounds the
//! delay by the interval instead.

pub mod list;

use serde_json::Value;

use super::{excerpt, Listing, RegistryError, Request, Snapshot, Source};
use crate::conf::nacos::{NacosApi, NacosSpec};
use crate::conf::{Credential, UpsyncSpec};
use crate::http::percent_encode;
use crate::http::Head;
use crate::servers::ServerSpec;
use list::{read_answer, servers_of, Answer, NOT_FOUND_CODES};

/// The detection order of `nacos_api=auto`: newest first, as Nacos 3.2 no longer
/// serves v1/v2 and every version answers an unknown path with 404.
pub const DETECT_ORDER: [NacosApi; 3] = [NacosApi::V3, NacosApi::V2, NacosApi::V1];

/// Token lifetime assumed when a login answer gives none (Nacos's default, 5 h).
const DEFAULT_TTL_S: u64 = 18_000;

/// Statuses by which a server says it does not serve a path (unknown, method not
/// allowed, API switched off in Nacos 3.0/3.1, not implemented).
fn path_missing(status: u16) -> bool {
    matches!(status, 404 | 405 | 410 | 501)
}

/// Nacos's own "no such service" error (an envelope with one of its codes), as opposed
/// to a web server's 404 for a path it does not know.
fn service_not_found(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("code").and_then(Value::as_i64))
        .is_some_and(|c| NOT_FOUND_CODES.contains(&c))
}

/// The login API in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Login {
    V1,
    V3,
}

pub struct Nacos {
    spec: NacosSpec,
    timeout_ms: u64,
    /// The API being asked; while `detecting`, the candidate of `DETECT_ORDER[cand]`.
    api: NacosApi,
    detecting: bool,
    cand: usize,
    /// What each rejected candidate answered, for the log.
    tried: Vec<String>,
    credential: Option<(String, String)>,
    login: Login,
    /// The other login path was tried after this one answered "no such path".
    login_switched: bool,
    token: Option<String>,
    /// The token Nacos refused last (it may still be quoted in an error).
    old_token: Option<String>,
    /// Renew the token once the clock reaches this (80 % of its lifetime).
    renew_at_ms: u64,
    /// The token was just issued: if Nacos refuses it anyway, logging in again would
    /// loop, so that is an error.
    fresh_token: bool,
    now_ms: u64,
    /// When the exchange in flight started (a token's lifetime counts from there).
    started_ms: u64,
    /// The last list read, to tell a change from a repeat.
    last: Option<Vec<ServerSpec>>,
    position: u64,
    note: Option<String>,
}

impl Nacos {
    pub fn new(spec: &UpsyncSpec) -> Nacos {
        let n = spec.nacos.clone().unwrap_or_else(|| NacosSpec {
            context: "/nacos".into(),
            namespace: crate::conf::nacos::DEFAULT_NAMESPACE.into(),
            group: crate::conf::nacos::DEFAULT_GROUP.into(),
            service: spec.endpoint.path.trim_start_matches('/').to_string(),
            clusters: vec![],
            api: NacosApi::Auto,
        });
        let detecting = n.api == NacosApi::Auto;
        Nacos {
            api: if detecting { DETECT_ORDER[0] } else { n.api },
            login: if n.api == NacosApi::V3 {
                Login::V3
            } else {
                Login::V1
            },
            spec: n,
            timeout_ms: spec.timeout_ms.min(30_000),
            detecting,
            cand: 0,
            tried: Vec::new(),
            credential: None,
            login_switched: false,
            token: None,
            old_token: None,
            renew_at_ms: 0,
            fresh_token: false,
            now_ms: 0,
            started_ms: 0,
            last: None,
            position: 0,
            note: None,
        }
    }

    pub fn with_credential(mut self, cred: Option<&Credential>) -> Nacos {
        self.credential = match cred {
            Some(Credential::UserPassword { user, password }) => {
                Some((user.clone(), password.clone()))
            }
            _ => None,
        };
        self
    }

    /// The API in use (the candidate while detecting).
    pub fn api(&self) -> NacosApi {
        self.api
    }

    /// A login comes next: no token yet, or it is due for renewal (but never twice in a
    /// row: a fresh token is always used once, whatever the clock says).
    fn needs_login(&self) -> bool {
        self.credential.is_some()
            && (self.token.is_none() || (!self.fresh_token && self.now_ms >= self.renew_at_ms))
    }

    fn login_path(&self) -> String {
        match self.login {
            Login::V1 => format!("{}/v1/auth/login", self.spec.context),
            Login::V3 => format!("{}/v3/auth/user/login", self.spec.context),
        }
    }

    fn list_path(&self) -> String {
        let s = &self.spec;
        let (path, cluster_key) = match self.api {
            NacosApi::V3 => ("/v3/client/ns/instance/list", "clusterName"),
            NacosApi::V2 => ("/v2/ns/instance/list", "clusterName"),
            _ => ("/v1/ns/instance/list", "clusters"),
        };
        let mut q = format!(
            "{}{path}?serviceName={}&groupName={}&namespaceId={}&healthyOnly=false",
            s.context,
            percent_encode(&s.service),
            percent_encode(&s.group),
            percent_encode(&s.namespace)
        );
        if !s.clusters.is_empty() {
            let list: Vec<String> = s.clusters.iter().map(|c| percent_encode(c)).collect();
            q.push_str(&format!("&{cluster_key}={}", list.join(",")));
        }
        if let Some(t) = &self.token {
            q.push_str(&format!("&accessToken={}", percent_encode(t)));
        }
        q
    }

    /// Starts detecting the API again from the newest.
    fn restart_detection(&mut self) {
        self.detecting = true;
        self.cand = 0;
        self.api = DETECT_ORDER[0];
        self.tried.clear();
    }

    /// The login answer: `{accessToken, tokenTtl}` (also inside `data` on some 3.x
    /// servers).
    fn take_token(&mut self, head: &Head, body: &[u8]) -> Result<Option<Snapshot>, RegistryError> {
        let user = self.credential.as_ref().map(|c| c.0.as_str()).unwrap_or("");
        if path_missing(head.status) && !self.login_switched {
            // This server has the other login API (3.x without the v1 path, or the
            // reverse): try it once.
            self.login_switched = true;
            self.login = match self.login {
                Login::V1 => Login::V3,
                Login::V3 => Login::V1,
            };
            return Ok(None);
        }
        let v: Option<Value> = serde_json::from_slice(body).ok();
        let obj = v.as_ref().map(|v| match v.get("data") {
            Some(d) if d.get("accessToken").is_some() => d,
            _ => v,
        });
        let token = obj
            .and_then(|o| o.get("accessToken"))
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b > b' ' && b < 0x7f));
        match token {
            Some(t) if head.status == 200 => {
                let ttl_s = obj
                    .and_then(|o| o.get("tokenTtl"))
                    .and_then(Value::as_u64)
                    .filter(|&t| t > 0)
                    .unwrap_or(DEFAULT_TTL_S);
                self.token = Some(t.to_string());
                self.fresh_token = true;
                self.login_switched = false;
                // Renew at 80 % of the lifetime, counted from when the login was sent;
                // never sooner than a second (a tiny TTL must not make a login loop).
                let renew = ttl_s.saturating_mul(800).max(1_000);
                self.renew_at_ms = self.started_ms.saturating_add(renew);
                Ok(None)
            }
            _ => {
                let why = obj
                    .and_then(|o| o.get("message").or_else(|| o.get("data")))
                    .and_then(Value::as_str)
                    .map(|m| format!("HTTP {}: {}", head.status, excerpt(m.as_bytes())))
                    .unwrap_or_else(|| format!("HTTP {}: {}", head.status, excerpt(body)));
                self.login_switched = false;
                Err(RegistryError::Auth(format!(
                    "Nacos refused user \"{}\" of token_file= at {}: {why}",
                    excerpt(user.as_bytes()),
                    self.login_path()
                )))
            }
        }
    }

    /// A list request was refused (401/403): log in again at once, unless the token
    /// was just issued or there are no credentials.
    fn token_refused(
        &mut self,
        head: &Head,
        body: &[u8],
    ) -> Result<Option<Snapshot>, RegistryError> {
        let why = format!("HTTP {}: {}", head.status, excerpt(body));
        if self.credential.is_none() {
            return Err(RegistryError::Auth(format!(
                "Nacos requires authentication: set token_file= to a file holding USER:PASSWORD ({why})"
            )));
        }
        if self.fresh_token {
            return Err(RegistryError::Auth(format!(
                "Nacos refuses a token it has just issued (check that the user may read namespace \"{}\") ({why})",
                excerpt(self.spec.namespace.as_bytes())
            )));
        }
        // Kept only so that text echoing it can still be redacted.
        self.old_token = self.token.take().or(self.old_token.take());
        self.note = Some(
            "the Nacos access token is no longer accepted (expired or revoked); logging in again"
                .into(),
        );
        Ok(None)
    }

    /// The API being detected does not answer here: move on to the next candidate, or
    /// give up for this round when none is left.
    fn candidate_rejected(&mut self, what: String) -> Result<Option<Snapshot>, RegistryError> {
        self.tried.push(format!("{}: {what}", self.api.name()));
        self.cand += 1;
        if let Some(&next) = DETECT_ORDER.get(self.cand) {
            self.api = next;
            return Ok(None);
        }
        let tried = self.tried.join("; ");
        self.restart_detection();
        Err(RegistryError::Status {
            code: 404,
            body: format!("no Nacos instance-list API answers here ({tried})"),
        })
    }

    fn list_answer(&mut self, head: &Head, body: &[u8]) -> Result<Option<Snapshot>, RegistryError> {
        if head.status == 401 || head.status == 403 {
            return self.token_refused(head, body);
        }
        let listing = if head.status == 404 && service_not_found(body) {
            Listing::default()
        } else if path_missing(head.status) {
            let what = format!("HTTP {}", head.status);
            if self.detecting {
                return self.candidate_rejected(what);
            }
            if self.spec.api == NacosApi::Auto {
                let api = self.api.name();
                self.restart_detection();
                self.note = Some(format!(
                    "the Nacos {api} instance-list API is not answered at this address ({what}); detecting the API again"
                ));
                return Ok(None);
            }
            return Err(RegistryError::Status {
                code: head.status,
                body: format!(
                    "the Nacos {} instance-list API is not served here (nacos_api={}): {}",
                    self.api.name(),
                    self.api.name(),
                    excerpt(body)
                ),
            });
        } else if head.status != 200 {
            return Err(RegistryError::Status {
                code: head.status,
                body: excerpt(body),
            });
        } else {
            let answer = match read_answer(body, self.api) {
                Ok(a) => a,
                Err(_) if self.detecting => {
                    return self.candidate_rejected("not JSON".into());
                }
                Err(e) => return Err(e),
            };
            match answer {
                Answer::Instances(list) => servers_of(&list, &self.spec.clusters)?,
                Answer::Failed { code, .. } if NOT_FOUND_CODES.contains(&code) => {
                    Listing::default()
                }
                Answer::Failed { code, message } => {
                    return Err(RegistryError::Status {
                        code: 200,
                        body: format!("Nacos error {code}: {message}"),
                    })
                }
                Answer::Foreign if self.detecting => {
                    return self.candidate_rejected("another answer shape".into());
                }
                Answer::Foreign => {
                    return Err(RegistryError::Json(format!(
                        "not a Nacos {} instance list: {}",
                        self.api.name(),
                        excerpt(body)
                    )))
                }
            }
        };
        if self.detecting {
            self.detecting = false;
            let tried = if self.tried.is_empty() {
                String::new()
            } else {
                format!(" ({})", self.tried.join("; "))
            };
            self.note = Some(format!(
                "reading the Nacos {} instance-list API{tried}",
                self.api.name()
            ));
            self.tried.clear();
        }
        self.fresh_token = false;
        let snap = Snapshot::of(listing, false);
        let changed = self.last.as_ref() != Some(&snap.servers);
        if changed {
            self.position = fingerprint(&snap.servers);
            self.last = Some(snap.servers.clone());
        }
        Ok(Some(Snapshot {
            advanced: changed,
            ..snap
        }))
    }
}

/// A stable number for a server list (shown as the upstream's index): the CRC-32 of
/// every server's settings, so every worker and restart shows the same for the same set.
fn fingerprint(servers: &[ServerSpec]) -> u64 {
    let mut h = crc32fast::Hasher::new();
    for s in servers {
        h.update(s.line().as_bytes());
        h.update(&s.slow_start.to_le_bytes());
    }
    h.finalize() as u64
}

impl Source for Nacos {
    fn next_request(&self) -> Request {
        if let Some((user, password)) = self.credential.as_ref().filter(|_| self.needs_login()) {
            let body = format!(
                "username={}&password={}",
                percent_encode(user),
                percent_encode(password)
            );
            let mut r = Request::get(self.login_path(), self.timeout_ms);
            r.method = "POST";
            r.headers
                .push("Content-Type: application/x-www-form-urlencoded".into());
            r.body = body.into_bytes();
            return r;
        }
        Request::get(self.list_path(), self.timeout_ms)
    }

    fn set_now(&mut self, now_ms: u64) {
        self.now_ms = now_ms;
    }

    fn start(&mut self) {
        self.started_ms = self.now_ms;
    }

    fn handle(&mut self, head: &Head, body: &[u8]) -> Result<Option<Snapshot>, RegistryError> {
        if self.needs_login() {
            return self.take_token(head, body);
        }
        self.list_answer(head, body)
    }

    fn take_note(&mut self) -> Option<String> {
        self.note.take()
    }

    fn reset(&mut self) {
        self.fresh_token = false;
        self.login_switched = false;
        // An unfinished detection starts over (the next address may run another
        // version); a detected API stays until it stops answering.
        if self.detecting {
            self.restart_detection();
        }
    }

    fn position(&self) -> u64 {
        self.position
    }

    fn secrets(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some((_, password)) = &self.credential {
            v.push(password.clone());
            v.push(percent_encode(password));
        }
        for t in self.token.iter().chain(self.old_token.iter()) {
            v.push(t.clone());
            v.push(percent_encode(t));
        }
        v
    }
}

#[cfg(test)]
mod tests;
