//! Active health checks (NGINX Plus's `health_check` for stream upstreams): one prober
//! per checked upstream per nginx instance, elected through the zone like the poller
//! (a second lease, `zone::health`). The worker holding it probes every server of the
//! set (`check::Probe`, at most `max_in_flight` at once, each on its own jittered
//! timetable), follows set changes within a tick (a removed server's probe stops), and
//! writes results to the zone's health table, keyed by address; the balancers read the
//! health flag of each slot. Decisions are `upsync_core::health`'s.

mod check;
mod conf;
mod conn;
mod directives;
mod resolve;

use std::collections::{HashMap, HashSet};
use std::ffi::c_void;
use std::net::SocketAddr;
use std::ptr;

use ngx::ffi::*;
use ngx::ngx_log_error;

use crate::ngx_util::{cycle_log, mono_ms, wall_ms};
use crate::process::{exiting, my_pid};
use crate::srv_conf::SrvConf;
use crate::zone::{HealthCommit, InitOutcome, Locked, Probed, Zone};
use check::{CheckSpec, Outcome, Probe};
use conn::QuietLog;
use upsync_core::health::{
    first_due, next_due, Change, HealthState, ProbeFailure, Thresholds, Timetable,
};
use upsync_core::policy::{self, Rng};

pub use conf::{HcDirective, HealthConf, MatchDef};
pub use directives::{cmd_health_check, cmd_health_check_timeout, cmd_match};
pub use resolve::resolve;

/// How often the prober's worker renews its lease and looks for set changes.
const HOLDER_TICK_MS: u64 = 200;

/// One server of the set, as the prober follows it.
struct Server {
    down: bool,
    probe: Option<Box<Probe>>,
}

pub struct Prober {
    conf: *const SrvConf,
    zone: Zone,
    name: String,
    conf_id: u64,
    th: Thresholds,
    interval_ms: u64,
    jitter_ms: u64,
    lease_ms: u64,
    idle_tick_ms: u64,
    tick: ngx_event_t,
    wake: ngx_event_t,
    /// The lease epoch this worker probes under; None: not the prober.
    epoch: Option<u64>,
    servers: HashMap<SocketAddr, Server>,
    timetable: Timetable<SocketAddr>,
    in_flight: usize,
    max_in_flight: usize,
    rng: Rng,
    log: Box<QuietLog>,
    /// "No server is healthy" was said (and not yet taken back).
    none_healthy_said: bool,
    /// The zone had no room for the table (said once).
    full_said: bool,
}

static mut PROBERS: Vec<*mut Prober> = Vec::new();

/// The master commits the configuration of one upstream: the zone's health table is
/// reset, kept (`persistent`) or dropped, and the prober lease restarts.
pub fn commit(log: *mut ngx_log_t, conf: &SrvConf) {
    let Some(zone) = conf.zone else {
        return;
    };
    let what = match &conf.health {
        None => HealthCommit::Off,
        Some(h) => HealthCommit::On {
            conf_id: h.id(&conf.name),
            mandatory: h.spec.mandatory,
            keep: h.spec.persistent && conf.outcome != Some(InitOutcome::Fresh),
        },
    };
    let committed = zone.lock().health_commit(what);
    if let Err(e) = committed {
        ngx_log_error!(
            NGX_LOG_ERR,
            log,
            "upsync: upstream \"{}\": the health table does not fit: {e}",
            conf.name
        );
    }
}

