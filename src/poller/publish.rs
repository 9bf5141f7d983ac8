//! Publishing what a registry answered for one upstream: the new set and its plan into
//! the zone (the plan built once, outside the lock), the sync status, the skipped
//! entries and the dump file, each only while the caller may (`may_publish`: it holds
//! the zone's lease under the epoch it read with, the zone serves its source, and this
//! process is not exiting). Used by the HTTP poller and by the ZooKeeper session owner,
//! which publishes for every upstream that watches its ensemble.

use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use ngx::ffi::*;
use ngx::ngx_log_debug_mask;

use crate::driver::Side;
use crate::ngx_util::{cycle_log, mono_ms, wall_ms};
use crate::process::{exiting, my_pid};
use crate::srv_conf::SrvConf;
use crate::zone::{Locked, Zone, ZoneError};
use upsync_core::balancer::{Method, Plan};
use upsync_core::dump;
use upsync_core::registry::{Skipped, Snapshot};
use upsync_core::servers::{Diff, ServerSpec};

/// How long the zone's lock was held, at most, while a change was applied: a connection
/// in any worker waits at most that long for it.
#[derive(Default)]
struct LockTimes {
    max: Duration,
    since: Option<Instant>,
}

impl LockTimes {
    fn taken(&mut self) {
        self.since = Some(Instant::now());
    }

