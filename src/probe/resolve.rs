//! Postconfiguration: each stream server's `health_check` becomes its upstream's check.
//! The upstream is the one the server's `proxy_pass` names; it must be fed by `upsync`,
//! the `match` must exist, and an upstream is checked by one `health_check`.
//!
//! The stream proxy module keeps its upstream in a configuration struct nginx does not
//! publish; its last two fields have long been the upstream and the variable form of
//! `proxy_pass`. The struct's size is measured once by calling the module's own
//! `create_srv_conf` on a scratch pool, and the word found there is only used when it
//! is one of the configuration's upstreams.

use std::ffi::c_void;
use std::sync::OnceLock;

use ngx::ffi::*;

use super::conf::{HealthConf, Pcre};
use crate::ngx_util::str_of;
use crate::srv_conf::{server_conf, upstream_conf, upstreams_of};
use upsync_core::health::DEFAULT_TIMEOUT_MS;

extern "C" {
    /// nginx's stream proxy module (in nginx, or in the stream module's .so).
    static mut ngx_stream_proxy_module: ngx_module_t;
}

/// Size in words of the proxy module's server configuration (0: unknown).
static PROXY_CONF_WORDS: OnceLock<usize> = OnceLock::new();

/// Measures the proxy module's server configuration: the bytes its `create_srv_conf`
/// takes from a fresh pool.
///
/// # Safety
/// Called while nginx reads a configuration (the proxy module is initialized).
unsafe fn proxy_conf_words(log: *mut ngx_log_t) -> usize {
    *PROXY_CONF_WORDS.get_or_init(|| {
        // SAFETY: per the contract; the scratch pool is ours and destroyed here, and the
        // proxy module's create_srv_conf only allocates its struct from `cf.pool`.
        unsafe {
            let ctx =
                (*std::ptr::addr_of!(ngx_stream_proxy_module)).ctx as *const ngx_stream_module_t;
            let Some(create) = ctx.as_ref().and_then(|c| c.create_srv_conf) else {
                return 0;
            };
            let pool = ngx_create_pool(4096, log);
            if pool.is_null() {
                return 0;
            }
            let mut cf: ngx_conf_t = std::mem::zeroed();
            cf.pool = pool;
            cf.log = log;
            let conf = create(&mut cf);
            let end = (*pool).d.last as usize;
            let words = if conf.is_null() || end <= conf as usize {
                0
            } else {
                (end - conf as usize) / size_of::<*mut c_void>()
            };
            ngx_destroy_pool(pool);
            words
        }
    })
}

/// The upstream a stream server's `proxy_pass` names, if it names one.
///
/// # Safety
/// `srv_conf` is the `srv_conf` array of a parsed stream server;
/// `upstreams` are the configuration's upstreams.
unsafe fn proxy_upstream(
    srv_conf: *mut *mut c_void,
    upstreams: &[*mut ngx_stream_upstream_srv_conf_t],
    log: *mut ngx_log_t,
) -> Option<*mut ngx_stream_upstream_srv_conf_t> {
    // SAFETY: per the contract; the word read lies inside the measured struct.
    unsafe {
        let words = proxy_conf_words(log);
        if words < 2 {
            return None;
        }
        let index = (*std::ptr::addr_of!(ngx_stream_proxy_module)).ctx_index;
        let pscf = *srv_conf.add(index) as *const *mut ngx_stream_upstream_srv_conf_t;
        if pscf.is_null() {
            return None;
        }
        let candidate = *pscf.add(words - 2);
        upstreams.iter().copied().find(|&u| u == candidate)
    }
}

