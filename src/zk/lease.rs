//! Which worker runs an ensemble's session: every worker's election tick renews, takes
//! or waits for the lease of the group's first zone (`policy::decide_lease`); the
//! holder also holds the leases of the other zones of the group (so each upstream's
//! status names it, and each publish checks its own zone's epoch). A worker that takes
//! the lease opens a new session and reads everything; one that loses it closes its
//! session at once. Ticks also reclaim what dead processes' sessions held in each zone.

use crate::zone::reaped_line;
use ngx::ffi::*;

use super::ZkOwner;
use crate::ngx_util::{cancel_timer, mono_ms};
use crate::process::{exiting, my_pid, observe};
use upsync_core::registry::zookeeper::Session;

pub(super) unsafe extern "C" fn tick_handler(ev: *mut ngx_event_t) {
    // SAFETY: the tick event's data is its owner (set in `start`).
    unsafe { (*((*ev).data as *mut ZkOwner)).on_tick() };
}

impl ZkOwner {
    /// Whether this worker still holds the lead zone's lease under the epoch it runs
    /// the session with (a stalled worker finds out before it reconnects).
    pub(super) fn holds_lead(&self) -> bool {
        let m = &self.members[0];
        m.publisher
            .may_publish(&m.publisher.zone.lock(), self.epoch)
    }

    fn on_tick(&mut self) {
        if exiting() {
            return self.shutdown();
        }
        let now = mono_ms();
        let me = my_pid();
        for i in 0..self.members.len() {
            let reaped = self.members[i]
                .publisher
                .zone
                .lock()
                .reap_dead(now, &mut observe);
            if let Some(line) = reaped_line(reaped) {
                self.member_log(i, NGX_LOG_NOTICE, &line);
            }
        }
        let until = now + self.lease_ms;
        let lead = {
            let m = &self.members[0];
            let mut l = m.publisher.zone.lock();
            if l.fingerprint() != m.publisher.fingerprint {
                None // a reload gave the zone to another source
            } else {
                l.elect(me, now, until)
            }
        };
        match (self.epoch, lead) {
            (held, Some(e)) if held != Some(e) => {
                if held.is_some() {
                    // lost and taken again while this worker did not look (stalled):
                    // what the session read belongs to the old epoch
                    self.close_session();
                }
                self.epoch = Some(e);
                self.members[0].epoch = Some(e);
                for m in &mut self.members[1..] {
                    m.epoch = m.publisher.hold(m.epoch, me, until).0;
                }
                self.log(
                    NGX_LOG_INFO,
                    &format!("this worker (pid {me}) now runs the ZooKeeper session"),
                );
                self.open_session();
            }
            (_, Some(_)) => {
                for i in 1..self.members.len() {
                    let m = &mut self.members[i];
                    let (epoch, taken) = m.publisher.hold(m.epoch, me, until);
                    m.epoch = epoch;
                    if taken && epoch.is_some() {
                        // another worker wrote this zone meanwhile: read it again
                        self.rewatch(i);
                    }
                }
            }
            (Some(_), None) => {
                self.log(
                    NGX_LOG_WARN,
                    "lost the ZooKeeper session lease to another worker (or a reload changed the source); closing the session",
                );
                self.close_session();
                self.epoch = None;
                for m in &mut self.members {
                    m.epoch = None;
                }
            }
            (None, None) => {}
        }
        // SAFETY: the tick event belongs to this owner.
        unsafe { ngx_add_timer(&mut self.tick, self.tick_ms as ngx_msec_t) };
    }

    /// A new session (the server's state of an old one is not trusted): every member's
    /// znode is watched and read in full, then the connection to the member in use.
    fn open_session(&mut self) {
        let now = mono_ms();
        let mut session = Session::new(self.cfg.clone());
        for i in 0..self.members.len() {
            let m = &mut self.members[i];
            m.watch = None;
            if m.epoch.is_none() {
                continue;
            }
            match session.watch(&m.path, now) {
                Ok(id) => m.watch = Some(id),
                Err(e) => self.member_log(i, NGX_LOG_ERR, &e.to_string()),
            }
        }
        self.session = Some(session);
        self.connect();
    }

    /// Reads member `i`'s znode again in full (its zone was taken back).
    fn rewatch(&mut self, i: usize) {
        let now = mono_ms();
        let Some(s) = self.session.as_mut() else {
            return;
        };
        if let Some(old) = self.members[i].watch.take() {
            s.unwatch(old);
        }
        match s.watch(&self.members[i].path, now) {
            Ok(id) => self.members[i].watch = Some(id),
            Err(e) => self.member_log(i, NGX_LOG_ERR, &e.to_string()),
        }
        self.flush();
        self.arm_timer();
    }

    /// Ends the session: closeSession when it is up (so the server frees it at once),
    /// then the connection and the timers go.
    pub(super) fn close_session(&mut self) {
        if let Some(s) = self.session.as_mut() {
            if self.ready && s.is_established() {
                s.close(mono_ms());
                self.flush();
            }
        }
        self.session = None;
        self.conn = None;
        self.ready = false;
        self.established_at = 0;
        self.out.clear();
        self.sent = 0;
        for m in &mut self.members {
            m.watch = None;
            m.pending = None;
        }
        cancel_timer(&mut self.timer);
        cancel_timer(&mut self.retry);
        cancel_timer(&mut self.settle);
    }

    /// Closes the session and gives the leases back so another worker takes over at
    /// once (exit, or told to stop).
    pub(super) fn shutdown(&mut self) {
        self.close_session();
        cancel_timer(&mut self.tick);
        if self.epoch.take().is_some() {
            let me = my_pid();
            for m in &mut self.members {
                if m.epoch.take().is_some() {
                    m.publisher.zone.lock().release_lease(me);
                }
            }
        }
    }
}