    fn released(&mut self) {
        if let Some(t) = self.since.take() {
            self.max = self.max.max(t.elapsed());
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Whether a worker that read under lease `epoch` may write the zone's set, status and
/// dump now: it holds the lease under that epoch, the zone still serves its source
/// (`fingerprint`), and it is not exiting. Checked under the same lock as the write it
/// allows.
pub fn may_publish(l: &Locked<'_>, epoch: Option<u64>, fingerprint: u64) -> bool {
    epoch == Some(l.lease_epoch())
        && l.lease().holder == my_pid()
        && l.fingerprint() == fingerprint
        && !exiting()
}

/// One upstream's publishing side: its zone, what it last reported (skipped entries,
/// duplicates, an empty registry), and its log lines.
pub struct Publisher {
    pub zone: Zone,
    /// The source the publisher reads (`SrvConf::fingerprint`).
    pub fingerprint: u64,
    name: String,
    method: Method,
    dump_path: String,
    side: Rc<Side>,
    skipped: Vec<Skipped>,
    duplicates: usize,
    empty_warned: bool,
    /// The registry lists more servers than fit (how many): said once, until they fit.
    too_many: Option<usize>,
    /// The set this publisher last published (generation, servers in set order): while
    /// it is the zone's, changes are matched against it outside the lock.
    known: Option<(u64, Vec<ServerSpec>)>,
}

impl Publisher {
    /// For the upstream of `conf` (which has a zone); log lines go through `side`.
    pub fn new(conf: &SrvConf, side: Rc<Side>) -> Publisher {
        Publisher {
            zone: conf.zone.expect("zone initialized"),
            fingerprint: conf.fingerprint(),
            name: conf.name.clone(),
            method: conf.method(),
            dump_path: conf.dump_path(),
            side,
            skipped: Vec::new(),
            duplicates: 0,
            empty_warned: false,
            too_many: None,
            known: None,
        }
    }

    /// Takes or renews the lease of this upstream's zone for `me` until `until`, for
    /// a worker that holds it under `epoch` (if any): returns the epoch (None when the
    /// zone serves another source now) and whether it had to be taken anew (another
    /// worker wrote the zone meanwhile).
    pub fn hold(&self, epoch: Option<u64>, me: i64, until: u64) -> (Option<u64>, bool) {
        let mut l = self.zone.lock();
        if l.fingerprint() != self.fingerprint {
            return (None, false);
        }
        if l.lease().holder == me && epoch == Some(l.lease_epoch()) {
            l.renew_lease(until);
            (epoch, false)
        } else {
            (Some(l.take_lease(me, until)), true)
        }
    }

    pub fn may_publish(&self, l: &Locked<'_>, epoch: Option<u64>) -> bool {
        may_publish(l, epoch, self.fingerprint)
    }

    fn log(&self, level: u32, msg: &str) {
        self.side.error_log(level, msg);
    }

    fn debug(&self, msg: &str) {
        ngx_log_debug_mask!(
            DebugMask::Stream,
            cycle_log(),
            "upsync: {}: {msg}",
            self.name
        );
    }

    /// Records a failed read in the status (`failures`: the count of consecutive
    /// failures, when the caller counts them), if the caller may write the zone.
    pub fn record_error(&self, epoch: Option<u64>, msg: &str, failures: Option<u64>) {
        let mut l = self.zone.lock();
        if self.may_publish(&l, epoch) {
            if let Some(n) = failures {
                l.status().consecutive_failures = n;
            }
            l.set_error(msg);
        }
    }

    /// Publishes a snapshot read under lease `epoch`: the skipped entries, the status
    /// (`position` is the registry's index, `in_use` the address that answered), and,
    /// when the servers changed, the set with its plan and the dump, logging the change
    /// with how long after the answer (its last byte arrived at `answered`) the set was
    /// live.
    pub fn publish(
        &mut self,
        epoch: Option<u64>,
        snap: Snapshot,
        position: u64,
        in_use: &str,
        answered: Instant,
    ) {
        if snap.duplicates != self.duplicates {
            self.duplicates = snap.duplicates;
            if snap.duplicates > 0 {
                self.log(
                    NGX_LOG_WARN,
                    &format!(
                        "{} entries repeat an address already listed; the first one is used",
                        snap.duplicates
                    ),
                );
            }
        }
        let mut held = LockTimes::default();
        let mut l = self.zone.lock();
        held.taken();
        if !self.may_publish(&l, epoch) {
            return; // lost the lease, or exiting, or the zone serves another source now
        }
        if snap.skipped != self.skipped {
            l.set_skipped(&snap.skipped);
            drop(l);
            held.released();
            self.report_skipped(&snap.skipped);
            l = self.zone.lock();
            held.taken();
            if !self.may_publish(&l, epoch) {
                return;
            }
        }
        l.mark_synced(position, in_use);
        // the set as this publisher left it, if no one changed it since (else read it)
        let generation_now = l.generation();
        let current = match self.known.take() {
            Some((g, specs)) if g == generation_now => specs,
            _ => l.specs(),
        };
        drop(l);
        held.released();
        if snap.servers.is_empty() {
            if !current.is_empty() && !self.empty_warned {
                self.empty_warned = true;
                self.log(
                    NGX_LOG_WARN,
                    &format!("the registry lists no servers; keeping the last {} (an upstream is never emptied)", current.len()),
                );
            }
            self.known = Some((generation_now, current));
            return;
        }
        self.empty_warned = false;
        let diff = Diff::between(&current, &snap.servers);
        if diff.is_empty() {
            self.known = Some((generation_now, current));
            return;
        }
        // The plan is built here, once per change and outside the lock: connections in
        // every worker keep picking from the current set meanwhile.
        let plan_start = Instant::now();
        let plan = Plan::for_servers(&snap.servers, self.method);
        let block = {
            let mut l = self.zone.lock();
            held.taken();
            let b = l.alloc_plan_block(plan.flat_words());
            drop(l);
            held.released();
            b
        };
        let Some(mut block) = block else {
            let n = current.len();
            self.known = Some((generation_now, current));
            return self.does_not_fit(snap.servers.len(), n, plan.flat_words());
        };
        block.fill(&plan);
        let plan_time = plan_start.elapsed();
        let mut l = self.zone.lock();
        held.taken();
        if !self.may_publish(&l, epoch) {
            l.free_plan_block(block);
            return;
        }
        let known = Some((generation_now, current.as_slice()));
        let generation = match l.publish_known(&snap.servers, block, Some(mono_ms()), known) {
            Ok(g) => g,
            Err(ZoneError::Full { .. }) => {
                drop(l);
                let n = current.len();
                self.known = Some((generation_now, current));
                return self.does_not_fit(snap.servers.len(), n, plan.flat_words());
            }
        };
        let st = l.status();
        st.updates += 1;
        st.last_change_ms = wall_ms();
        drop(l);
        held.released();
        let live = answered.elapsed();
        self.debug(&format!("set switched to generation {generation}"));
        if self.too_many.take().is_some() {
            self.log(
                NGX_LOG_NOTICE,
                &format!(
                    "the registry's {} server{} fit in the shared zone again",
                    snap.servers.len(),
                    if snap.servers.len() == 1 { "" } else { "s" }
                ),
            );
        }
        let used = self.zone.usage().used;
        self.log(
            NGX_LOG_NOTICE,
            &format!(
                "{} servers now (+{} -{} ~{}), index {position}, generation {generation}, {} kB of shared memory; live {:.2} ms after the answer (plan {:.2} ms, lock held at most {:.3} ms)",
                snap.servers.len(),
                diff.added,
                diff.removed,
                diff.changed,
                used.div_ceil(1024),
                ms(live),
                ms(plan_time),
                ms(held.max),
            ),
        );
        self.write_dump(&snap.servers, generation);
        self.known = Some((generation, snap.servers));
    }

    /// The registry lists `listed` servers and they do not fit (`current` serve on):
    /// says so once until they fit, with how many would and what to change.
    fn does_not_fit(&mut self, listed: usize, current: usize, plan_words: usize) {
        if self.too_many.replace(listed).is_some() {
            return self.debug(&format!("{listed} servers still do not fit"));
        }
        let u = self.zone.usage();
        let need = crate::zone::bytes_for(listed, plan_words, self.method);
        // what the upstream may still take: the zone's free pages, within its cap
        let mut room = u.shared_free;
        if u.budget > 0 {
            room = room.min(u.budget.saturating_sub(u.used));
        }
        // A change keeps the servers that stay and builds the new list and plan next
        // to the old ones: those need room first, then each server added one slot.
        let transient = need - listed as u64 * crate::zone::SLOT_BYTES;
        let added = room.saturating_sub(transient) / crate::zone::SLOT_BYTES;
        let fit = (current as u64 + added).min(listed.saturating_sub(1) as u64);
        let mb = |b: u64| b.div_ceil(1 << 20);
        let advice = if u.budget > 0 && u.budget.saturating_sub(u.used) < u.shared_free {
            format!(
                "raise this upstream's zone_size= to at least {}m",
                mb(u.used + need + need / 4)
            )
        } else {
            let want = u.shared_size + need.saturating_sub(room) + need / 4;
            format!(
                "set \"upsync_zone_size {}m;\" in the stream block (now {}m)",
                mb(want).next_power_of_two(),
                mb(u.shared_size)
            )
        };
        self.log(
            NGX_LOG_ERR,
            &format!(
                "the registry lists {listed} servers, about {fit} fit in the shared memory left ({} kB free); keeping the current {current}; {advice}",
                room / 1024
            ),
        );
    }

    /// Logs the entries that became invalid (and why) and those that are no longer
    /// skipped, each once, at most `LOG_EACH` of each by name.
    fn report_skipped(&mut self, now: &[Skipped]) {
        const LOG_EACH: usize = 10;
        let appeared: Vec<&Skipped> = now.iter().filter(|s| !self.skipped.contains(s)).collect();
        let gone: Vec<&Skipped> = self
            .skipped
            .iter()
            .filter(|s| !now.iter().any(|n| n.key == s.key))
            .collect();
        for s in appeared.iter().take(LOG_EACH) {
            self.log(
                NGX_LOG_WARN,
                &format!(
                    "entry \"{}\" skipped: {}; the other entries apply",
                    s.key, s.cause
                ),
            );
        }
        if appeared.len() > LOG_EACH {
            self.log(
                NGX_LOG_WARN,
                &format!(
                    "{} more entries skipped (the status view lists them)",
                    appeared.len() - LOG_EACH
                ),
            );
        }
        for s in gone.iter().take(LOG_EACH) {
            self.log(
                NGX_LOG_NOTICE,
                &format!("entry \"{}\" is no longer skipped", s.key),
            );
        }
        if gone.len() > LOG_EACH {
            self.log(
                NGX_LOG_NOTICE,
                &format!(
                    "{} more entries are no longer skipped",
                    gone.len() - LOG_EACH
                ),
            );
        }
        self.skipped = now.to_vec();
    }

    /// Writes the dump of the set this worker published as `generation`: the file is
    /// prepared outside the lock, and renamed into place under it only if the zone
    /// still serves this source and that set is still the current one, so a dump never
    /// goes back to an older set. Neither the lease nor a shutdown is asked about: the
    /// set is live already, and a worker told to quit while it writes (a reload) must
    /// not leave the dump one change behind.
    fn write_dump(&self, servers: &[ServerSpec], generation: u64) {
        let path = Path::new(&self.dump_path);
        let result =
            dump::TempDump::write(path, dump::render(servers).as_bytes()).and_then(|tmp| {
                let l = self.zone.lock();
                if l.fingerprint() == self.fingerprint && l.generation() == generation {
                    tmp.commit()
                } else {
                    Ok(()) // superseded: the temp file is removed on drop
                }
            });
        match result {
            Ok(()) => dump::sync_dir(path),
            Err(e) => self.log(
                NGX_LOG_ERR,
                &format!("cannot write the dump file \"{}\": {e}", path.display()),
            ),
        }
    }
}
