//! The stream upstream peer callbacks: every connection picks its server from the shared
//! set of its upstream, so a change published by the poller reaches the next connection
//! in every worker at once.

use std::ffi::c_void;
use std::mem::size_of;
use std::net::SocketAddr;
use std::ptr;

use ngx::ffi::*;
use ngx::ngx_log_debug_mask;

use crate::ngx_util::now_sec;

use crate::ngx_util::mono_ms;
use crate::srv_conf::upstream_conf;
use crate::zone::{Ticket, Zone, NAME_MAX};
use upsync_core::balancer::{pick, Method};
use upsync_core::policy::Rng;
use upsync_core::servers::ServerSpec;

/// Per-session state, allocated from the session's pool.
struct PeerData {
    zone: Zone,
    method: Method,
    pool: *mut ngx_pool_t,
    upstream_name: *mut ngx_str_t,
    /// The hash key (hash methods) or the client address bytes (ip_hash).
    key: ngx_str_t,
    addr: [u8; 16],
    addr_len: u8,
    /// The slot this session holds, while it holds one.
    ticket: Option<Ticket>,
    /// Generation of the set `tried` refers to.
    generation: u64,
    tried: *mut u64,
    tried_words: usize,
    /// Attempts made so far: the first one's name lives in `name_buf`, later ones in the
    /// session pool, so `$upstream_addr` keeps every attempt's address.
    attempts: u32,
    sockaddr: libc::sockaddr_storage,
    name: ngx_str_t,
    name_buf: [u8; NAME_MAX],
}

thread_local! {
    /// This worker's generator for `random` (not for anything secret).
    static RNG: std::cell::RefCell<Option<Rng>> = const { std::cell::RefCell::new(None) };
}

fn random() -> u64 {
    RNG.with(|r| {
        r.borrow_mut()
            .get_or_insert_with(|| {
                // SAFETY: a process-global written before any connection is balanced.
                let pid = unsafe { ngx_pid } as u64;
                Rng::new(pid << 32 ^ crate::ngx_util::mono_ms())
            })
            .next_u64()
    })
}

/// `init_upstream`: keeps nginx's round-robin data for the configured servers (so the
/// `zone` directive and other readers of `peer.data` still work), records the configured
/// servers as the initial set, and installs our per-session init.
///
/// # Safety
/// Called by nginx as the upstream's `init_upstream`, with the configuration parsed.
pub unsafe extern "C" fn init_upstream(
    cf: *mut ngx_conf_t,
    us: *mut ngx_stream_upstream_srv_conf_t,
) -> ngx_int_t {
    // SAFETY: per the contract; nginx's round robin sets up `us.peer.data`, and our
    // SrvConf of the upstream is not borrowed elsewhere during this call.
    let conf = unsafe {
        let Some(conf) = upstream_conf(us) else {
            return NGX_ERROR as ngx_int_t;
        };
        drop_placeholder(us, conf.placeholder);
        if ngx_stream_upstream_init_round_robin(cf, us) != NGX_OK as ngx_int_t {
            return NGX_ERROR as ngx_int_t;
        }
        (*us).peer.init = Some(init_peer);
        conf
    };
    // SAFETY: `us` is the parsed upstream.
    conf.initial = unsafe { configured_servers(us, conf.placeholder) };
    upsync_core::servers::normalize(&mut conf.initial);
    conf.initialized = true;
    NGX_OK as ngx_int_t
}

/// Removes the stand-in server `upsync` added (see `directives::add_placeholder`) when
/// the block has servers of its own.
///
/// # Safety
/// `us` is a parsed stream upstream.
unsafe fn drop_placeholder(us: *mut ngx_stream_upstream_srv_conf_t, placeholder: *mut ngx_addr_t) {
    if placeholder.is_null() {
        return;
    }
    // SAFETY: per the contract `servers` is an array of `nelts` servers; removing one
    // shifts the rest down within the array.
    unsafe {
        let arr = (*us).servers;
        let n = (*arr).nelts;
        let elts = (*arr).elts as *mut ngx_stream_upstream_server_t;
        if n < 2 {
            return; // only the stand-in: it stays, and is never picked
        }
        if let Some(i) = (0..n).find(|&i| (*elts.add(i)).addrs == placeholder) {
            ptr::copy(elts.add(i + 1), elts.add(i), n - i - 1);
            (*arr).nelts = n - 1;
        }
    }
}

