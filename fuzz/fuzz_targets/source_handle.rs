//! The registry state machines (`Source::handle`, `on_partial`, `next_request`) driven
//! by a sequence of synthetic responses, for every `upsync_type`: whatever the registry
//! answers, no panic, accepted snapshots are valid, errors are loggable, and the next
//! request is a well-formed HTTP request.
//!
//! Input (plain bytes, so crashing inputs can be written by hand):
//!   KIND_BYTE STEP [0xFF 0xFF STEP]...
//! (KIND_BYTE & 0x7f) % 7: consul, consul_services, consul_health, etcd (v2), etcdv3, nacos
//! (API detection), nacos (v1, clusters); with KIND_BYTE >= 128 the source has a
//! credential (Consul token, etcd or Nacos user and password), so the etcd v3 and Nacos
//! login exchanges are driven too. The clock advances 100 s per step (Nacos renewal).
//! STEP: "STATUS\nINDEX\nFLAGS\nBODY" -- INDEX is the X-Consul-Index / X-Etcd-Index
//! value ("-": no header); FLAGS may contain 'p' (offer the body to on_partial byte by
//! byte first, as the poller does while a watch streams) and 'r' (reset() afterwards).
#![no_main]
use libfuzzer_sys::fuzz_target;
use upsync_fuzz::{check, split_steps};
use upsync_core::conf::{parse_upsync, Credential};
use upsync_core::http::Head;
use upsync_core::registry::{redact, source_for, RegistryError, Snapshot, Source};

const SPECS: &[&[&str]] = &[
    &["127.0.0.1:8500/v1/kv/upstreams/test", "upsync_type=consul", "upsync_timeout=6m"],
    &["127.0.0.1:8500/v1/catalog/service/web?dc=dc1", "upsync_type=consul_services"],
    &["127.0.0.1:8500/v1/health/service/web", "upsync_type=consul_health", "upsync_timeout=2s"],
    &["127.0.0.1:2379/v2/keys/upstreams/test", "upsync_type=etcd", "upsync_timeout=2s"],
    &["127.0.0.1:2379/upstreams/test/", "upsync_type=etcdv3", "upsync_timeout=2s"],
    &["127.0.0.1:8848/orders", "upsync_type=nacos"],
    &["127.0.0.1:8848/nacos/v1/ns/instance/list?serviceName=s&clusters=A", "upsync_type=nacos", "nacos_api=v1"],
];

fn finish(r: Result<Option<Snapshot>, RegistryError>, source: &dyn Source) {
    match r {
        Ok(Some(snap)) => check::snapshot(&snap),
        Ok(None) => {}
        Err(e) => {
            check::error(&e);
            // what is logged and shown (redacted) never holds the secret, even when
            // the registry echoes it
            let shown = redact(&e.to_string(), source);
            assert!(
                source.secrets().is_empty() || !shown.contains("fuzz-secret"),
                "{shown}"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else { return };
    let spec = parse_upsync(SPECS[(kind & 0x7f) as usize % SPECS.len()]).unwrap();
    let cred = match (kind >= 128, spec.kind.name()) {
        (false, _) => None,
        (true, "etcd" | "etcdv3" | "nacos") => Some(Credential::UserPassword {
            user: "upsync".into(),
            password: "fuzz-secret".into(),
        }),
        (true, _) => Some(Credential::Token("fuzz-secret".into())),
    };
    let Some(mut source) = source_for(&spec, cred.as_ref()) else { return };
    for (n, step) in split_steps(rest).into_iter().take(16).enumerate() {
        source.set_now(n as u64 * 100_000);
        source.start();
        check::next_request(source.as_ref(), &spec.endpoint);
        let mut parts = step.splitn(4, |&b| b == b'\n');
        let status = parts.next().unwrap_or(b"");
        let index = parts.next().unwrap_or(b"-");
        let flags = parts.next().unwrap_or(b"");
        let body = parts.next().unwrap_or(b"");
        let status: u16 = std::str::from_utf8(status)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(200);
        let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
        if index != b"-" {
            let v = String::from_utf8_lossy(index).trim().to_string();
            headers.push(("x-consul-index".into(), v.clone()));
            headers.push(("x-etcd-index".into(), v));
        }
        let head = Head {
            status,
            http11: true,
            headers,
        };
        let mut done = false;
        if flags.contains(&b'p') {
            for cut in 0..=body.len() {
                if source.on_partial(&head, &body[..cut]) {
                    let r = source.handle(&head, &body[..cut]);
                    finish(r, source.as_ref());
                    done = true;
                    break;
                }
            }
        }
        if !done {
            let r = source.handle(&head, body);
            finish(r, source.as_ref());
        }
        if let Some(note) = source.take_note() {
            assert!(!note.contains('\n'), "line break in a note: {note:?}");
        }
        let _ = source.position();
        if flags.contains(&b'r') {
            source.reset();
        }
    }
    check::next_request(source.as_ref(), &spec.endpoint);
});
