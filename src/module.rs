//! The nginx module: its table and its hooks (configuration checks, zone
//! initialization, the master's commit, worker start and exit). The directive handlers
//! are in `directives`, the per-upstream configuration in `srv_conf`.

use std::ffi::{c_char, c_void};
use std::ptr;

use ngx::ffi::*;
use ngx::ngx_conf_log_error;

use crate::ngx_util::mono_ms;
use crate::ngx_util::str_of;
use crate::srv_conf::{
    create_srv_conf, cycle_upstreams, server_conf, upstream_conf, upstreams_of, upsync_confs,
    SrvConf,
};
use crate::{bootstrap, directives, poller, probe, show_handler, zk};

static mut MODULE_CTX: ngx_stream_module_t = ngx_stream_module_t {
    preconfiguration: Some(preconfiguration),
    postconfiguration: Some(postconfiguration),
    create_main_conf: None,
    init_main_conf: None,
    create_srv_conf: Some(create_srv_conf),
    merge_srv_conf: None,
};

#[no_mangle]
#[used]
pub static mut ngx_stream_upsync_module: ngx_module_t = ngx_module_t {
    ctx: ptr::addr_of_mut!(MODULE_CTX) as *mut c_void,
    commands: ptr::addr_of_mut!(directives::COMMANDS) as *mut ngx_command_t,
    type_: NGX_STREAM_MODULE as ngx_uint_t,
    init_module: Some(init_module),
    init_process: Some(init_process),
    exit_process: Some(exit_process),
    ..ngx_module_t::default()
};

/// Tells the rest of the glue where nginx keeps this module's configurations.
unsafe extern "C" fn preconfiguration(_cf: *mut ngx_conf_t) -> ngx_int_t {
    // SAFETY: nginx assigned the module's index when it loaded it; read-only now.
    let index = unsafe { (*ptr::addr_of!(ngx_stream_upsync_module)).ctx_index };
    crate::srv_conf::set_ctx_index(index);
    NGX_OK as ngx_int_t
}

/// Checks what single directives cannot: `upstream_show` stays its server's only
/// content handler, `upsync_lb` and `upsync_dump_path` only come with `upsync`, no
/// stock balancer directive follows `upsync`, and each `health_check` checks an upsync
/// upstream (`probe::resolve`).
unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
    // SAFETY: nginx calls this with the stream configuration just parsed; its main
    // context holds the core module's server list and the upstream module's upstreams.
    let (servers, upstreams) = unsafe {
        let ctx = (*cf).ctx as *mut ngx_stream_conf_ctx_t;
        let cmcf = *(*ctx).main_conf.add(ngx_stream_core_module.ctx_index)
            as *mut ngx_stream_core_main_conf_t;
        let servers: &[*mut ngx_stream_core_srv_conf_t] = (*cmcf).servers.as_slice();
        (servers, upstreams_of((*ctx).main_conf))
    };
    let show: unsafe extern "C" fn(*mut ngx_stream_session_t) = show_handler::handler;
    for &cscf in servers {
        // SAFETY: every server of the list is a parsed stream server with a context.
        let (ours, handler, file, line) = unsafe {
            let file = if (*cscf).file_name.is_null() {
                String::new()
            } else {
                std::ffi::CStr::from_ptr((*cscf).file_name as *const c_char)
                    .to_string_lossy()
                    .into_owned()
            };
            (
                server_conf((*(*cscf).ctx).srv_conf),
                (*cscf).handler,
                file,
                (*cscf).line,
            )
        };
        if ours.is_some_and(|c| c.show) && handler.map(|h| h as usize) != Some(show as usize) {
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "upstream_show: the server defined in {file}:{line} also has proxy_pass, return or pass; upstream_show must be its only content handler"
            );
            return NGX_ERROR as ngx_int_t;
        }
    }
    // SAFETY: the configuration just parsed.
    unsafe { directives::default_shared_zone_size(cf) };
    for &uscf in upstreams {
        // SAFETY: an upstream of this configuration; no other borrow of its SrvConf.
        let Some(conf) = (unsafe { upstream_conf(uscf) }) else {
            continue;
        };
        if conf.upsync.is_none() && (conf.lb.is_some() || conf.dump_path.is_some()) {
            // SAFETY: as above.
            let name = str_of(unsafe { &(*uscf).host });
            let what = if conf.lb.is_some() {
                "upsync_lb"
            } else {
                "upsync_dump_path"
            };
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "{what}: upstream \"{name}\" has no \"upsync\"; {what} only applies to upsync upstreams"
            );
            return NGX_ERROR as ngx_int_t;
        }
        // SAFETY: the configuration just parsed.
        unsafe { directives::default_dump_path(cf, conf) };
        if conf.upsync.is_some() && !conf.initialized {
            // a balancing directive after `upsync` replaced its init_upstream
            // SAFETY: the upstream and the configuration just parsed.
            let stock = unsafe { (*uscf).peer.init_upstream }
                // SAFETY: as above.
                .and_then(|init| unsafe { crate::stock_lb::identify(cf, init) });
            let Some(stock) = stock else {
                ngx_conf_log_error!(
                    NGX_LOG_EMERG,
                    cf,
                    "upsync: upstream \"{}\" also has a load-balancing directive (random, or one of another module) after \"upsync\"; remove it and use \"upsync_lb\"",
                    conf.name
                );
                return NGX_ERROR as ngx_int_t;
            };
            conf.stock_lb = Some(stock);
            // SAFETY: as above; upsync's own initialization runs instead.
            if unsafe { crate::peer::init_upstream(cf, uscf) } != NGX_OK as ngx_int_t {
                return NGX_ERROR as ngx_int_t;
            }
        }
        if let Some(stock) = conf.stock_lb {
            if let Err(msg) = directives::check_stock_lb(conf) {
                ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{msg}");
                return NGX_ERROR as ngx_int_t;
            }
            // `least_conn;` alone may have made it the method
            crate::peer::set_peer_method(conf);
            ngx_conf_log_error!(
                NGX_LOG_NOTICE,
                cf,
                "upsync: upstream \"{}\": \"{}\" is upsync_lb's method (the C module's form); upsync balances with it",
                conf.name,
                stock.directive()
            );
        }
    }
    // SAFETY: called from postconfiguration with the stream configuration just parsed.
    if let Err(msg) = unsafe { probe::resolve(cf) } {
        ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{msg}");
        return NGX_ERROR as ngx_int_t;
    }
    NGX_OK as ngx_int_t
}

