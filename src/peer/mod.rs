//! The stream upstream peer callbacks: every connection picks its server from the shared
//! set of its upstream, so a change published by the poller reaches the next connection
//! in every worker at once.

use std::ffi::c_void;
use std::mem::size_of;
use std::ptr;

use ngx::ffi::*;
use ngx::ngx_log_debug_mask;

use crate::ngx_util::{mono_ms, now_sec};
use crate::srv_conf::{upstream_conf, SrvConf};
use crate::zone::Ticket;
use upsync_core::balancer::{pick, Method};
use upsync_core::policy::Rng;

mod upstream;
pub use upstream::{init_upstream, set_peer_method};

/// Per-session state, allocated from the session's pool. Small (64 bytes: nginx serves
/// it from the pool's current block, as it does stock round robin's few words) and
/// written once: what the upstream's configuration holds is read from there. The hash
/// methods get a `KeyedPeerData` that adds the key.
#[repr(C)]
struct PeerData {
    conf: *const SrvConf,
    pool: *mut ngx_pool_t,
    /// The slot this session holds, while it holds one.
    ticket: Option<Ticket>,
    /// Servers tried in `generation`: the bits themselves for sets of up to 64 servers
    /// (`tried_words` 1), else the address of `tried_words` words in the session's
    /// pool; no tracking when `tried_words` is 0.
    tried: u64,
    /// Generation of the set `tried` refers to (its low half).
    generation: u32,
    tried_words: u16,
    method: Method,
    /// The first attempt's server name (`$upstream_addr`), pointing at the name in its
    /// slot: the zone keeps a released slot until every process has passed a quiet
    /// point, so it outlives the session's log line. Copied into the session's pool
    /// when a retry releases the slot for good while the session goes on.
    name: ngx_str_t,
}

const _: () = assert!(size_of::<PeerData>() == 64);

/// `PeerData` of the methods that hash a key (hash, hash_ketama, ip_hash).
#[repr(C)]
struct KeyedPeerData {
    base: PeerData,
    /// The hash key, or the client's address bytes (ip_hash), in the session's or the
    /// connection's memory.
    key: ngx_str_t,
}

pub(super) fn keyed(method: Method) -> bool {
    matches!(
        method,
        Method::IpHash | Method::HashModula | Method::HashKetama
    )
}
thread_local! {
    /// This worker's generator for `random` (not for anything secret).
    static RNG: std::cell::RefCell<Option<Rng>> = const { std::cell::RefCell::new(None) };
}

fn random() -> u64 {
    RNG.with(|r| {
        r.borrow_mut()
            .get_or_insert_with(|| {
                let pid = crate::process::my_pid() as u64;
                Rng::new(pid << 32 ^ crate::ngx_util::mono_ms())
            })
            .next_u64()
    })
}

