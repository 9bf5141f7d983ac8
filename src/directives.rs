//! The directives (`upsync`, `upsync_dump_path`, `upsync_lb`, `upstream_show`,
//! `upsync_zone_size`, and the health-check ones, whose handlers are in `probe`): their
//! table and handlers. Values are parsed by `upsync_core::conf`; these handlers move
//! strings in, resolve names, load files, and turn errors into `nginx -t` messages.

use std::ffi::{c_char, c_void};
use std::net::ToSocketAddrs;
use std::ptr;

use ngx::core::{NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::*;
use ngx::{ngx_conf_log_error, ngx_string};

use crate::ngx_util::{pool_str, str_of};
use crate::srv_conf::SrvConf;
use upsync_core::conf::{parse_credential, parse_lb, parse_upsync, Target};

type Handler =
    unsafe extern "C" fn(*mut ngx_conf_t, *mut ngx_command_t, *mut c_void) -> *mut c_char;

/// A directive of this module: every handler gets the `SrvConf` of its block.
const fn command(name: ngx_str_t, type_: u32, set: Handler) -> ngx_command_t {
    ngx_command_t {
        name,
        type_: type_ as ngx_uint_t,
        set: Some(set),
        conf: NGX_STREAM_SRV_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    }
}

pub static mut COMMANDS: [ngx_command_t; 9] = [
    command(
        ngx_string!("upsync"),
        NGX_STREAM_UPS_CONF | NGX_CONF_1MORE,
        cmd_upsync,
    ),
    command(
        ngx_string!("upsync_dump_path"),
        NGX_STREAM_UPS_CONF | NGX_CONF_TAKE1,
        cmd_dump_path,
    ),
    command(
        ngx_string!("upsync_lb"),
        NGX_STREAM_UPS_CONF | NGX_CONF_TAKE123,
        cmd_lb,
    ),
    command(
        ngx_string!("upstream_show"),
        NGX_STREAM_SRV_CONF | NGX_CONF_NOARGS,
        cmd_upstream_show,
    ),
    command(
        ngx_string!("health_check"),
        NGX_STREAM_SRV_CONF | NGX_CONF_ANY,
        crate::probe::cmd_health_check,
    ),
    command(
        ngx_string!("health_check_timeout"),
        NGX_STREAM_MAIN_CONF | NGX_STREAM_SRV_CONF | NGX_CONF_TAKE1,
        crate::probe::cmd_health_check_timeout,
    ),
    command(
        ngx_string!("match"),
        NGX_STREAM_MAIN_CONF | NGX_CONF_BLOCK | NGX_CONF_TAKE1,
        crate::probe::cmd_match,
    ),
    command(
        ngx_string!("upsync_zone_size"),
        NGX_STREAM_MAIN_CONF | NGX_CONF_TAKE1,
        cmd_zone_size,
    ),
    ngx_command_t::empty(),
];

/// The shared zone every upsync upstream lives in.
const SHARED_ZONE: &str = "upsync";

/// The `upsync` zone of the configuration being read, declared with `size` (0: not
/// known yet; `postconfiguration` gives it the default then). Made with the list of its
/// users, which its `init` sets up.
///
/// # Safety
/// `cf` is the configuration being parsed.
unsafe fn shared_zone(cf: *mut ngx_conf_t, size: usize) -> *mut ngx_shm_zone_t {
    // SAFETY: per the contract; the zone is registered under our module's tag, and its
    // users live in the configuration's pool, as long as the zone entry.
    unsafe {
        let Some(mut name) = pool_str((*cf).pool, SHARED_ZONE) else {
            return ptr::null_mut();
        };
        let shm = ngx_shared_memory_add(
            cf,
            &mut name,
            size,
            ptr::addr_of!(crate::srv_conf::ZONE_TAG) as *mut c_void,
        );
        if !shm.is_null() && (*shm).data.is_null() {
            let users = ngx::core::Pool::from_ngx_pool((*cf).pool)
                .allocate(crate::bootstrap::ZoneUsers::default());
            (*shm).data = users as *mut c_void;
            (*shm).init = Some(crate::bootstrap::init_shared);
        }
        shm
    }
}

/// Gives the `upsync` zone its default size when no `upsync_zone_size` set one.
///
/// # Safety
/// `cf` is the configuration just parsed (postconfiguration).
pub unsafe fn default_shared_zone_size(cf: *mut ngx_conf_t) {
    // SAFETY: per the contract; the cycle's zone list holds `nelts` entries per part.
    unsafe {
        let mut part = &mut (*(*cf).cycle).shared_memory.part as *mut ngx_list_part_t;
        while !part.is_null() {
            let zones =
                std::slice::from_raw_parts_mut((*part).elts as *mut ngx_shm_zone_t, (*part).nelts);
            for z in zones {
                let ours = z.tag == ptr::addr_of!(crate::srv_conf::ZONE_TAG) as *mut c_void;
                if ours && str_of(&z.shm.name) == SHARED_ZONE && z.shm.size == 0 {
                    z.shm.size = upsync_core::conf::DEFAULT_SHARED_ZONE_SIZE;
                }
            }
            part = (*part).next;
        }
    }
}

/// `upsync_zone_size SIZE;` (stream block): the size of the shared zone all upsync
/// upstreams live in.
unsafe extern "C" fn cmd_zone_size(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    _conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx calls this with the configuration positioned on the directive.
    let a = unsafe { args(cf) };
    let min = upsync_core::conf::MIN_SHARED_ZONE_SIZE;
    let Some(size) = upsync_core::conf::time::parse_size(&a[0]).filter(|&n| n >= min) else {
        conf_err!(
            cf,
            "upsync_zone_size: invalid size \"{}\": expected a size of at least 1m, such as 256m",
            a[0]
        );
    };
    // SAFETY: as above; nginx reports a size that conflicts with an earlier one.
    if unsafe { shared_zone(cf, size) }.is_null() {
        return NGX_CONF_ERROR;
    }
    NGX_CONF_OK
}

/// The directive's arguments, without the directive name.
///
/// # Safety
/// `cf` is the configuration being parsed, positioned on a directive.
unsafe fn args(cf: *mut ngx_conf_t) -> Vec<String> {
    // SAFETY: per the contract.
    unsafe { crate::ngx_util::conf_words(cf) }.split_off(1)
}

/// The stream upstream block being parsed.
///
/// # Safety
/// `cf` is positioned inside a stream `upstream {}` block.
unsafe fn current_upstream(cf: *mut ngx_conf_t) -> *mut ngx_stream_upstream_srv_conf_t {
    // SAFETY: per the contract the context is a stream context whose upstream module
    // slot holds the block's upstream configuration.
    unsafe {
        let ctx = (*cf).ctx as *mut ngx_stream_conf_ctx_t;
        *(*ctx).srv_conf.add(ngx_stream_upstream_module.ctx_index)
            as *mut ngx_stream_upstream_srv_conf_t
    }
}

unsafe extern "C" fn cmd_upsync(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes our configuration of the upstream being parsed.
    let conf = unsafe { &mut *(conf as *mut SrvConf) };
    // SAFETY: the directive is only allowed in stream upstream blocks.
    let uscf = unsafe { current_upstream(cf) };
    // SAFETY: `uscf` is the live upstream configuration.
    let name = str_of(unsafe { &(*uscf).host });
    if conf.upsync.is_some() {
        conf_err!(
            cf,
            "\"upsync\" is given twice in upstream \"{name}\"; one registry source per upstream"
        );
    }
    // SAFETY: positioned on this directive.
    let a = unsafe { args(cf) };
    let argv: Vec<&str> = a.iter().map(String::as_str).collect();
    let spec = match parse_upsync(&argv) {
        Ok(s) => s,
        Err(e) => conf_err!(cf, "upsync: {e} in upstream \"{name}\""),
    };
    let credential = match &spec.token_file {
        None => None,
        Some(path) => match std::fs::read_to_string(path) {
            Ok(t) => match parse_credential(spec.kind, &t) {
                Ok(c) => {
                    // SAFETY: `cf` is the configuration being parsed.
                    unsafe { warn_readable_secret(cf, path, &name, spec.kind) };
                    Some(c)
                }
                Err(what) => conf_err!(
                    cf,
                    "upsync: token_file \"{path}\" of upstream \"{name}\" {what}"
                ),
            },
            Err(e) => conf_err!(
                cf,
                "upsync: cannot read token_file \"{path}\" of upstream \"{name}\": {e}"
            ),
        },
    };
    let mut addrs = Vec::new();
    for (i, h) in spec.endpoint.hosts.iter().enumerate() {
        match (h.host.as_str(), h.port).to_socket_addrs() {
            Ok(it) => addrs.extend(it.map(|addr| Target { addr, host: i })),
            Err(e) => conf_err!(
                cf,
                "upsync: host \"{}\" of upstream \"{name}\" not found: {e}",
                h.host
            ),
        }
        if !addrs.iter().any(|t| t.host == i) {
            conf_err!(
                cf,
                "upsync: host \"{}\" of upstream \"{name}\" has no addresses",
                h.host
            );
        }
    }
    let ssl = match &spec.tls {
        None => ptr::null_mut(),
        // SAFETY: `cf` is the configuration being parsed; the context lives in its pool.
        Some(tls) => match unsafe { crate::driver::tls::create_context(cf, tls) } {
            Ok(ssl) => ssl,
            Err(e) => conf_err!(cf, "upsync: {e} for upstream \"{name}\""),
        },
    };
    // SAFETY: `uscf` is the live upstream configuration being parsed.
    unsafe {
        if let Some(init) = (*uscf).peer.init_upstream {
            // `least_conn;` or `hash ...;` before `upsync`: checked against upsync_lb
            // once the block is read (see `check_stock_lb`)
            match crate::stock_lb::identify(cf, init) {
                Some(stock) => conf.stock_lb = Some(stock),
                None => conf_err!(
                    cf,
                    "upsync: upstream \"{name}\" already has a load-balancing method (random, or one of another module); remove it and use \"upsync_lb\""
                ),
            }
        }
        (*uscf).peer.init_upstream = Some(crate::peer::init_upstream);
    }
    // SAFETY: `cf` is the configuration being parsed.
    let shm = unsafe { shared_zone(cf, 0) };
    if shm.is_null() {
        return NGX_CONF_ERROR;
    }
    // SAFETY: the zone's users were made with it, in the configuration's pool.
    unsafe {
        let users = &mut *((*shm).data as *mut crate::bootstrap::ZoneUsers);
        users.confs.push(conf as *mut SrvConf);
    }
    // SAFETY: `uscf` is the upstream being parsed; its server list exists.
    if unsafe { add_placeholder(cf, uscf, conf) }.is_err() {
        return NGX_CONF_ERROR;
    }
    conf.upsync = Some(spec);
    conf.addrs = addrs;
    conf.credential = credential;
    conf.ssl = ssl;
    conf.uscf = uscf;
    conf.name = name;
    NGX_CONF_OK
}

/// nginx refuses an upstream block without a `server` line, but an upsync upstream may
/// start from the registry alone: `upsync` adds a stand-in server (127.0.0.1:1,
/// `down`), which `peer::init_upstream` removes again when the block has servers of
/// its own and otherwise keeps out of the set (nginx's round robin, which the `zone`
/// directive copies, then holds one server that is never picked).
///
/// # Safety
/// `uscf` is the stream upstream being parsed (its `servers` array exists).
unsafe fn add_placeholder(
    cf: *mut ngx_conf_t,
    uscf: *mut ngx_stream_upstream_srv_conf_t,
    conf: &mut SrvConf,
) -> Result<(), ()> {
    // SAFETY: per the contract; everything is allocated in the configuration pool and
    // written whole before nginx reads it.
    unsafe {
        let pool = (*cf).pool;
        let sin = ngx_pcalloc(pool, size_of::<libc::sockaddr_in>()) as *mut libc::sockaddr_in;
        let addr = ngx_pcalloc(pool, size_of::<ngx_addr_t>()) as *mut ngx_addr_t;
        let server = ngx_array_push((*uscf).servers) as *mut ngx_stream_upstream_server_t;
        let name = pool_str(pool, "127.0.0.1:1");
        let (false, false, false, Some(name)) =
            (sin.is_null(), addr.is_null(), server.is_null(), name)
        else {
            return Err(());
        };
        (*sin).sin_family = libc::AF_INET as libc::sa_family_t;
        (*sin).sin_port = 1u16.to_be();
        (*sin).sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        *addr = ngx_addr_t {
            sockaddr: sin as *mut sockaddr,
            socklen: size_of::<libc::sockaddr_in>() as socklen_t,
            name,
        };
        ptr::write_bytes(server, 0, 1);
        (*server).name = name;
        (*server).addrs = addr;
        (*server).naddrs = 1;
        (*server).weight = 1;
        (*server).down = 1;
        conf.placeholder = addr;
    }
    Ok(())
}

unsafe extern "C" fn cmd_dump_path(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes our configuration of the upstream being parsed.
    let conf = unsafe { &mut *(conf as *mut SrvConf) };
    if conf.dump_path.is_some() {
        return c"is duplicate".as_ptr() as *mut c_char;
    }
    // SAFETY: positioned on this directive (TAKE1: one argument).
    let path = unsafe { args(cf) }.remove(0);
    if path.is_empty() || path.ends_with('/') {
        conf_err!(cf, "upsync_dump_path: \"{path}\" is not a file path");
    }
    // relative to the configuration's directory, as `include` reads it
    // SAFETY: `cf` is the configuration being parsed.
    let path = unsafe { conf_relative(cf, &path) };
    // SAFETY: as above.
    unsafe { prepare_dump(cf, conf, path, "upsync_dump_path") };
    NGX_CONF_OK
}

/// A credential file others may read gets a warning naming it and its mode. Not for
/// Kubernetes: its token is read again by the workers when it rotates (and a Pod's
/// projected token is mode 0644 by default).
///
/// # Safety
/// `cf` is the configuration being parsed.
unsafe fn warn_readable_secret(
    cf: *mut ngx_conf_t,
    path: &str,
    name: &str,
    kind: upsync_core::conf::SourceKind,
) {
    use std::os::unix::fs::PermissionsExt;
    if kind == upsync_core::conf::SourceKind::Kubernetes {
        return;
    }
    let Ok(m) = std::fs::metadata(path) else {
        return;
    };
    let mode = m.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        ngx_conf_log_error!(
            NGX_LOG_WARN,
            cf,
            "upsync: token_file \"{path}\" of upstream \"{name}\" can be read by group or others (mode {mode:04o}); make it 0600: only nginx's master reads it, with the configuration"
        );
    }
}

