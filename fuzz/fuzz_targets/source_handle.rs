//! The registry state machines (`Source::handle`, `on_partial`, `next_request`) driven
//! by a sequence of synthetic responses, for every `upsync_type`: whatever the registry
//! answers, no panic, accepted snapshots are valid, errors are loggable, and the next
//! request is a well-formed HTTP request.
#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use upsync_pure::check;
use upsync_pure::conf::parse_upsync;
use upsync_pure::net::http::{build_request, Head};
use upsync_pure::registry::source_for;

#[derive(Arbitrary, Debug)]
struct Step {
    status: u16,
    http11: bool,
    /// Index header value: 0 none, 1 the text below, 2 a number
    index_kind: u8,
    index_text: String,
    index_num: u64,
    extra: Vec<(String, String)>,
    body: Vec<u8>,
    /// Offer prefixes of the body to on_partial first (streaming watches).
    partial: bool,
    reset: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    kind: u8,
    steps: Vec<Step>,
}

const SPECS: &[&[&str]] = &[
    &["127.0.0.1:8500/v1/kv/upstreams/test", "upsync_type=consul", "upsync_timeout=6m"],
    &["127.0.0.1:8500/v1/catalog/service/web?dc=dc1", "upsync_type=consul_services"],
    &["127.0.0.1:8500/v1/health/service/web", "upsync_type=consul_health", "upsync_timeout=2s"],
    &["127.0.0.1:2379/v2/keys/upstreams/test", "upsync_type=etcd", "upsync_timeout=2s"],
    &["127.0.0.1:2379/upstreams/test/", "upsync_type=etcdv3", "upsync_timeout=2s"],
];

fuzz_target!(|input: Input| {
    let spec = parse_upsync(SPECS[input.kind as usize % SPECS.len()]).unwrap();
    let mut source = source_for(&spec);
    for step in input.steps.iter().take(16) {
        let req = source.next_request();
        check::request(&build_request(
            req.method,
            &req.path_and_query,
            &spec.endpoint.authority(),
            &req.headers,
            &req.body,
        ));
        let mut headers: Vec<(String, String)> = step
            .extra
            .iter()
            .take(8)
            .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let index = match step.index_kind % 3 {
            0 => None,
            1 => Some(step.index_text.trim().to_string()),
            _ => Some(step.index_num.to_string()),
        };
        if let Some(i) = index {
            headers.insert(0, ("x-consul-index".into(), i.clone()));
            headers.insert(0, ("x-etcd-index".into(), i));
        }
        let head = Head {
            status: step.status,
            http11: step.http11,
            headers,
        };
        if step.partial {
            let mut done = false;
            for cut in 0..=step.body.len() {
                if source.on_partial(&head, &step.body[..cut]) {
                    let r = source.handle(&head, &step.body[..cut]);
                    finish(r);
                    done = true;
                    break;
                }
            }
            if !done {
                finish(source.handle(&head, &step.body));
            }
        } else {
            finish(source.handle(&head, &step.body));
        }
        if let Some(note) = source.take_note() {
            assert!(!note.contains('\n'), "line break in a note: {note:?}");
        }
        let _ = source.position();
        if step.reset {
            source.reset();
        }
    }
    let req = source.next_request();
    check::request(&build_request(req.method, &req.path_and_query, "h:1", &req.headers, &req.body));
});

fn finish(
    r: Result<Option<upsync_pure::registry::Snapshot>, upsync_pure::registry::RegistryError>,
) {
    match r {
        Ok(Some(snap)) => check::snapshot(&snap),
        Ok(None) => {}
        Err(e) => check::error(&e),
    }
}
