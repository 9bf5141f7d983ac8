//! The nginx module: its table, directives, configuration structs and process hooks.
//! Directive values are parsed by `conf`; this file only moves strings in and errors out.

use std::collections::hash_map::DefaultHasher;
use std::ffi::{c_char, c_void};
use std::hash::{Hash, Hasher};
use std::net::ToSocketAddrs;
use std::ptr;

use ngx::ffi::*;
use ngx::{ngx_conf_log_error, ngx_string};

use upsync_core::balancer::{Method, Plan};
use upsync_core::conf::{
    parse_credential, parse_lb, parse_upsync, Credential, LbSpec, Target, UpsyncSpec,
};
use upsync_core::servers::ServerSpec;
use crate::zone::{InitOutcome, Zone, ZoneError};
use crate::{peer, poller, show_handler};

/// Per-`upstream {}` (and per `server {}`) configuration of this module.
pub struct SrvConf {
    pub upsync: Option<UpsyncSpec>,
    /// Registry addresses, resolved when the configuration is read: every address of
    /// the first host, then of the next (the failover order).
    pub addrs: Vec<Target>,
    /// The registry credential from `token_file=` (never logged or shown).
    pub credential: Option<Credential>,
    /// The TLS context (`ngx_ssl_t`) for `https://` registries; null for plain http.
    pub ssl: *mut c_void,
    pub dump_path: Option<String>,
    pub lb: Option<LbSpec>,
    /// The hash key of `upsync_lb`, compiled; null means `$remote_addr`.
    pub lb_key: *mut ngx_stream_complex_value_t,
    pub uscf: *mut ngx_stream_upstream_srv_conf_t,
    pub name: String,
    /// The `server` lines of the configuration (usually the included dump).
    pub initial: Vec<ServerSpec>,
    pub initialized: bool,
    pub shm_zone: *mut ngx_shm_zone_t,
    pub zone: Option<Zone>,
    /// What the zone's initialization found; committed by `init_module`.
    pub outcome: Option<InitOutcome>,
    /// The plan of the configured servers, kept for a source switch's commit.
    pub switch_plan: Option<Plan>,
    /// `upstream_show` is set in this (stream server) block.
    pub show: bool,
}

impl SrvConf {
    pub fn dump_path(&self) -> String {
        self.dump_path
            .clone()
            .unwrap_or_else(|| format!("/tmp/servers_{}.conf", self.name))
    }

    /// `upsync: upstream "NAME" (consul 127.0.0.1:8500/v1/kv/...)` — the prefix of every
    /// runtime log line, naming the upstream and the registry.
    pub fn log_prefix(&self) -> String {
        match &self.upsync {
            Some(u) => format!(
                "upsync: upstream \"{}\" ({} {})",
                self.name,
                u.kind.name(),
                u.endpoint
            ),
            None => format!("upsync: upstream \"{}\"", self.name),
        }
    }

    /// The name checked against the registry's certificate (and sent in SNI) for one
    /// of its addresses: `ssl_name=`, or the host as configured.
    pub fn tls_name(&self, t: &Target) -> String {
        let spec = self.upsync.as_ref().expect("upsync configured");
        spec.tls
            .as_ref()
            .and_then(|tls| tls.name.clone())
            .unwrap_or_else(|| spec.endpoint.hosts[t.host].host.clone())
    }

    /// The balancing method (`upsync_lb`, round robin by default).
    pub fn method(&self) -> Method {
        self.lb.as_ref().map(|l| l.method).unwrap_or_default()
    }

    /// Identifies the upstream's source (name, type, endpoint): a zone keeps its set
    /// across a reload only for the same source, and only its pollers publish there.
    pub fn fingerprint(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.name.hash(&mut h);
        if let Some(u) = &self.upsync {
            u.kind.name().hash(&mut h);
            u.endpoint.to_string().hash(&mut h);
        }
        h.finish()
    }
}