/// `path` made absolute against the configuration's directory (nginx's conf prefix).
///
/// # Safety
/// `cf` is the configuration being parsed.
unsafe fn conf_relative(cf: *mut ngx_conf_t, path: &str) -> String {
    if path.starts_with('/') {
        return path.to_string();
    }
    // SAFETY: per the contract the cycle's conf prefix is set.
    let prefix = unsafe { str_of(&(*(*cf).cycle).conf_prefix) };
    format!("{prefix}{path}")
}

/// Makes `path` the upstream's dump: a first start needs no hand-made file, so a
/// missing dump (and its directory) is created empty (an `include` of it that follows
/// works; the registry fills it), and an unsafe place is warned about.
///
/// # Safety
/// `cf` is the configuration being parsed.
unsafe fn prepare_dump(cf: *mut ngx_conf_t, conf: &mut SrvConf, path: String, what: &str) {
    match upsync_core::dump::create_if_missing(std::path::Path::new(&path)) {
        Ok(made) => conf.created_dump = made,
        Err(e) => {
            ngx_conf_log_error!(
                NGX_LOG_WARN,
                cf,
                "{what}: cannot create \"{path}\": {e}; the dump cannot be written until it can"
            );
        }
    }
    for warning in upsync_core::dump::path_warnings(std::path::Path::new(&path)) {
        ngx_conf_log_error!(NGX_LOG_WARN, cf, "{what}: {warning}");
    }
    conf.dump_path = Some(path);
}