/// The `server` lines of an upstream block, one spec per resolved address, without the
/// stand-in `placeholder`.
///
/// # Safety
/// `us` is a parsed stream upstream.
unsafe fn configured_servers(
    us: *mut ngx_stream_upstream_srv_conf_t,
    placeholder: *mut ngx_addr_t,
) -> Vec<ServerSpec> {
    let mut out = Vec::new();
    // SAFETY: per the contract `servers` is null or an array of parsed servers.
    let servers: &[ngx_stream_upstream_server_t] = unsafe {
        if (*us).servers.is_null() {
            return out;
        }
        (*(*us).servers).as_slice()
    };
    for s in servers.iter().filter(|s| s.addrs != placeholder) {
        for i in 0..s.naddrs {
            // SAFETY: a parsed server has `naddrs` resolved addresses.
            let a = unsafe { &*s.addrs.add(i) };
            // SAFETY: each address is a socket address of `socklen` bytes.
            let Some(addr) = (unsafe { socket_addr(a.sockaddr, a.socklen) }) else {
                continue;
            };
            out.push(ServerSpec {
                addr,
                weight: s.weight as u32,
                max_fails: s.max_fails as u32,
                fail_timeout: s.fail_timeout as u32,
                max_conns: s.max_conns as u32,
                down: s.down != 0,
                backup: s.backup() != 0,
                slow_start: 0,
            });
        }
    }
    out
}

