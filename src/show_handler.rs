//! `upstream_show`: answers a TCP connection with a report of every stream upstream —
//! the C module's text by default, JSON or Prometheus on request (see `show.rs`). The
//! request line is read first (a client that sends nothing, or closes its side, gets the
//! text after at most a second); partial writes wait for the socket; after the response
//! the write side is shut down and the rest of the request drained, so the client never
//! sees a reset.

use std::ffi::c_void;

use ngx::ffi::*;

use crate::ngx_util::now_sec;

use crate::driver::io::{send_pending, Sent};
use crate::srv_conf::{cycle_upstreams, upstream_conf, SrvConf};
use upsync_core::servers::server_line;
use upsync_core::show::{parse_request, render, ServerView, ShowRequest, SourceView, UpstreamView};

const REQUEST_WAIT_MS: ngx_msec_t = 1_000;
const SEND_TIMEOUT_MS: ngx_msec_t = 10_000;
const LINGER_MS: ngx_msec_t = 2_000;
/// Longest request line read; the rest is drained unread.
const REQUEST_MAX: usize = 8 * 1024;

struct ShowCtx {
    request: Vec<u8>,
    out: Vec<u8>,
    sent: usize,
    responded: bool,
    lingering: bool,
}

unsafe extern "C" fn drop_ctx(data: *mut c_void) {
    drop(Box::from_raw(data as *mut ShowCtx));
}

fn failed_until(
    max_fails: u32,
    fails: u32,
    checked: i64,
    fail_timeout: i64,
    now: i64,
) -> Option<i64> {
    (max_fails > 0 && fails >= max_fails && now - checked <= fail_timeout)
        .then_some(checked + fail_timeout)
}

/// The current state of every `upstream {}` block, in configuration order.
pub unsafe fn snapshot() -> Vec<UpstreamView> {
    let now = now_sec();
    let mut out = Vec::new();
    for &uscf in cycle_upstreams(ngx_cycle) {
        if (*uscf).flags & NGX_STREAM_UPSTREAM_CREATE as ngx_uint_t == 0 {
            continue; // implicit upstreams of `proxy_pass ADDRESS`
        }
        let name = String::from_utf8_lossy(std::slice::from_raw_parts(
            (*uscf).host.data,
            (*uscf).host.len,
        ))
        .into_owned();
        let view = match upstream_conf(uscf).filter(|c| c.zone.is_some()) {
            Some(conf) => synced_view(name, conf, now),
            None => UpstreamView {
                name,
                servers: static_servers(uscf, now),
                source: None,
            },
        };
        out.push(view);
    }
    out
}

