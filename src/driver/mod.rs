//! Connections the module makes itself on nginx's event loop: to registries today (a
//! `Conn` with TLS, owned by a poller), and the pieces any such owner shares: the log
//! capture and TLS session (`Side`), non-blocking writes (`io`), nginx's SSL (`tls`).

mod conn;
pub mod io;
mod side;
mod target;
pub mod tls;

pub use conn::{Conn, ConnError, ConnEvent, ConnOwner, Recv, TlsSetup};
pub use side::Side;
pub use target::PeerTarget;
