//! What a poller does when an exchange does not end in a good answer: a connection
//! closed unanswered (the registry's keep-alive, an idle cut by something in between,
//! Consul's connection limit), an answer with bad data (no failover, no backoff), and
//! a failed exchange (logged once per outage, next address or backoff). The last good
//! set always stays.

use ngx::ffi::*;

use super::{Poller, IDLE_CUT_MIN_MS};
use crate::ngx_util::mono_ms;
use upsync_core::conf::SourceKind;
use upsync_core::policy::Retry;
use upsync_core::registry::consul::turned_away_message;
use upsync_core::registry::{redact, RegistryError};

impl Poller {
    /// The registry side closed the connection before any byte of an answer, or while a
    /// watch stream was quiet. On a kept-alive connection closed at once, the registry
    /// had closed it while idle: ask again on a new one. A long poll or watch closed
    /// after a quiet while is an idle cut by something in between (a proxy, a load
    /// balancer, NAT): ask again at once with the same position, and once cuts repeat,
    /// keep long polls shorter than the cut.
    pub(super) fn closed_unanswered(&mut self) {
        let Some(x) = self.exchange.take() else {
            return;
        };
        self.conn = None;
        let now = mono_ms();
        let elapsed = now.saturating_sub(x.last_byte);
        if x.received == 0 && x.reused && elapsed < IDLE_CUT_MIN_MS {
            self.debug("the kept-alive connection was closed by the registry; asking again");
            return self.schedule(0);
        }
        if elapsed < IDLE_CUT_MIN_MS {
            let addr = self.target().addr;
            if x.received == 0 && self.is_consul() {
                return self.fail(turned_away_message(addr));
            }
            return self.fail(if x.received == 0 {
                format!("the registry at {addr} closed the connection without answering")
            } else {
                "bad response: connection closed before the response was complete (truncated)"
                    .to_string()
            });
        }
        self.log(
            NGX_LOG_INFO,
            &format!("the long poll was closed after {elapsed}ms without an answer (an idle cut by a proxy, load balancer or NAT?); asking again"),
        );
        self.cuts.push(elapsed);
        if self.cuts.len() > 3 {
            self.cuts.remove(0);
        }
        if self.cuts.len() >= 2 {
            let shortest = self.cuts.iter().copied().min().unwrap_or(elapsed);
            let cap = (shortest / 4 * 3).max(IDLE_CUT_MIN_MS / 2);
            if self.poll_cap.map_or(true, |c| cap < c) {
                self.poll_cap = Some(cap);
                self.source.set_poll_cap(cap);
                self.log(
                    NGX_LOG_NOTICE,
                    &format!("quiet registry connections are cut after about {shortest}ms: long polls now last at most {cap}ms"),
                );
            }
        }
        self.schedule(0);
    }

    /// A good exchange with bad data (not a listing, a missing header): the registry and
    /// the connection work, so there is no failover and no backoff. The set stays; the
    /// error is logged once for the spell; the next request goes out at once when the
    /// source's position moved past the bad answer (a blocking query then waits for the
    /// next change, usually the fix), else after upsync_interval.
    pub(super) fn data_failed(&mut self, e: RegistryError, position_before: u64) {
        let msg = redact(&e.to_string(), self.source.as_ref());
        if self.errors.first_time(&msg) {
            self.log(
                NGX_LOG_ERR,
                &format!("{msg}; keeping the current servers, the next change is read as soon as the registry has one"),
            );
        }
        self.publisher.record_error(self.epoch, &msg, None);
        self.members_record_error(&msg, None);
        self.data_error = Some(msg);
        let moved = self.source.position() != position_before;
        self.schedule(if moved { 0 } else { self.interval_ms });
    }

    /// Records a failed exchange: logs each distinct error once per outage, keeps the
    /// last good set, and moves on to the next registry address: at once while the
    /// round of addresses is not done, after a backoff delay once every one failed.
    pub(super) fn fail(&mut self, msg: String) {
        let msg = redact(&msg, self.source.as_ref());
        self.conn = None;
        self.exchange = None;
        self.side.forget_session();
        self.source.reset();
        let jitter = self.rng.fraction();
        let retry = self.failover.failed(self.interval_ms, jitter);
        let next = self.target().addr;
        let (delay, what) = match retry {
            Retry::Next => (0, format!("trying the next registry address {next} now")),
            Retry::Backoff(d) if self.failover.is_list() => (
                d,
                format!("every registry address failed; retrying {next} in {d}ms"),
            ),
            Retry::Backoff(d) => (d, format!("retrying in {d}ms")),
        };
        self.debug(&format!("failed: {msg}; next try in {delay}ms"));
        if self.errors.first_time(&msg) {
            self.log(
                NGX_LOG_ERR,
                &format!("{msg}; keeping the current servers, {what} (further identical errors are not logged)"),
            );
        }
        let failures = self.failover.failures();
        self.publisher
            .record_error(self.epoch, &msg, Some(failures as u64));
        self.members_record_error(&msg, Some(failures as u64));
        self.schedule(delay);
    }

    pub(super) fn is_consul(&self) -> bool {
        self.conf().upsync.as_ref().is_some_and(|u| {
            matches!(
                u.kind,
                SourceKind::ConsulKv | SourceKind::ConsulServices | SourceKind::ConsulHealth
            )
        })
    }

    /// Whether the exchange in flight looks turned away by Consul's per-client
    /// connection limit: a Consul registry, a new connection, and nothing of an answer
    /// but a 429 status line.
    pub(super) fn refused_by_limit(&self) -> bool {
        let Some(x) = self.exchange.as_ref() else {
            return false;
        };
        let status = x.parser.head().map(|h| h.status);
        self.is_consul() && !x.reused && (x.received == 0 || status == Some(429))
    }

    /// A send or receive failed: on a Consul connection turned away at once, says why
    /// that likely is.
    pub(super) fn fail_io(&mut self, msg: String) {
        // a TLS alert says why itself (a refused client certificate, say)
        if self.refused_by_limit() && !msg.contains("alert") {
            return self.fail(turned_away_message(self.target().addr));
        }
        self.fail(msg)
    }
}
