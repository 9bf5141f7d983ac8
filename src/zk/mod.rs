//! ZooKeeper on nginx's event loop: one session per ensemble per nginx instance, shared
//! by every `upsync_type=zookeeper` upstream that watches that ensemble (`group`). Every
//! worker keeps a `ZkOwner` per ensemble and runs its election tick (`lease`); the
//! worker holding the lease of the group's first zone runs the session
//! (`upsync_core::registry::zookeeper::Session`) over one `driver::Conn` (`link`), and
//! publishes each upstream's listing into that upstream's zone (`events`, through
//! `poller::Publisher`).

mod events;
mod group;
mod lease;
mod link;

use std::ffi::c_void;
use std::net::SocketAddr;
use std::ptr;
use std::rc::Rc;

use ngx::ffi::*;
use ngx::ngx_log_debug_mask;

use crate::driver::{Conn, Side};
use crate::ngx_util::{cycle_log, mono_ms};
use crate::poller::Publisher;
use crate::process::my_pid;
use crate::srv_conf::SrvConf;
use upsync_core::policy::{self, ErrorDedup, Failover, Rng};
use upsync_core::registry::redact_secrets;
use upsync_core::registry::zookeeper::{Layout, Session, WatchId, ZkConfig};

/// One upstream of the group: where its servers are, and its publishing side.
struct Member {
    name: String,
    /// The znode whose children are the servers (with the chroot).
    path: String,
    layout: Layout,
    publisher: Publisher,
    /// The upstream's own log lines (`upsync: upstream "NAME" (zookeeper ...)`).
    side: Rc<Side>,
    /// The lease epoch of this member's zone while this worker runs the session.
    epoch: Option<u64>,
    watch: Option<WatchId>,
    /// A listing waiting for `settle` to be published, and whether the znode exists.
    pending: Option<(upsync_core::registry::Snapshot, bool)>,
    /// The read error of the current spell (logged once; its end is logged too).
    watch_error: Option<String>,
    /// The znode was missing at the last listing (logged once per change).
    missing: bool,
}

pub struct ZkOwner {
    /// `upsync: zookeeper HOST:PORT,... for upstream(s) ...`: the session's lines.
    side: Rc<Side>,
    addrs: Vec<SocketAddr>,
    cfg: ZkConfig,
    members: Vec<Member>,
    interval_ms: u64,
    tick_ms: u64,
    lease_ms: u64,
    tick: ngx_event_t,
    /// The session's next deadline (pings, timeouts, the client-side expiry).
    timer: ngx_event_t,
    /// The next connection attempt.
    retry: ngx_event_t,
    /// Publishing the listings that came in (`events`), and since when they wait.
    settle: ngx_event_t,
    settle_since: u64,
    /// When listings were last published, and what that took (microseconds).
    published_at: u64,
    publish_cost_us: u64,
    conn: Option<Conn>,
    /// The connection is up (and the session handshake under way or done).
    ready: bool,
    /// When the session handshake on this connection completed (0: not yet).
    established_at: u64,
    /// The session timeout the server granted (the one asked for until then).
    timeout_ms: u32,
    out: Vec<u8>,
    sent: usize,
    session: Option<Session>,
    /// The lease epoch of the lead zone; None: another worker runs the session.
    epoch: Option<u64>,
    failover: Failover,
    errors: ErrorDedup,
    rng: Rng,
}

static mut OWNERS: Vec<*mut ZkOwner> = Vec::new();

/// `zookeeper 10.0.0.1:2181,10.0.0.2:2181 for upstream "a"` (or `upstreams "a", "b"`).
fn session_prefix(addrs: &[SocketAddr], names: &[&str]) -> String {
    let list: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
    format!(
        "upsync: zookeeper {} for upstream{} {}",
        list.join(","),
        if names.len() == 1 { "" } else { "s" },
        crate::ngx_util::quoted_names(names)
    )
}

