//! `upstream_show`: answers a TCP connection with a report of every stream upstream —
//! the C module's text by default, JSON or Prometheus on request (see
//! `upsync_core::show`). The request line is read first (a client that sends nothing,
//! or closes its side, gets the text after at most a second). The report is rendered
//! a slice at a time (`show::Renderer`: one bounded batch of servers per turn of the
//! event loop, the next turn posted), and only as fast as the client reads: a slice is
//! rendered when the last one is sent. After the response the write side is shut down
//! and the rest of the request drained, so the client never sees a reset.

use ngx::core::Pool;
use ngx::ffi::*;

use crate::driver::io::{send_pending, Sent};
use crate::srv_conf::ctx_index;
use crate::status::Live;
use upsync_core::show::{parse_request, Renderer};

const REQUEST_WAIT_MS: ngx_msec_t = 1_000;
const SEND_TIMEOUT_MS: ngx_msec_t = 10_000;
const LINGER_MS: ngx_msec_t = 2_000;
/// Longest request line read; the rest is drained unread.
const REQUEST_MAX: usize = 8 * 1024;
/// Servers read (under a zone lock) and rendered per connection and turn of the event
/// loop, at most: about 0.1 ms of work in a release build (see README, upstream_show).
const SLICE: usize = 64;
/// Bytes handed to the socket per turn of the event loop, at most.
const SEND_MAX: usize = 64 * 1024;

/// One `upstream_show` connection. Every handler borrows it once (through `session`)
/// and passes that borrow down, so no two `&mut` to it ever exist.
struct ShowCtx {
    s: *mut ngx_stream_session_t,
    c: *mut ngx_connection_t,
    request: Vec<u8>,
    /// The report being rendered (None before the request is read and once it is all
    /// in `out`).
    renderer: Option<Renderer>,
    /// Rendered bytes, `sent` of them written.
    out: Vec<u8>,
    sent: usize,
    responded: bool,
    lingering: bool,
}

/// The content handler of an `upstream_show` server.
///
/// # Safety
/// Called by nginx with a new stream session of such a server.
pub unsafe extern "C" fn handler(s: *mut ngx_stream_session_t) {
    // SAFETY: per the contract the session and its connection are live.
    let c = unsafe { (*s).connection };
    // SAFETY: as above.
    if unsafe { (*c).type_ } != libc::SOCK_STREAM {
        return finalize(s);
    }
    // SAFETY: the connection's pool lives as long as the session; the context is
    // dropped by the pool's cleanup.
    let ctx = unsafe { Pool::from_ngx_pool((*c).pool) }.allocate(ShowCtx {
        s,
        c,
        request: Vec::new(),
        renderer: None,
        out: Vec::new(),
        sent: 0,
        responded: false,
        lingering: false,
    });
    if ctx.is_null() {
        // SAFETY: the live session.
        unsafe { ngx_stream_finalize_session(s, NGX_STREAM_INTERNAL_SERVER_ERROR as ngx_uint_t) };
        return;
    }
    // SAFETY: our slot of the session's module contexts, and the connection's events.
    unsafe {
        *(*s).ctx.add(ctx_index()) = ctx as *mut std::ffi::c_void;
        (*(*c).read).handler = Some(on_read);
        (*(*c).write).handler = Some(on_write);
        ngx_add_timer((*c).read, REQUEST_WAIT_MS);
        on_read((*c).read);
    }
}

fn finalize(s: *mut ngx_stream_session_t) {
    // SAFETY: `s` is the live session this module's handler owns; nothing touches it or
    // its context after this call.
    unsafe { ngx_stream_finalize_session(s, NGX_STREAM_OK as ngx_uint_t) };
}

/// The session's context for an event of its connection.
///
/// # Safety
/// `ev` is an event of an `upstream_show` connection set up by `handler`; the caller
/// makes this the only borrow of the context while it is used.
unsafe fn session<'a>(ev: *mut ngx_event_t) -> &'a mut ShowCtx {
    // SAFETY: per the contract.
    unsafe {
        let c = (*ev).data as *mut ngx_connection_t;
        let s = (*c).data as *mut ngx_stream_session_t;
        &mut *(*(*s).ctx.add(ctx_index()) as *mut ShowCtx)
    }
}

/// Reads what the client sent (keeping up to REQUEST_MAX bytes of it while the request
/// line is incomplete). Returns false when the client has closed (EOF or error).
fn read_available(ctx: &mut ShowCtx) -> bool {
    let c = ctx.c;
    let mut buf = [0u8; 4096];
    loop {
        // SAFETY: the live connection; `recv` writes at most `buf.len()` bytes.
        let n = unsafe {
            let Some(recv) = (*c).recv else { return false };
            recv(c, buf.as_mut_ptr(), buf.len())
        };
        if n > 0 {
            if !ctx.responded && ctx.request.len() < REQUEST_MAX {
                let take = (n as usize).min(REQUEST_MAX - ctx.request.len());
                ctx.request.extend_from_slice(&buf[..take]);
            }
            continue;
        }
        if n == NGX_AGAIN as isize {
            // SAFETY: the live connection's read event.
            let _ = unsafe { ngx_handle_read_event((*c).read, 0) };
            return true;
        }
        return false;
    }
}