/// Reads a C socket address (IPv4/IPv6 only).
///
/// # Safety
/// `sa` is null or points at `len` readable bytes of a socket address.
pub unsafe fn socket_addr(sa: *const sockaddr, len: socklen_t) -> Option<SocketAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: per the contract, and each cast is checked against `len` first.
    match unsafe { (*sa).sa_family } as i32 {
        libc::AF_INET if len as usize >= size_of::<libc::sockaddr_in>() => {
            // SAFETY: checked against `len` above.
            let sin = unsafe { &*(sa as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 if len as usize >= size_of::<libc::sockaddr_in6>() => {
            // SAFETY: as above.
            let sin6 = unsafe { &*(sa as *const libc::sockaddr_in6) };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::from((ip, u16::from_be(sin6.sin6_port))))
        }
        _ => None,
    }
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
    let Some(zone) = conf.zone else {
        return NGX_ERROR as ngx_int_t;
    };
    let method = conf.method();
    // SAFETY: the session and its connection are live; the pool outlives the session's
    // upstream use of this data.
    let (c, pool) = unsafe { ((*s).connection, (*(*s).connection).pool) };
    let mut key = ngx_str_t::empty();
    let mut addr = [0u8; 16];
    let mut addr_len = 0;
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
        Method::IpHash => {
            // SAFETY: the client connection's address.
            if let Some(a) = unsafe { socket_addr((*c).sockaddr, (*c).socklen) } {
                let bytes = match a.ip() {
                    std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
                    std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
                };
                addr[..bytes.len()].copy_from_slice(&bytes);
                addr_len = bytes.len() as u8;
            }
        }
        _ => {}
    }
    let (generation, n) = {
        let locked = zone.lock();
        (locked.generation(), locked.slots().len())
    };
    let words = n.div_ceil(64).max(1);
    // SAFETY: allocations from the session's pool, zeroed (tried) or written whole
    // (PeerData) before use.
    let (pd, tried) = unsafe {
        let tried = ngx_pcalloc(pool, words * 8) as *mut u64;
        let pd = ngx_palloc(pool, size_of::<PeerData>()) as *mut PeerData;
        if tried.is_null() || pd.is_null() {
            return NGX_ERROR as ngx_int_t;
        }
        (pd, tried)
    };
    // SAFETY: `pd` is a fresh allocation of PeerData's size and alignment (nginx pools
    // align to the word).
    unsafe {
        ptr::write(
            pd,
            PeerData {
                zone,
                method,
                pool,
                upstream_name: &mut (*us).host,
                key,
                addr,
                addr_len,
                ticket: None,
                generation,
                tried,
                tried_words: words,
                attempts: 0,
                sockaddr: std::mem::zeroed(),
                name: ngx_str_t::empty(),
                name_buf: [0; NAME_MAX],
            },
        );
    }
    // SAFETY: the session's upstream is set up by nginx before init_peer.
    unsafe {
        let u = (*s).upstream;
        (*u).peer.data = pd as *mut c_void;
        (*u).peer.get = Some(get_peer);
        (*u).peer.free = Some(free_peer);
        (*u).peer.notify = Some(notify_peer);
        (*u).peer.tries = n.max(1) as ngx_uint_t;
        #[cfg(ngx_feature = "ssl")]
        {
            (*u).peer.set_session = Some(set_session);
            (*u).peer.save_session = Some(save_session);
        }
    }
    NGX_OK as ngx_int_t
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
    fn is_tried(&self, i: usize) -> bool {
        // SAFETY: `tried` holds `tried_words` words (allocated in init_peer).
        i / 64 < self.tried_words && unsafe { *self.tried.add(i / 64) } & (1u64 << (i % 64)) != 0
    }

    fn mark_tried(&mut self, i: usize) {
        if i / 64 < self.tried_words {
            // SAFETY: as in `is_tried`.
            unsafe { *self.tried.add(i / 64) |= 1u64 << (i % 64) };
        }
    }

    /// The set changed between two tries of this session: start the tried list over.
    fn new_generation(&mut self, generation: u64, servers: usize) {
        self.generation = generation;
        if servers.div_ceil(64) > self.tried_words {
            // The set grew past the bitmap: track nothing for the rest of this session
            // (retries may revisit a server; sets rarely grow mid-session).
            self.tried_words = 0;
        } else {
            // SAFETY: as in `is_tried`.
            unsafe { ptr::write_bytes(self.tried, 0, self.tried_words) };
        }
    }

    fn key(&self) -> &[u8] {
        match self.method {
            Method::IpHash => &self.addr[..self.addr_len as usize],
            // SAFETY: the key string lives in the session's pool (or the connection).
            _ if self.key.len > 0 => unsafe {
                std::slice::from_raw_parts(self.key.data, self.key.len)
            },
            _ => &[],
        }
    }

    /// The name nginx keeps for this attempt (`$upstream_addr`, log lines): the
    /// session's own buffer for the first attempt, a copy in the session pool for each
    /// retry, so every attempt's address stays valid for the life of the session.
    fn attempt_name(&mut self, name: &[u8]) -> *mut ngx_str_t {
        self.attempts += 1;
        if self.attempts > 1 {
            // SAFETY: allocations from the live session pool, written whole.
            unsafe {
                let s = ngx_palloc(self.pool, size_of::<ngx_str_t>()) as *mut ngx_str_t;
                let data = ngx_pnalloc(self.pool, name.len()) as *mut u8;
                if !s.is_null() && !data.is_null() {
                    ptr::copy_nonoverlapping(name.as_ptr(), data, name.len());
                    *s = ngx_str_t {
                        len: name.len(),
                        data,
                    };
                    return s;
                }
            }
            // out of memory: fall back to the session buffer (the last name wins)
        }
        self.name_buf[..name.len()].copy_from_slice(name);
        self.name = ngx_str_t {
            len: name.len(),
            data: self.name_buf.as_mut_ptr(),
        };
        &mut self.name
    }
}