/// Starts, in this worker, one owner per ensemble of the given ZooKeeper upstreams.
///
/// # Safety
/// Called from `init_process` with configurations of the running cycle (they outlive
/// the worker's owners), each with an initialized zone.
pub unsafe fn start(confs: &[*const SrvConf]) {
    // SAFETY: per the contract the configurations are live for the worker's life.
    let confs: Vec<&SrvConf> = confs.iter().map(|&c| unsafe { &*c }).collect();
    let pid = my_pid() as u64;
    for g in group::groups(&confs) {
        let names: Vec<&str> = g.confs.iter().map(|c| c.name.as_str()).collect();
        let members = g
            .confs
            .iter()
            .map(|c| {
                let zk = c
                    .upsync
                    .as_ref()
                    .and_then(|u| u.zookeeper.as_ref())
                    .expect("grouped ZooKeeper upstream");
                let side = Side::new(c.log_prefix());
                Member {
                    name: c.name.clone(),
                    path: zk.server_path.clone(),
                    layout: zk.layout,
                    publisher: Publisher::new(c, side.clone()),
                    side,
                    epoch: None,
                    watch: None,
                    pending: None,
                    watch_error: None,
                    missing: false,
                }
            })
            .collect();
        let o: *mut ZkOwner = Box::into_raw(Box::new(ZkOwner {
            side: Side::new(session_prefix(&g.addrs, &names)),
            failover: Failover::new(g.addrs.len()),
            addrs: g.addrs,
            timeout_ms: g.cfg.session_timeout_ms,
            cfg: g.cfg,
            members,
            interval_ms: g.interval_ms,
            tick_ms: policy::tick_ms(g.interval_ms),
            lease_ms: policy::lease_ms(g.interval_ms),
            // SAFETY: ngx_event_t is plain old data; all-zero is its initial value.
            tick: unsafe { std::mem::zeroed() },
            // SAFETY: as above.
            timer: unsafe { std::mem::zeroed() },
            // SAFETY: as above.
            retry: unsafe { std::mem::zeroed() },
            // SAFETY: as above.
            settle: unsafe { std::mem::zeroed() },
            settle_since: 0,
            published_at: 0,
            publish_cost_us: 0,
            conn: None,
            ready: false,
            established_at: 0,
            out: Vec::new(),
            sent: 0,
            session: None,
            epoch: None,
            errors: ErrorDedup::default(),
            rng: Rng::new(pid << 32 ^ mono_ms() ^ 0x7a6b),
        }));
        // SAFETY: `o` was just boxed and is never freed (owners live until the process
        // exits); its timers are cancelable, so they never hold up an exit.
        unsafe {
            let me = &mut *o;
            crate::ngx_util::timer_events(
                o as *mut c_void,
                &mut [
                    (
                        &mut me.tick,
                        lease::tick_handler as unsafe extern "C" fn(*mut ngx_event_t),
                    ),
                    (&mut me.timer, link::timer_handler),
                    (&mut me.retry, link::retry_handler),
                    (&mut me.settle, events::settle_handler),
                ],
            );
            // Spread the first election tick so workers do not all race at once.
            let first = me.rng.next_u64() % 50;
            ngx_add_timer(&mut me.tick, first as ngx_msec_t);
            (*ptr::addr_of_mut!(OWNERS)).push(o);
        }
    }
}

/// Closes every session this worker runs and gives the leases back (worker exit).
pub fn stop_all() {
    // SAFETY: the worker is single-threaded; owners live until the process exits.
    unsafe {
        for &o in (*ptr::addr_of!(OWNERS)).iter() {
            (*o).shutdown();
        }
    }
}

impl ZkOwner {
    /// A session-level line (credentials never appear, even quoted by a server).
    fn log(&self, level: u32, msg: &str) {
        self.side
            .error_log(level, &redact_secrets(msg, &self.secrets()));
    }

    fn member_log(&self, i: usize, level: u32, msg: &str) {
        self.members[i]
            .side
            .error_log(level, &redact_secrets(msg, &self.secrets()));
    }

    fn secrets(&self) -> Vec<String> {
        match &self.cfg.auth {
            None => Vec::new(),
            Some(a) => {
                let mut v = vec![a.clone()];
                if let Some((_, p)) = a.split_once(':').filter(|(_, p)| !p.is_empty()) {
                    v.push(p.to_string());
                }
                v
            }
        }
    }

    fn debug(&self, msg: &str) {
        ngx_log_debug_mask!(
            DebugMask::Stream,
            cycle_log(),
            "upsync: zookeeper {}: {msg}",
            self.members[0].name
        );
    }

    /// The member address in use (the failover list rotates on failures).
    fn addr(&self) -> SocketAddr {
        self.addrs[self.failover.current() % self.addrs.len()]
    }
}
