//! Consul KV upstreams that share one blocking query: upstreams on the same registry
//! (addresses, TLS settings, token and query) whose KV prefixes have the same parent
//! (`upstreams/a/`, `upstreams/b/` -> `upstreams/`) are read with one `?recurse` query
//! on the parent. The answer is split per member prefix, each part is read with the
//! rules of `consul::parse_kv`, and only the parts that changed are handed out.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use super::consul::{kv_entries, kv_listing, split_kv_path, Consul, KvEntry};
use super::{Part, RegistryError, Request, Snapshot, Source};
use crate::conf::{Credential, HostPort, SourceKind, TlsSpec, UpsyncSpec};
use crate::http::Head;

/// The parent of a KV prefix (`upstreams/a/` -> `upstreams/`, `a/b/c/` -> `a/b/`).
/// None for a prefix right below the root: its parent is the whole KV store, which may
/// hold anything, so such upstreams are not grouped.
pub fn parent_of(prefix: &str) -> Option<&str> {
    let inner = prefix.strip_suffix('/').unwrap_or(prefix);
    let cut = inner.rfind('/')?;
    (cut > 0).then(|| &prefix[..=cut])
}

/// What upstreams must have in common to share a poll (their resolved addresses
/// aside, which the glue compares).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareKey {
    hosts: Vec<HostPort>,
    https: bool,
    /// The path up to the KV prefix (`/v1/kv/`, or `/proxy/v1/kv/`) and the parent.
    base: String,
    parent: String,
    query: String,
    tls: Option<TlsSpec>,
    credential: Option<Credential>,
}

impl ShareKey {
    /// The parent prefix the group reads.
    pub fn parent(&self) -> &str {
        &self.parent
    }
}

/// The key under which a `upsync_type=consul` upstream may share its poll; None when it
/// polls alone (another type, or a prefix right below the root).
pub fn share_key(spec: &UpsyncSpec, cred: Option<&Credential>) -> Option<ShareKey> {
    if spec.kind != SourceKind::ConsulKv {
        return None;
    }
    let (base, prefix) = split_kv_path(&spec.endpoint.path)?;
    let parent = parent_of(prefix)?;
    Some(ShareKey {
        hosts: spec.endpoint.hosts.clone(),
        https: spec.endpoint.tls,
        base: base.to_string(),
        parent: parent.to_string(),
        query: spec.endpoint.query.clone(),
        tls: spec.tls.clone(),
        credential: cred.cloned(),
    })
}

/// Groups items by key: the indexes of the items with equal keys, each group in the
/// items' order, the groups in the order of their first item. An item without a key
/// is a group of its own.
pub fn group_indexes<K: PartialEq>(keys: &[Option<K>]) -> Vec<Vec<usize>> {
    let mut groups: Vec<(Option<&K>, Vec<usize>)> = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        match k {
            Some(k) => match groups.iter_mut().find(|(g, _)| *g == Some(k)) {
                Some((_, list)) => list.push(i),
                None => groups.push((Some(k), vec![i])),
            },
            None => groups.push((None, vec![i])),
        }
    }
    groups.into_iter().map(|(_, list)| list).collect()
}

/// For each member prefix (all below one parent), the indexes of the entries under it.
/// A key belongs to the member named by its first component below the parent.
pub fn split(entries: &[KvEntry], parent: &str, prefixes: &[String]) -> Vec<Vec<usize>> {
    let mut by_prefix: HashMap<&str, Vec<usize>> = HashMap::new();
    for (m, p) in prefixes.iter().enumerate() {
        by_prefix.entry(p.as_str()).or_default().push(m);
    }
    let mut out = vec![Vec::new(); prefixes.len()];
    for (i, e) in entries.iter().enumerate() {
        let Some(rest) = e.key.strip_prefix(parent) else {
            continue;
        };
        let Some(slash) = rest.find('/') else {
            continue; // a key right in the parent: no member's
        };
        if let Some(members) = by_prefix.get(&e.key[..parent.len() + slash + 1]) {
            for &m in members {
                out[m].push(i);
            }
        }
    }
    out
}

/// What a member's part is made of (keys and values, in Consul's order): equal parts
/// have equal fingerprints; a different part the same one with a chance of 2^-64.
fn fingerprint(entries: &[KvEntry], part: &[usize]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    part.len().hash(&mut h);
    for &i in part {
        entries[i].key.hash(&mut h);
        entries[i].value.hash(&mut h);
    }
    h.finish()
}

/// The source of a group: one blocking query on the parent; `handle` returns the first
/// member's snapshot, `take_parts` what the same answer brought for the others.
pub struct KvGroup {
    consul: Consul,
    prefixes: Vec<String>,
    /// The fingerprint of each member's part at the last answer (None: hand it out
    /// at the next one).
    seen: Vec<Option<u64>>,
    parts: Vec<Part>,
}

