//! Which stock balancing directive an upstream has (`least_conn;`, `hash KEY;`, `hash KEY
//! consistent;`), for the C module's drop-in form where one sits next to `upsync_lb`.
//!
//! nginx keeps only the balancer's `init_upstream` function, and those are private to
//! their modules. So each directive's own handler is run once on a scratch upstream
//! (the modules are found by name in the cycle, so an nginx built without one simply
//! never matches it), and the function it installs is remembered.

use std::ffi::{c_void, CStr};
use std::ptr;
use std::sync::OnceLock;

use ngx::ffi::*;

/// A stock balancing directive, as nginx recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StockLb {
    LeastConn,
    Hash,
    HashConsistent,
}

impl StockLb {
    pub fn directive(self) -> &'static str {
        match self {
            StockLb::LeastConn => "least_conn",
            StockLb::Hash => "hash KEY",
            StockLb::HashConsistent => "hash KEY consistent",
        }
    }
}

type InitUpstream =
    unsafe extern "C" fn(*mut ngx_conf_t, *mut ngx_stream_upstream_srv_conf_t) -> ngx_int_t;

/// The `init_upstream` each directive installs (addresses; 0 when unknown).
#[derive(Default)]
struct Known {
    least_conn: usize,
    hash: usize,
    chash: usize,
}

static KNOWN: OnceLock<Known> = OnceLock::new();

/// The stock directive behind `init` (an upstream's `peer.init_upstream`), if it is one
/// of those the drop-in form accepts.
///
/// # Safety
/// `cf` is a stream configuration being read (its context a stream context).
pub unsafe fn identify(cf: *mut ngx_conf_t, init: InitUpstream) -> Option<StockLb> {
    // SAFETY: per the contract.
    let known = KNOWN.get_or_init(|| unsafe { learn(cf) });
    let at = init as usize;
    if at == known.least_conn {
        Some(StockLb::LeastConn)
    } else if at == known.hash {
        Some(StockLb::Hash)
    } else if at == known.chash {
        Some(StockLb::HashConsistent)
    } else {
        None
    }
}

/// Runs the stock handlers on a scratch upstream to learn their functions.
///
/// # Safety
/// As `identify`.
unsafe fn learn(cf: *mut ngx_conf_t) -> Known {
    // SAFETY: per the contract.
    unsafe {
        Known {
            least_conn: probe(
                cf,
                c"ngx_stream_upstream_least_conn_module",
                &[c"least_conn"],
            ),
            hash: probe(cf, c"ngx_stream_upstream_hash_module", &[c"hash", c"x"]),
            chash: probe(
                cf,
                c"ngx_stream_upstream_hash_module",
                &[c"hash", c"x", c"consistent"],
            ),
        }
    }
}

/// The module named `name` among the cycle's modules.
///
/// # Safety
/// `cf` is a configuration being read.
unsafe fn module(cf: *mut ngx_conf_t, name: &CStr) -> *mut ngx_module_t {
    // SAFETY: the cycle's module list is null-terminated and set before any
    // configuration is read.
    unsafe {
        let mut m = (*(*cf).cycle).modules;
        while !m.is_null() && !(*m).is_null() {
            if !(**m).name.is_null() && CStr::from_ptr((**m).name) == name {
                return *m;
            }
            m = m.add(1);
        }
    }
    ptr::null_mut()
}

/// The `init_upstream` the directive `args[0]` of module `name` installs, run with
/// `args` on a scratch upstream and module configuration (0 when it cannot be learnt).
///
/// # Safety
/// As `identify`.
unsafe fn probe(cf: *mut ngx_conf_t, name: &CStr, args: &[&CStr]) -> usize {
    // SAFETY: per the contract `cf` is a stream configuration whose context has the
    // stream modules' configuration arrays; everything the handler writes is scratch
    // memory of this function (a copy of the context pointing at a zeroed upstream and
    // a zeroed module configuration larger than the module's), or the pool's.
    unsafe {
        let m = module(cf, name);
        if m.is_null() || (*m).commands.is_null() {
            return 0;
        }
        let mut cmd = (*m).commands;
        while !(*cmd).name.data.is_null() {
            let n = std::slice::from_raw_parts((*cmd).name.data, (*cmd).name.len);
            if n == args[0].to_bytes() {
                break;
            }
            cmd = cmd.add(1);
        }
        let Some(set) = (*cmd).set.filter(|_| !(*cmd).name.data.is_null()) else {
            return 0;
        };
        let real = (*cf).ctx as *mut ngx_stream_conf_ctx_t;
        let n = ngx_stream_max_module;
        let mut srv: Vec<*mut c_void> = std::slice::from_raw_parts((*real).srv_conf, n).to_vec();
        let mut uscf: ngx_stream_upstream_srv_conf_t = std::mem::zeroed();
        let mut own = [0u64; 128];
        srv[ngx_stream_upstream_module.ctx_index] = &mut uscf as *mut _ as *mut c_void;
        srv[(*m).ctx_index] = own.as_mut_ptr() as *mut c_void;
        let mut ctx = ngx_stream_conf_ctx_t {
            main_conf: (*real).main_conf,
            srv_conf: srv.as_mut_ptr(),
        };
        let mut strs: Vec<ngx_str_t> = args
            .iter()
            .map(|a| ngx_str_t {
                len: a.to_bytes().len(),
                data: a.as_ptr() as *mut u8,
            })
            .collect();
        let mut argv: ngx_array_t = std::mem::zeroed();
        argv.elts = strs.as_mut_ptr() as *mut c_void;
        argv.nelts = strs.len();
        argv.size = size_of::<ngx_str_t>();
        argv.nalloc = strs.len();
        argv.pool = (*cf).pool;
        let mut scratch = *cf;
        scratch.ctx = &mut ctx as *mut _ as *mut c_void;
        scratch.args = &mut argv;
        let rc = set(&mut scratch, cmd, own.as_mut_ptr() as *mut c_void);
        if !rc.is_null() {
            return 0; // NGX_CONF_OK is null
        }
        uscf.peer.init_upstream.map_or(0, |f| f as usize)
    }
}