static mut NGX_STREAM_UPSYNC_MODULE_CTX: ngx_stream_module_t = ngx_stream_module_t {
    preconfiguration: None,
    postconfiguration: Some(postconfiguration),
    create_main_conf: None,
    init_main_conf: None,
    create_srv_conf: Some(create_srv_conf),
    merge_srv_conf: None,
};

static mut NGX_STREAM_UPSYNC_COMMANDS: [ngx_command_t; 5] = [
    ngx_command_t {
        name: ngx_string!("upsync"),
        type_: (NGX_STREAM_UPS_CONF | NGX_CONF_1MORE) as ngx_uint_t,
        set: Some(cmd_upsync),
        conf: NGX_STREAM_SRV_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("upsync_dump_path"),
        type_: (NGX_STREAM_UPS_CONF | NGX_CONF_TAKE1) as ngx_uint_t,
        set: Some(cmd_dump_path),
        conf: NGX_STREAM_SRV_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("upsync_lb"),
        type_: (NGX_STREAM_UPS_CONF | NGX_CONF_TAKE123) as ngx_uint_t,
        set: Some(cmd_lb),
        conf: NGX_STREAM_SRV_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("upstream_show"),
        type_: (NGX_STREAM_SRV_CONF | NGX_CONF_NOARGS) as ngx_uint_t,
        set: Some(cmd_upstream_show),
        conf: NGX_STREAM_SRV_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t::empty(),
];

#[no_mangle]
#[used]
pub static mut ngx_stream_upsync_module: ngx_module_t = ngx_module_t {
    ctx: ptr::addr_of_mut!(NGX_STREAM_UPSYNC_MODULE_CTX) as *mut c_void,
    commands: ptr::addr_of_mut!(NGX_STREAM_UPSYNC_COMMANDS) as *mut ngx_command_t,
    type_: NGX_STREAM_MODULE as ngx_uint_t,
    init_module: Some(init_module),
    init_process: Some(init_process),
    exit_process: Some(exit_process),
    ..ngx_module_t::default()
};

const CONF_OK: *mut c_char = ptr::null_mut();
const CONF_ERROR: *mut c_char = usize::MAX as *mut c_char;

/// The module's index among stream modules (valid once nginx loaded the module).
pub fn ctx_index() -> usize {
    // SAFETY: written by nginx before any configuration is parsed; read-only afterwards.
    unsafe { (*ptr::addr_of!(ngx_stream_upsync_module)).ctx_index }
}

/// Our configuration of an upstream block.
///
/// # Safety
/// `uscf` must be a configured stream upstream (its `srv_conf` array filled by nginx).
pub unsafe fn upstream_conf<'a>(
    uscf: *mut ngx_stream_upstream_srv_conf_t,
) -> Option<&'a mut SrvConf> {
    let srv = (*uscf).srv_conf;
    if srv.is_null() {
        return None;
    }
    let c = *srv.add(ctx_index()) as *mut SrvConf;
    c.as_mut()
}

fn str_of(s: &ngx_str_t) -> String {
    if s.len == 0 || s.data.is_null() {
        return String::new();
    }
    // SAFETY: nginx strings point at `len` readable bytes.
    String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(s.data, s.len) }).into_owned()
}

/// The directive's arguments, without the directive name.
unsafe fn args(cf: *mut ngx_conf_t) -> Vec<String> {
    let a = &*(*cf).args;
    let v: &[ngx_str_t] = a.as_slice();
    v.iter().skip(1).map(str_of).collect()
}

/// The stream upstream block being parsed.
unsafe fn current_upstream(cf: *mut ngx_conf_t) -> *mut ngx_stream_upstream_srv_conf_t {
    let ctx = (*cf).ctx as *mut ngx_stream_conf_ctx_t;
    *(*ctx).srv_conf.add(ngx_stream_upstream_module.ctx_index)
        as *mut ngx_stream_upstream_srv_conf_t
}

unsafe extern "C" fn drop_conf(data: *mut c_void) {
    drop(Box::from_raw(data as *mut SrvConf));
}

