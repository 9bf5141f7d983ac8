//! Networking: the pure HTTP parser and the nginx-event client built on it.
#[cfg(not(test))]
pub mod conn;
pub mod http;
#[cfg(not(test))]
pub mod tls;
