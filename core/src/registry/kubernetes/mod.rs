//! Kubernetes (`upsync_type=kubernetes`): the EndpointSlices of one Service, listed,
//! then watched from the list's resourceVersion.
//!
//! The watch is one long chunked response: each event is applied as it arrives
//! (`on_partial` reads it, `take_streamed` hands the new set to the poller) and the
//! stream stays open. Slices are merged by name; an address in two slices (a Pod moving
//! between slices) counts once, ready before draining. A watch the server ends
//! (`timeoutSeconds`, a proxy) is started again at once from the last resourceVersion
//! seen (event or bookmark); "too old resource version" (HTTP 410, or an ERROR event
//! with code 410 in a 200 stream) lists again. Any other error ends the exchange and
//! the poller lists again after its backoff.

pub mod slice;
pub mod token;
pub mod watch;

#[cfg(test)]
mod tests;

use crate::http::percent_encode;
use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::Value;

use super::{excerpt, Listing, RegistryError, Request, Skipped, Snapshot, Source};
use crate::conf::kubernetes::K8sSpec;
use crate::conf::{Credential, UpsyncSpec};
use crate::http::Head;
use crate::servers::ServerSpec;
use token::{Refresh, TokenFile};
use watch::Event;

/// A watch stream is ended (and started again from its last resourceVersion) once this
/// much of it was read, so its body never nears the poller's response size limit.
pub const RESTART_AFTER_BYTES: usize = 4 * 1024 * 1024;

/// `timeoutSeconds=` for the watch and the client's own deadline, from
/// `upsync_timeout`: the server ends the watch 2 s before the client would give up.
pub fn watch_timing(timeout_ms: u64) -> (u64, u64) {
    let secs = (timeout_ms.saturating_sub(2_000) / 1000).max(1);
    (secs, timeout_ms.max(secs * 1000 + 2_000))
}

/// Why the current watch stream ended early.
enum End {
    /// 410: list again.
    Expired(String),
    Failed(RegistryError),
}

pub struct Kubernetes {
    spec: K8sSpec,
    list_path: String,
    list_timeout_ms: u64,
    watch_secs: u64,
    watch_deadline_ms: u64,
    /// `None`: list next; else watch from this resourceVersion.
    watch_from: Option<String>,
    /// The last resourceVersion seen (list, event or bookmark).
    resource_version: String,
    /// Each slice's servers and skipped endpoints, by slice name.
    slices: BTreeMap<String, (Vec<ServerSpec>, Vec<Skipped>)>,
    /// The merged set last handed to the poller.
    applied: Listing,
    /// Slices whose endpoints are left out as a whole, with the reason already noted.
    unused: BTreeMap<String, String>,
    // The watch stream in flight.
    scanned: usize,
    events: u64,
    pending: Option<Snapshot>,
    end: Option<End>,
    /// Watches in a row that ended without sending anything.
    quiet_ends: u32,
    token: Option<TokenFile>,
    /// Why the token file could not be read again, as last noted (noted once).
    token_failure: Option<String>,
    notes: Vec<String>,
}

impl Kubernetes {
    pub fn new(spec: &UpsyncSpec) -> Kubernetes {
        let k = spec
            .kubernetes
            .clone()
            .expect("upsync_type=kubernetes has a Service");
        let (watch_secs, watch_deadline_ms) = watch_timing(spec.timeout_ms);
        Kubernetes {
            list_path: format!(
                "/apis/discovery.k8s.io/v1/namespaces/{}/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3D{}",
                k.namespace, k.service
            ),
            spec: k,
            list_timeout_ms: spec.timeout_ms.min(30_000),
            watch_secs,
            watch_deadline_ms,
            watch_from: None,
            resource_version: String::new(),
            slices: BTreeMap::new(),
            applied: Listing::default(),
            unused: BTreeMap::new(),
            scanned: 0,
            events: 0,
            pending: None,
            end: None,
            quiet_ends: 0,
            token: None,
            token_failure: None,
            notes: Vec::new(),
        }
    }

    /// The bearer token read from `token_file=` when the configuration was loaded; the
    /// file is read again when it changes.
    pub fn with_credential(mut self, spec: &UpsyncSpec, cred: Option<&Credential>) -> Kubernetes {
        self.token = match (cred, &spec.token_file) {
            (Some(Credential::Token(t)), Some(path)) => Some(TokenFile::new(path, t)),
            _ => None,
        };
        self
    }

    /// For tests: how often the token file may be looked at.
    pub fn token_file_mut(&mut self) -> Option<&mut TokenFile> {
        self.token.as_mut()
    }

    /// The Service's servers: every slice merged, one entry per address (a ready one
    /// wins over a draining one), sorted; and every slice's skipped endpoints.
    fn merged(&self) -> Listing {
        let mut by_addr: BTreeMap<std::net::SocketAddr, ServerSpec> = BTreeMap::new();
        for s in self.slices.values().flat_map(|(servers, _)| servers) {
            match by_addr.get(&s.addr) {
                Some(have) if !have.down || s.down => {}
                _ => {
                    by_addr.insert(s.addr, s.clone());
                }
            }
        }
        let mut skipped: Vec<Skipped> = self
            .slices
            .values()
            .flat_map(|(_, skipped)| skipped.iter().cloned())
            .collect();
        skipped.sort();
        Listing {
            servers: by_addr.into_values().collect(),
            skipped,
        }
    }

