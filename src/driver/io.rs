//! Writing to an nginx connection without blocking: the one loop both the registry
//! connection and `upstream_show` need.

use ngx::ffi::{ngx_connection_t, ngx_handle_write_event, ngx_int_t, NGX_AGAIN, NGX_OK};

pub enum Sent {
    /// Everything is written.
    All,
    /// The socket is full; the write event is armed.
    Again,
    /// The connection failed (the OS error is in errno).
    Error,
}

/// Sends `buf[*sent..]` with the connection's `send`, advancing `*sent`.
///
/// # Safety
/// `c` must be a live nginx connection owned by the caller.
pub unsafe fn send_pending(c: *mut ngx_connection_t, buf: &mut [u8], sent: &mut usize) -> Sent {
    // SAFETY: per the contract `c` is live; `send` is nginx's (plain or TLS) writer and
    // reads at most the given length from the given pointer, which stays in `buf`.
    unsafe {
        let Some(send) = (*c).send else {
            return Sent::Error;
        };
        while *sent < buf.len() {
            let n = send(c, buf.as_mut_ptr().add(*sent), buf.len() - *sent);
            if n > 0 {
                *sent += n as usize;
            } else if n == NGX_AGAIN as isize {
                if ngx_handle_write_event((*c).write, 0) != NGX_OK as ngx_int_t {
                    return Sent::Error;
                }
                return Sent::Again;
            } else {
                return Sent::Error;
            }
        }
    }
    Sent::All
}

/// The pending error of socket `fd` (SO_ERROR; 0: none), or getsockopt's own error.
pub fn so_error(fd: libc::c_int) -> i32 {
    let mut err: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most one c_int into `err`; a bad fd is an error.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            &mut err as *mut _ as *mut std::ffi::c_void,
            &mut len,
        )
    };
    if rc == -1 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        err
    }
}
