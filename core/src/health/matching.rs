//! How a probe's answer is judged against a `match` block: a literal `expect` is what the
//! response starts with (decided as soon as enough bytes, or a differing byte, arrive); a
//! regex `expect` is tried on everything received so far (through the glue's PCRE), up
//! to `RESPONSE_LIMIT` bytes.

use super::state::ProbeFailure;

/// What a plain UDP check sends (NGINX Plus's datagram); it passes unless the server's
/// host answers with ICMP port unreachable.
pub const PLAIN_UDP_PAYLOAD: &[u8] = b"nginx health check";

/// Only the first bytes of a response are examined (nginx's default proxy_buffer_size).
pub const RESPONSE_LIMIT: usize = 16 * 1024;

/// What the data from the server must match.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Expect {
    /// The response starts with these bytes.
    Literal(Vec<u8>),
    /// The response matches this PCRE pattern (`~`, or `~*` when caseless).
    Regex { pattern: String, caseless: bool },
}

/// A `match NAME { send ...; expect ...; }` block.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MatchRule {
    pub name: String,
    /// Sent once connected (empty: nothing).
    pub send: Vec<u8>,
    pub expect: Option<Expect>,
}

/// A compiled regex (the glue's PCRE; a fake in tests).
pub trait RegexMatch {
    fn is_match(&self, data: &[u8]) -> bool;
}

/// What the data received so far means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail(ProbeFailure),
    /// Not decided yet: wait for more data.
    More,
}

impl MatchRule {
    /// Judges `data` (everything received so far, at most `RESPONSE_LIMIT` bytes kept).
    /// `complete`: nothing more will come (the server closed the connection, or `data`
    /// is a whole UDP datagram). `regex` is the compiled form of a regex `expect`.
    pub fn judge(&self, data: &[u8], complete: bool, regex: Option<&dyn RegexMatch>) -> Verdict {
        let mismatch = || Verdict::Fail(ProbeFailure::Mismatch(self.name.clone()));
        match &self.expect {
            None => Verdict::Pass,
            Some(Expect::Literal(lit)) => {
                let n = data.len().min(lit.len());
                if data[..n] != lit[..n] {
                    mismatch()
                } else if n == lit.len() {
                    Verdict::Pass
                } else if complete {
                    if data.is_empty() {
                        Verdict::Fail(ProbeFailure::Closed)
                    } else {
                        mismatch()
                    }
                } else {
                    Verdict::More
                }
            }
            Some(Expect::Regex { .. }) => {
                let Some(re) = regex else {
                    return mismatch();
                };
                let data = &data[..data.len().min(RESPONSE_LIMIT)];
                if !data.is_empty() && re.is_match(data) {
                    Verdict::Pass
                } else if complete {
                    if data.is_empty() {
                        Verdict::Fail(ProbeFailure::Closed)
                    } else {
                        mismatch()
                    }
                } else if data.len() >= RESPONSE_LIMIT {
                    Verdict::Fail(ProbeFailure::TooLong(RESPONSE_LIMIT))
                } else {
                    Verdict::More
                }
            }
        }
    }

    /// Whether the probe must read the server's answer.
    pub fn expects(&self) -> bool {
        self.expect.is_some()
    }
}
