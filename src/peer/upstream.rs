//! The upstream's setup when nginx reads the configuration: the configured servers
//! become the initial set, and every session is given this module's peer callbacks.

use std::mem::size_of;
use std::net::SocketAddr;
use std::ptr;

use ngx::ffi::*;

use super::{init_peer, keyed};
use crate::srv_conf::{upstream_conf, SrvConf};
use upsync_core::servers::ServerSpec;

/// Records the balancing method for the per-connection path (after `upsync_lb` and any
/// drop-in stock directive are known).
pub fn set_peer_method(conf: &mut SrvConf) {
    conf.peer_method = conf.method();
    conf.peer_keyed = keyed(conf.peer_method);
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
    set_peer_method(conf);
    // SAFETY: `us` is the parsed upstream.
    let (initial, left_out) = unsafe { configured_servers(us, conf.placeholder) };
    for name in left_out {
        ngx::ngx_conf_log_error!(
            NGX_LOG_WARN,
            cf,
            "upsync: upstream \"{}\": server \"{name}\" is left out: only IP addresses can be synced (and dumped), not unix sockets",
            conf.name
        );
    }
    conf.initial = initial;
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
/// stand-in `placeholder`; and the names of addresses that cannot be synced (unix
/// sockets).
///
/// # Safety
/// `us` is a parsed stream upstream.
unsafe fn configured_servers(
    us: *mut ngx_stream_upstream_srv_conf_t,
    placeholder: *mut ngx_addr_t,
) -> (Vec<ServerSpec>, Vec<String>) {
    let mut out = Vec::new();
    let mut left_out = Vec::new();
    // SAFETY: per the contract `servers` is null or an array of parsed servers.
    let servers: &[ngx_stream_upstream_server_t] = unsafe {
        if (*us).servers.is_null() {
            return (out, left_out);
        }
        (*(*us).servers).as_slice()
    };
    for s in servers.iter().filter(|s| s.addrs != placeholder) {
        for i in 0..s.naddrs {
            // SAFETY: a parsed server has `naddrs` resolved addresses.
            let a = unsafe { &*s.addrs.add(i) };
            // SAFETY: each address is a socket address of `socklen` bytes.
            let Some(addr) = (unsafe { socket_addr(a.sockaddr, a.socklen) }) else {
                left_out.push(crate::ngx_util::str_of(&a.name));
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
    (out, left_out)
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
