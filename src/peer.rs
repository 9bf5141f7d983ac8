//! The stream upstream peer callbacks: every connection picks its server from the shared
//! set of its upstream, so a change published by the poller reaches the next connection
//! in every worker at once.

use std::ffi::c_void;
use std::mem::size_of;
use std::net::SocketAddr;
use std::ptr;

use ngx::ffi::*;

use crate::ngx_util::now_sec;

use crate::srv_conf::upstream_conf;
use crate::zone::{mono_ms, Ticket, Zone, NAME_MAX};
use upsync_core::balancer::{pick, Method};
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

/// A per-worker xorshift generator for `random` (not for anything secret).
fn random() -> u64 {
    static mut STATE: u64 = 0;
    // SAFETY: workers are single-threaded; only this function touches STATE, and
    // ngx_cached_time is always valid in a running nginx process.
    unsafe {
        let st = &mut *std::ptr::addr_of_mut!(STATE);
        if *st == 0 {
            *st = (ngx_pid as u64) << 32 ^ (*ngx_cached_time).msec as u64 ^ 0x9e37_79b9_7f4a_7c15;
        }
        *st ^= *st << 13;
        *st ^= *st >> 7;
        *st ^= *st << 17;
        *st
    }
}

/// `init_upstream`: keeps nginx's round-robin data for the configured servers (so the
/// `zone` directive and other readers of `peer.data` still work), records the configured
/// servers as the initial set, and installs our per-session init.
pub unsafe extern "C" fn init_upstream(
    cf: *mut ngx_conf_t,
    us: *mut ngx_stream_upstream_srv_conf_t,
) -> ngx_int_t {
    if ngx_stream_upstream_init_round_robin(cf, us) != NGX_OK as ngx_int_t {
        return NGX_ERROR as ngx_int_t;
    }
    (*us).peer.init = Some(init_peer);
    let Some(conf) = upstream_conf(us) else {
        return NGX_ERROR as ngx_int_t;
    };
    conf.initial = configured_servers(us);
    upsync_core::servers::normalize(&mut conf.initial);
    conf.initialized = true;
    NGX_OK as ngx_int_t
}