unsafe extern "C" fn get_peer(pc: *mut ngx_peer_connection_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: `data` is the PeerData init_peer made for this session; nginx calls one
    // peer callback at a time.
    let pd = unsafe { &mut *(data as *mut PeerData) };
    let now = now_sec();
    let zone = pd.zone;
    let mut locked = zone.lock();
    let generation = locked.generation();
    if generation != pd.generation {
        pd.new_generation(generation, locked.slots().len());
    }
    let chosen = {
        let (mut peers, plan, cursors) = locked.pick_parts();
        plan.and_then(|plan| {
            pick(
                &mut peers,
                &plan,
                pd.method,
                pd.key(),
                cursors,
                now,
                mono_ms(),
                &|i| pd.is_tried(i),
                &mut random,
            )
        })
    };
    let Some(i) = chosen else {
        let (empty, never_synced) = (
            locked.slots().is_empty(),
            locked.status_ref().last_sync_ms == 0,
        );
        drop(locked);
        if empty {
            // SAFETY: the session's live peer connection and its upstream's name.
            unsafe { no_servers_yet((*pc).log, &*pd.upstream_name, never_synced) };
        }
        // SAFETY: `pc` is the session's live peer connection.
        let log = unsafe {
            (*pc).name = pd.upstream_name;
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
    pd.mark_tried(i);
    // Copy the address into session memory: the slot may be freed before the session's
    // log line is written.
    let slot = locked.slot(i);
    pd.sockaddr = slot.sockaddr;
    let socklen = slot.socklen;
    let mut name = [0u8; NAME_MAX];
    let name_len = slot.name().len();
    name[..name_len].copy_from_slice(slot.name());
    drop(locked);
    pd.ticket = Some(ticket);
    let name = pd.attempt_name(&name[..name_len]);
    // SAFETY: `pc` is the session's live peer connection; the address and name point
    // into session memory that outlives the attempt.
    let log = unsafe {
        (*pc).connection = ptr::null_mut();
        (*pc).sockaddr = &mut pd.sockaddr as *mut _ as *mut sockaddr;
        (*pc).socklen = socklen;
        (*pc).name = name;
        (*pc).log
    };
    ngx_log_debug_mask!(
        DebugMask::Stream,
        log,
        "upsync: get peer #{i} of generation {generation}, attempt {}",
        pd.attempts
    );
    NGX_OK as ngx_int_t
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
        pd.zone.lock().release(ticket, failed, now_sec());
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

unsafe extern "C" fn notify_peer(
    pc: *mut ngx_peer_connection_t,
    data: *mut c_void,
    kind: ngx_uint_t,
) {
    // SAFETY: as in `get_peer`; the connection, when set, is the session's upstream one.
    let (pd, tcp) = unsafe {
        (
            &mut *(data as *mut PeerData),
            !(*pc).connection.is_null() && (*(*pc).connection).type_ == libc::SOCK_STREAM,
        )
    };
    if kind == NGX_STREAM_UPSTREAM_NOTIFY_CONNECT as ngx_uint_t && tcp {
        if let Some(ticket) = &pd.ticket {
            pd.zone.lock().connected(ticket, mono_ms());
        }
    }
}

/// `proxy_ssl_session_reuse on`: offers the server's last TLS session (kept in the zone,
/// so every worker resumes what any worker negotiated, as nginx's upstream zone does).
#[cfg(ngx_feature = "ssl")]
unsafe extern "C" fn set_session(pc: *mut ngx_peer_connection_t, data: *mut c_void) -> ngx_int_t {
    // SAFETY: as in `get_peer`.
    let pd = unsafe { &mut *(data as *mut PeerData) };
    let Some(ticket) = &pd.ticket else {
        return NGX_OK as ngx_int_t;
    };
    let mut der = Vec::new();
    if !pd.zone.lock().session(ticket, &mut der) {
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
    if let (Some(ticket), Some(der)) = (&pd.ticket, der) {
        pd.zone.lock().store_session(ticket, &der);
    }
}
