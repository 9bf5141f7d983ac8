//! The stream upstream peer callbacks: every connection picks its server from the shared
//! set of its upstream, so a change published by the poller reaches the next connection
//! in every worker at once.

use std::ffi::c_void;
use std::mem::size_of;
use std::net::SocketAddr;
use std::ptr;

use ngx::ffi::*;

use upsync_core::balancer::{pick, Method, Plan, PlanPeer};
use crate::module::{upstream_conf, SrvConf};
use upsync_core::servers::ServerSpec;
use crate::zone::{mono_ms, SetPeers, Slot, Zone, NAME_MAX};

/// Per-session state, allocated from the session's pool.
#[repr(C)]
struct PeerData {
    zone: Zone,
    conf: *mut SrvConf,
    upstream_name: *mut ngx_str_t,
    /// The hash key (hash methods) or the client address bytes (ip_hash).
    key: ngx_str_t,
    addr: [u8; 16],
    addr_len: u8,
    /// The slot this session holds a reference on (null when none).
    current: *mut Slot,
    /// Generation of the set `tried` refers to.
    generation: u64,
    tried: *mut u64,
    tried_words: usize,
    sockaddr: libc::sockaddr_storage,
    name: ngx_str_t,
    name_buf: [u8; NAME_MAX],
}

/// A per-worker xorshift generator for `random` (not for anything secret).
fn random() -> u64 {
    static mut STATE: u64 = 0;
    // SAFETY: workers are single-threaded; only this function touches STATE.
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

fn now_sec() -> i64 {
    // SAFETY: ngx_cached_time is always valid in a running nginx process.
    unsafe { (*ngx_cached_time).sec as i64 }
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
    let pool = (*(*s).connection).pool;
    let pd = ngx_pcalloc(pool, size_of::<PeerData>()) as *mut PeerData;
    if pd.is_null() {
        return NGX_ERROR as ngx_int_t;
    }
    (*pd).zone = zone;
    (*pd).conf = conf;
    (*pd).upstream_name = &mut (*us).host;
    let c = (*s).connection;
    match conf.lb.as_ref().map(|l| l.method) {
        Some(Method::HashModula | Method::HashKetama) => {
            if conf.lb_key.is_null() {
                (*pd).key = (*c).addr_text;
            } else if ngx_stream_complex_value(s, conf.lb_key, &mut (*pd).key)
                != NGX_OK as ngx_int_t
            {
                return NGX_ERROR as ngx_int_t;
            }
        }
        Some(Method::IpHash) => {
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

unsafe extern "C" fn get_peer(pc: *mut ngx_peer_connection_t, data: *mut c_void) -> ngx_int_t {
    let pd = &mut *(data as *mut PeerData);
    (*pc).connection = ptr::null_mut();
    let now = now_sec();
    let mut locked = pd.zone.lock();
    let gen = locked.generation();
    let slots = locked.slots();
    if gen != pd.generation {
        // The set changed between two tries of this session: start the tried list over.
        pd.generation = gen;
        if slots.len().div_ceil(64) > pd.tried_words {
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
    let slots_copy: &[*mut Slot] = std::slice::from_raw_parts(slots.as_ptr(), slots.len());
    let conf = &mut *pd.conf;
    // only the method is needed per pick (no clone of the configured key)
    let method = conf.lb.as_ref().map(|l| l.method).unwrap_or_default();
    // This worker's plan follows the set's generation; rebuilt under the lock, once per
    // change and worker.
    if conf.plan.as_ref().map(|p| p.generation) != Some(gen) {
        let names: Vec<String> = slots_copy
            .iter()
            .map(|&s| String::from_utf8_lossy((*s).name()).into_owned())
            .collect();
        let pp: Vec<PlanPeer> = slots_copy
            .iter()
            .zip(&names)
            .map(|(&s, n)| PlanPeer {
                name: n,
                weight: (*s).spec_weight,
                down: (*s).spec_down,
                backup: (*s).spec_backup,
            })
            .collect();
        conf.plan = Some(Plan::build(gen, &pp, method));
    }
    let plan = conf.plan.as_ref().expect("plan built above");
    let key: &[u8] = match method {
        Method::IpHash => &pd.addr[..pd.addr_len as usize],
        _ if pd.key.len > 0 => std::slice::from_raw_parts(pd.key.data, pd.key.len),
        _ => &[],
    };
    let mut peers = SetPeers { slots: slots_copy };
    let mut cursors = locked.hdr.cursors;
    let pick = pick(
        &mut peers,
        plan,
        method,
        key,
        &mut cursors,
        now,
        mono_ms(),
        &is_tried,
        &mut random,
    );
    locked.hdr.cursors = cursors;
    let Some(i) = pick else {
        drop(locked);
        (*pc).name = pd.upstream_name;
        return NGX_BUSY as ngx_int_t;
    };
    let slot = slots_copy[i];
    (*slot).state.picked(now);
    locked.acquire(slot);
    if i / 64 < pd.tried_words {
        *pd.tried.add(i / 64) |= 1u64 << (i % 64);
    }
    // Copy the address into session memory: the slot may be freed before the session's
    // log line is written.
    pd.sockaddr = (*slot).sockaddr;
    let name = (*slot).name();
    pd.name_buf[..name.len()].copy_from_slice(name);
    let socklen = (*slot).socklen;
    drop(locked);
    pd.current = slot;
    pd.name = ngx_str_t {
        len: name.len(),
        data: pd.name_buf.as_mut_ptr(),
    };
    (*pc).sockaddr = &mut pd.sockaddr as *mut _ as *mut sockaddr;
    (*pc).socklen = socklen;
    (*pc).name = &mut pd.name;
    NGX_OK as ngx_int_t
}

unsafe extern "C" fn free_peer(
    pc: *mut ngx_peer_connection_t,
    data: *mut c_void,
    state: ngx_uint_t,
) {
    let pd = &mut *(data as *mut PeerData);
    if !pd.current.is_null() {
        let failed = state & NGX_PEER_FAILED as ngx_uint_t != 0;
        let mut locked = pd.zone.lock();
        locked.release(pd.current, failed, now_sec());
        drop(locked);
        pd.current = ptr::null_mut();
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
        && !pd.current.is_null()
        && !(*pc).connection.is_null()
        && (*(*pc).connection).type_ == libc::SOCK_STREAM
    {
        let _locked = pd.zone.lock();
        let st = &mut (*pd.current).state;
        let was_failed = st.max_fails > 0 && st.fails >= st.max_fails;
        st.connected();
        if was_failed && st.fails == 0 {
            // recovered: ramp up again (slow_start)
            st.ramp_start_ms = mono_ms();
        }
    }
}

#[cfg(ngx_feature = "ssl")]
unsafe extern "C" fn set_session(_pc: *mut ngx_peer_connection_t, _data: *mut c_void) -> ngx_int_t {
    NGX_OK as ngx_int_t
}

#[cfg(ngx_feature = "ssl")]
unsafe extern "C" fn save_session(_pc: *mut ngx_peer_connection_t, _data: *mut c_void) {}
