//! This module's per-`upstream {}` (and per stream `server {}`) configuration, and how
//! the rest of the glue finds it: an upstream's `SrvConf`, the cycle's upstreams.

use std::ffi::c_void;
use std::hash::{Hash, Hasher};
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};

use ngx::core::Pool;
use ngx::ffi::*;

use crate::probe::{HcDirective, HealthConf, MatchDef};
use crate::zone::{InitOutcome, SharedZone, Zone};
use upsync_core::balancer::Method;
use upsync_core::conf::{Credential, LbSpec, Target, UpsyncSpec};
use upsync_core::servers::ServerSpec;

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
    /// The balancing method and whether it hashes a key, as the per-connection path
    /// reads them (set with the upstream's initialization, `peer::init_upstream`;
    /// `peer_keyed` is `keyed(peer_method)`, kept so a connection reads one flag).
    pub peer_method: Method,
    pub peer_keyed: bool,
    /// A stock balancing directive in the same block (`least_conn;`, `hash ...;`: the
    /// C module's drop-in form), checked against `lb` after parsing.
    pub stock_lb: Option<crate::stock_lb::StockLb>,
    /// The hash key of `upsync_lb`, compiled; null means `$remote_addr`.
    pub lb_key: *mut ngx_stream_complex_value_t,
    pub uscf: *mut ngx_stream_upstream_srv_conf_t,
    pub name: String,
    /// The `server` lines of the configuration (usually the included dump).
    pub initial: Vec<ServerSpec>,
    pub initialized: bool,
    pub zone: Option<Zone>,
    /// The shared zone the domain is in (set with `zone`).
    pub shared: Option<SharedZone>,
    /// What the zone's initialization found; committed by `init_module`.
    pub outcome: Option<InitOutcome>,
    /// `upstream_show` is set in this (stream server) block.
    pub show: bool,
    /// The address of the stand-in `server` that lets an upsync upstream have no
    /// `server` line (see `directives::add_placeholder`); null when there is none.
    pub placeholder: *mut ngx_addr_t,
    /// The dump file (and directories) this configuration created, handed over to the
    /// worker user when the configuration is committed.
    pub created_dump: Vec<std::path::PathBuf>,
    /// `health_check` of this (stream server) block, before `probe::resolve` ties it
    /// to its upstream.
    pub hc_directive: Option<HcDirective>,
    /// A `health_check` whose values are wrong: the cause and where (`file:line`),
    /// reported by `probe::resolve` once the server's upstream is known, to name it.
    pub hc_error: Option<(String, String)>,
    /// `health_check_timeout` of this (stream server or `stream {}`) block, in ms.
    pub hc_timeout: Option<u64>,
    /// The `match` blocks (`stream {}` level).
    pub matches: Vec<MatchDef>,
    /// The upstream's active health check (upstreams only; see `probe`).
    pub health: Option<HealthConf>,
}

impl SrvConf {
    fn new() -> SrvConf {
        SrvConf {
            upsync: None,
            addrs: Vec::new(),
            credential: None,
            ssl: ptr::null_mut(),
            dump_path: None,
            lb: None,
            peer_method: Method::RoundRobin,
            peer_keyed: false,
            stock_lb: None,
            lb_key: ptr::null_mut(),
            uscf: ptr::null_mut(),
            name: String::new(),
            initial: Vec::new(),
            initialized: false,
            zone: None,
            shared: None,
            outcome: None,
            show: false,
            placeholder: ptr::null_mut(),
            created_dump: Vec::new(),
            hc_directive: None,
            hc_error: None,
            hc_timeout: None,
            matches: Vec::new(),
            health: None,
        }
    }

    /// Where the dump goes (`upsync_dump_path`, else the default `postconfiguration`
    /// sets, see `directives::default_dump_path`).
    pub fn dump_path(&self) -> String {
        self.dump_path
            .clone()
            .unwrap_or_else(|| format!("upsync/servers_{}.conf", self.name))
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

    /// `upsync_lb`'s name for log lines.
    pub fn method_name(&self) -> &'static str {
        self.lb.as_ref().map(|l| l.name()).unwrap_or("roundrobin")
    }

    /// Identifies the upstream's source (name, type, endpoint): a zone keeps its set
    /// across a reload only for the same source, and only its pollers publish there.
    pub fn fingerprint(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.name.hash(&mut h);
        if let Some(u) = &self.upsync {
            u.kind.name().hash(&mut h);
            u.endpoint.to_string().hash(&mut h);
        }
        h.finish()
    }
}

