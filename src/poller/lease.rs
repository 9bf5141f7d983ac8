//! The polling lease, from a worker's side: every worker's election tick renews, takes
//! or waits for the lease in the zone (`policy::decide_lease`), reclaims what dead
//! processes' sessions held, and stops its poller when the lease or the source is no
//! longer its own. A poller polls under the lease epoch it took, and may write the
//! zone only while that epoch holds. A group's poller does this for its lead's zone,
//! and the holder takes the members' leases along (`group`).

use crate::zone::reaped_line;
use ngx::ffi::*;

use super::Poller;
use crate::ngx_util::mono_ms;
use crate::process::my_pid;
use crate::process::{exiting, observe};

/// For the first `FAST_TICKS_FOR_MS` of a worker, a poller that does not hold the lease
/// looks again every `FAST_TICK_MS` (after a reload the old holder gives the lease back
/// within milliseconds, and the new workers take over without waiting a whole tick).
pub(super) const FAST_TICKS_FOR_MS: u64 = 3_000;
const FAST_TICK_MS: u64 = 100;

pub(super) unsafe extern "C" fn tick_handler(ev: *mut ngx_event_t) {
    // SAFETY: the tick event's data is its poller (set in `start`).
    unsafe { (*((*ev).data as *mut Poller)).on_tick() };
}

impl Poller {
    fn on_tick(&mut self) {
        if exiting() {
            return self.shutdown();
        }
        let now = mono_ms();
        let me = my_pid();
        let (epoch, same_source, reaped) = {
            let mut l = self.publisher.zone.lock();
            let reaped = l.reap_dead(now, &mut observe);
            let same_source = l.fingerprint() == self.publisher.fingerprint;
            let epoch = if !same_source {
                None // a reload gave the zone to another source: never poll this one
            } else {
                l.elect(me, now, now + self.lease_ms)
            };
            (epoch, same_source, reaped)
        };
        self.members_reap(now);
        if let Some(line) = reaped_line(reaped) {
            self.log(NGX_LOG_NOTICE, &line);
        }
        match (self.epoch, epoch) {
            (held, Some(e)) if held != Some(e) => {
                if held.is_some() {
                    // the lease was lost and taken again while this worker did not look
                    // (stalled): what is in flight belongs to the old epoch
                    self.abort_exchange();
                }
                self.epoch = Some(e);
                self.members_hold(now + self.lease_ms);
                self.log(
                    NGX_LOG_INFO,
                    &format!("this worker (pid {me}) now polls the registry"),
                );
                self.source.reset();
                self.schedule(0);
            }
            (Some(_), Some(_)) => {
                let taken_anew = self.members_hold(now + self.lease_ms);
                if taken_anew {
                    // a member's zone was written by another worker meanwhile: read
                    // everything again
                    self.abort_exchange();
                    self.source.reset();
                    self.schedule(0);
                }
            }
            (Some(_), None) => {
                self.epoch = None;
                self.members_drop(false);
                if same_source {
                    self.log(NGX_LOG_WARN, "lost the polling lease to another worker");
                } else {
                    self.log(
                        NGX_LOG_INFO,
                        "a reload changed this upstream's source: this worker stops polling the old one",
                    );
                }
                self.abort_exchange();
            }
            _ => {}
        }
        // A worker just started by a reload finds the lease still held by an old
        // worker, which gives it back as soon as it is told to stop: look again soon.
        let next = if self.epoch.is_none() && now < self.fast_ticks_until {
            self.tick_ms.min(FAST_TICK_MS)
        } else {
            self.tick_ms
        };
        // SAFETY: the tick event belongs to this poller.
        unsafe { ngx_add_timer(&mut self.tick, next as ngx_msec_t) };
    }

    /// Stops polling and gives the lease back so another worker takes over at once.
    pub(super) fn shutdown(&mut self) {
        self.abort_exchange();
        for ev in [&mut self.tick, &mut self.wake] {
            crate::ngx_util::cancel_timer(ev);
        }
        if self.epoch.take().is_some() {
            self.publisher.zone.lock().release_lease(my_pid());
        }
        self.members_drop(true);
    }
}