    /// Records a slice's servers; notes once when a slice contributes nothing.
    fn put_slice(&mut self, s: slice::Slice) {
        match &s.unused {
            Some(why) if self.unused.get(&s.name) != Some(why) => {
                self.notes.push(format!(
                    "endpointslice \"{}\" of Service {}/{}: {why}",
                    excerpt(s.name.as_bytes()),
                    self.spec.namespace,
                    self.spec.service
                ));
                self.unused.insert(s.name.clone(), why.clone());
            }
            Some(_) => {}
            None => {
                self.unused.remove(&s.name);
            }
        }
        self.slices.insert(s.name, (s.servers, s.skipped));
    }

    fn note_rv(&mut self, rv: Option<String>) {
        if let Some(rv) = rv.filter(|r| !r.is_empty()) {
            self.resource_version = rv;
        }
    }

    /// Reads the complete events of the watch stream not read yet and applies them.
    fn consume(&mut self, body: &[u8]) {
        if self.end.is_some() {
            return;
        }
        let (events, err) = watch::read_events(body, &mut self.scanned);
        let read = events.len();
        for ev in events {
            self.events += 1;
            match ev {
                Event::Upsert(obj) => match slice::parse_slice(&obj, &self.spec) {
                    Ok(Some(s)) => {
                        self.note_rv(s.resource_version.clone());
                        self.put_slice(s);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.end = Some(End::Failed(e));
                        break;
                    }
                },
                Event::Delete(obj) => match slice::meta(&obj) {
                    Ok((name, rv)) => {
                        self.note_rv(rv);
                        self.slices.remove(&name);
                        self.unused.remove(&name);
                    }
                    Err(e) => {
                        self.end = Some(End::Failed(e));
                        break;
                    }
                },
                Event::Bookmark(rv) => self.resource_version = rv,
                Event::Expired(why) => {
                    self.end = Some(End::Expired(why));
                    break;
                }
                Event::Error { code, message } => {
                    self.end = Some(End::Failed(RegistryError::Status {
                        code,
                        body: format!("watch ERROR event: {message}"),
                    }));
                    break;
                }
            }
        }
        if let (Some(e), None) = (err, &self.end) {
            self.end = Some(End::Failed(RegistryError::Json(e)));
        }
        if read == 0 {
            return; // no event in this piece of the stream: the set is as applied
        }
        let now = self.merged();
        if now != self.applied {
            self.applied = now.clone();
            self.pending = Some(Snapshot::of(now, true));
        }
    }

    fn expired(&mut self, why: &str) -> Result<Option<Snapshot>, RegistryError> {
        let from = self.watch_from.take().unwrap_or_default();
        self.notes.push(format!(
            "the watch from resourceVersion {} is too old for the API server ({why}); listing again",
            excerpt(from.as_bytes())
        ));
        Ok(None)
    }

    fn unauthorized(&mut self, why: &str) -> Result<Option<Snapshot>, RegistryError> {
        let Some(t) = self.token.as_mut() else {
            return Err(RegistryError::Auth(format!(
                "the API server wants a bearer token ({why}): set token_file= (in a Pod, in-cluster/ uses the service account's)"
            )));
        };
        match t.refresh(Instant::now(), true) {
            Refresh::Changed => {
                self.notes.push(format!(
                    "the API server refused the bearer token ({why}); token_file \"{}\" holds a new one: retrying with it",
                    t.path()
                ));
                Ok(None)
            }
            Refresh::Unchanged => Err(RegistryError::Auth(format!(
                "the API server refused the bearer token of token_file \"{}\" (401 {why}); the file is read again before the next attempt",
                t.path()
            ))),
            Refresh::Failed(e) => Err(RegistryError::Auth(format!(
                "the API server refused the bearer token (401 {why}) and token_file \"{}\" cannot be read again: {e}",
                t.path()
            ))),
        }
    }

    fn list_answer(&mut self, head: &Head, body: &[u8]) -> Result<Option<Snapshot>, RegistryError> {
        if head.status != 200 {
            return Err(RegistryError::Status {
                code: head.status,
                body: status_of(body),
            });
        }
        let (rv, slices) = slice::parse_list(body, &self.spec)?;
        self.slices.clear();
        let known: Vec<String> = slices.iter().map(|s| s.name.clone()).collect();
        self.unused.retain(|name, _| known.contains(name));
        for s in slices {
            self.put_slice(s);
        }
        self.resource_version = rv.clone();
        self.watch_from = Some(rv);
        self.applied = self.merged();
        Ok(Some(Snapshot::of(self.applied.clone(), true)))
    }