/// Runs in the master once the configuration is committed (a reload can no longer be
/// rejected; also for `nginx -t`, where it does nothing). Fails only a first start whose
/// `strong_dependency` read fails: a reload never takes the master down.
unsafe extern "C" fn init_module(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    // SAFETY: nginx passes the cycle being committed; `old_cycle` is the running one (an
    // init cycle without configuration at first start), and the core module's
    // configuration is in conf_ctx.
    let (log, first_start, user) = unsafe {
        let ccf = *(*cycle).conf_ctx.add(ngx_core_module.index) as *mut ngx_core_conf_t;
        let user = (!ccf.is_null() && (*ccf).user != 0 && (*ccf).user != u32::MAX as ngx_uid_t)
            .then(|| ((*ccf).user as u32, (*ccf).group as u32));
        ((*cycle).log, (*(*cycle).old_cycle).conf_ctx.is_null(), user)
    };
    // SAFETY: a process-global nginx sets before configurations are read.
    if unsafe { ngx_test_config } != 0 {
        // `nginx -t` may have created dump files: they belong to the worker user too
        // SAFETY: the cycle's upstreams, one configuration at a time.
        for conf in unsafe { upsync_confs(cycle) } {
            bootstrap::hand_over_created(log, conf, user);
        }
        return NGX_OK as ngx_int_t;
    }
    let mut shared = None;
    // SAFETY: the cycle's upstreams, one configuration at a time.
    for conf in unsafe { upsync_confs(cycle) } {
        if bootstrap::commit(log, conf, first_start, user).is_err() {
            return NGX_ERROR as ngx_int_t;
        }
        probe::commit(log, conf);
        shared = shared.or(conf.shared);
    }
    if let Some(shared) = shared {
        bootstrap::sweep(log, &shared);
    }
    NGX_OK as ngx_int_t
}

/// Worker start: a session ledger in every upsync zone, the upstream's poller (one per
/// group of upstreams that share a poll, one ZooKeeper owner per ensemble) and, for a
/// checked upstream, its prober.
unsafe extern "C" fn init_process(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    // SAFETY: process-globals nginx sets before init_process.
    let (process, pid) = (unsafe { ngx_process }, crate::process::my_pid());
    if process != NGX_PROCESS_WORKER as ngx_uint_t && process != NGX_PROCESS_SINGLE as ngx_uint_t {
        return NGX_OK as ngx_int_t;
    }
    let now = mono_ms();
    let mut zookeeper = Vec::new();
    let mut http = Vec::new();
    // SAFETY: the running cycle's upstreams, one configuration at a time.
    for conf in unsafe { upsync_confs(cycle) } {
        if let Some(zone) = conf.zone.as_mut() {
            zone.attach_process(pid, now);
            if conf.upsync.as_ref().is_some_and(|u| u.zookeeper.is_some()) {
                zookeeper.push(conf as *const SrvConf);
            } else {
                http.push(conf as *const SrvConf);
            }
            // SAFETY: called from init_process with the running cycle, whose
            // configuration outlives the worker's probers.
            unsafe { probe::start(conf) };
        }
    }
    // SAFETY: as above; every one of them has its zone.
    unsafe { poller::start_all(&http) };
    // SAFETY: as above.
    unsafe { zk::start(&zookeeper) };
    NGX_OK as ngx_int_t
}

/// Worker exit: pollers and probers give their leases back, and the ledger what
/// sessions still hold.
unsafe extern "C" fn exit_process(cycle: *mut ngx_cycle_t) {
    poller::stop_all();
    zk::stop_all();
    probe::stop_all();
    // SAFETY: the running cycle's upstreams, one configuration at a time.
    for &uscf in unsafe { cycle_upstreams(cycle) } {
        // SAFETY: an upstream of the running cycle.
        if let Some(zone) = unsafe { upstream_conf(uscf) }.and_then(|c| c.zone.as_mut()) {
            zone.detach_process();
        }
    }
}