unsafe extern "C" fn create_srv_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    let conf = Box::into_raw(Box::new(SrvConf {
        upsync: None,
        addrs: Vec::new(),
        credential: None,
        ssl: ptr::null_mut(),
        dump_path: None,
        lb: None,
        lb_key: ptr::null_mut(),
        uscf: ptr::null_mut(),
        name: String::new(),
        initial: Vec::new(),
        initialized: false,
        shm_zone: ptr::null_mut(),
        zone: None,
        outcome: None,
        switch_plan: None,
        show: false,
    }));
    // The Rust fields own heap memory: free it with the configuration pool.
    let cln = ngx_pool_cleanup_add((*cf).pool, 0);
    if cln.is_null() {
        drop(Box::from_raw(conf));
        return ptr::null_mut();
    }
    (*cln).handler = Some(drop_conf);
    (*cln).data = conf as *mut c_void;
    conf as *mut c_void
}

macro_rules! conf_err {
    ($cf:expr, $($arg:tt)+) => {{
        ngx_conf_log_error!(NGX_LOG_EMERG, $cf, $($arg)+);
        return CONF_ERROR;
    }};
}

unsafe extern "C" fn cmd_upsync(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let conf = &mut *(conf as *mut SrvConf);
    let uscf = current_upstream(cf);
    let name = str_of(&(*uscf).host);
    if conf.upsync.is_some() {
        conf_err!(
            cf,
            "\"upsync\" is given twice in upstream \"{name}\"; one registry source per upstream"
        );
    }
    let a = args(cf);
    let argv: Vec<&str> = a.iter().map(String::as_str).collect();
    let spec = match parse_upsync(&argv) {
        Ok(s) => s,
        Err(e) => conf_err!(cf, "upsync: {e} in upstream \"{name}\""),
    };
    let credential = match &spec.token_file {
        None => None,
        Some(path) => match std::fs::read_to_string(path) {
            Ok(t) => match parse_credential(spec.kind, &t) {
                Ok(c) => Some(c),
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
        Some(tls) => match crate::net::tls::create_context(cf, tls) {
            Ok(ssl) => ssl,
            Err(e) => conf_err!(cf, "upsync: {e} for upstream \"{name}\""),
        },
    };
    let ours: ngx_stream_upstream_init_pt = Some(peer::init_upstream);
    if (*uscf).peer.init_upstream.is_some() {
        conf_err!(
            cf,
            "upsync: upstream \"{name}\" already has a load-balancing method (least_conn, hash, random); remove it and use \"upsync_lb\""
        );
    }
    (*uscf).peer.init_upstream = ours;

    let mut zname = format!("upsync_{name}").into_bytes();
    let mut zstr = ngx_str_t {
        len: zname.len(),
        data: ngx_pnalloc((*cf).pool, zname.len()) as *mut u8,
    };
    if zstr.data.is_null() {
        return CONF_ERROR;
    }
    ptr::copy_nonoverlapping(zname.as_mut_ptr(), zstr.data, zname.len());
    let shm = ngx_shared_memory_add(
        cf,
        &mut zstr,
        spec.zone_size,
        ptr::addr_of_mut!(ngx_stream_upsync_module) as *mut c_void,
    );
    if shm.is_null() {
        return CONF_ERROR;
    }
    if !(*shm).data.is_null() {
        conf_err!(cf, "upsync: shared zone \"upsync_{name}\" is already used");
    }
    (*shm).init = Some(init_zone);
    (*shm).data = conf as *mut SrvConf as *mut c_void;

    conf.upsync = Some(spec);
    conf.addrs = addrs;
    conf.credential = credential;
    conf.ssl = ssl;
    conf.uscf = uscf;
    conf.name = name;
    conf.shm_zone = shm;
    CONF_OK
}

unsafe extern "C" fn cmd_dump_path(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let conf = &mut *(conf as *mut SrvConf);
    if conf.dump_path.is_some() {
        return c"is duplicate".as_ptr() as *mut c_char;
    }
    let a = args(cf);
    let path = &a[0];
    let dir_ok = match std::path::Path::new(path).parent() {
        Some(d) if !d.as_os_str().is_empty() => d.is_dir(),
        _ => true,
    };
    if path.is_empty() || path.ends_with('/') {
        conf_err!(cf, "upsync_dump_path: \"{path}\" is not a file path");
    }
    if !dir_ok {
        ngx_conf_log_error!(
            NGX_LOG_WARN,
            cf,
            "upsync_dump_path: directory of \"{path}\" does not exist; the dump cannot be written until it does"
        );
    }
    conf.dump_path = Some(path.clone());
    CONF_OK
}

unsafe extern "C" fn cmd_lb(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let conf = &mut *(conf as *mut SrvConf);
    if conf.lb.is_some() {
        return c"is duplicate".as_ptr() as *mut c_char;
    }
    let a = args(cf);
    let argv: Vec<&str> = a.iter().map(String::as_str).collect();
    let spec = match parse_lb(&argv) {
        Ok(s) => s,
        Err(e) => conf_err!(cf, "upsync_lb: {e}"),
    };
    if let Some(key) = spec.key.as_deref().filter(|k| *k != "$remote_addr") {
        // Compile the key like nginx's own `hash` directive does.
        let value = ngx_palloc((*cf).pool, std::mem::size_of::<ngx_str_t>()) as *mut ngx_str_t;
        let cv = ngx_pcalloc(
            (*cf).pool,
            std::mem::size_of::<ngx_stream_complex_value_t>(),
        ) as *mut ngx_stream_complex_value_t;
        let data = ngx_pnalloc((*cf).pool, key.len()) as *mut u8;
        if value.is_null() || cv.is_null() || data.is_null() {
            return CONF_ERROR;
        }
        ptr::copy_nonoverlapping(key.as_ptr(), data, key.len());
        *value = ngx_str_t {
            len: key.len(),
            data,
        };
        let mut ccv: ngx_stream_compile_complex_value_t = std::mem::zeroed();
        ccv.cf = cf;
        ccv.value = value;
        ccv.complex_value = cv;
        if ngx_stream_compile_complex_value(&mut ccv) != NGX_OK as ngx_int_t {
            return CONF_ERROR;
        }
        conf.lb_key = cv;
    }
    conf.lb = Some(spec);
    CONF_OK
}

unsafe extern "C" fn cmd_upstream_show(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    (*(conf as *mut SrvConf)).show = true;
    let ctx = (*cf).ctx as *mut ngx_stream_conf_ctx_t;
    let cscf =
        *(*ctx).srv_conf.add(ngx_stream_core_module.ctx_index) as *mut ngx_stream_core_srv_conf_t;
    if (*cscf).handler.is_some() {
        conf_err!(cf, "upstream_show: this server already has a content handler (proxy_pass, return, pass or upstream_show)");
    }
    (*cscf).handler = Some(show_handler::handler);
    CONF_OK
}

/// All stream upstreams of a configuration's main context.
pub unsafe fn upstreams_of(
    main_conf: *mut *mut c_void,
) -> &'static [*mut ngx_stream_upstream_srv_conf_t] {
    let umcf = *main_conf.add(ngx_stream_upstream_module.ctx_index)
        as *mut ngx_stream_upstream_main_conf_t;
    if umcf.is_null() {
        return &[];
    }
    let arr = &(*umcf).upstreams;
    if arr.nelts == 0 {
        return &[];
    }
    std::slice::from_raw_parts(
        arr.elts as *const *mut ngx_stream_upstream_srv_conf_t,
        arr.nelts,
    )
}

/// All stream upstreams of the running cycle.
pub unsafe fn cycle_upstreams(
    cycle: *mut ngx_cycle_t,
) -> &'static [*mut ngx_stream_upstream_srv_conf_t] {
    let ctx = *(*cycle).conf_ctx.add(ngx_stream_module.index) as *mut ngx_stream_conf_ctx_t;
    if ctx.is_null() {
        return &[];
    }
    upstreams_of((*ctx).main_conf)
}

unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
    let ctx = (*cf).ctx as *mut ngx_stream_conf_ctx_t;
    // `upstream_show` must stay the server's only content handler: a later proxy_pass or
    // return would silently replace it.
    let cmcf =
        *(*ctx).main_conf.add(ngx_stream_core_module.ctx_index) as *mut ngx_stream_core_main_conf_t;
    let servers: &[*mut ngx_stream_core_srv_conf_t] = (*cmcf).servers.as_slice();
    for &cscf in servers {
        let ours = *(*(*cscf).ctx).srv_conf.add(ctx_index()) as *mut SrvConf;
        let show: unsafe extern "C" fn(*mut ngx_stream_session_t) = show_handler::handler;
        if !ours.is_null()
            && (*ours).show
            && (*cscf).handler.map(|h| h as usize) != Some(show as usize)
        {
            let file = if (*cscf).file_name.is_null() {
                String::new()
            } else {
                std::ffi::CStr::from_ptr((*cscf).file_name as *const c_char)
                    .to_string_lossy()
                    .into_owned()
            };
            ngx_conf_log_error!(
                NGX_LOG_EMERG,
                cf,
                "upstream_show: the server defined in {file}:{} also has proxy_pass, return or pass; upstream_show must be its only content handler",
                (*cscf).line
            );
            return NGX_ERROR as ngx_int_t;
        }
    }
    for &uscf in upstreams_of((*ctx).main_conf) {
        if let Some(conf) = upstream_conf(uscf) {
            if conf.upsync.is_none() && (conf.lb.is_some() || conf.dump_path.is_some()) {
                let name = str_of(&(*uscf).host);
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
            if conf.upsync.is_some() && !conf.initialized {
                ngx_conf_log_error!(
                    NGX_LOG_EMERG,
                    cf,
                    "upsync: upstream \"{}\" also has a load-balancing directive (least_conn, hash, random) after \"upsync\"; remove it and use \"upsync_lb\"",
                    conf.name
                );
                return NGX_ERROR as ngx_int_t;
            }
        }
    }
    NGX_OK as ngx_int_t
}