/// Starts the prober of one checked upstream in this worker.
///
/// # Safety
/// Called from `init_process` with a configuration of the running cycle (it outlives the
/// worker's probers).
pub unsafe fn start(conf: &SrvConf) {
    let (Some(h), Some(zone)) = (conf.health.as_ref(), conf.zone) else {
        return;
    };
    // SAFETY: process-globals set before init_process.
    let (pid, connections) = (my_pid() as u64, unsafe { (*ngx_cycle).connection_n });
    let p: *mut Prober = Box::into_raw(Box::new(Prober {
        conf,
        zone,
        name: conf.name.clone(),
        conf_id: h.id(&conf.name),
        th: h.thresholds(),
        interval_ms: h.spec.interval_ms,
        jitter_ms: h.spec.jitter_ms,
        lease_ms: policy::lease_ms(h.spec.interval_ms),
        idle_tick_ms: policy::tick_ms(h.spec.interval_ms),
        // SAFETY: ngx_event_t is plain old data; all-zero is its initial value.
        tick: unsafe { std::mem::zeroed() },
        // SAFETY: as above.
        wake: unsafe { std::mem::zeroed() },
        epoch: None,
        servers: HashMap::new(),
        timetable: Timetable::default(),
        in_flight: 0,
        max_in_flight: (connections / 4).clamp(4, 512),
        rng: Rng::new(pid << 32 ^ mono_ms() ^ 0x6863),
        log: QuietLog::new(),
        none_healthy_said: false,
        full_said: false,
    }));
    // SAFETY: `p` was just boxed and is never freed (probers live until the process
    // exits); its timers are cancelable, so they never hold up an exit.
    unsafe {
        let me = &mut *p;
        crate::ngx_util::timer_events(
            p as *mut c_void,
            &mut [
                (
                    &mut me.tick,
                    tick_handler as unsafe extern "C" fn(*mut ngx_event_t),
                ),
                (&mut me.wake, wake_handler),
            ],
        );
        let first = me.rng.next_u64() % 50;
        ngx_add_timer(&mut me.tick, first as ngx_msec_t);
        (*ptr::addr_of_mut!(PROBERS)).push(p);
    }
}

/// Stops every prober of this worker and gives their leases back (worker exit).
pub fn stop_all() {
    // SAFETY: the worker is single-threaded; probers live until the process exits.
    unsafe {
        for &p in (*ptr::addr_of!(PROBERS)).iter() {
            (*p).shutdown();
        }
    }
}

unsafe extern "C" fn tick_handler(ev: *mut ngx_event_t) {
    // SAFETY: the tick event's data is its prober (set in `start`).
    unsafe { (*((*ev).data as *mut Prober)).on_tick() };
}

unsafe extern "C" fn wake_handler(ev: *mut ngx_event_t) {
    // SAFETY: the wake event's data is its prober (set in `start`).
    unsafe { Prober::run_due((*ev).data as *mut Prober) };
}

impl Prober {
    fn conf(&self) -> &SrvConf {
        // SAFETY: the configuration outlives the worker's probers.
        unsafe { &*self.conf }
    }

    fn log(&self, level: u32, msg: &str) {
        ngx_log_error!(
            level,
            cycle_log(),
            "upsync: upstream \"{}\"{msg}",
            self.name
        );
    }

    /// Whether this worker may write the zone's health now: it holds the prober lease
    /// under the epoch it probes with, for its configuration, and is not exiting.
    fn may_write(&self, l: &Locked<'_>) -> bool {
        let (lease, conf_id) = l.prober_lease();
        self.epoch.is_some()
            && self.epoch == Some(l.prober_epoch())
            && lease.holder == my_pid()
            && conf_id == self.conf_id
            && !exiting()
    }

    fn on_tick(&mut self) {
        if exiting() {
            return self.shutdown();
        }
        let now = mono_ms();
        let me = my_pid();
        let (epoch, sync) = {
            let mut l = self.zone.lock();
            let epoch = if l.prober_lease().1 != self.conf_id {
                None // the committed configuration is another one (a reload)
            } else {
                l.elect_prober(me, now, now + self.lease_ms)
            };
            let fresh = epoch.is_some() && epoch != self.epoch;
            let sync = match epoch {
                Some(_) => l.health_sync(fresh),
                None => None,
            };
            (epoch, sync)
        };
        match (self.epoch, epoch) {
            (held, Some(e)) if held != Some(e) => {
                if held.is_some() {
                    self.drop_all(); // lost and taken again: start over
                }
                self.epoch = Some(e);
                self.log(
                    NGX_LOG_INFO,
                    &format!(": this worker (pid {me}) now runs the health checks"),
                );
            }
            (Some(_), None) => {
                self.epoch = None;
                self.drop_all();
                self.log(
                    NGX_LOG_INFO,
                    ": this worker no longer runs the health checks",
                );
            }
            _ => {}
        }
        if let Some((list, full)) = sync {
            self.follow(list, now);
            match full {
                Some(e) if !self.full_said => {
                    self.full_said = true;
                    self.log(
                        NGX_LOG_ERR,
                        &format!(": the health table does not fit: {e}; servers it has no room for keep their initial state"),
                    );
                }
                Some(_) => {}
                None => self.full_said = false,
            }
        }
        let next = if self.epoch.is_some() {
            HOLDER_TICK_MS
        } else {
            self.idle_tick_ms
        };
        // SAFETY: the tick event belongs to this prober.
        unsafe { ngx_add_timer(&mut self.tick, next as ngx_msec_t) };
        if self.epoch.is_some() {
            // SAFETY: `self` is a live, boxed prober.
            unsafe { Prober::run_due(self) };
        }
    }