unsafe extern "C" fn init_peer(
    s: *mut ngx_stream_session_t,
    us: *mut ngx_stream_upstream_srv_conf_t,
) -> ngx_int_t {
    // SAFETY: nginx calls this for a session of an upstream this module set up; our
    // SrvConf is only read here.
    let Some(conf) = (unsafe { upstream_conf(us) }) else {
        return NGX_ERROR as ngx_int_t;
    };
    let Some(zone) = &conf.zone else {
        return NGX_ERROR as ngx_int_t;
    };
    let method = conf.peer_method;
    // SAFETY: the session and its connection are live; the pool outlives the session's
    // upstream use of this data.
    let (c, pool) = unsafe { ((*s).connection, (*(*s).connection).pool) };
    let mut key = ngx_str_t::empty();
    match method {
        Method::HashModula | Method::HashKetama => {
            if conf.lb_key.is_null() {
                // SAFETY: the live client connection.
                key = unsafe { (*c).addr_text };
            // SAFETY: the key was compiled for this stream configuration.
            } else if unsafe { ngx_stream_complex_value(s, conf.lb_key, &mut key) }
                != NGX_OK as ngx_int_t
            {
                return NGX_ERROR as ngx_int_t;
            }
        }
        // SAFETY: the client connection's address, which lives as long as the session.
        Method::IpHash => key = unsafe { ip_bytes((*c).sockaddr, (*c).socklen) },
        _ => {}
    }
    let (n, generation) = zone.set_hint();
    let words = n.div_ceil(64).max(1);
    // SAFETY: allocations from the session's pool: the bitmap zeroed, the data written
    // whole before use (nginx pools align to the word).
    let pd = unsafe {
        let tried = if words > 1 {
            let t = ngx_pcalloc(pool, words * 8) as *mut u64;
            if t.is_null() {
                return NGX_ERROR as ngx_int_t;
            }
            t as u64
        } else {
            0
        };
        let base = PeerData {
            conf,
            pool,
            ticket: None,
            tried,
            // the bitmap is clear: no need to clear it again for this generation
            generation: generation as u32,
            tried_words: words.min(u16::MAX as usize) as u16,
            method,
            name: ngx_str_t::empty(),
        };
        if conf.peer_keyed {
            let pd = ngx_palloc(pool, size_of::<KeyedPeerData>()) as *mut KeyedPeerData;
            if pd.is_null() {
                return NGX_ERROR as ngx_int_t;
            }
            ptr::write(pd, KeyedPeerData { base, key });
            pd as *mut PeerData
        } else {
            let pd = ngx_palloc(pool, size_of::<PeerData>()) as *mut PeerData;
            if pd.is_null() {
                return NGX_ERROR as ngx_int_t;
            }
            ptr::write(pd, base);
            pd
        }
    };
    // SAFETY: the session's upstream is set up by nginx before init_peer.
    unsafe {
        let u = (*s).upstream;
        (*u).peer.data = pd as *mut c_void;
        (*u).peer.get = Some(get_peer);
        (*u).peer.free = Some(free_peer);
        // `notify` is set by get_peer, for a server with failures on record only
        (*u).peer.notify = None;
        (*u).peer.tries = n.max(1) as ngx_uint_t;
        #[cfg(ngx_feature = "ssl")]
        {
            (*u).peer.set_session = Some(set_session);
            (*u).peer.save_session = Some(save_session);
        }
    }
    NGX_OK as ngx_int_t
}

/// The address bytes of a client (ip_hash's key), pointing into `sa`.
///
/// # Safety
/// `sa` is null or points at `len` readable bytes of a socket address.
unsafe fn ip_bytes(sa: *const sockaddr, len: socklen_t) -> ngx_str_t {
    if sa.is_null() {
        return ngx_str_t::empty();
    }
    // SAFETY: per the contract, and each cast is checked against `len` first.
    unsafe {
        match (*sa).sa_family as i32 {
            libc::AF_INET if len as usize >= size_of::<libc::sockaddr_in>() => ngx_str_t {
                len: 4,
                data: &(*(sa as *mut libc::sockaddr_in)).sin_addr as *const _ as *mut u8,
            },
            libc::AF_INET6 if len as usize >= size_of::<libc::sockaddr_in6>() => ngx_str_t {
                len: 16,
                data: &(*(sa as *mut libc::sockaddr_in6)).sin6_addr as *const _ as *mut u8,
            },
            _ => ngx_str_t::empty(),
        }
    }
}

