//! ngx_stream_upsync_module: keeps nginx stream `upstream {}` blocks in sync with service
//! discovery, with no reloads. This crate is the nginx glue; the pure logic (directive
//! values, registry protocols, balancing, formats) is the `upsync_core` crate.
//!
//! Data flow: registry -> poller (one per upstream per nginx instance, elected through
//! shared memory) -> server set in the upstream's shared zone (with a generation number)
//! -> every worker's balancer -> the session's connection.

#[cfg(not(test))]
mod blocking;
#[cfg(not(test))]
pub mod module;
#[cfg(not(test))]
pub mod net;
#[cfg(not(test))]
mod peer;
#[cfg(not(test))]
mod poller;
#[cfg(not(test))]
mod process;
#[cfg(not(test))]
mod show_handler;
#[cfg(not(test))]
pub mod zone;

#[cfg(not(test))]
use module::ngx_stream_upsync_module;
#[cfg(not(test))]
ngx::ngx_modules!(ngx_stream_upsync_module);
