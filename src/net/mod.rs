//! Networking: the pure HTTP parser and the nginx-event client built on it.
pub mod http;