/// Whether nginx asked the connection to close (worker_shutdown_timeout on exit).
fn closing(ctx: &ShowCtx) -> bool {
    // SAFETY: the live connection.
    unsafe { (*ctx.c).close() != 0 }
}

unsafe extern "C" fn on_read(ev: *mut ngx_event_t) {
    // SAFETY: nginx calls this for the read event of a connection `handler` set up.
    let (ctx, timed_out) = unsafe {
        let timed_out = (*ev).timedout() != 0;
        (*ev).set_timedout(0);
        (session(ev), timed_out)
    };
    if closing(ctx) {
        return finalize(ctx.s);
    }
    if ctx.lingering {
        if timed_out || !read_available(ctx) {
            finalize(ctx.s);
        }
        return;
    }
    if ctx.responded {
        // a client that closes its side may still read the answer: sending tells
        // whether it is gone
        let _ = read_available(ctx);
        return;
    }
    let open = !timed_out && read_available(ctx);
    let line_done = ctx.request.contains(&b'\n') || ctx.request.len() >= REQUEST_MAX;
    if open && !line_done {
        return; // wait for the rest of the request line (the read timer is armed)
    }
    respond(ctx);
}

fn respond(ctx: &mut ShowCtx) {
    // SAFETY: the live connection's read event.
    unsafe {
        let rev = (*ctx.c).read;
        if (*rev).timer_set() != 0 {
            ngx_del_timer(rev);
        }
    }
    let line_end = ctx
        .request
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(ctx.request.len());
    let req = parse_request(&ctx.request[..line_end]);
    ctx.request = Vec::new();
    ctx.renderer = Some(Renderer::new(&req, &mut Live::new(), SLICE));
    ctx.responded = true;
    pump(ctx);
}

unsafe extern "C" fn on_write(ev: *mut ngx_event_t) {
    // SAFETY: nginx calls this for the write event of a connection `handler` set up
    // (from epoll, its timer, or the posted queue `pump` puts it on).
    let (ctx, timed_out) = unsafe { (session(ev), (*ev).timedout() != 0) };
    if timed_out || closing(ctx) {
        return finalize(ctx.s);
    }
    if ctx.responded {
        pump(ctx);
    }
}

/// Moves the answer on, by one turn of the event loop's worth: sends at most SEND_MAX
/// bytes of what is rendered; once all of it is sent, renders the next slice (one per
/// turn: not while the write event is posted, as its run renders) and sends from it;
/// then, if more is to come, yields to the event loop until the socket can take more
/// (the client reads) or for one turn (the write event is posted to the next one). A
/// timer on the write event ends a client that takes nothing for SEND_TIMEOUT_MS; it
/// also keeps an exiting worker until the answer is out.
fn pump(ctx: &mut ShowCtx) {
    if ctx.lingering {
        return;
    }
    let c = ctx.c;
    // SAFETY: the connection's write event.
    let wev = unsafe { (*c).write };
    // SAFETY: as above; a posted run of this handler is due in this turn or the next.
    let mut rendered = unsafe { (*wev).posted() } != 0;
    let mut budget = SEND_MAX;
    loop {
        let end = ctx.out.len().min(ctx.sent + budget);
        let before = ctx.sent;
        // SAFETY: the live connection, owned by this session.
        let sent = unsafe { send_pending(c, &mut ctx.out[..end], &mut ctx.sent) };
        budget -= ctx.sent - before;
        match sent {
            Sent::All if ctx.sent < ctx.out.len() => return yield_turn(wev),
            Sent::All => {}
            Sent::Again => {
                // SAFETY: the connection's write event (re-armed: progress was made or
                // the wait begins).
                unsafe { ngx_add_timer(wev, SEND_TIMEOUT_MS) };
                return;
            }
            Sent::Error => return finalize(ctx.s),
        }
        ctx.out.clear();
        ctx.sent = 0;
        let Some(r) = ctx.renderer.as_mut() else {
            break;
        };
        if rendered || budget == 0 {
            return yield_turn(wev);
        }
        if r.step(&mut Live::new(), &mut ctx.out) {
            ctx.renderer = None; // the rest of the answer is in `out`
        }
        rendered = true;
    }
    // Everything is sent: half-close, then wait (briefly) for the client to close, reading
    // and discarding what it still sends, so the close never turns into a reset.
    ctx.lingering = true;
    ctx.out = Vec::new();
    // SAFETY: the connection's events and socket.
    unsafe {
        if (*wev).posted() != 0 {
            ngx_delete_posted_event(wev);
        }
        if (*wev).timer_set() != 0 {
            ngx_del_timer(wev);
        }
        libc::shutdown((*c).fd, libc::SHUT_WR);
        ngx_add_timer((*c).read, LINGER_MS);
    }
    if !read_available(ctx) {
        finalize(ctx.s);
    }
}

/// Goes on in the next turn of the event loop: other connections are served first.
fn yield_turn(wev: *mut ngx_event_t) {
    // SAFETY: the write event of a live `upstream_show` connection; a posted event is
    // taken off its queue when the connection closes (ngx_close_connection).
    unsafe {
        ngx_post_event(wev, std::ptr::addr_of_mut!(ngx_posted_next_events));
        ngx_add_timer(wev, SEND_TIMEOUT_MS);
    }
}