    fn watch_answer(
        &mut self,
        head: &Head,
        body: &[u8],
    ) -> Result<Option<Snapshot>, RegistryError> {
        if head.status == 410 {
            return self.expired(&status_of(body));
        }
        if head.status != 200 {
            return Err(RegistryError::Status {
                code: head.status,
                body: status_of(body),
            });
        }
        self.consume(body);
        match self.end.take() {
            Some(End::Expired(why)) => return self.expired(&why),
            Some(End::Failed(e)) => return Err(e),
            None => {}
        }
        // The watch ended (timeoutSeconds, a proxy, the size cap): watch again from
        // the last resourceVersion seen, at once. A watch that ended without sending
        // anything twice in a row is paced by the poll interval instead (a proxy that
        // closes watches at once must not become a hot loop).
        self.watch_from = Some(self.resource_version.clone());
        if let Some(s) = self.pending.take() {
            self.quiet_ends = 0;
            return Ok(Some(s));
        }
        if self.events > 0 {
            self.quiet_ends = 0;
            return Ok(None);
        }
        self.quiet_ends = self.quiet_ends.saturating_add(1);
        if self.quiet_ends == 1 {
            Ok(None)
        } else {
            Ok(Some(Snapshot::of(self.applied.clone(), false)))
        }
    }
}

/// The text of a Kubernetes Status answer (`reason: message`), or an excerpt.
fn status_of(body: &[u8]) -> String {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) if v.get("kind").and_then(Value::as_str) == Some("Status") => watch::status_text(&v),
        _ => excerpt(body),
    }
}

impl Source for Kubernetes {
    fn next_request(&self) -> Request {
        let mut r = match &self.watch_from {
            None => Request::get(self.list_path.clone(), self.list_timeout_ms),
            Some(rv) => Request {
                timeout_is_normal: true,
                ..Request::get(
                    format!(
                        "{}&watch=1&resourceVersion={}&allowWatchBookmarks=true&timeoutSeconds={}",
                        self.list_path,
                        percent_encode(rv),
                        self.watch_secs
                    ),
                    self.watch_deadline_ms,
                )
            },
        };
        r.headers.push("Accept: application/json".into());
        if let Some(t) = &self.token {
            r.headers
                .push(format!("Authorization: Bearer {}", t.token()));
        }
        r
    }

    fn start(&mut self) {
        // A watch the client gave up on (upsync_timeout) starts again from the last
        // version seen, like one the server ended.
        if self.watch_from.is_some() {
            self.watch_from = Some(self.resource_version.clone());
        }
        self.scanned = 0;
        self.events = 0;
        self.pending = None;
        self.end = None;
        if let Some(t) = self.token.as_mut() {
            match t.refresh(Instant::now(), false) {
                Refresh::Unchanged => {}
                Refresh::Changed => {
                    self.token_failure = None;
                    self.notes.push(format!(
                        "token_file \"{}\" changed on disk; requests from now on carry the new token",
                        t.path()
                    ));
                }
                // Once per distinct reason, not once per request (a worker user that
                // may not read the file would otherwise log at every watch).
                Refresh::Failed(e) if self.token_failure.as_ref() != Some(&e) => {
                    self.notes.push(format!(
                        "cannot read token_file \"{}\" again: {e}; still using the token read before",
                        t.path()
                    ));
                    self.token_failure = Some(e);
                }
                Refresh::Failed(_) => {}
            }
        }
    }

    fn on_partial(&mut self, head: &Head, body: &[u8]) -> bool {
        if self.watch_from.is_none() || head.status != 200 {
            return false;
        }
        self.consume(body);
        self.end.is_some() || self.scanned >= RESTART_AFTER_BYTES
    }

    fn take_streamed(&mut self) -> Option<Snapshot> {
        self.pending.take()
    }

    fn handle(&mut self, head: &Head, body: &[u8]) -> Result<Option<Snapshot>, RegistryError> {
        let result = match head.status {
            401 => self.unauthorized(&status_of(body)),
            403 => Err(RegistryError::Auth(format!(
                "the API server forbids reading EndpointSlices in namespace \"{}\" ({}): grant the service account list and watch on endpointslices (apiGroup discovery.k8s.io), see the README's RBAC example",
                self.spec.namespace,
                status_of(body)
            ))),
            _ if self.watch_from.is_none() => self.list_answer(head, body),
            _ => self.watch_answer(head, body),
        };
        self.scanned = 0;
        self.events = 0;
        self.end = None;
        result
    }

    fn take_note(&mut self) -> Option<String> {
        if self.notes.is_empty() {
            return None;
        }
        Some(std::mem::take(&mut self.notes).join("; "))
    }

    fn reset(&mut self) {
        self.watch_from = None;
        self.scanned = 0;
        self.events = 0;
        self.pending = None;
        self.end = None;
    }

    fn position(&self) -> u64 {
        self.resource_version.parse().unwrap_or(0)
    }

    fn secrets(&self) -> Vec<String> {
        self.token.as_ref().map(TokenFile::all).unwrap_or_default()
    }
}
