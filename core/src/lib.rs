//! The pure logic of ngx-stream-upsync: everything that needs no nginx symbol, so it is
//! unit-tested and fuzzed on its own and the compiler keeps it apart from the glue.
//!
//! `conf` directive values, `servers` the server model, `registry` the registry
//! protocols (what to send next, what an answer means; no I/O), `http` the HTTP/1.1
//! request builder and response parser, `balancer` the selection plans and picks, `health`
//! the active health checks (match rules, thresholds, scheduling),
//! `dump` and `show` the file and report formats, `policy` the poller's decisions
//! (pacing, failover, backoff, error de-duplication, the lease) against a clock passed in.

pub mod balancer;
pub mod conf;
pub mod dump;
pub mod health;
pub mod http;
pub mod policy;
pub mod registry;
pub mod servers;
pub mod show;
