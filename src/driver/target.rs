//! What nginx's `ngx_event_connect_peer` needs for a connection the module makes itself
//! (to a registry, or a health probe): the peer connection with its address and name, at
//! a fixed address (boxed) for as long as the connection lives.

use std::ffi::c_void;
use std::net::SocketAddr;

use ngx::ffi::*;

use crate::zone::sockaddr_of;

pub struct PeerTarget {
    pub pc: ngx_peer_connection_t,
    sockaddr: libc::sockaddr_storage,
    name: ngx_str_t,
    name_buf: Vec<u8>,
}

/// `pc.get` for our own connection: the address is already set.
unsafe extern "C" fn peer_get(_pc: *mut ngx_peer_connection_t, _data: *mut c_void) -> ngx_int_t {
    NGX_OK as ngx_int_t
}

impl PeerTarget {
    /// A peer connection to `addr` (a datagram socket with `udp`), logging into `log`
    /// with nginx's connection errors at `log_error`, one try.
    pub fn new(
        addr: &SocketAddr,
        log: *mut ngx_log_t,
        log_error: ngx_connection_log_error_e,
        udp: bool,
    ) -> Box<PeerTarget> {
        let (sockaddr, len) = sockaddr_of(addr);
        let mut t = Box::new(PeerTarget {
            // SAFETY: ngx_peer_connection_t is plain old data; all-zero is its initial
            // value.
            pc: unsafe { std::mem::zeroed() },
            sockaddr,
            name: ngx_str_t::empty(),
            name_buf: addr.to_string().into_bytes(),
        });
        let t_ref = &mut *t;
        t_ref.name = ngx_str_t {
            len: t_ref.name_buf.len(),
            data: t_ref.name_buf.as_mut_ptr(),
        };
        t_ref.pc.sockaddr = &mut t_ref.sockaddr as *mut _ as *mut sockaddr;
        t_ref.pc.socklen = len;
        t_ref.pc.name = &mut t_ref.name;
        t_ref.pc.get = Some(peer_get);
        t_ref.pc.log = log;
        t_ref.pc.set_log_error(log_error as u32);
        t_ref.pc.tries = 1;
        if udp {
            t_ref.pc.type_ = libc::SOCK_DGRAM;
        }
        t
    }
}