unsafe extern "C" fn init_zone(shm_zone: *mut ngx_shm_zone_t, _old: *mut c_void) -> ngx_int_t {
    let conf = &mut *((*shm_zone).data as *mut SrvConf);
    let pool = (*shm_zone).shm.addr as *mut ngx_slab_pool_t;
    let log = (*shm_zone).shm.log;
    let plan = Plan::for_servers(&conf.initial, conf.method());
    match Zone::init(pool, conf.fingerprint(), &conf.initial, &plan) {
        Ok((zone, outcome)) => {
            conf.zone = Some(zone);
            conf.outcome = Some(outcome);
            if outcome == InitOutcome::Switch {
                conf.switch_plan = Some(plan);
            }
            NGX_OK as ngx_int_t
        }
        Err(e) => {
            ngx::ngx_log_error!(NGX_LOG_EMERG, log, "{}: {e}", conf.log_prefix());
            NGX_ERROR as ngx_int_t
        }
    }
}

/// Runs in the master once the configuration is committed (a reload can no longer be
/// rejected; also for `nginx -t`, where it does nothing): makes a reload's source
/// switches visible, does the `strong_dependency=on` first read at first start, and
/// checks that workers can write each dump file. Fails only a first start whose
/// `strong_dependency` read fails: a reload never takes the master down.
unsafe extern "C" fn init_module(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    if ngx_test_config != 0 {
        return NGX_OK as ngx_int_t;
    }
    let log = (*cycle).log;
    let first_start = (*(*cycle).old_cycle).conf_ctx.is_null();
    let ccf = *(*cycle).conf_ctx.add(ngx_core_module.index) as *mut ngx_core_conf_t;
    for &uscf in cycle_upstreams(cycle) {
        let Some(conf) = upstream_conf(uscf) else {
            continue;
        };
        let (Some(spec), Some(zone)) = (conf.upsync.clone(), conf.zone) else {
            continue;
        };
        if !ccf.is_null() && (*ccf).user != 0 && (*ccf).user != u32::MAX as ngx_uid_t {
            check_dump_dir(log, conf, (*ccf).user as u32, (*ccf).group as u32);
        }
        let stale = upsync_core::dump::remove_stale_temps(
            std::path::Path::new(&conf.dump_path()),
            |pid| crate::process::pid_alive(pid as i64),
        );
        if stale > 0 {
            ngx::ngx_log_error!(
                NGX_LOG_NOTICE,
                log,
                "{}: removed {stale} temporary dump file(s) left by a killed process",
                conf.log_prefix()
            );
        }
        match conf.outcome {
            Some(InitOutcome::Kept) => {
                let n = zone.lock().slots().len();
                ngx::ngx_log_error!(
                    NGX_LOG_NOTICE,
                    log,
                    "{}: keeping the running set of {n} servers across the reload",
                    conf.log_prefix()
                );
                replan(log, conf, zone);
            }
            Some(InitOutcome::Switch) => {
                let plan = conf.switch_plan.take().unwrap_or_default();
                match zone.commit_switch(conf.fingerprint(), &conf.initial, &plan) {
                    Ok(()) => {
                        ngx::ngx_log_error!(
                            NGX_LOG_NOTICE,
                            log,
                            "{}: the source changed: serving the {} configured servers until the registry answers{}",
                            conf.log_prefix(),
                            conf.initial.len(),
                            if spec.strong_dependency { " (strong_dependency applies at first start only)" } else { "" }
                        );
                    }
                    Err(e) => {
                        ngx::ngx_log_error!(
                            NGX_LOG_ERR,
                            log,
                            "{}: the source changed, but the configured servers cannot be applied: {e}; the previous servers serve until the registry answers",
                            conf.log_prefix()
                        );
                    }
                }
            }
            _ => {}
        }
        if first_start
            && spec.strong_dependency
            && strong_dependency_read(log, conf, &spec, zone).is_err()
        {
            return NGX_ERROR as ngx_int_t;
        }
    }
    NGX_OK as ngx_int_t
}