    /// Follows the set: new servers get their first probe (at once while "checking",
    /// else somewhere in the interval), removed ones lose theirs at once.
    fn follow(&mut self, list: Vec<Probed>, now: u64) {
        let present: HashSet<SocketAddr> = list.iter().map(|p| p.addr).collect();
        let gone: Vec<SocketAddr> = self
            .servers
            .keys()
            .filter(|a| !present.contains(a))
            .copied()
            .collect();
        for a in gone {
            self.forget(&a);
            self.servers.remove(&a);
        }
        for p in list {
            let immediate = p.state == HealthState::Checking;
            match self.servers.get_mut(&p.addr) {
                None => {
                    self.servers.insert(
                        p.addr,
                        Server {
                            down: p.down,
                            probe: None,
                        },
                    );
                    if !p.down {
                        let due = first_due(now, self.interval_ms, immediate, &mut self.rng);
                        self.timetable.add(p.addr, due);
                    }
                }
                Some(s) if s.down != p.down => {
                    s.down = p.down;
                    if p.down {
                        self.forget(&p.addr);
                    } else {
                        let due = first_due(now, self.interval_ms, immediate, &mut self.rng);
                        self.timetable.add(p.addr, due);
                    }
                }
                Some(_) => {}
            }
        }
    }

    /// Stops probing `addr`: its timetable entry and its probe in flight.
    fn forget(&mut self, addr: &SocketAddr) {
        self.timetable.remove(addr);
        if let Some(probe) = self.servers.get_mut(addr).and_then(|s| s.probe.take()) {
            self.in_flight -= 1;
            drop(probe);
        }
    }

    /// Drops every probe and the timetable (the lease is lost or given back).
    fn drop_all(&mut self) {
        for s in self.servers.values_mut() {
            s.probe = None;
        }
        self.servers.clear();
        self.timetable = Timetable::default();
        self.in_flight = 0;
        crate::ngx_util::cancel_timer(&mut self.wake);
    }

    fn shutdown(&mut self) {
        self.drop_all();
        crate::ngx_util::cancel_timer(&mut self.tick);
        if self.epoch.take().is_some() {
            self.zone.lock().release_prober_lease(my_pid());
        }
    }

    /// Starts the probes that are due, as many as may be in flight, and arms the wake
    /// timer for the next one.
    ///
    /// # Safety
    /// `this` is a live, boxed prober.
    unsafe fn run_due(this: *mut Prober) {
        // SAFETY: per the contract; the borrow is released around each probe start,
        // whose immediate end comes back into the prober.
        let now = mono_ms();
        loop {
            let (addr, probe_ptr) = {
                // SAFETY: as above.
                let p = unsafe { &mut *this };
                if p.epoch.is_none() || exiting() || p.in_flight >= p.max_in_flight {
                    break;
                }
                let Some(addr) = p.timetable.pop_due(now) else {
                    break;
                };
                let Some(probe) = p.new_probe(this, addr, now) else {
                    continue;
                };
                let server = p
                    .servers
                    .get_mut(&addr)
                    .expect("scheduled servers are known");
                let slot = server.probe.insert(probe);
                p.in_flight += 1;
                (addr, &mut **slot as *mut Probe)
            };
            // SAFETY: the probe is boxed in its server's record and stays there until
            // `probe_done` or `forget` drops it.
            if let Some(outcome) = unsafe { Probe::start(probe_ptr) } {
                // ended at once (refused): finish it here, without recursing
                // SAFETY: as above; the probe is not used after.
                unsafe { (*this).finish(addr, outcome) };
            }
        }
        // SAFETY: as above.
        let p = unsafe { &mut *this };
        if p.epoch.is_none() {
            return;
        }
        crate::ngx_util::cancel_timer(&mut p.wake);
        if p.in_flight < p.max_in_flight {
            if let Some(due) = p.timetable.next_due() {
                // SAFETY: as above.
                unsafe { ngx_add_timer(&mut p.wake, due.saturating_sub(now).max(1) as ngx_msec_t) };
            }
        }
    }

