//! Registry protocols. Each one turns "what do I know so far" into the next HTTP request,
//! and a response into a server list. No I/O here: the poller drives the requests.

pub mod consul;
pub mod consul_group;
pub mod etcd_v2;
pub mod etcd_v3;
pub mod kubernetes;
pub mod nacos;
pub mod zookeeper;

use crate::conf::{Credential, SourceKind, UpsyncSpec};
use crate::http::Head;
use crate::servers::{normalize, ServerSpec, SpecError};

/// The next request to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: &'static str,
    pub path_and_query: String,
    /// Complete header lines without CRLF.
    pub headers: Vec<String>,
    /// How long to wait for the whole response.
    pub timeout_ms: u64,
    /// A watch the server never ends by itself (etcd): reaching the timeout is normal,
    /// and the same request is simply sent again.
    pub timeout_is_normal: bool,
    pub body: Vec<u8>,
}

impl Request {
    pub fn get(path_and_query: String, timeout_ms: u64) -> Request {
        Request {
            method: "GET",
            path_and_query,
            headers: vec![],
            timeout_ms,
            timeout_is_normal: false,
            body: vec![],
        }
    }
}

/// A registry entry that is not a valid server. It is skipped (every valid entry
/// applies) and reported: logged when it appears and when it goes away, and listed in
/// the status views.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Skipped {
    /// The entry's key (Consul KV / etcd key, Consul service ID, ...), printable.
    pub key: String,
    /// Why it cannot be a server.
    pub cause: String,
}

impl Skipped {
    pub fn new(key: &str, cause: impl std::fmt::Display) -> Skipped {
        Skipped {
            key: excerpt(key.as_bytes()),
            cause: crate::servers::printable(&cause.to_string(), 256),
        }
    }
}

/// A registry's listing: its valid servers and the entries it skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    pub servers: Vec<ServerSpec>,
    pub skipped: Vec<Skipped>,
}

impl Listing {
    /// Takes an entry's result: a server, or a skipped entry under `key`.
    pub fn push(&mut self, key: &str, entry: Result<ServerSpec, crate::servers::SpecError>) {
        match entry {
            Ok(s) => self.servers.push(s),
            Err(e) => self.skipped.push(Skipped::new(key, e)),
        }
    }
}

/// The result of one successful exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Normalized: sorted by address, one entry per address.
    pub servers: Vec<ServerSpec>,
    /// Entries dropped because another entry had the same address.
    pub duplicates: usize,
    /// Entries that are not valid servers, sorted by key.
    pub skipped: Vec<Skipped>,
    /// True when the registry's position moved (a change may have happened); false when
    /// a blocking query simply timed out at the same index.
    pub advanced: bool,
}

impl Snapshot {
    pub fn new(servers: Vec<ServerSpec>, advanced: bool) -> Snapshot {
        Snapshot::of(
            Listing {
                servers,
                skipped: Vec::new(),
            },
            advanced,
        )
    }

    pub fn of(mut listing: Listing, advanced: bool) -> Snapshot {
        let duplicates = normalize(&mut listing.servers).len();
        listing.skipped.sort();
        listing.skipped.dedup();
        Snapshot {
            servers: listing.servers,
            duplicates,
            skipped: listing.skipped,
            advanced,
        }
    }
}

/// What one answer of a source that reads several upstreams at once brought for one of
/// them (see [`Source::take_parts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Its listing changed (or is read for the first time since a reset).
    Changed(Snapshot),
    /// Its part of the answer is what it was.
    Same,
}

