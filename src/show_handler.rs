//! `upstream_show`: answers a TCP connection with the text report of every stream
//! upstream. The client's request is read and ignored; partial writes wait for the socket
//! to become writable; after the response the write side is shut down and the request is
//! drained until the client closes, so the client never sees a reset.

use std::ffi::c_void;

use ngx::ffi::*;

use crate::module::{cycle_upstreams, upstream_conf};
use crate::net::conn::{send_pending, Sent};
use crate::servers::server_line;
use crate::show::{render_body, render_response, UpstreamView};

const SEND_TIMEOUT_MS: ngx_msec_t = 10_000;
const LINGER_MS: ngx_msec_t = 2_000;

struct ShowCtx {
    out: Vec<u8>,
    sent: usize,
    lingering: bool,
}

unsafe extern "C" fn drop_ctx(data: *mut c_void) {
    drop(Box::from_raw(data as *mut ShowCtx));
}

/// The current report, built from the shared zones (upsync upstreams) and from nginx's
/// own peer lists (static upstreams), in configuration order.
pub unsafe fn report() -> Vec<u8> {
    let mut names = Vec::new();
    let mut all_lines = Vec::new();
    for &uscf in cycle_upstreams(ngx_cycle) {
        if (*uscf).flags & NGX_STREAM_UPSTREAM_CREATE as ngx_uint_t == 0 {
            continue; // implicit upstreams of `proxy_pass ADDRESS`
        }
        let name = String::from_utf8_lossy(std::slice::from_raw_parts(
            (*uscf).host.data,
            (*uscf).host.len,
        ))
        .into_owned();
        let lines = match upstream_conf(uscf).and_then(|c| c.zone) {
            Some(zone) => zone.lock().specs().iter().map(|s| s.line()).collect(),
            None => static_lines(uscf),
        };
        names.push(name);
        all_lines.push(lines);
    }
    let views: Vec<UpstreamView> = names
        .iter()
        .zip(all_lines)
        .map(|(n, lines)| UpstreamView { name: n, lines })
        .collect();
    render_response(&render_body(&views), "text/plain")
}

/// Lines for an upstream nginx balances itself: its round-robin peers, backups last.
unsafe fn static_lines(uscf: *mut ngx_stream_upstream_srv_conf_t) -> Vec<String> {
    let mut out = Vec::new();
    let mut peers = (*uscf).peer.data as *mut ngx_stream_upstream_rr_peers_t;
    let mut backup = false;
    while !peers.is_null() {
        let mut p = (*peers).peer;
        while !p.is_null() {
            let name =
                String::from_utf8_lossy(std::slice::from_raw_parts((*p).name.data, (*p).name.len))
                    .into_owned();
            out.push(server_line(
                &name,
                (*p).weight as u32,
                (*p).max_fails as u32,
                (*p).fail_timeout as i64,
                (*p).max_conns as u32,
                backup,
                (*p).down != 0,
            ));
            p = (*p).next;
        }
        peers = (*peers).next;
        backup = true;
    }
    out
}

pub unsafe extern "C" fn handler(s: *mut ngx_stream_session_t) {
    let c = (*s).connection;
    if (*c).type_ != libc::SOCK_STREAM {
        ngx_stream_finalize_session(s, NGX_STREAM_OK as ngx_uint_t);
        return;
    }
    let ctx = Box::into_raw(Box::new(ShowCtx {
        out: report(),
        sent: 0,
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
    ngx_stream_set_ctx(s, ctx as *mut c_void);
    (*(*c).read).handler = Some(on_read);
    (*(*c).write).handler = Some(on_write);
    drain(s);
    write(s);
}

unsafe fn ngx_stream_set_ctx(s: *mut ngx_stream_session_t, ctx: *mut c_void) {
    *(*s).ctx.add(crate::module::ctx_index()) = ctx;
}

unsafe fn get_ctx(s: *mut ngx_stream_session_t) -> *mut ShowCtx {
    *(*s).ctx.add(crate::module::ctx_index()) as *mut ShowCtx
}

/// Reads and discards whatever the client sent. Returns false when the client has closed
/// (EOF or error).
unsafe fn drain(s: *mut ngx_stream_session_t) -> bool {
    let c = (*s).connection;
    let mut buf = [0u8; 4096];
    loop {
        let recv = (*c).recv.expect("recv");
        let n = recv(c, buf.as_mut_ptr(), buf.len());
        if n > 0 {
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
    let ctx = get_ctx(s);
    if (*ev).timedout() != 0 {
        ngx_stream_finalize_session(s, NGX_STREAM_OK as ngx_uint_t);
        return;
    }
    let open = drain(s);
    if !open && (*ctx).lingering {
        ngx_stream_finalize_session(s, NGX_STREAM_OK as ngx_uint_t);
    }
}

unsafe extern "C" fn on_write(ev: *mut ngx_event_t) {
    let c = (*ev).data as *mut ngx_connection_t;
    let s = (*c).data as *mut ngx_stream_session_t;
    if (*ev).timedout() != 0 {
        ngx_stream_finalize_session(s, NGX_STREAM_OK as ngx_uint_t);
        return;
    }
    write(s);
}

unsafe fn write(s: *mut ngx_stream_session_t) {
    let c = (*s).connection;
    let ctx = &mut *get_ctx(s);
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
    if !drain(s) {
        ngx_stream_finalize_session(s, NGX_STREAM_OK as ngx_uint_t);
    }
}