    /// A probe of `addr`, unless the server is gone or down.
    fn new_probe(&mut self, this: *mut Prober, addr: SocketAddr, now: u64) -> Option<Box<Probe>> {
        let server = self.servers.get(&addr)?;
        if server.down || server.probe.is_some() {
            return None;
        }
        let h = self.conf().health.as_ref()?;
        let target = match h.spec.port {
            Some(port) => SocketAddr::new(addr.ip(), port),
            None => addr,
        };
        let spec = CheckSpec {
            udp: h.spec.udp,
            timeout_ms: h.timeout_ms,
            rule: h.rule.as_ref().map(|r| r as *const _),
            regex: &h.regex,
            log: &*self.log,
        };
        Some(Probe::new(this, addr, target, spec, now))
    }

    /// A probe of `addr` ended (from its events): see `finish`; then the next due
    /// probes may start.
    ///
    /// # Safety
    /// `this` is a live, boxed prober; the probe of `addr` is not used after this call.
    pub(super) unsafe fn probe_done(this: *mut Prober, addr: SocketAddr, outcome: Outcome) {
        // SAFETY: per the contract.
        unsafe { (*this).finish(addr, outcome) };
        // SAFETY: as above; no borrow of the prober is live.
        unsafe { Prober::run_due(this) };
    }

    /// A probe of `addr` ended: it is dropped (its connection closed), the result goes
    /// to the zone (unless this worker could not probe at all), and the server's next
    /// probe is scheduled.
    fn finish(&mut self, addr: SocketAddr, outcome: Outcome) {
        let Some(probe) = self.servers.get_mut(&addr).and_then(|s| s.probe.take()) else {
            return;
        };
        self.in_flight -= 1;
        let started = probe.started_ms;
        drop(probe);
        match outcome {
            Outcome::Pass => self.record(addr, None),
            Outcome::Fail(f) => self.record(addr, Some(f)),
            Outcome::Local => {} // not the server's fault: no verdict
        }
        let due = next_due(started, self.interval_ms, self.jitter_ms, &mut self.rng);
        self.timetable.add(addr, due);
    }

    /// Writes one result to the zone and logs what changed.
    fn record(&mut self, addr: SocketAddr, failure: Option<ProbeFailure>) {
        let why = failure.as_ref().map(|f| f.to_string());
        let (change, counts) = {
            let mut l = self.zone.lock();
            if !self.may_write(&l) {
                return;
            }
            let change = l.health_record(&addr, why.as_deref(), self.th, wall_ms(), mono_ms());
            let counts = match change {
                Some(Change::Unchanged) | None => None,
                Some(_) => Some(l.health_counts()),
            };
            (change, counts)
        };
        match change {
            Some(Change::Unhealthy) => self.log(
                NGX_LOG_WARN,
                &format!(
                    " server {addr} is unhealthy: {}",
                    why.as_deref().unwrap_or("failed")
                ),
            ),
            Some(Change::Healthy {
                was: HealthState::Checking,
                ..
            }) => self.log(
                NGX_LOG_NOTICE,
                &format!(" server {addr} is healthy: its first check passed"),
            ),
            Some(Change::Healthy { after, .. }) => self.log(
                NGX_LOG_NOTICE,
                &format!(" server {addr} is healthy again after {after} checks"),
            ),
            _ => return,
        }
        let Some((candidates, healthy)) = counts else {
            return;
        };
        if candidates > 0 && healthy == 0 && !self.none_healthy_said {
            self.none_healthy_said = true;
            self.log(
                NGX_LOG_ERR,
                ": no server is healthy: new connections fail (\"no live upstreams\") until one passes its check",
            );
        } else if healthy > 0 && self.none_healthy_said {
            self.none_healthy_said = false;
            self.log(
                NGX_LOG_NOTICE,
                &format!(": {healthy} server(s) healthy again, connections flow"),
            );
        }
    }
}
