//! What the health-check directives leave in the configuration: a stream server's
//! `health_check` (before it is resolved onto its upstream), the `match` blocks, and the
//! resolved check of an upstream (`HealthConf`), with its PCRE regex.

use std::hash::{Hash, Hasher};

use ngx::ffi::{ngx_int_t, ngx_regex_exec, ngx_regex_t, ngx_str_t};
use upsync_core::health::{HealthCheckSpec, MatchRule, RegexMatch, Thresholds};

/// A `health_check` line of a stream `server {}` block.
#[derive(Debug, Clone)]
pub struct HcDirective {
    pub spec: HealthCheckSpec,
    /// Where it is written (`file:line`), for messages.
    pub at: String,
}

/// A `match NAME { }` block.
pub struct MatchDef {
    pub rule: MatchRule,
    /// The compiled regex of `expect ~ ...` (null: none).
    pub regex: *mut ngx_regex_t,
    pub at: String,
    /// What is wrong with the block, if anything: reported by `resolve`, which names
    /// the upstreams whose checks use it.
    pub error: Option<String>,
}

/// A regex compiled by nginx's PCRE at configuration time.
pub struct Pcre(pub *mut ngx_regex_t);

impl RegexMatch for Pcre {
    fn is_match(&self, data: &[u8]) -> bool {
        if self.0.is_null() {
            return false;
        }
        let mut s = ngx_str_t {
            len: data.len(),
            data: data.as_ptr() as *mut u8,
        };
        // SAFETY: the regex was compiled by ngx_regex_compile for this configuration
        // (which outlives every probe); PCRE only reads `len` bytes of `data`; no
        // captures are asked for.
        let rc = unsafe { ngx_regex_exec(self.0, &mut s, std::ptr::null_mut(), 0) };
        rc >= 0 as ngx_int_t
    }
}

/// An upstream's active health check, resolved at postconfiguration.
pub struct HealthConf {
    pub spec: HealthCheckSpec,
    pub timeout_ms: u64,
    pub rule: Option<MatchRule>,
    pub regex: Pcre,
    /// Where the `health_check` is written.
    pub at: String,
}

impl HealthConf {
    pub fn thresholds(&self) -> Thresholds {
        Thresholds {
            fails: self.spec.fails,
            passes: self.spec.passes,
        }
    }

    /// Identifies the check (everything that decides what a probe does or means):
    /// probers of another configuration never take the zone's prober lease.
    pub fn id(&self, upstream: &str) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        upstream.hash(&mut h);
        self.spec.hash(&mut h);
        self.timeout_ms.hash(&mut h);
        self.rule.hash(&mut h);
        h.finish() | 1
    }
}
