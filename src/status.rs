//! The state of every stream upstream as `upstream_show` reads it, a piece at a time
//! (`upsync_core::show::ShowSource`): an upsync upstream's servers from its zone, one
//! bounded batch per lock (rendered after the lock is released); the servers of an
//! upstream nginx balances itself from its peer list, read whole (a list from the
//! configuration or one DNS answer) under nginx's read lock.

use ngx::ffi::*;

use crate::ngx_util::{now_sec, str_of};
use crate::srv_conf::{cycle_upstreams, upstream_conf, SrvConf};
use upsync_core::balancer::failed_until;
use upsync_core::servers::ServerSpec;
use upsync_core::show::{
    resume_index, Batch, Cursor, HealthView, ServerView, ShowSource, SourceView, UpstreamHead,
};

/// The `upstream {}` blocks of the running cycle, in configuration order, as a source
/// for one step of a report.
pub struct Live {
    upstreams: Vec<*mut ngx_stream_upstream_srv_conf_t>,
    now: i64,
}

impl Live {
    pub fn new() -> Live {
        // SAFETY: the running cycle's upstreams, configured for the life of the worker.
        let all = unsafe { cycle_upstreams(ngx_cycle) };
        let upstreams = all
            .iter()
            .copied()
            // SAFETY: as above.
            .filter(|&u| unsafe { (*u).flags } & NGX_STREAM_UPSTREAM_CREATE as ngx_uint_t != 0)
            .collect(); // (not the implicit upstreams of `proxy_pass ADDRESS`)
        Live {
            upstreams,
            now: now_sec(),
        }
    }

    /// Upstream `i` and, for an upsync upstream, its configuration.
    fn upstream(&self, i: usize) -> (*mut ngx_stream_upstream_srv_conf_t, Option<&SrvConf>) {
        let uscf = self.upstreams[i];
        // SAFETY: a configured upstream of the running cycle; nginx runs one handler at a
        // time, so no other reference to its SrvConf is live while this one is used.
        let conf = unsafe { upstream_conf(uscf) }.filter(|c| c.zone.is_some());
        (uscf, conf.map(|c| &*c))
    }
}

impl ShowSource for Live {
    fn names(&self) -> Vec<String> {
        self.upstreams
            .iter()
            // SAFETY: configured upstreams of the running cycle.
            .map(|&u| str_of(unsafe { &(*u).host }))
            .collect()
    }

    fn head(&mut self, i: usize) -> UpstreamHead {
        let (uscf, conf) = self.upstream(i);
        // SAFETY: as in `names`.
        let name = str_of(unsafe { &(*uscf).host });
        match conf {
            Some(conf) => synced_head(name, conf),
            None => {
                // SAFETY: an upstream nginx balances itself (round robin's peers).
                let servers = unsafe { static_servers(uscf, self.now) };
                UpstreamHead {
                    name,
                    server_count: servers.len(),
                    version: 0,
                    checked: false,
                    source: None,
                    whole: Some(servers),
                }
            }
        }
    }

    fn servers(&mut self, i: usize, cursor: &mut Cursor, max: usize) -> Batch {
        match self.upstream(i).1 {
            Some(conf) => synced_batch(conf, cursor, max, self.now),
            None => Batch {
                end: true,
                ..Batch::default()
            },
        }
    }
}

/// An upsync upstream's summary: one short hold of its lock.
fn synced_head(name: String, conf: &SrvConf) -> UpstreamHead {
    let zone = conf.zone.expect("filtered on zone");
    let mem = zone.usage();
    let l = zone.lock();
    let st = l.status_ref();
    let (skipped, skipped_count) = l.skipped();
    let spec = conf.upsync.as_ref().expect("synced upstream");
    let source = SourceView {
        kind: spec.kind.name().into(),
        address: spec.endpoint.to_string(),
        in_use: l.in_use(),
        lb: conf.method_name().into(),
        position: st.position,
        last_sync_ms: st.last_sync_ms,
        last_change_ms: st.last_change_ms,
        last_error: l.last_error(),
        consecutive_failures: st.consecutive_failures,
        generation: l.generation(),
        updates: st.updates,
        poller_pid: l.lease().holder,
        skipped,
        skipped_count,
        memory_used: mem.used,
        memory_cap: mem.budget,
        zone_free: mem.shared_free,
        zone_size: mem.shared_size,
    };
    UpstreamHead {
        name,
        server_count: l.slots().len(),
        version: l.generation(),
        checked: l.health_conf_id() != 0,
        source: Some(source),
        whole: None,
    }
}

/// What is copied of a slot under the lock.
struct Copied {
    spec: ServerSpec,
    active: u32,
    fails: u32,
    total: u64,
    failed_until: Option<i64>,
}

