//! The module's pure code (no nginx symbols), compiled as its own crate for the fuzzers.
//! The files are the module's own sources, included by path; the module tree mirrors
//! `src/` so their `crate::...` paths resolve. Nothing here is a copy: a change in `src/`
//! is fuzzed as is.
#![allow(dead_code)]

#[path = "../../src/balancer.rs"]
pub mod balancer;
#[path = "../../src/conf/mod.rs"]
pub mod conf;
#[path = "../../src/dump.rs"]
pub mod dump;
pub mod net;
#[path = "../../src/registry/mod.rs"]
pub mod registry;
#[path = "../../src/servers.rs"]
pub mod servers;
#[path = "../../src/show.rs"]
pub mod show;

pub mod check;