/// Why a response could not be used. The last good server set stays in place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("unexpected HTTP status {code}{}{}", quoted(.body), credential_hint(*.code))]
    Status { code: u16, body: String },
    #[error("response has no {0} header")]
    MissingHeader(&'static str),
    #[error("invalid {0} header \"{1}\"")]
    BadHeader(&'static str, String),
    #[error("invalid JSON in response: {0}")]
    Json(String),
    #[error("entry \"{key}\": {err}")]
    Entry { key: String, err: SpecError },
    /// Consul hid entries this token may not read: applying the rest would drop servers.
    #[error("the ACL token may not read every entry (X-Consul-Results-Filtered-By-ACLs); a partial list is not applied")]
    AclFiltered,
    /// The registry reported a failure in a successful HTTP answer (an etcd watch
    /// stream's error message): a failed exchange, not bad data.
    #[error("{0}")]
    Server(String),
    /// The registry refused the credentials (or wants some).
    #[error("authentication failed: {0}")]
    Auth(String),
    /// An object of the answer is not usable (Kubernetes: a slice or an endpoint).
    #[error("{what}: {why}")]
    Object { what: String, why: String },
}

impl RegistryError {
    /// Bad data in an otherwise good exchange (the connection and the registry work):
    /// never a reason for failover or backoff.
    pub fn is_data_error(&self) -> bool {
        matches!(
            self,
            RegistryError::Json(_)
                | RegistryError::MissingHeader(_)
                | RegistryError::BadHeader(..)
                | RegistryError::Entry { .. }
                | RegistryError::Object { .. }
        )
    }
}

fn quoted(body: &str) -> String {
    if body.is_empty() {
        String::new()
    } else {
        format!(": \"{body}\"")
    }
}

fn credential_hint(code: u16) -> &'static str {
    if code == 401 || code == 403 {
        " (the registry wants credentials: check token_file=)"
    } else {
        ""
    }
}

/// Shortens untrusted bytes for a log line: at most 128 bytes, control characters
/// escaped.
pub fn excerpt(bytes: &[u8]) -> String {
    crate::servers::printable(&String::from_utf8_lossy(bytes), 128)
}

/// One registry protocol's client-side state machine.
pub trait Source: Send {
    /// The request to send next.
    fn next_request(&self) -> Request;
    /// A new exchange begins (its response is a new stream).
    fn start(&mut self) {}
    /// The poller's monotonic clock in milliseconds, given before each exchange (before
    /// `start`), for sources that keep time-bound state (the Nacos token's lifetime).
    fn set_now(&mut self, _now_ms: u64) {}
    /// Turns a complete response into a snapshot, updating the position (index/revision).
    /// `Ok(None)`: nothing to apply, ask again at once (a watch fired; re-read).
    fn handle(&mut self, head: &Head, body: &[u8]) -> Result<Option<Snapshot>, RegistryError>;
    /// Called with the body received so far of a response that is still streaming (etcd
    /// v3 watches never end). Returning true ends the exchange and hands that body to
    /// `handle`.
    fn on_partial(&mut self, _head: &Head, _body: &[u8]) -> bool {
        false
    }
    /// After `on_partial` returned false: a new server set that the part of the stream
    /// read so far produced, to apply now while the exchange goes on (a Kubernetes watch
    /// stays open across changes). The poller calls it after every `on_partial`.
    fn take_streamed(&mut self) -> Option<Snapshot> {
        None
    }
    /// A notable recovery the source made on its own (history cleared, watch compacted),
    /// for the poller to log once.
    fn take_note(&mut self) -> Option<String> {
        None
    }
    /// Long polls must end within `cap_ms` (something between nginx and the registry
    /// cuts connections that stay idle longer): a source whose server ends its long
    /// polls itself asks for a shorter wait. Sources whose watches the client ends
    /// (etcd) need nothing: the poller ends them at the cap.
    fn set_poll_cap(&mut self, _cap_ms: u64) {}
    /// A source that reads several upstreams in one exchange (a Consul KV group): after
    /// `handle` returned the first upstream's snapshot, what the same answer brought for
    /// each of the others, in order. Empty for a source of one upstream.
    fn take_parts(&mut self) -> Vec<Part> {
        Vec::new()
    }
    /// Forgets the position, so the next request reads everything (after errors).
    fn reset(&mut self);
    /// The position, for status output (Consul index, etcd index).
    fn position(&self) -> u64;
    /// The secrets this source sends (token, password, their encodings), so text that
    /// quotes a registry's answer can be cleaned of them before it is logged or shown:
    /// a proxy or a registry may echo a request back.
    fn secrets(&self) -> Vec<String> {
        Vec::new()
    }
}