unsafe fn synced_view(name: String, conf: &SrvConf, now: i64) -> UpstreamView {
    let zone = conf.zone.expect("filtered on zone");
    let l = zone.lock();
    let servers = l
        .slots()
        .iter()
        .map(|&s| {
            let spec = (*s).spec();
            let st = &(*s).state;
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
                failed_until: failed_until(
                    st.max_fails,
                    st.fails,
                    st.checked,
                    st.fail_timeout,
                    now,
                ),
            }
        })
        .collect();
    let st = l.status_ref();
    let spec = conf.upsync.as_ref().expect("synced upstream");
    let source = SourceView {
        kind: spec.kind.name().into(),
        address: spec.endpoint.to_string(),
        in_use: l.in_use(),
        lb: conf
            .lb
            .as_ref()
            .map(|l| l.name())
            .unwrap_or("roundrobin")
            .into(),
        position: st.position,
        last_sync_ms: st.last_sync_ms,
        last_change_ms: st.last_change_ms,
        last_error: l.last_error(),
        consecutive_failures: st.consecutive_failures,
        generation: l.generation(),
        updates: st.updates,
        poller_pid: l.lease().holder,
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
unsafe fn static_servers(uscf: *mut ngx_stream_upstream_srv_conf_t, now: i64) -> Vec<ServerView> {
    let peers = (*uscf).peer.data as *mut ngx_stream_upstream_rr_peers_t;
    if peers.is_null() {
        return Vec::new();
    }
    let _guard = PeersReadLock::new(peers);
    let mut out = Vec::new();
    let mut list = peers;
    let mut backup = false;
    while !list.is_null() {
        let mut p = (*list).peer;
        while !p.is_null() {
            let name =
                String::from_utf8_lossy(std::slice::from_raw_parts((*p).name.data, (*p).name.len))
                    .into_owned();
            let pr = &*p;
            out.push(ServerView {
                line: server_line(
                    &name,
                    pr.weight as u32,
                    pr.max_fails as u32,
                    pr.fail_timeout as i64,
                    pr.max_conns as u32,
                    backup,
                    pr.down != 0,
                ),
                address: name,
                weight: pr.weight as u32,
                max_fails: pr.max_fails as u32,
                fail_timeout: pr.fail_timeout as i64,
                max_conns: pr.max_conns as u32,
                down: pr.down != 0,
                backup,
                active: pr.conns as u32,
                fails: pr.fails as u32,
                total: 0,
                failed_until: failed_until(
                    pr.max_fails as u32,
                    pr.fails as u32,
                    pr.checked as i64,
                    pr.fail_timeout as i64,
                    now,
                ),
            });
            p = pr.next;
        }
        list = (*list).next;
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

pub unsafe extern "C" fn handler(s: *mut ngx_stream_session_t) {
    let c = (*s).connection;
    if (*c).type_ != libc::SOCK_STREAM {
        ngx_stream_finalize_session(s, NGX_STREAM_OK as ngx_uint_t);
        return;
    }
    let ctx = Box::into_raw(Box::new(ShowCtx {
        request: Vec::new(),
        out: Vec::new(),
        sent: 0,
        responded: false,
        lingering: false,
    }));
    let cln = ngx_pool_cleanup_add((*c).pool, 0);
    if cln.is_null() {
        drop(Box::from_raw(ctx));
        ngx_stream_finalize_session(s, NGX_STREAM_INTERNAL_SERVER_ERROR as ngx_uint_t);
        return;
    }
    (*cln).handler = Some(drop_ctx);
    (*cln).data = ctx as *mut c_void;
    *(*s).ctx.add(crate::srv_conf::ctx_index()) = ctx as *mut c_void;
    (*(*c).read).handler = Some(on_read);
    (*(*c).write).handler = Some(on_write);
    ngx_add_timer((*c).read, REQUEST_WAIT_MS);
    on_read((*c).read);
}

unsafe fn get_ctx(s: *mut ngx_stream_session_t) -> &'static mut ShowCtx {
    &mut *(*(*s).ctx.add(crate::srv_conf::ctx_index()) as *mut ShowCtx)
}

/// Reads what the client sent (keeping up to REQUEST_MAX bytes of it while the request
/// line is incomplete). Returns false when the client has closed (EOF or error).
unsafe fn read_available(s: *mut ngx_stream_session_t) -> bool {
    let c = (*s).connection;
    let ctx = get_ctx(s);
    let mut buf = [0u8; 4096];
    loop {
        let Some(recv) = (*c).recv else { return false };
        let n = recv(c, buf.as_mut_ptr(), buf.len());
        if n > 0 {
            if !ctx.responded && ctx.request.len() < REQUEST_MAX {
                let take = (n as usize).min(REQUEST_MAX - ctx.request.len());
                ctx.request.extend_from_slice(&buf[..take]);
            }
            continue;
        }
        if n == NGX_AGAIN as isize {
            let _ = ngx_handle_read_event((*c).read, 0);
            return true;
        }
        return false;
    }
}

unsafe extern "C" fn on_read(ev: *mut ngx_event_t) {
    let c = (*ev).data as *mut ngx_connection_t;
    let s = (*c).data as *mut ngx_stream_session_t;
    let timed_out = (*ev).timedout() != 0;
    (*ev).set_timedout(0);
    let ctx = get_ctx(s);
    if ctx.lingering {
        if timed_out || !read_available(s) {
            ngx_stream_finalize_session(s, NGX_STREAM_OK as ngx_uint_t);
        }
        return;
    }
    if ctx.responded {
        let _ = read_available(s);
        return;
    }
    let open = !timed_out && read_available(s);
    let line_done = ctx.request.contains(&b'\n') || ctx.request.len() >= REQUEST_MAX;
    if open && !line_done {
        return; // wait for the rest of the request line (the read timer is armed)
    }
    respond(s);
}

unsafe fn respond(s: *mut ngx_stream_session_t) {
    let c = (*s).connection;
    let ctx = get_ctx(s);
    if (*(*c).read).timer_set() != 0 {
        ngx_del_timer((*c).read);
    }
    let line_end = ctx
        .request
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(ctx.request.len());
    let req = if ctx.request.is_empty() {
        ShowRequest::default()
    } else {
        parse_request(&ctx.request[..line_end])
    };
    ctx.out = render(&req, &snapshot());
    ctx.responded = true;
    write(s);
}

unsafe extern "C" fn on_write(ev: *mut ngx_event_t) {
    let c = (*ev).data as *mut ngx_connection_t;
    let s = (*c).data as *mut ngx_stream_session_t;
    if (*ev).timedout() != 0 {
        ngx_stream_finalize_session(s, NGX_STREAM_OK as ngx_uint_t);
        return;
    }
    if get_ctx(s).responded {
        write(s);
    }
}

unsafe fn write(s: *mut ngx_stream_session_t) {
    let c = (*s).connection;
    let ctx = get_ctx(s);
    if ctx.lingering {
        return;
    }
    match send_pending(c, &mut ctx.out, &mut ctx.sent) {
        Sent::All => {}
        Sent::Again => {
            ngx_add_timer((*c).write, SEND_TIMEOUT_MS);
            return;
        }
        Sent::Error => {
            ngx_stream_finalize_session(s, NGX_STREAM_OK as ngx_uint_t);
            return;
        }
    }
    if (*(*c).write).timer_set() != 0 {
        ngx_del_timer((*c).write);
    }
    // Everything is sent: half-close, then wait (briefly) for the client to close, reading
    // and discarding what it still sends, so the close never turns into a reset.
    ctx.lingering = true;
    libc::shutdown((*c).fd, libc::SHUT_WR);
    ngx_add_timer((*c).read, LINGER_MS);
    if !read_available(s) {
        ngx_stream_finalize_session(s, NGX_STREAM_OK as ngx_uint_t);
    }
}