/// The C module's drop-in form: a stock `least_conn;` or `hash KEY [consistent];` next
/// to `upsync` is accepted (with a notice) when it is the method `upsync_lb` names, or,
/// for `least_conn;` alone, makes it the method; anything else is refused. Returns the
/// message of a refusal.
pub fn check_stock_lb(conf: &mut SrvConf) -> Result<(), String> {
    use crate::stock_lb::StockLb;
    use upsync_core::balancer::Method;
    let Some(stock) = conf.stock_lb else {
        return Ok(());
    };
    let lb = conf.lb.as_ref().map(|l| l.method);
    let ok = match (stock, lb) {
        (StockLb::LeastConn, None) => {
            conf.lb = upsync_core::conf::parse_lb(&["least_conn"]).ok();
            true
        }
        (StockLb::LeastConn, Some(Method::LeastConn)) => true,
        (StockLb::Hash, Some(Method::HashModula)) => true,
        (StockLb::HashConsistent, Some(Method::HashKetama)) => true,
        _ => false,
    };
    if ok {
        return Ok(());
    }
    let want = match stock {
        StockLb::LeastConn => "upsync_lb least_conn;",
        StockLb::Hash => "upsync_lb hash KEY;",
        StockLb::HashConsistent => "upsync_lb hash_ketama KEY;",
    };
    Err(match lb {
        None => format!(
            "upsync: upstream \"{}\" has \"{}\" without upsync_lb: add \"{want}\" with the same key (upsync balances with upsync_lb)",
            conf.name,
            stock.directive()
        ),
        Some(_) => format!(
            "upsync: upstream \"{}\" has \"{}\" but \"upsync_lb {}\": keep one method (upsync balances with upsync_lb)",
            conf.name,
            stock.directive(),
            conf.method_name()
        ),
    })
}

