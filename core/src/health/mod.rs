//! Active health checks, the pure part: the directive values (`health_check`, `match`),
//! how a probe's answer is judged, the pass/fail thresholds and state transitions of one
//! server, and when each server is probed next (against a clock passed in).
//!
//! The glue (`src/probe/`) opens the connections and keeps the state in the upstream's
//! shared zone; everything it decides comes from here.

mod conf;
mod key;
mod matching;
mod schedule;
mod state;
#[cfg(test)]
mod tests;

pub use conf::{
    decode_escapes, parse_expect, parse_health_check, parse_timeout, HealthCheckSpec,
    HealthConfError, MatchBuilder, DEFAULT_INTERVAL_MS, DEFAULT_TIMEOUT_MS,
};
pub use key::AddrKey;
pub use matching::{Expect, MatchRule, RegexMatch, Verdict, PLAIN_UDP_PAYLOAD, RESPONSE_LIMIT};
pub use schedule::{first_due, next_due, Timetable};
pub use state::{Change, Health, HealthState, ProbeFailure, Thresholds};