/// The `server` lines of an upstream block, one spec per resolved address.
unsafe fn configured_servers(us: *mut ngx_stream_upstream_srv_conf_t) -> Vec<ServerSpec> {
    let mut out = Vec::new();
    if (*us).servers.is_null() {
        return out;
    }
    let servers: &[ngx_stream_upstream_server_t] = (*(*us).servers).as_slice();
    for s in servers {
        for i in 0..s.naddrs {
            let a = &*s.addrs.add(i);
            let Some(addr) = socket_addr(a.sockaddr, a.socklen) else {
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
pub unsafe fn socket_addr(sa: *const sockaddr, len: socklen_t) -> Option<SocketAddr> {
    if sa.is_null() {
        return None;
    }
    match (*sa).sa_family as i32 {
        libc::AF_INET if len as usize >= size_of::<libc::sockaddr_in>() => {
            let sin = &*(sa as *const libc::sockaddr_in);
            let ip = std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::from((ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 if len as usize >= size_of::<libc::sockaddr_in6>() => {
            let sin6 = &*(sa as *const libc::sockaddr_in6);
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
    let Some(conf) = upstream_conf(us) else {
        return NGX_ERROR as ngx_int_t;
    };
    let Some(zone) = conf.zone else {
        return NGX_ERROR as ngx_int_t;
    };
    let c = (*s).connection;
    let pool = (*c).pool;
    let pd = ngx_palloc(pool, size_of::<PeerData>()) as *mut PeerData;
    if pd.is_null() {
        return NGX_ERROR as ngx_int_t;
    }
    let method = conf.lb.as_ref().map(|l| l.method).unwrap_or_default();
    ptr::write(
        pd,
        PeerData {
            zone,
            method,
            pool,
            upstream_name: &mut (*us).host,
            key: ngx_str_t::empty(),
            addr: [0; 16],
            addr_len: 0,
            ticket: None,
            generation: 0,
            tried: ptr::null_mut(),
            tried_words: 0,
            attempts: 0,
            sockaddr: std::mem::zeroed(),
            name: ngx_str_t::empty(),
            name_buf: [0; NAME_MAX],
        },
    );
    match method {
        Method::HashModula | Method::HashKetama => {
            if conf.lb_key.is_null() {
                (*pd).key = (*c).addr_text;
            } else if ngx_stream_complex_value(s, conf.lb_key, &mut (*pd).key)
                != NGX_OK as ngx_int_t
            {
                return NGX_ERROR as ngx_int_t;
            }
        }
        Method::IpHash => {
            if let Some(a) = socket_addr((*c).sockaddr, (*c).socklen) {
                let bytes: Vec<u8> = match a.ip() {
                    std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
                    std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
                };
                (&mut (*pd).addr)[..bytes.len()].copy_from_slice(&bytes);
                (*pd).addr_len = bytes.len() as u8;
            }
        }
        _ => {}
    }
    let n = {
        let locked = zone.lock();
        (*pd).generation = locked.generation();
        locked.slots().len()
    };
    if !alloc_tried(pool, pd, n) {
        return NGX_ERROR as ngx_int_t;
    }
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
    NGX_OK as ngx_int_t
}

unsafe fn alloc_tried(pool: *mut ngx_pool_t, pd: *mut PeerData, n: usize) -> bool {
    let words = n.div_ceil(64).max(1);
    if words > (*pd).tried_words {
        let t = ngx_pcalloc(pool, words * 8) as *mut u64;
        if t.is_null() {
            return false;
        }
        (*pd).tried = t;
        (*pd).tried_words = words;
    } else {
        ptr::write_bytes((*pd).tried, 0, (*pd).tried_words);
    }
    true
}

/// The name nginx keeps for this attempt (`$upstream_addr`, log lines): the session's
/// own buffer for the first attempt, a copy in the session pool for each retry, so
/// every attempt's address stays valid for the life of the session.
unsafe fn attempt_name(pd: &mut PeerData, name: &[u8]) -> *mut ngx_str_t {
    pd.attempts += 1;
    if pd.attempts > 1 {
        let s = ngx_palloc(pd.pool, size_of::<ngx_str_t>()) as *mut ngx_str_t;
        let data = ngx_pnalloc(pd.pool, name.len()) as *mut u8;
        if !s.is_null() && !data.is_null() {
            ptr::copy_nonoverlapping(name.as_ptr(), data, name.len());
            *s = ngx_str_t {
                len: name.len(),
                data,
            };
            return s;
        }
        // out of memory: fall back to the session buffer (the last name wins)
    }
    pd.name_buf[..name.len()].copy_from_slice(name);
    pd.name = ngx_str_t {
        len: name.len(),
        data: pd.name_buf.as_mut_ptr(),
    };
    &mut pd.name
}

unsafe extern "C" fn get_peer(pc: *mut ngx_peer_connection_t, data: *mut c_void) -> ngx_int_t {
    let pd = &mut *(data as *mut PeerData);
    (*pc).connection = ptr::null_mut();
    let now = now_sec();
    let mut locked = pd.zone.lock();
    let gen = locked.generation();
    if gen != pd.generation {
        // The set changed between two tries of this session: start the tried list over.
        pd.generation = gen;
        if locked.slots().len().div_ceil(64) > pd.tried_words {
            // The set grew past the tried bitmap: track nothing for the rest of this
            // session (retries may revisit a server; sets rarely grow mid-session).
            pd.tried_words = 0;
        } else {
            ptr::write_bytes(pd.tried, 0, pd.tried_words);
        }
    }
    let tried_words = pd.tried_words;
    let tried = pd.tried;
    let is_tried = |i: usize| i / 64 < tried_words && *tried.add(i / 64) & (1u64 << (i % 64)) != 0;
    let key: &[u8] = match pd.method {
        Method::IpHash => &pd.addr[..pd.addr_len as usize],
        _ if pd.key.len > 0 => std::slice::from_raw_parts(pd.key.data, pd.key.len),
        _ => &[],
    };
    let chosen = {
        let (mut peers, plan, cursors) = locked.pick_parts();
        match plan {
            Some(plan) => pick(
                &mut peers,
                &plan,
                pd.method,
                key,
                cursors,
                now,
                mono_ms(),
                &is_tried,
                &mut random,
            ),
            None => None,
        }
    };
    let Some(i) = chosen else {
        drop(locked);
        (*pc).name = pd.upstream_name;
        return NGX_BUSY as ngx_int_t;
    };
    let slot = locked.slots()[i];
    let ticket = locked.acquire(i, now);
    if i / 64 < pd.tried_words {
        *pd.tried.add(i / 64) |= 1u64 << (i % 64);
    }
    // Copy the address into session memory: the slot may be freed before the session's
    // log line is written.
    pd.sockaddr = (*slot).sockaddr;
    let mut name = [0u8; NAME_MAX];
    let name_len = (*slot).name().len();
    name[..name_len].copy_from_slice((*slot).name());
    let socklen = (*slot).socklen;
    drop(locked);
    pd.ticket = Some(ticket);
    (*pc).sockaddr = &mut pd.sockaddr as *mut _ as *mut sockaddr;
    (*pc).socklen = socklen;
    (*pc).name = attempt_name(pd, &name[..name_len]);
    NGX_OK as ngx_int_t
}

unsafe extern "C" fn free_peer(
    pc: *mut ngx_peer_connection_t,
    data: *mut c_void,
    state: ngx_uint_t,
) {
    let pd = &mut *(data as *mut PeerData);
    if let Some(ticket) = pd.ticket.take() {
        let failed = state & NGX_PEER_FAILED as ngx_uint_t != 0;
        pd.zone.lock().release(ticket, failed, now_sec());
    }
    if (*pc).tries > 0 {
        (*pc).tries -= 1;
    }
}

unsafe extern "C" fn notify_peer(
    pc: *mut ngx_peer_connection_t,
    data: *mut c_void,
    kind: ngx_uint_t,
) {
    let pd = &mut *(data as *mut PeerData);
    if kind == NGX_STREAM_UPSTREAM_NOTIFY_CONNECT as ngx_uint_t
        && !(*pc).connection.is_null()
        && (*(*pc).connection).type_ == libc::SOCK_STREAM
    {
        if let Some(ticket) = &pd.ticket {
            let mut locked = pd.zone.lock();
            locked.connected(ticket, mono_ms());
        }
    }
}

#[cfg(ngx_feature = "ssl")]
unsafe extern "C" fn set_session(_pc: *mut ngx_peer_connection_t, _data: *mut c_void) -> ngx_int_t {
    NGX_OK as ngx_int_t
}

#[cfg(ngx_feature = "ssl")]
unsafe extern "C" fn save_session(_pc: *mut ngx_peer_connection_t, _data: *mut c_void) {}