/// `create_srv_conf`: a `SrvConf` owned by the configuration pool (dropped with it).
///
/// # Safety
/// Called by nginx with the configuration being parsed.
pub unsafe extern "C" fn create_srv_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    // SAFETY: nginx calls this with the configuration being parsed, whose pool lives as
    // long as the configuration.
    let pool = unsafe { Pool::from_ngx_pool((*cf).pool) };
    pool.allocate(SrvConf::new()) as *mut c_void
}

/// The module's index among stream modules, registered by the module's
/// preconfiguration hook (nginx assigns it before any configuration is parsed).
static CTX_INDEX: AtomicUsize = AtomicUsize::new(usize::MAX);

pub fn set_ctx_index(index: usize) {
    CTX_INDEX.store(index, Ordering::Relaxed);
}

/// The module's index among stream modules.
pub fn ctx_index() -> usize {
    CTX_INDEX.load(Ordering::Relaxed)
}

/// The tag of the module's shared zones (its address: unique to this module).
pub static ZONE_TAG: u8 = 0;

/// Our configuration of an upstream block.
///
/// # Safety
/// `uscf` is a configured stream upstream (its `srv_conf` array filled by nginx), and the
/// caller holds no other reference to the same `SrvConf` while it uses this one (nginx
/// calls into the module one callback at a time).
pub unsafe fn upstream_conf<'a>(
    uscf: *mut ngx_stream_upstream_srv_conf_t,
) -> Option<&'a mut SrvConf> {
    // SAFETY: per the contract; our slot of `srv_conf` holds what create_srv_conf made.
    unsafe {
        let srv = (*uscf).srv_conf;
        if srv.is_null() {
            return None;
        }
        (*srv.add(ctx_index()) as *mut SrvConf).as_mut()
    }
}

/// Our configuration of a stream `server {}` block.
///
/// # Safety
/// `srv_conf` is the `srv_conf` array of a stream server's context; as `upstream_conf`.
pub unsafe fn server_conf<'a>(srv_conf: *mut *mut c_void) -> Option<&'a mut SrvConf> {
    // SAFETY: per the contract.
    unsafe { (*srv_conf.add(ctx_index()) as *mut SrvConf).as_mut() }
}

/// All stream upstreams of a configuration's main context.
///
/// # Safety
/// `main_conf` is the `main_conf` array of a stream context whose configuration lives as
/// long as the returned slice is used.
pub unsafe fn upstreams_of<'a>(
    main_conf: *mut *mut c_void,
) -> &'a [*mut ngx_stream_upstream_srv_conf_t] {
    // SAFETY: per the contract; the upstream module's main conf holds an array of
    // `nelts` upstream pointers.
    unsafe {
        let umcf = *main_conf.add(ngx_stream_upstream_module.ctx_index)
            as *mut ngx_stream_upstream_main_conf_t;
        if umcf.is_null() || (*umcf).upstreams.nelts == 0 {
            return &[];
        }
        std::slice::from_raw_parts(
            (*umcf).upstreams.elts as *const *mut ngx_stream_upstream_srv_conf_t,
            (*umcf).upstreams.nelts,
        )
    }
}

/// All stream upstreams of a cycle.
///
/// # Safety
/// `cycle` is the running cycle (or the one being committed).
pub unsafe fn cycle_upstreams<'a>(
    cycle: *mut ngx_cycle_t,
) -> &'a [*mut ngx_stream_upstream_srv_conf_t] {
    // SAFETY: per the contract; the stream module's slot of conf_ctx is its context.
    unsafe {
        let ctx = *(*cycle).conf_ctx.add(ngx_stream_module.index) as *mut ngx_stream_conf_ctx_t;
        if ctx.is_null() {
            return &[];
        }
        upstreams_of((*ctx).main_conf)
    }
}

/// The upsync upstreams of a cycle with their configuration.
///
/// # Safety
/// As `cycle_upstreams` and `upstream_conf` (one configuration borrowed at a time).
pub unsafe fn upsync_confs<'a>(cycle: *mut ngx_cycle_t) -> impl Iterator<Item = &'a mut SrvConf> {
    // SAFETY: per the contract.
    unsafe { cycle_upstreams(cycle) }
        .iter()
        // SAFETY: every element is an upstream of the cycle.
        .filter_map(|&u| unsafe { upstream_conf(u) })
        .filter(|c| c.upsync.is_some())
}