/// `text` with every secret of `source` replaced by `<hidden>`.
///
/// The text may quote a registry's answer as received (JSON-escaped), after
/// [`excerpt`] mapped control characters, or cut at 128 bytes with `...`; each of those
/// forms is hidden, and so is the start of a secret that a cut left before `...`.
/// Secrets shorter than 4 bytes are hidden only where they stand as a separate word,
/// so that they do not blank ordinary words.
pub fn redact(text: &str, source: &dyn Source) -> String {
    redact_secrets(text, &source.secrets())
}

/// `text` with each of `secrets` replaced by `<hidden>`, in every form [`redact`]
/// covers (for clients that are not a [`Source`], such as the ZooKeeper session).
pub fn redact_secrets(text: &str, secrets: &[String]) -> String {
    // Longest first across all secrets, so that hiding a short one never breaks up a
    // longer one (a 1-byte password inside a token) and leaves the rest of it showing.
    let mut forms: Vec<String> = secrets
        .iter()
        .filter(|s| !s.is_empty())
        .flat_map(|s| quoted_forms(s))
        .collect();
    forms.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    forms.dedup();
    let mut out = text.to_string();
    for form in &forms {
        out = if form.len() >= 4 {
            out.replace(form.as_str(), "<hidden>")
        } else {
            replace_word(&out, form)
        };
    }
    // An excerpt cut inside a secret leaves its first bytes before the "...".
    for form in forms.iter().filter(|f| f.len() > 4) {
        out = hide_cut_prefix(&out, form);
    }
    out
}

/// The ways a secret can appear in text quoting a registry's answer: as sent,
/// JSON-escaped (serde's way, and Go's, which also escapes `<`, `>` and `&`), and each
/// of those with control characters mapped by [`excerpt`].
fn quoted_forms(secret: &str) -> Vec<String> {
    let json = serde_json::to_string(secret).unwrap_or_default();
    let json = json
        .strip_prefix('"')
        .and_then(|j| j.strip_suffix('"'))
        .unwrap_or(secret)
        .to_string();
    let go = json
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026");
    let raw = [secret.to_string(), json, go];
    let shown = raw
        .iter()
        .map(|f| crate::servers::printable(f, usize::MAX))
        .collect::<Vec<_>>();
    raw.into_iter().chain(shown).collect()
}

/// `text` with each occurrence of `word` that is not part of a longer alphanumeric run
/// replaced by `<hidden>`.
fn replace_word(text: &str, word: &str) -> String {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric());
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(word) {
        let before = if at > 0 {
            rest[..at].chars().last()
        } else {
            out.chars().last()
        };
        let after = rest[at + word.len()..].chars().next();
        out.push_str(&rest[..at]);
        if alnum(before) || alnum(after) {
            out.push_str(word);
        } else {
            out.push_str("<hidden>");
        }
        rest = &rest[at + word.len()..];
    }
    out.push_str(rest);
    out
}

/// Hides a start of `secret` (4 bytes or more) that ends right before a `...` cut mark
/// (the last three dots of a run: the secret itself may end in dots).
fn hide_cut_prefix(text: &str, secret: &str) -> String {
    let mut out = text.to_string();
    let mut from = 0;
    while let Some(start) = out[from..].find("...").map(|p| p + from) {
        let run = out[start..].bytes().take_while(|&b| b == b'.').count();
        let mark = start + run - 3;
        let head = &out[..mark];
        let hit = (4..secret.len())
            .rev()
            .filter(|&n| secret.is_char_boundary(n))
            .find(|&n| head.ends_with(&secret[..n]));
        from = start + run;
        if let Some(n) = hit {
            out.replace_range(mark - n..mark, "<hidden>");
            from = from - n + "<hidden>".len();
        }
    }
    out
}