impl KvGroup {
    /// The group of `specs` (the first is the lead; all have one `share_key`), polled
    /// with the shortest `upsync_timeout` among them.
    pub fn new(specs: &[&UpsyncSpec], cred: Option<&Credential>) -> Option<KvGroup> {
        let lead = specs.first()?;
        let key = share_key(lead, cred)?;
        let mut spec = (*lead).clone();
        spec.timeout_ms = specs.iter().map(|s| s.timeout_ms).min()?;
        let prefixes: Vec<String> = specs
            .iter()
            .map(|s| split_kv_path(&s.endpoint.path).map_or(String::new(), |(_, p)| p.into()))
            .collect();
        Some(KvGroup {
            consul: Consul::new(&spec)
                .with_credential(cred)
                .with_kv_prefix(key.parent()),
            seen: vec![None; prefixes.len()],
            prefixes,
            parts: Vec::new(),
        })
    }

    /// The parent prefix read.
    pub fn parent(&self) -> &str {
        self.consul.kv_prefix()
    }

    /// The path read (`.../v1/kv/PARENT`).
    pub fn path(&self) -> &str {
        self.consul.path()
    }
}

impl Source for KvGroup {
    fn next_request(&self) -> Request {
        self.consul.next_request()
    }

    fn handle(&mut self, head: &Head, body: &[u8]) -> Result<Option<Snapshot>, RegistryError> {
        self.parts.clear();
        let (entries, advanced) = self.consul.answer(head, body, |body| match body {
            None => Ok(Vec::new()), // nothing under the parent
            Some(b) => kv_entries(b),
        })?;
        let split = split(&entries, self.consul.kv_prefix(), &self.prefixes);
        let mut lead = None;
        for (m, part) in split.iter().enumerate() {
            let fp = fingerprint(&entries, part);
            if m > 0 && self.seen[m] == Some(fp) {
                self.parts.push(Part::Same);
                continue;
            }
            self.seen[m] = Some(fp);
            let listing = kv_listing(part.iter().map(|&i| &entries[i]), &self.prefixes[m]);
            let snap = Snapshot::of(listing, advanced);
            if m == 0 {
                lead = Some(snap);
            } else {
                self.parts.push(Part::Changed(snap));
            }
        }
        Ok(lead)
    }

    fn take_parts(&mut self) -> Vec<Part> {
        std::mem::take(&mut self.parts)
    }

    fn set_poll_cap(&mut self, cap_ms: u64) {
        self.consul.set_poll_cap(cap_ms);
    }

    fn reset(&mut self) {
        self.consul.reset();
        self.seen.iter_mut().for_each(|s| *s = None);
        self.parts.clear();
    }

    fn take_note(&mut self) -> Option<String> {
        self.consul.take_note()
    }

    fn secrets(&self) -> Vec<String> {
        self.consul.secrets()
    }

