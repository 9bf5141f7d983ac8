//! ngx_stream_upsync_module: keeps nginx stream `upstream {}` blocks in sync with Consul
//! and etcd, with no reloads.
//!
//! Data flow: registry -> poller (one per upstream per nginx instance, elected through
//! shared memory) -> server set in the upstream's shared zone (with a generation number)
//! -> every worker's balancer -> the session's connection.
//!
//! Pure logic (no nginx symbols): `conf`, `servers`, `dump`, `show`, `net::http`,
//! `registry`, `balancer`. nginx glue: `module`, `zone`, `peer`, `poller`, `client`,
//! `show_handler`.

pub mod balancer;
pub mod conf;
pub mod dump;
pub mod net;
pub mod registry;
pub mod servers;
pub mod show;

#[cfg(not(test))]
pub mod module;
#[cfg(not(test))]
mod peer;
#[cfg(not(test))]
mod poller;
#[cfg(not(test))]
mod show_handler;
#[cfg(not(test))]
pub mod zone;

#[cfg(not(test))]
use module::ngx_stream_upsync_module;
#[cfg(not(test))]
ngx::ngx_modules!(ngx_stream_upsync_module);