/// An upsync upstream without `upsync_dump_path` dumps to `upsync/servers_NAME.conf` in
/// the configuration's directory. The C module's default, /tmp/servers_NAME.conf, is
/// kept (with a warning) when that file exists: configurations `include` it.
///
/// # Safety
/// `cf` is the configuration just parsed (postconfiguration).
pub unsafe fn default_dump_path(cf: *mut ngx_conf_t, conf: &mut SrvConf) {
    if conf.dump_path.is_some() || conf.upsync.is_none() {
        return;
    }
    let legacy = format!("/tmp/servers_{}.conf", conf.name);
    // SAFETY: per the contract.
    let default = unsafe { conf_relative(cf, &format!("upsync/servers_{}.conf", conf.name)) };
    if std::fs::symlink_metadata(&legacy).is_ok() {
        ngx_conf_log_error!(
            NGX_LOG_WARN,
            cf,
            "upsync: upstream \"{}\" dumps to \"{legacy}\" (the C module's default, which exists), where other users can reach it; set upsync_dump_path (without it new upstreams dump to \"{default}\")",
            conf.name
        );
        // SAFETY: per the contract.
        unsafe { prepare_dump(cf, conf, legacy, "upsync") };
        return;
    }
    // SAFETY: per the contract.
    unsafe { prepare_dump(cf, conf, default, "upsync") };
}

