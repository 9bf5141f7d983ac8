//! ngx_stream_upsync_module: keeps nginx stream `upstream {}` blocks in sync with service
//! discovery, with no reloads. This crate is the nginx glue; the pure logic (directive
//! values, registry protocols, balancing, formats) is the `upsync_core` crate.
//!
//! Data flow: registry -> poller (one per upstream per nginx instance, elected through
//! shared memory) -> server set in the upstream's shared zone (with a generation number)
//! -> every worker's balancer -> the session's connection.

// nginx's C types differ by platform (time_t, ngx_uint_t, socklen_t): casts that are
// no-ops on x86_64 are needed elsewhere.
#![allow(clippy::unnecessary_cast)]

/// Logs an `nginx -t` error for the directive being parsed and fails it (in a
/// directive handler).
#[cfg(not(test))]
macro_rules! conf_err {
    ($cf:expr, $($arg:tt)+) => {{
        ngx::ngx_conf_log_error!(ngx::ffi::NGX_LOG_EMERG, $cf, $($arg)+);
        return ngx::core::NGX_CONF_ERROR;
    }};
}

#[cfg(not(test))]
mod bootstrap;
#[cfg(not(test))]
mod directives;
#[cfg(not(test))]
mod driver;
#[cfg(not(test))]
pub mod module;
#[cfg(not(test))]
mod ngx_util;
#[cfg(not(test))]
mod peer;
#[cfg(not(test))]
mod poller;
#[cfg(not(test))]
mod probe;
#[cfg(not(test))]
mod process;
#[cfg(not(test))]
mod show_handler;
#[cfg(not(test))]
mod srv_conf;
#[cfg(not(test))]
mod status;
#[cfg(not(test))]
mod stock_lb;
#[cfg(not(test))]
mod zk;
#[cfg(not(test))]
pub mod zone;

#[cfg(not(test))]
use module::ngx_stream_upsync_module;
#[cfg(not(test))]
ngx::ngx_modules!(ngx_stream_upsync_module);
