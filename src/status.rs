//! The state of every stream upstream as the reports show it (`upsync_core::show`
//! views): upsync upstreams from their zone, the others from nginx's own peers.

use ngx::ffi::*;

use crate::ngx_util::{now_sec, str_of};
use crate::srv_conf::{cycle_upstreams, upstream_conf, SrvConf};
use upsync_core::balancer::failed_until;
use upsync_core::servers::server_line;
use upsync_core::show::{HealthView, ServerView, SourceView, UpstreamView};

/// The current state of every `upstream {}` block of the running cycle, in
/// configuration order.
pub fn snapshot() -> Vec<UpstreamView> {
    let now = now_sec();
    let mut out = Vec::new();
    // SAFETY: the running cycle's upstreams; nginx runs one handler at a time, so no
    // other reference to their SrvConf is live.
    for &uscf in unsafe { cycle_upstreams(ngx_cycle) } {
        // SAFETY: `uscf` is a configured upstream of the running cycle.
        let (flags, name) = unsafe { ((*uscf).flags, str_of(&(*uscf).host)) };
        if flags & NGX_STREAM_UPSTREAM_CREATE as ngx_uint_t == 0 {
            continue; // implicit upstreams of `proxy_pass ADDRESS`
        }
        // SAFETY: as above.
        let view = match unsafe { upstream_conf(uscf) }.filter(|c| c.zone.is_some()) {
            Some(conf) => synced_view(name, conf, now),
            None => UpstreamView {
                name,
                // SAFETY: as above.
                servers: unsafe { static_servers(uscf, now) },
                source: None,
            },
        };
        out.push(view);
    }
    out
}

fn synced_view(name: String, conf: &SrvConf, now: i64) -> UpstreamView {
    let zone = conf.zone.expect("filtered on zone");
    let mem = zone.usage();
    let l = zone.lock();
    let health = l.health_records();
    let servers = (0..l.slots().len())
        .map(|i| {
            let slot = l.slot(i);
            let spec = slot.spec();
            let st = &slot.state;
            ServerView {
                line: spec.line(),
                address: spec.addr.to_string(),
                weight: spec.weight,
                max_fails: spec.max_fails,
                fail_timeout: spec.fail_timeout as i64,
                max_conns: spec.max_conns,
                down: spec.down,
                backup: spec.backup,
                active: st.conns,
                fails: st.fails,
                total: st.total,
                failed_until: st.failed_until(now),
                health: health.as_ref().and_then(|h| h.get(i)).map(|r| HealthView {
                    state: r.health.state.name(),
                    consecutive_passes: r.health.passes,
                    consecutive_fails: r.health.fails,
                    last_check_ms: r.health.last_check_ms,
                    last_failure: r.last_failure.clone(),
                    checks: r.health.checks,
                    checks_failed: r.health.failed,
                }),
            }
        })
        .collect();
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
    UpstreamView {
        name,
        servers,
        source: Some(source),
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
                line: server_line(
                    &name,
                    weight,
                    max_fails,
                    fail_timeout,
                    pr.max_conns as u32,
                    backup,
                    pr.down != 0,
                ),
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