/// Builds the protocol for a parsed `upsync` directive; `cred` is the credential read
/// from `token_file=` (Consul: an ACL token; etcd and Nacos: user and password;
/// Kubernetes: a bearer token, read again when the file changes). `None` for
/// ZooKeeper, which is no request/response protocol: its [`zookeeper::Session`] is
/// driven by the glue's ZooKeeper owner, one per ensemble.
pub fn source_for(spec: &UpsyncSpec, cred: Option<&Credential>) -> Option<Box<dyn Source>> {
    Some(match spec.kind {
        SourceKind::ConsulKv | SourceKind::ConsulServices | SourceKind::ConsulHealth => {
            Box::new(consul::Consul::new(spec).with_credential(cred))
        }
        SourceKind::EtcdV2 => Box::new(etcd_v2::EtcdV2::new(spec).with_credential(cred)),
        SourceKind::EtcdV3 => Box::new(etcd_v3::EtcdV3::new(spec).with_credential(cred)),
        SourceKind::Nacos => Box::new(nacos::Nacos::new(spec).with_credential(cred)),
        SourceKind::Kubernetes => {
            Box::new(kubernetes::Kubernetes::new(spec).with_credential(spec, cred))
        }
        SourceKind::ZooKeeper => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_from_echoed_text() {
        let spec = crate::conf::parse_upsync(&["h:1/upstreams/x/", "upsync_type=etcdv3"]).unwrap();
        let cred = Credential::UserPassword {
            user: "upsync".into(),
            password: "hunter22".into(),
        };
        let src = source_for(&spec, Some(&cred)).unwrap();
        assert_eq!(
            redact(
                "echo: {\"name\":\"upsync\",\"password\":\"hunter22\"}",
                src.as_ref()
            ),
            "echo: {\"name\":\"upsync\",\"password\":\"<hidden>\"}"
        );
        let spec = crate::conf::parse_upsync(&["h:1/v2/keys/x/", "upsync_type=etcd"]).unwrap();
        let src = source_for(&spec, Some(&cred)).unwrap();
        let basic = "dXBzeW5jOmh1bnRlcjIy"; // base64("upsync:hunter22")
        assert_eq!(
            redact(&format!("got Basic {basic}"), src.as_ref()),
            "got Basic <hidden>"
        );
        let spec = crate::conf::parse_upsync(&["h:1/v1/kv/x/", "upsync_type=consul"]).unwrap();
        let src = source_for(&spec, Some(&Credential::Token("tok-1234".into()))).unwrap();
        assert_eq!(
            redact("token tok-1234 denied", src.as_ref()),
            "token <hidden> denied"
        );
    }

    #[test]
    fn secrets_of_any_client_are_redacted() {
        let secrets = vec!["upsync:s3cret-pw".to_string(), "s3cret-pw".to_string()];
        assert_eq!(
            redact_secrets("auth upsync:s3cret-pw, then s3cret-pw", &secrets),
            "auth <hidden>, then <hidden>"
        );
        assert_eq!(redact_secrets("nothing here", &[]), "nothing here");
    }

    /// An etcd v3 source for user "upsync" with `password`.
    fn v3_with_password(password: &str) -> Box<dyn Source> {
        let spec = crate::conf::parse_upsync(&["h:1/upstreams/x/", "upsync_type=etcdv3"]).unwrap();
        let cred = Credential::UserPassword {
            user: "upsync".into(),
            password: password.into(),
        };
        source_for(&spec, Some(&cred)).unwrap()
    }

    #[test]
    fn secrets_are_redacted_in_every_quoted_form() {
        // JSON-escaped, as an echoed request body quotes it
        let src = v3_with_password("pa\"ss\\word");
        assert_eq!(
            redact(r#"{"password":"pa\"ss\\word"}"#, src.as_ref()),
            r#"{"password":"<hidden>"}"#
        );
        // cut by an excerpt in the middle of the secret
        let src = v3_with_password("correct-horse-battery");
        let cut = format!(
            "{}...",
            &format!("{:>110}password\":\"correct-hor", "x")[..128]
        );
        let text =
            excerpt(format!("{:>110}password\":\"correct-horse-battery\"}}", "x").as_bytes());
        assert_eq!(text, cut);
        assert!(
            !redact(&text, src.as_ref()).contains("correct"),
            "{}",
            redact(&text, src.as_ref())
        );
        assert!(redact(&text, src.as_ref()).ends_with("\"<hidden>..."));
        // ordinary text that merely ends like a cut is left alone
        assert_eq!(redact("cor...", src.as_ref()), "cor...");
        // a short secret is hidden where it stands alone, not inside other words
        let src = v3_with_password("ab1");
        assert_eq!(
            redact(r#"user "ab1" has password ab1 in cab1ne"#, src.as_ref()),
            r#"user "<hidden>" has password <hidden> in cab1ne"#
        );
    }

    /// Found by review: a short secret hidden first broke up a longer one; forms
    /// escaped the way Go does, or escaped and then control-mapped; a cut after dots
    /// that belong to the secret.
    #[test]
    fn redaction_covers_overlapping_secrets_and_more_forms() {
        let src = v3_with_password("1");
        // the v3 source's token would be a second secret; the v2 Basic form is one
        let spec = crate::conf::parse_upsync(&["h:1/v2/keys/x/", "upsync_type=etcd"]).unwrap();
        let cred = Credential::UserPassword {
            user: "upsync".into(),
            password: "1".into(),
        };
        let v2 = source_for(&spec, Some(&cred)).unwrap();
        let basic = "dXBzeW5jOjE="; // base64("upsync:1")
        assert_eq!(
            redact(&format!("Basic {basic} and 1"), v2.as_ref()),
            "Basic <hidden> and <hidden>"
        );
        assert_eq!(redact("abc 1.5", src.as_ref()), "abc <hidden>.5");
        // a password of "1" and a token that ends in ".1", the short one listed first
        struct Fixed(Vec<String>);
        impl Source for Fixed {
            fn next_request(&self) -> Request {
                Request::get("/".into(), 1)
            }
            fn handle(&mut self, _: &Head, _: &[u8]) -> Result<Option<Snapshot>, RegistryError> {
                Ok(None)
            }
            fn reset(&mut self) {}
            fn position(&self) -> u64 {
                0
            }
            fn secrets(&self) -> Vec<String> {
                self.0.clone()
            }
        }
        let both = Fixed(vec!["1".into(), "abcdEFGHijklMNOP.1".into()]);
        assert_eq!(
            redact("token abcdEFGHijklMNOP.1 (1)", &both),
            "token <hidden> (<hidden>)"
        );
        let src = v3_with_password("pa\"ss\u{1}x\u{7f}<wo>&rd");
        for shown in [
            r#"pa"ss.x.<wo>&rd"#,
            r#"pa\"ss\u0001x.<wo>&rd"#,
            r#"pa\"ss\u0001x.\u003cwo\u003e\u0026rd"#,
        ] {
            assert_eq!(
                redact(&format!("[{shown}]"), src.as_ref()),
                "[<hidden>]",
                "{shown}"
            );
        }
        let src = v3_with_password("abcd..efghij");
        assert_eq!(redact("x abcd.....", src.as_ref()), "x <hidden>...");
        assert_eq!(redact("x abcd..efg... y", src.as_ref()), "x <hidden>... y");
    }
}
