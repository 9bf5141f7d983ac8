//! What the session reports, applied: listings become each upstream's server set
//! (bad children skipped and reported, published through `poller::Publisher` with the
//! HTTP poller's log lines), session changes (established, resumed, expired, the watch
//! mode) are logged once, and read errors of one znode are logged once per spell and
//! recorded in that upstream's status.

use ngx::ffi::*;

use super::ZkOwner;
use crate::ngx_util::{arm_timer, mono_ms};
use upsync_core::registry::zookeeper::{
    listing, Child, Event, SessionEvent, WatchId, WatchMode, ZkError,
};
use upsync_core::registry::Snapshot;

/// A listing is published once the event loop is done with what it read (a timer of
/// 0 ms): notifications that arrived together go out together. A transaction is
/// never split anyway (the list is read again after a child is created or deleted,
/// see `registry::zookeeper::watch`).
const SETTLE_MS: u64 = 0;
/// After a publish that took T, the next waits PUBLISH_SHARE x T: publishing (a plan
/// and a dump of the whole set each time) takes at most about a fifth of the worker
/// however fast the registrations come, and costs an isolated change nothing.
const PUBLISH_SHARE: u64 = 4;
/// How long a steady stream of changes may hold listings back.
const MAX_SETTLE_MS: u64 = 100;

pub(super) unsafe extern "C" fn settle_handler(ev: *mut ngx_event_t) {
    // SAFETY: the settle event's data is its owner (set in `start`).
    unsafe { (*((*ev).data as *mut ZkOwner)).publish_pending() };
}

impl ZkOwner {
    /// Applies every event the session has queued.
    pub(super) fn handle_events(&mut self) {
        let Some(s) = self.session.as_mut() else {
            return;
        };
        for ev in s.take_events() {
            match ev {
                Event::Listing {
                    watch,
                    exists,
                    children,
                } => self.on_listing(watch, exists, &children),
                Event::Session(e) => self.on_session_event(e),
                Event::Error {
                    watch: Some(id),
                    err,
                } => self.on_watch_error(id, &err),
                Event::Error { watch: None, err } => self.log(NGX_LOG_ERR, &err.to_string()),
            }
        }
    }

    fn member_of(&self, id: WatchId) -> Option<usize> {
        self.members.iter().position(|m| m.watch == Some(id))
    }

    /// A listing is published once the event loop is done with what it read
    /// (`SETTLE_MS`), and after a burst of registrations only after a pause
    /// proportional to the last publish's cost (`PUBLISH_SHARE`), never more than
    /// `MAX_SETTLE_MS` in all: a burst does not publish one node at a time, each with
    /// its plan and dump.
    fn on_listing(&mut self, id: WatchId, exists: bool, children: &[Child]) {
        let Some(i) = self.member_of(id) else {
            return;
        };
        self.failover.succeeded();
        self.errors.clear();
        let snap = Snapshot::of(listing(self.members[i].layout, children), true);
        self.members[i].pending = Some((snap, exists));
        let now = mono_ms();
        if self.settle.timer_set() == 0 {
            self.settle_since = now;
        }
        let pause_ms = (self.publish_cost_us * PUBLISH_SHARE).div_ceil(1000);
        let due = (now + SETTLE_MS)
            .max(self.published_at.saturating_add(pause_ms))
            .min(self.settle_since.saturating_add(MAX_SETTLE_MS));
        arm_timer(&mut self.settle, due.saturating_sub(now));
    }

    /// Publishes the listings kept by `on_listing`.
    pub(super) fn publish_pending(&mut self) {
        let started = std::time::Instant::now();
        let position = self
            .session
            .as_ref()
            .map_or(0, |s| s.last_zxid().max(0) as u64);
        let in_use = self.addr().to_string();
        for i in 0..self.members.len() {
            let Some((snap, exists)) = self.members[i].pending.take() else {
                continue;
            };
            if let Some(e) = self.members[i].watch_error.take() {
                self.member_log(
                    i,
                    NGX_LOG_NOTICE,
                    &format!("the znode can be read again (was: {e})"),
                );
            }
            if exists == self.members[i].missing {
                self.members[i].missing = !exists;
                let path = self.members[i].path.clone();
                if exists {
                    self.member_log(i, NGX_LOG_NOTICE, &format!("the znode {path} exists now"));
                } else {
                    self.member_log(
                        i,
                        NGX_LOG_WARN,
                        &format!("the znode {path} does not exist; its children are read as soon as it is created"),
                    );
                }
            }
            let m = &mut self.members[i];
            m.publisher
                .publish(m.epoch, snap, position, &in_use, started);
        }
        self.publish_cost_us = started.elapsed().as_micros() as u64;
        self.published_at = mono_ms();
    }

    fn on_watch_error(&mut self, id: WatchId, err: &ZkError) {
        let Some(i) = self.member_of(id) else {
            return;
        };
        let msg = err.to_string();
        let m = &self.members[i];
        m.publisher.record_error(m.epoch, &msg, None);
        if self.members[i].watch_error.as_deref() != Some(msg.as_str()) {
            self.members[i].watch_error = Some(msg.clone());
            let retry = upsync_core::registry::zookeeper::session::RETRY_MS;
            self.member_log(
                i,
                NGX_LOG_ERR,
                &format!("{msg}; keeping the current servers, reading it again every {retry}ms"),
            );
        }
    }

    fn on_session_event(&mut self, e: SessionEvent) {
        let addr = self.addr();
        match e {
            SessionEvent::Established {
                id,
                timeout_ms,
                resumed,
            } => {
                self.established_at = mono_ms().max(1);
                self.timeout_ms = timeout_ms;
                let failures = self.failover.failures();
                if failures > 0 {
                    self.log(
                        NGX_LOG_NOTICE,
                        &format!(
                            "ZooKeeper answers again after {failures} failed attempt{} (at {addr})",
                            if failures == 1 { "" } else { "s" }
                        ),
                    );
                }
                if resumed {
                    self.log(
                        NGX_LOG_NOTICE,
                        &format!("session 0x{id:x} resumed at {addr}"),
                    );
                } else {
                    self.log(
                        NGX_LOG_INFO,
                        &format!(
                            "session 0x{id:x} established at {addr} (timeout {timeout_ms}ms); reading {} znode{}",
                            self.members.iter().filter(|m| m.watch.is_some()).count(),
                            if self.members.len() == 1 { "" } else { "s" }
                        ),
                    );
                }
                for m in &self.members {
                    m.publisher.record_error(m.epoch, "", Some(0));
                }
            }
            SessionEvent::Expired { id, by_client } => {
                let why = if by_client {
                    format!(
                        "no member answered within the session timeout of {}ms",
                        self.timeout_ms
                    )
                } else {
                    format!("{addr} refused to resume it")
                };
                self.log(
                    NGX_LOG_WARN,
                    &format!("session 0x{id:x} has expired ({why}); a new session reads every znode again, the current servers stay meanwhile"),
                );
            }
            // The refusal also ends the connection: `fail` logs it once.
            SessionEvent::AuthFailed => {}
            SessionEvent::ModeDetected(WatchMode::OneShot) => self.log(
                NGX_LOG_NOTICE,
                "the server has no persistent watches (ZooKeeper before 3.6): using one-shot watches",
            ),
            SessionEvent::ModeDetected(_) => {
                self.debug("persistent recursive watches (ZooKeeper 3.6+)")
            }
        }
    }
}
