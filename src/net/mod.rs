//! The nginx-side networking helpers: non-blocking writes and TLS on nginx connections.
pub mod conn;
pub mod tls;