/// A reload kept the zone but changed `upsync_lb`: the running set gets a plan for the
/// new method (old workers' picks fall back to round robin where the plan lacks
/// something their method needs).
fn replan(log: *mut ngx_log_t, conf: &SrvConf, zone: Zone) {
    let method = conf.method();
    let (specs, generation) = {
        let l = zone.lock();
        if l.plan().map(|p| p.method) == Some(method) {
            return;
        }
        (l.specs(), l.generation())
    };
    let plan = Plan::for_servers(&specs, method);
    let mut l = zone.lock();
    if l.generation() != generation {
        return; // a poller published meanwhile (with its own method's plan)
    }
    if let Err(e) = l.replace_plan(&plan) {
        drop(l);
        ngx::ngx_log_error!(
            NGX_LOG_ERR,
            log,
            "{}: cannot build the plan for \"upsync_lb {}\": {e}",
            conf.log_prefix(),
            conf.lb.as_ref().map(|l| l.name()).unwrap_or("roundrobin")
        );
    }
}

/// `strong_dependency=on` at first start: the master reads the registry before any
/// worker runs; nginx does not start when it cannot.
unsafe fn strong_dependency_read(
    log: *mut ngx_log_t,
    conf: &SrvConf,
    spec: &UpsyncSpec,
    zone: Zone,
) -> Result<(), ()> {
    let mut source = upsync_core::registry::source_for(spec, conf.credential.as_ref());
    let timeout = std::time::Duration::from_millis(spec.timeout_ms.clamp(1_000, 5_000));
    let ssl = conf.ssl;
    let wrap = |sock: std::net::TcpStream,
                t: &Target|
     -> Result<Box<dyn crate::blocking::Stream>, String> {
        match &spec.tls {
            None => Ok(Box::new(sock)),
            Some(tls) => {
                let name = conf.tls_name(t);
                let s = crate::net::tls::BlockingTls::connect(ssl, sock, &name, tls.verify)?;
                Ok(Box::new(s))
            }
        }
    };
    match crate::blocking::fetch(
        &conf.addrs,
        &spec.endpoint,
        source.as_mut(),
        3,
        timeout,
        &wrap,
    ) {
        Ok(snap) if snap.servers.is_empty() => {
            ngx::ngx_log_error!(NGX_LOG_WARN, log, "{}: strong_dependency=on: the registry lists no servers; starting with the configured ones", conf.log_prefix());
            Ok(())
        }
        Ok(snap) => {
            let plan = Plan::for_servers(&snap.servers, conf.method());
            let published = {
                let mut l = zone.lock();
                match l.alloc_plan_block(plan.flat_words()) {
                    Some(mut block) => {
                        block.fill(&plan);
                        l.publish(&snap.servers, block, None).map(|_| ())
                    }
                    None => Err(ZoneError::Full {
                        servers: snap.servers.len(),
                    }),
                }
            };
            if let Err(e) = published {
                ngx::ngx_log_error!(NGX_LOG_EMERG, log, "{}: strong_dependency=on: {e}", conf.log_prefix());
                return Err(());
            }
            let path = conf.dump_path();
            if let Err(e) = upsync_core::dump::write_atomic(
                std::path::Path::new(&path),
                upsync_core::dump::render(&snap.servers).as_bytes(),
            ) {
                ngx::ngx_log_error!(
                    NGX_LOG_ERR,
                    log,
                    "{}: cannot write the dump file \"{path}\": {e}",
                    conf.log_prefix()
                );
            }
            ngx::ngx_log_error!(
                NGX_LOG_NOTICE,
                log,
                "{}: strong_dependency=on: starting with {} servers from the registry",
                conf.log_prefix(),
                snap.servers.len()
            );
            Ok(())
        }
        Err(e) => {
            ngx::ngx_log_error!(
                NGX_LOG_EMERG,
                log,
                "{}: strong_dependency=on and the registry cannot be read: {e}; nginx does not start",
                conf.log_prefix()
            );
            Err(())
        }
    }
}

