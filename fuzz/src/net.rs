//! `src/net/mod.rs` also declares the nginx-side connection helpers; only the parser is
//! pure.
#[path = "../../src/net/http.rs"]
pub mod http;