    fn position(&self) -> u64 {
        self.consul.position()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conf::parse_upsync;
    use base64::Engine as _;

    fn head(status: u16, index: &str) -> Head {
        Head {
            status,
            http11: true,
            headers: vec![("x-consul-index".to_string(), index.to_string())],
        }
    }

    fn spec(addr: &str) -> UpsyncSpec {
        parse_upsync(&[addr, "upsync_type=consul"]).unwrap()
    }

    fn kv(pairs: &[(&str, Option<&str>)]) -> Vec<u8> {
        let list: Vec<serde_json::Value> = pairs
            .iter()
            .map(|(k, v)| {
                serde_json::json!({
                    "Key": k,
                    "Value": v.map(|v| base64::engine::general_purpose::STANDARD.encode(v)),
                    "ModifyIndex": 1,
                })
            })
            .collect();
        serde_json::to_vec(&list).unwrap()
    }

    #[test]
    fn parents() {
        assert_eq!(parent_of("upstreams/a/"), Some("upstreams/"));
        assert_eq!(parent_of("a/b/c/"), Some("a/b/"));
        assert_eq!(parent_of("a/"), None, "the whole store is never read");
        assert_eq!(parent_of("/a/"), None);
        assert_eq!(parent_of(""), None);
        assert_eq!(parent_of("upstreams//"), Some("upstreams/"));
    }

    #[test]
    fn share_keys() {
        let a = spec("127.0.0.1:8500/v1/kv/upstreams/a/");
        let b = spec("127.0.0.1:8500/v1/kv/upstreams/b");
        let key = share_key(&a, None).unwrap();
        assert_eq!(key.parent(), "upstreams/");
        assert_eq!(Some(key.clone()), share_key(&b, None));
        // what splits a group
        for other in [
            "127.0.0.1:8500/v1/kv/other/b/",
            "127.0.0.1:8501/v1/kv/upstreams/b/",
            "localhost:8500/v1/kv/upstreams/b/",
            "127.0.0.1:8500,127.0.0.2:8500/v1/kv/upstreams/b/",
            "https://127.0.0.1:8500/v1/kv/upstreams/b/",
            "127.0.0.1:8500/proxy/v1/kv/upstreams/b/",
            "127.0.0.1:8500/v1/kv/upstreams/b/?stale",
            "127.0.0.1:8500/v1/kv/upstreams/x/b/",
        ] {
            assert_ne!(share_key(&spec(other), None), Some(key.clone()), "{other}");
        }
        let token = Credential::Token("t".into());
        assert_ne!(share_key(&a, Some(&token)), Some(key.clone()));
        assert_eq!(
            share_key(&a, Some(&token)),
            share_key(&b, Some(&Credential::Token("t".into())))
        );
        // the timeouts do not split a group
        let slow = parse_upsync(&[
            "127.0.0.1:8500/v1/kv/upstreams/c/",
            "upsync_type=consul",
            "upsync_timeout=10m",
            "upsync_interval=1s",
        ])
        .unwrap();
        assert_eq!(share_key(&slow, None), Some(key.clone()));
        // polled alone
        assert_eq!(share_key(&spec("127.0.0.1:8500/v1/kv/top/"), None), None);
        let svc = parse_upsync(&[
            "127.0.0.1:8500/v1/health/service/web",
            "upsync_type=consul_health",
        ])
        .unwrap();
        assert_eq!(share_key(&svc, None), None);
    }

    #[test]
    fn grouping_keeps_order() {
        let keys = [Some(1), None, Some(2), Some(1), None, Some(2), Some(3)];
        assert_eq!(
            group_indexes(&keys),
            vec![vec![0, 3], vec![1], vec![2, 5], vec![4], vec![6]]
        );
        assert!(group_indexes::<u8>(&[]).is_empty());
    }

    #[test]
    fn split_per_member() {
        let body = kv(&[
            ("upstreams/", None),
            ("upstreams/a/", None),
            ("upstreams/a/127.0.0.1:1", None),
            ("upstreams/a/deeper/127.0.0.1:2", None),
            ("upstreams/ab/127.0.0.1:3", None),
            ("upstreams/b/127.0.0.1:4", None),
            ("upstreams/loose-key", None),
            ("upstreams/c/127.0.0.1:5", None),
        ]);
        let entries = kv_entries(&body).unwrap();
        let prefixes: Vec<String> = [
            "upstreams/a/",
            "upstreams/b/",
            "upstreams/ab/",
            "upstreams/a/",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let parts = split(&entries, "upstreams/", &prefixes);
        assert_eq!(parts, vec![vec![1, 2, 3], vec![5], vec![4], vec![1, 2, 3]]);
    }

    fn group(names: &[&str]) -> KvGroup {
        let specs: Vec<UpsyncSpec> = names
            .iter()
            .map(|n| spec(&format!("127.0.0.1:8500/v1/kv/upstreams/{n}/")))
            .collect();
        let refs: Vec<&UpsyncSpec> = specs.iter().collect();
        KvGroup::new(&refs, None).unwrap()
    }

    fn changed(p: &Part) -> Option<&Snapshot> {
        match p {
            Part::Changed(s) => Some(s),
            Part::Same => None,
        }
    }

    #[test]
    fn one_query_on_the_parent_and_only_changed_parts() {
        let mut g = group(&["a", "b", "c"]);
        assert_eq!(g.parent(), "upstreams/");
        let r = g.next_request();
        assert!(
            r.path_and_query
                .starts_with("/v1/kv/upstreams/?recurse&index=0&wait="),
            "{}",
            r.path_and_query
        );
        let v1 = kv(&[
            ("upstreams/a/127.0.0.1:1", Some(r#"{"weight":3}"#)),
            ("upstreams/b/127.0.0.1:2", None),
            ("upstreams/b/127.0.0.1:3", None),
            ("upstreams/unrelated/127.0.0.1:9", None),
        ]);
        let lead = g.handle(&head(200, "10"), &v1).unwrap().unwrap();
        assert_eq!(lead.servers.len(), 1);
        assert_eq!(lead.servers[0].weight, 3);
        assert!(lead.advanced);
        let parts = g.take_parts();
        assert_eq!(parts.len(), 2, "one per member after the lead");
        assert_eq!(changed(&parts[0]).unwrap().servers.len(), 2);
        assert!(
            changed(&parts[1]).unwrap().servers.is_empty(),
            "c: first answer"
        );
        assert!(g.take_parts().is_empty(), "taken");
        assert!(g.next_request().path_and_query.contains("index=10&"));

        // b changes: only b is handed out; the lead comes every time
        let v2 = kv(&[
            ("upstreams/a/127.0.0.1:1", Some(r#"{"weight":3}"#)),
            ("upstreams/b/127.0.0.1:2", Some(r#"{"down":1}"#)),
            ("upstreams/b/127.0.0.1:3", None),
            ("upstreams/unrelated/127.0.0.1:9", None),
        ]);
        let lead = g.handle(&head(200, "11"), &v2).unwrap().unwrap();
        assert_eq!(lead.servers.len(), 1);
        let parts = g.take_parts();
        assert!(changed(&parts[0]).unwrap().servers[0].down);
        assert!(changed(&parts[1]).is_none());

        // a change outside every member: nothing handed out
        let v3 = kv(&[
            ("upstreams/a/127.0.0.1:1", Some(r#"{"weight":3}"#)),
            ("upstreams/b/127.0.0.1:2", Some(r#"{"down":1}"#)),
            ("upstreams/b/127.0.0.1:3", None),
        ]);
        g.handle(&head(200, "12"), &v3).unwrap();
        assert!(g.take_parts().iter().all(|p| changed(p).is_none()));

        // a reset hands out everything again
        g.reset();
        assert!(g.next_request().path_and_query.contains("index=0&"));
        g.handle(&head(200, "12"), &v3).unwrap();
        assert!(g.take_parts().iter().all(|p| changed(p).is_some()));
    }

    #[test]
    fn bad_entries_stay_with_their_member() {
        let mut g = group(&["a", "b"]);
        let body = kv(&[
            ("upstreams/a/127.0.0.1:1", None),
            ("upstreams/b/localhost:80", None),
            ("upstreams/b/127.0.0.1:2", Some(r#"{"weight":-1}"#)),
            ("upstreams/b/127.0.0.1:3", None),
        ]);
        let lead = g.handle(&head(200, "5"), &body).unwrap().unwrap();
        assert!(lead.skipped.is_empty());
        let parts = g.take_parts();
        let b = changed(&parts[0]).unwrap();
        assert_eq!(b.servers.len(), 1);
        let keys: Vec<&str> = b.skipped.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(
            keys,
            ["upstreams/b/127.0.0.1:2", "upstreams/b/localhost:80"]
        );
    }

    #[test]
    fn whole_answer_errors_and_empty_parent() {
        let mut g = group(&["a", "b"]);
        assert!(matches!(
            g.handle(&head(200, "5"), b"[{\"Key\":"),
            Err(RegistryError::Json(_))
        ));
        assert!(g.take_parts().is_empty());
        assert!(matches!(
            g.handle(&head(500, "6"), b"rpc error"),
            Err(RegistryError::Status { code: 500, .. })
        ));
        let mut filtered = head(200, "7");
        filtered.headers.push((
            "X-Consul-Results-Filtered-By-ACLs".to_string(),
            "true".to_string(),
        ));
        assert!(matches!(
            g.handle(&filtered, b"[]"),
            Err(RegistryError::AclFiltered)
        ));
        // nothing under the parent: every member is empty
        let lead = g.handle(&head(404, "8"), b"").unwrap().unwrap();
        assert!(lead.servers.is_empty());
        assert_eq!(g.position(), 8);
        let parts = g.take_parts();
        assert!(changed(&parts[0]).unwrap().servers.is_empty());
    }

    #[test]
    fn the_shortest_timeout_and_the_token_apply() {
        let a = parse_upsync(&[
            "127.0.0.1:8500/v1/kv/upstreams/a/",
            "upsync_type=consul",
            "upsync_timeout=10m",
        ])
        .unwrap();
        let b = parse_upsync(&[
            "127.0.0.1:8500/v1/kv/upstreams/b/",
            "upsync_type=consul",
            "upsync_timeout=30s",
        ])
        .unwrap();
        let token = Credential::Token("s3cr3t".into());
        let g = KvGroup::new(&[&a, &b], Some(&token)).unwrap();
        let r = g.next_request();
        let (wait, _) = super::super::consul::wait_and_deadline(30_000);
        assert!(
            r.path_and_query.contains(&format!("wait={wait}ms")),
            "{}",
            r.path_and_query
        );
        assert_eq!(r.headers, vec!["X-Consul-Token: s3cr3t".to_string()]);
        assert_eq!(g.secrets(), vec!["s3cr3t".to_string()]);
    }
}