/// Ties every `health_check` to its upstream. Err: the `nginx -t` message.
///
/// # Safety
/// Called from the module's postconfiguration with the stream configuration just
/// parsed (`cf.ctx` is the stream main context).
pub unsafe fn resolve(cf: *mut ngx_conf_t) -> Result<(), String> {
    // SAFETY: per the contract; the main configurations hold the core module's server
    // list and the upstream module's upstreams; the cycle's slot of the stream module
    // is the `stream {}` context (`cf.ctx` is the last server's by now), whose
    // `srv_conf` holds our `stream {}`-level configuration.
    let (servers, upstreams, main, log) = unsafe {
        let ctx = (*cf).ctx as *mut ngx_stream_conf_ctx_t;
        let cmcf = *(*ctx).main_conf.add(ngx_stream_core_module.ctx_index)
            as *mut ngx_stream_core_main_conf_t;
        let servers: &[*mut ngx_stream_core_srv_conf_t] = (*cmcf).servers.as_slice();
        let stream =
            *(*(*cf).cycle).conf_ctx.add(ngx_stream_module.index) as *mut ngx_stream_conf_ctx_t;
        let main = if stream.is_null() {
            None
        } else {
            server_conf((*stream).srv_conf).map(|m| &*m)
        };
        (servers, upstreams_of((*ctx).main_conf), main, (*cf).log)
    };
    let default_timeout = main.as_ref().and_then(|m| m.hc_timeout);
    for &cscf in servers {
        // SAFETY: every server of the list is a parsed stream server with a context.
        let srv_conf = unsafe { (*(*cscf).ctx).srv_conf };
        // SAFETY: as above; no other borrow of the server's SrvConf is live.
        let Some(server) = (unsafe { server_conf(srv_conf) }) else {
            continue;
        };
        if let Some((cause, at)) = &server.hc_error {
            // SAFETY: the server's configuration and the configuration's upstreams.
            let found = unsafe { proxy_upstream(srv_conf, upstreams, log) };
            return Err(match found {
                Some(u) => {
                    // SAFETY: an upstream of this configuration.
                    let name = str_of(unsafe { &(*u).host });
                    format!("health_check (at {at}): upstream \"{name}\": {cause}")
                }
                None => format!("health_check (at {at}): {cause}"),
            });
        }
        let Some(hc) = server.hc_directive.clone() else {
            continue;
        };
        let at = &hc.at;
        let named = |u: &*mut ngx_stream_upstream_srv_conf_t| {
            // SAFETY: an upstream of this configuration.
            let flags = unsafe { (**u).flags };
            flags & NGX_STREAM_UPSTREAM_CREATE as ngx_uint_t != 0
        };
        // SAFETY: the server's configuration and the configuration's upstreams.
        let found = unsafe { proxy_upstream(srv_conf, upstreams, log) };
        let Some(uscf) = found.filter(named) else {
            return Err(format!(
                "health_check (at {at}): its server must proxy_pass to an upstream {{}} block by name (not an address or a variable)"
            ));
        };
        // SAFETY: an upstream of this configuration.
        let name = str_of(unsafe { &(*uscf).host });
        // SAFETY: as above; the server's SrvConf is not used past this point.
        let Some(ups) = (unsafe { upstream_conf(uscf) }).filter(|u| u.upsync.is_some()) else {
            return Err(format!(
                "health_check (at {at}): upstream \"{name}\" is not fed by \"upsync\"; this module checks upsync upstreams only"
            ));
        };
        if let Some(other) = &ups.health {
            return Err(format!(
                "health_check (at {at}): upstream \"{name}\" is already checked by the health_check at {}; one health_check per upstream",
                other.at
            ));
        }
        let timeout_ms = server
            .hc_timeout
            .or(default_timeout)
            .unwrap_or(DEFAULT_TIMEOUT_MS);
        let (rule, regex) = match &hc.spec.match_name {
            None => (None, std::ptr::null_mut()),
            Some(m) => {
                let Some(def) = main
                    .as_ref()
                    .and_then(|c| c.matches.iter().find(|d| &d.rule.name == m))
                else {
                    return Err(format!(
                        "health_check (at {at}): match \"{m}\" of upstream \"{name}\" is not defined (match {m} {{ ... }} at stream level)"
                    ));
                };
                if let Some(e) = &def.error {
                    return Err(format!(
                        "health_check (at {at}): upstream \"{name}\": match \"{m}\" (at {}): {e}",
                        def.at
                    ));
                }
                (Some(def.rule.clone()), def.regex)
            }
        };
        if hc.spec.udp && rule.as_ref().is_some_and(|r| r.send.is_empty()) {
            return Err(format!(
                "health_check (at {at}): \"udp\" with match \"{}\" needs \"send\" in the match block (a UDP check sends a datagram)",
                hc.spec.match_name.as_deref().unwrap_or_default()
            ));
        }
        ups.health = Some(HealthConf {
            spec: hc.spec.clone(),
            timeout_ms,
            rule,
            regex: Pcre(regex),
            at: hc.at.clone(),
        });
    }
    // a bad match block that no check uses is refused all the same
    if let Some(d) = main
        .as_ref()
        .and_then(|c| c.matches.iter().find(|d| d.error.is_some()))
    {
        return Err(format!(
            "match \"{}\" (at {}): {}",
            d.rule.name,
            d.at,
            d.error.as_deref().unwrap_or_default()
        ));
    }
    Ok(())
}