/// At most `max` servers of an upsync upstream from `cursor` on: copied under the lock
/// (O(log n + max)), made views of after it is released.
fn synced_batch(conf: &SrvConf, cursor: &mut Cursor, max: usize, now: i64) -> Batch {
    let zone = conf.zone.expect("filtered on zone");
    let (copied, health, version, end, len) = {
        let l = zone.lock();
        let len = l.slots().len();
        let start = resume_index(cursor, len, |i| l.slot(i).addr());
        let end = start.saturating_add(max).min(len);
        let copied: Vec<Copied> = (start..end)
            .map(|i| {
                let slot = l.slot(i);
                Copied {
                    spec: slot.spec(),
                    active: slot.state.conns,
                    fails: slot.state.fails,
                    total: slot.state.total,
                    failed_until: slot.state.failed_until(now),
                }
            })
            .collect();
        let health = l.health_records_in(start..end);
        (copied, health, l.generation(), end, len)
    };
    cursor.next = end;
    cursor.after = copied.last().map(|c| c.spec.addr).or(cursor.after);
    let mut health = health.map(Vec::into_iter);
    let servers = copied
        .into_iter()
        .map(|c| ServerView {
            address: c.spec.addr.to_string(),
            weight: c.spec.weight,
            max_fails: c.spec.max_fails,
            fail_timeout: c.spec.fail_timeout as i64,
            max_conns: c.spec.max_conns,
            down: c.spec.down,
            backup: c.spec.backup,
            active: c.active,
            fails: c.fails,
            total: c.total,
            failed_until: c.failed_until,
            health: health
                .as_mut()
                .and_then(Iterator::next)
                .map(|r| HealthView {
                    state: r.health.state.name(),
                    consecutive_passes: r.health.passes,
                    consecutive_fails: r.health.fails,
                    last_check_ms: r.health.last_check_ms,
                    last_failure: r.last_failure,
                    checks: r.health.checks,
                    checks_failed: r.health.failed,
                }),
        })
        .collect();
    Batch {
        servers,
        end: end >= len,
        version,
    }
}

/// Servers of an upstream nginx balances itself: its round-robin peers, backups last.
/// With `zone`, other workers may change the list (`server ... resolve` relinks peers
/// under the write lock), so it is read under the peers' read lock, as nginx does.
///
/// # Safety
/// `uscf` is an upstream of the running cycle balanced by nginx's round robin.
unsafe fn static_servers(uscf: *mut ngx_stream_upstream_srv_conf_t, now: i64) -> Vec<ServerView> {
    // SAFETY: per the contract, `peer.data` is the upstream's round-robin peer list.
    let peers = unsafe { (*uscf).peer.data } as *mut ngx_stream_upstream_rr_peers_t;
    if peers.is_null() {
        return Vec::new();
    }
    // SAFETY: `peers` is the live primary list.
    let _guard = unsafe { PeersReadLock::new(peers) };
    let mut out = Vec::new();
    let mut list = peers;
    let mut backup = false;
    while !list.is_null() {
        // SAFETY: lists and peers are live and stable while the read lock is held.
        let mut p = unsafe { (*list).peer };
        while !p.is_null() {
            // SAFETY: as above.
            let pr = unsafe { &*p };
            let name = str_of(&pr.name);
            let (weight, max_fails) = (pr.weight as u32, pr.max_fails as u32);
            let fail_timeout = pr.fail_timeout as i64;
            out.push(ServerView {
                address: name,
                weight,
                max_fails,
                fail_timeout,
                max_conns: pr.max_conns as u32,
                down: pr.down != 0,
                backup,
                active: pr.conns as u32,
                fails: pr.fails as u32,
                total: 0,
                failed_until: failed_until(
                    max_fails,
                    pr.fails as u32,
                    pr.checked as i64,
                    fail_timeout,
                    now,
                ),
                health: None,
            });
            p = pr.next;
        }
        // SAFETY: as above.
        list = unsafe { (*list).next };
        backup = true;
    }
    out
}

/// nginx's `ngx_stream_upstream_rr_peers_rlock`/`_unlock` on a peer list (a no-op for
/// peers outside a shared zone). The backup list is covered by the primary list's lock.
struct PeersReadLock {
    #[cfg(ngx_feature = "stream_upstream_zone")]
    peers: *mut ngx_stream_upstream_rr_peers_t,
}

impl PeersReadLock {
    /// # Safety
    /// `peers` is the live primary peer list of an upstream of the running cycle.
    unsafe fn new(peers: *mut ngx_stream_upstream_rr_peers_t) -> PeersReadLock {
        #[cfg(ngx_feature = "stream_upstream_zone")]
        {
            // SAFETY: per the contract; `shpool` is set for lists in a shared zone,
            // whose `rwlock` every worker takes before changing the list.
            unsafe {
                if !(*peers).shpool.is_null() {
                    ngx_rwlock_rlock(&mut (*peers).rwlock);
                }
            }
            PeersReadLock { peers }
        }
        #[cfg(not(ngx_feature = "stream_upstream_zone"))]
        {
            let _ = peers;
            PeersReadLock {}
        }
    }
}

impl Drop for PeersReadLock {
    fn drop(&mut self) {
        #[cfg(ngx_feature = "stream_upstream_zone")]
        // SAFETY: the lock was taken in `new` on this live list.
        unsafe {
            if !(*self.peers).shpool.is_null() {
                ngx_rwlock_unlock(&mut (*self.peers).rwlock);
            }
        }
    }
}