unsafe extern "C" fn cmd_lb(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes our configuration of the upstream being parsed.
    let conf = unsafe { &mut *(conf as *mut SrvConf) };
    if conf.lb.is_some() {
        return c"is duplicate".as_ptr() as *mut c_char;
    }
    // SAFETY: positioned on this directive.
    let a = unsafe { args(cf) };
    let argv: Vec<&str> = a.iter().map(String::as_str).collect();
    let spec = match parse_lb(&argv) {
        Ok(s) => s,
        Err(e) => conf_err!(cf, "upsync_lb: {e}"),
    };
    if let Some(key) = spec.key.as_deref().filter(|k| *k != "$remote_addr") {
        // Compile the key like nginx's own `hash` directive does.
        // SAFETY: allocations in the configuration pool, initialized before use;
        // `ngx_stream_compile_complex_value` reads `cf` and the value string.
        unsafe {
            let pool = (*cf).pool;
            let value = ngx_palloc(pool, size_of::<ngx_str_t>()) as *mut ngx_str_t;
            let cv = ngx_pcalloc(pool, size_of::<ngx_stream_complex_value_t>())
                as *mut ngx_stream_complex_value_t;
            let (false, false, Some(text)) = (value.is_null(), cv.is_null(), pool_str(pool, key))
            else {
                return NGX_CONF_ERROR;
            };
            *value = text;
            let mut ccv: ngx_stream_compile_complex_value_t = std::mem::zeroed();
            ccv.cf = cf;
            ccv.value = value;
            ccv.complex_value = cv;
            if ngx_stream_compile_complex_value(&mut ccv) != NGX_OK as ngx_int_t {
                return NGX_CONF_ERROR;
            }
            conf.lb_key = cv;
        }
    }
    conf.lb = Some(spec);
    NGX_CONF_OK
}

unsafe extern "C" fn cmd_upstream_show(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes our configuration of the stream server being parsed, whose
    // context holds the core module's server configuration.
    unsafe {
        (*(conf as *mut SrvConf)).show = true;
        let ctx = (*cf).ctx as *mut ngx_stream_conf_ctx_t;
        let cscf = *(*ctx).srv_conf.add(ngx_stream_core_module.ctx_index)
            as *mut ngx_stream_core_srv_conf_t;
        if (*cscf).handler.is_some() {
            conf_err!(cf, "upstream_show: this server already has a content handler (proxy_pass, return, pass or upstream_show)");
        }
        (*cscf).handler = Some(crate::show_handler::handler);
    }
    NGX_CONF_OK
}