/// Warns at startup when the worker user cannot replace the dump file (the dump is written
/// by a worker, atomically, so it needs write access to the directory).
fn check_dump_dir(log: *mut ngx_log_t, conf: &SrvConf, uid: u32, gid: u32) {
    use std::os::unix::fs::MetadataExt;
    let path = conf.dump_path();
    let dir = match std::path::Path::new(&path).parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let Ok(m) = std::fs::metadata(&dir) else {
        return;
    };
    let mode = m.mode();
    let writable = (m.uid() == uid && mode & 0o200 != 0)
        || (m.gid() == gid && mode & 0o020 != 0)
        || mode & 0o002 != 0;
    if !writable {
        ngx::ngx_log_error!(
            NGX_LOG_WARN,
            log,
            "{}: worker user (uid {uid}) cannot write to \"{}\"; the dump file \"{path}\" will not be updated",
            conf.log_prefix(),
            dir.display()
        );
    }
}

unsafe extern "C" fn init_process(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    if ngx_process != NGX_PROCESS_WORKER as ngx_uint_t
        && ngx_process != NGX_PROCESS_SINGLE as ngx_uint_t
    {
        return NGX_OK as ngx_int_t;
    }
    let now = crate::zone::mono_ms();
    for &uscf in cycle_upstreams(cycle) {
        if let Some(conf) = upstream_conf(uscf) {
            if conf.upsync.is_some() {
                if let Some(zone) = conf.zone.as_mut() {
                    zone.attach_process(ngx_pid as i64, now);
                    poller::start(cycle, conf);
                }
            }
        }
    }
    NGX_OK as ngx_int_t
}

unsafe extern "C" fn exit_process(cycle: *mut ngx_cycle_t) {
    poller::stop_all();
    for &uscf in cycle_upstreams(cycle) {
        if let Some(zone) = upstream_conf(uscf).and_then(|c| c.zone.as_mut()) {
            zone.detach_process();
        }
    }
}