thread_local! {
    /// When this worker last said that an upstream had no servers (monotonic ms).
    static EMPTY_SAID: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// A connection came while the upstream has no servers at all (it started without any
/// and the registry has not answered yet): says so, at most once a second per worker,
/// next to nginx's own "no live upstreams" line.
fn no_servers_yet(log: *mut ngx_log_t, upstream: &ngx_str_t, never_synced: bool) {
    let now = mono_ms();
    if EMPTY_SAID.with(|c| now.saturating_sub(c.get()) < 1000 && c.get() != 0) {
        return;
    }
    EMPTY_SAID.with(|c| c.set(now));
    let name = crate::ngx_util::str_of(upstream);
    let why = if never_synced {
        "waiting for the registry's first answer (or use strong_dependency=on, so nginx starts with the registry's servers)"
    } else {
        "the registry lists none"
    };
    ngx::ngx_log_error!(
        NGX_LOG_ERR,
        log,
        "upsync: upstream \"{name}\" has no servers yet: {why}"
    );
}

impl PeerData {
    fn tried_bits(&mut self) -> &mut [u64] {
        match self.tried_words {
            0 => &mut [],
            1 => std::slice::from_mut(&mut self.tried),
            // SAFETY: `tried` holds the address of `tried_words` words of the session's
            // pool (allocated in init_peer).
            n => unsafe { std::slice::from_raw_parts_mut(self.tried as *mut u64, n as usize) },
        }
    }

    fn is_tried(&self, i: usize) -> bool {
        let w = match self.tried_words {
            0 => return false,
            1 if i < 64 => self.tried,
            1 => return false,
            // SAFETY: as in `tried_bits`, the index checked against the length.
            n if i / 64 < n as usize => unsafe { *(self.tried as *const u64).add(i / 64) },
            _ => return false,
        };
        w & (1u64 << (i % 64)) != 0
    }

    /// No server was tried in this session yet (its first attempt).
    fn nothing_tried(&self) -> bool {
        self.tried_words == 1 && self.tried == 0
    }

    fn mark_tried(&mut self, i: usize) {
        if let Some(w) = self.tried_bits().get_mut(i / 64) {
            *w |= 1u64 << (i % 64);
        }
    }

    /// The set changed between two tries of this session (or this is the first): start
    /// the tried list over.
    fn new_generation(&mut self, generation: u64, servers: usize) {
        self.generation = generation as u32;
        if servers > self.tried_words as usize * 64 {
            // The set grew past the bitmap: track nothing for the rest of this session
            // (retries may revisit a server; sets rarely grow mid-session).
            self.tried_words = 0;
        }
        self.tried_bits().fill(0);
    }

    fn key(&self) -> &[u8] {
        if !self.conf().peer_keyed {
            return &[];
        }
        // SAFETY: a keyed method's data is a KeyedPeerData (init_peer), whose first
        // field is this PeerData.
        let key = unsafe { &(*(self as *const PeerData as *const KeyedPeerData)).key };
        if key.len == 0 {
            return &[];
        }
        // SAFETY: the key lives in the session's pool or the client connection.
        unsafe { std::slice::from_raw_parts(key.data, key.len) }
    }

    /// The upstream's configuration (not borrowed from the session's data: it lives in
    /// the cycle's pool).
    fn conf<'c>(&self) -> &'c SrvConf {
        // SAFETY: the upstream's configuration outlives every session of its cycle.
        unsafe { &*self.conf }
    }
}

/// A copy of `name` in the session's pool: nginx keeps the pointer for
/// `$upstream_addr` and log lines after the server is released (and maybe freed).
///
/// # Safety
/// `pool` is the session's live pool.
unsafe fn pool_name(pool: *mut ngx_pool_t, name: &[u8]) -> *mut ngx_str_t {
    // SAFETY: per the contract; the string header and its bytes are one allocation,
    // written whole.
    unsafe {
        let s = ngx_palloc(pool, size_of::<ngx_str_t>() + name.len()) as *mut ngx_str_t;
        if s.is_null() {
            return s;
        }
        let data = s.add(1) as *mut u8;
        ptr::copy_nonoverlapping(name.as_ptr(), data, name.len());
        *s = ngx_str_t {
            len: name.len(),
            data,
        };
        s
    }
}

/// The event loop's clock (CLOCK_MONOTONIC ms, like `mono_ms`, as of the last event
/// loop iteration): precise enough for slow_start ramps, at no cost per connection.
fn loop_ms() -> u64 {
    // SAFETY: a process-global nginx updates between event loop iterations.
    unsafe { ptr::read_volatile(ptr::addr_of!(ngx_current_msec)) as u64 }
}

unsafe extern "C" fn get_peer(pc: *mut ngx_peer_connection_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: `data` is the PeerData init_peer made for this session; nginx calls one
    // peer callback at a time.
    let pd = unsafe { &mut *(data as *mut PeerData) };
    let now = now_sec();
    let conf = pd.conf();
    let Some(zone) = &conf.zone else {
        return NGX_ERROR as ngx_int_t;
    };
    let mut locked = zone.lock();
    let generation = locked.generation();
    if generation as u32 != pd.generation {
        pd.new_generation(generation, locked.slots().len());
    }
    let chosen = {
        let (mut peers, plan, cursors, mut lc) = locked.pick_parts();
        let (key, untried) = (pd.key(), pd.nothing_tried());
        // Two calls on purpose: each is compiled for its own `tried` (a first attempt,
        // the usual case, asks no tried list at all); through a `dyn Fn` the pick costs
        // a tenth more per connection.
        plan.and_then(|plan| {
            let (method, lc, now_ms) = (pd.method, lc.as_mut(), loop_ms());
            if untried {
                pick(
                    &mut peers,
                    plan,
                    method,
                    key,
                    cursors,
                    lc,
                    now,
                    now_ms,
                    &|_| false,
                    &mut random,
                )
            } else {
                let tried = |i| pd.is_tried(i);
                pick(
                    &mut peers,
                    plan,
                    method,
                    key,
                    cursors,
                    lc,
                    now,
                    now_ms,
                    &tried,
                    &mut random,
                )
            }
        })
    };
    let Some(i) = chosen else {
        let (empty, never_synced) = (
            locked.slots().is_empty(),
            locked.status_ref().last_sync_ms == 0,
        );
        drop(locked);
        // SAFETY: the upstream configuration of a live session.
        let upstream_name = unsafe { &mut (*conf.uscf).host as *mut ngx_str_t };
        if empty {
            // SAFETY: the session's live peer connection and its upstream's name.
            unsafe { no_servers_yet((*pc).log, &*upstream_name, never_synced) };
        }
        // SAFETY: `pc` is the session's live peer connection.
        let log = unsafe {
            (*pc).name = upstream_name;
            (*pc).log
        };
        ngx_log_debug_mask!(
            DebugMask::Stream,
            log,
            "upsync: no server to pick in generation {generation}"
        );
        return NGX_BUSY as ngx_int_t;
    };
    let ticket = locked.acquire(i, now);
    drop(locked);
    pd.mark_tried(i);
    let (sockaddr, socklen, name) = ticket.server();
    let name = if pd.name.len == 0 {
        // the first attempt: the name in the slot (see `PeerData::name`)
        pd.name = ngx_str_t {
            len: name.len(),
            data: name.as_ptr() as *mut u8,
        };
        &mut pd.name as *mut ngx_str_t
    } else {
        // a retry: the first attempt's slot may go while this session lasts, so its
        // name moves into the session's pool, and so does this attempt's
        // SAFETY: the session's pool is live; the first name's slot is retired, not
        // freed, before this process's next quiet point (we are in its session).
        unsafe {
            let first = std::slice::from_raw_parts(pd.name.data, pd.name.len);
            let copy = ngx_pnalloc(pd.pool, first.len()) as *mut u8;
            if !copy.is_null() {
                ptr::copy_nonoverlapping(first.as_ptr(), copy, first.len());
                pd.name.data = copy;
            }
            pool_name(pd.pool, name)
        }
    };
    if name.is_null() {
        pd.zone_release(ticket, false, now);
        return NGX_ERROR as ngx_int_t;
    }
    // A successful connect clears a server's failures once its fail_timeout window has
    // passed (nginx's rule): only a server with failures on record needs the callback
    // (nginx calls `notify` when it is set, after connecting). A failure another session
    // records meanwhile would not be cleared by this connect under nginx's rule either
    // (it restarts the window).
    let notify = if ticket.failing() {
        Some(notify_peer as NotifyFn)
    } else {
        None
    };
    // SAFETY: `pc` is the session's live peer connection. The address points into the
    // slot, which the ticket keeps alive until `free_peer` (after which nginx clears
    // `sockaddr`); the name is the session's copy.
    let log = unsafe {
        (*pc).connection = ptr::null_mut();
        (*pc).sockaddr = sockaddr as *mut sockaddr;
        (*pc).socklen = socklen;
        (*pc).name = name;
        (*pc).notify = notify;
        (*pc).log
    };
    pd.ticket = Some(ticket);
    ngx_log_debug_mask!(
        DebugMask::Stream,
        log,
        "upsync: get peer #{i} of generation {generation}"
    );
    NGX_OK as ngx_int_t
}

impl PeerData {
    fn zone_release(&self, ticket: Ticket, failed: bool, now: i64) {
        if let Some(zone) = &self.conf().zone {
            zone.lock().release(ticket, failed, now);
        }
    }
}

unsafe extern "C" fn free_peer(
    pc: *mut ngx_peer_connection_t,
    data: *mut c_void,
    state: ngx_uint_t,
) {
    // SAFETY: as in `get_peer`.
    let pd = unsafe { &mut *(data as *mut PeerData) };
    let failed = state & NGX_PEER_FAILED as ngx_uint_t != 0;
    if let Some(ticket) = pd.ticket.take() {
        pd.zone_release(ticket, failed, now_sec());
    }
    // SAFETY: the session's live peer connection.
    let log = unsafe {
        if (*pc).tries > 0 {
            (*pc).tries -= 1;
        }
        (*pc).log
    };
    ngx_log_debug_mask!(
        DebugMask::Stream,
        log,
        "upsync: free peer, failed: {failed}"
    );
}

type NotifyFn = unsafe extern "C" fn(*mut ngx_peer_connection_t, *mut c_void, ngx_uint_t);

unsafe extern "C" fn notify_peer(
    pc: *mut ngx_peer_connection_t,
    data: *mut c_void,
    kind: ngx_uint_t,
) {
    if kind != NGX_STREAM_UPSTREAM_NOTIFY_CONNECT as ngx_uint_t {
        return;
    }
    // SAFETY: as in `get_peer`; the connection, when set, is the session's upstream one.
    let (pd, tcp) = unsafe {
        (
            &*(data as *mut PeerData),
            !(*pc).connection.is_null() && (*(*pc).connection).type_ == libc::SOCK_STREAM,
        )
    };
    // a connect only matters to a server with failures on record
    let Some(ticket) = pd.ticket.as_ref().filter(|t| tcp && t.failing()) else {
        return;
    };
    if let Some(zone) = &pd.conf().zone {
        zone.lock().connected(ticket, loop_ms());
    }
}

/// `proxy_ssl_session_reuse on`: offers the server's last TLS session (kept in the zone,
/// so every worker resumes what any worker negotiated, as nginx's upstream zone does).
#[cfg(ngx_feature = "ssl")]
unsafe extern "C" fn set_session(pc: *mut ngx_peer_connection_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: as in `get_peer`.
    let pd = unsafe { &mut *(data as *mut PeerData) };
    let (Some(ticket), Some(zone)) = (&pd.ticket, pd.conf().zone) else {
        return NGX_OK as ngx_int_t;
    };
    let mut der = Vec::new();
    if !zone.lock().session(ticket, &mut der) {
        return NGX_OK as ngx_int_t;
    }
    // SAFETY: nginx calls this with the session's TLS connection set up, before the
    // handshake.
    unsafe { crate::driver::tls::set_session_der((*pc).connection, &der) }
}

/// Keeps the session the handshake produced for the next connection to this server.
#[cfg(ngx_feature = "ssl")]
unsafe extern "C" fn save_session(pc: *mut ngx_peer_connection_t, data: *mut c_void) {
    // SAFETY: as in `get_peer`; nginx calls this after a successful handshake.
    let (pd, der) = unsafe {
        (
            &mut *(data as *mut PeerData),
            crate::driver::tls::session_der((*pc).connection),
        )
    };
    if let (Some(ticket), Some(der), Some(zone)) = (&pd.ticket, der, pd.conf().zone) {
        zone.lock().store_session(ticket, &der);
    }
}
