//! One connection to a registry address on nginx's event loop: non-blocking connect,
//! TLS (handshake, session resumption, the checks of `proxy_ssl_verify`), sends,
//! receives and the read deadline; closed when dropped. Its owner (a poller today, a
//! shared registry session or a health probe later) gets `ConnEvent`s through
//! `ConnOwner`, from handlers monomorphized for the owner's type.

use std::ffi::c_void;
use std::net::SocketAddr;
use std::ptr;
use std::rc::Rc;

use ngx::ffi::*;

use super::io::{send_pending, Sent};
use super::side::{save_session, Side};
use super::target::PeerTarget;
use super::tls;

/// Why a connection failed. The texts are the log lines' causes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnError {
    #[error("cannot connect to {addr}: {why}")]
    Connect { addr: SocketAddr, why: String },
    #[error("connecting to {addr} timed out")]
    ConnectTimeout { addr: SocketAddr },
    #[error("TLS handshake with {addr} failed: {why}")]
    Handshake { addr: SocketAddr, why: String },
    #[error("TLS handshake with {addr} timed out")]
    HandshakeTimeout { addr: SocketAddr },
    #[error("{why} at {addr}")]
    Verify {
        addr: SocketAddr,
        why: tls::TlsError,
    },
    #[error("sending the request to {addr} failed: {why}")]
    Send { addr: SocketAddr, why: String },
    #[error("reading the response from {addr} failed: {why}")]
    Recv { addr: SocketAddr, why: String },
    #[error("cannot wait for the response{}", if .why.is_empty() { String::new() } else { format!(": {}", .why) })]
    CannotWait { why: String },
    #[error("out of memory for the TLS session")]
    NoMemory,
}

/// What the connection tells its owner.
#[derive(Debug)]
pub enum ConnEvent {
    /// Established (and, with TLS, handshaken and verified): the owner may send.
    Ready,
    /// Bytes can be read, or the peer closed (`recv` says which).
    Readable,
    /// The socket takes more bytes.
    Writable,
    /// The read deadline passed.
    ReadTimeout,
    /// Connecting or the TLS handshake failed.
    Failed(ConnError),
}

/// The owner of a `Conn`, called from nginx's event handlers. Owners live at a fixed
/// address (boxed) for as long as their connection does.
pub trait ConnOwner {
    fn conn_mut(&mut self) -> Option<&mut Conn>;
    fn on_conn_event(&mut self, ev: ConnEvent);
}

/// TLS for an `https://` registry.
#[derive(Clone)]
pub struct TlsSetup {
    /// The upstream's context (`ngx_ssl_t`), made when the configuration was read.
    pub ctx: *mut c_void,
    /// The name sent in SNI and checked against the certificate.
    pub name: String,
    pub verify: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Connecting,
    Handshaking,
    Ready,
}

pub struct Conn {
    inner: Box<PeerTarget>,
    addr: SocketAddr,
    stage: Stage,
    tls: Option<TlsSetup>,
    side: Rc<Side>,
    /// How long connecting and the handshake may take.
    setup_timeout_ms: u64,
}

/// Outcome of `Conn::recv`.
pub enum Recv {
    Data(usize),
    /// The peer closed its side.
    Closed,
    /// Nothing more for now; the read event is armed.
    Again,
    Failed(ConnError),
}

/// Keepalive on registry sockets: a peer or a middlebox that vanished is noticed within
/// about a minute even while a long poll is quiet, and NAT tables see traffic.
const KEEPALIVE_IDLE_S: libc::c_int = 30;
const KEEPALIVE_INTERVAL_S: libc::c_int = 10;
const KEEPALIVE_COUNT: libc::c_int = 3;

fn set_sockopt(fd: libc::c_int, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    // SAFETY: `value` is a live c_int for the call; a failure only loses the option.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const _ as *const c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

impl Conn {
    /// Starts connecting to `addr` for `owner`. Returns the connection and whether it is
    /// ready already (connected at once, and TLS done at once); otherwise `owner` gets
    /// `Ready` or `Failed` later.
    ///
    /// # Safety
    /// `owner` stays at its address, and keeps this connection in the place its
    /// `conn_mut` returns, until the connection is dropped.
    pub unsafe fn connect<O: ConnOwner>(
        owner: *mut O,
        addr: SocketAddr,
        tls: Option<TlsSetup>,
        side: &Rc<Side>,
        setup_timeout_ms: u64,
    ) -> Result<(Conn, bool), ConnError> {
        side.take_captured();
        let mut inner = PeerTarget::new(
            &addr,
            side.log(),
            ngx_connection_log_error_e_NGX_ERROR_ERR,
            false,
        );
        let i = &mut *inner;
        // SAFETY: `pc` is fully set up and stays boxed for the connection's life.
        let rc = unsafe { ngx_event_connect_peer(&mut i.pc) };
        if rc == NGX_ERROR as ngx_int_t
            || rc == NGX_BUSY as ngx_int_t
            || rc == NGX_DECLINED as ngx_int_t
        {
            let why = std::io::Error::last_os_error().to_string();
            return Err(ConnError::Connect { addr, why });
        }
        let c = i.pc.connection;
        // SAFETY: nginx made `c` for this peer connection; its events are ours to set up.
        unsafe {
            (*c).data = owner as *mut c_void;
            // Requests go out whole: no Nagle delay (a request right after the TLS
            // handshake would wait for the registry's delayed ACK, ~40 ms).
            set_sockopt((*c).fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
            set_sockopt((*c).fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
            set_sockopt(
                (*c).fd,
                libc::IPPROTO_TCP,
                libc::TCP_KEEPIDLE,
                KEEPALIVE_IDLE_S,
            );
            set_sockopt(
                (*c).fd,
                libc::IPPROTO_TCP,
                libc::TCP_KEEPINTVL,
                KEEPALIVE_INTERVAL_S,
            );
            set_sockopt(
                (*c).fd,
                libc::IPPROTO_TCP,
                libc::TCP_KEEPCNT,
                KEEPALIVE_COUNT,
            );
            (*c).log = side.log();
            (*(*c).read).log = (*c).log;
            (*(*c).write).log = (*c).log;
            (*(*c).read).handler = Some(read_handler::<O>);
            (*(*c).write).handler = Some(write_handler::<O>);
            (*(*c).read).set_cancelable(1);
            (*(*c).write).set_cancelable(1);
        }
        let mut conn = Conn {
            inner,
            addr,
            stage: Stage::Connecting,
            tls,
            side: side.clone(),
            setup_timeout_ms,
        };
        if rc == NGX_AGAIN as ngx_int_t {
            // SAFETY: the connection is live.
            unsafe { ngx_add_timer((*c).write, setup_timeout_ms as ngx_msec_t) };
            return Ok((conn, false));
        }
        // SAFETY: `owner` is as the contract says.
        match unsafe { conn.established::<O>() } {
            Some(ConnEvent::Ready) => Ok((conn, true)),
            Some(ConnEvent::Failed(e)) => Err(e),
            _ => Ok((conn, false)),
        }
    }

    fn c(&self) -> *mut ngx_connection_t {
        self.inner.pc.connection
    }

    /// The TCP connection is up: start TLS when configured. `Some(Ready)` or a failure
    /// when that is known at once, `None` while the handshake runs.
    unsafe fn established<O: ConnOwner>(&mut self) -> Option<ConnEvent> {
        let Some(tls) = self.tls.clone() else {
            self.stage = Stage::Ready;
            return Some(ConnEvent::Ready);
        };
        let c = self.c();
        // SAFETY: `c` is the live connection; a pool for the TLS session is created on
        // it (destroyed with the connection in `drop`).
        unsafe {
            if (*c).pool.is_null() {
                (*c).pool = ngx_create_pool(1024, self.side.log());
                if (*c).pool.is_null() {
                    return Some(ConnEvent::Failed(ConnError::NoMemory));
                }
            }
            self.stage = Stage::Handshaking;
            let rc = tls::start_handshake(
                c,
                tls.ctx,
                &tls.name,
                self.side.tls_session(),
                tls_done::<O>,
                save_session,
            );
            if rc == NGX_AGAIN as ngx_int_t {
                ngx_add_timer(
                    (*c).read,
                    self.setup_timeout_ms.clamp(1_000, 5_000) as ngx_msec_t,
                );
                return None;
            }
            if rc == NGX_OK as ngx_int_t {
                return Some(self.handshake_done::<O>());
            }
        }
        let why = self.side.take_captured();
        Some(ConnEvent::Failed(ConnError::Handshake {
            addr: self.addr,
            why,
        }))
    }

    /// The handshake ended (or timed out): check the certificate.
    unsafe fn handshake_done<O: ConnOwner>(&mut self) -> ConnEvent {
        let c = self.c();
        let addr = self.addr;
        // SAFETY: `c` is the live connection the handshake ran on.
        let (timed_out, done) = unsafe {
            let timed_out = (*(*c).read).timedout() != 0 || (*(*c).write).timedout() != 0;
            (*(*c).read).set_timedout(0);
            (*(*c).write).set_timedout(0);
            for ev in [(*c).read, (*c).write] {
                if (*ev).timer_set() != 0 {
                    ngx_del_timer(ev);
                }
            }
            (timed_out, tls::handshaked(c))
        };
        if !done {
            let why = self.side.take_captured();
            return ConnEvent::Failed(if timed_out {
                ConnError::HandshakeTimeout { addr }
            } else {
                ConnError::Handshake { addr, why }
            });
        }
        if let Some(t) = self.tls.as_ref().filter(|t| t.verify) {
            // SAFETY: the handshake on `c` completed.
            if let Err(why) = unsafe { tls::verify_connection(c, &t.name) } {
                return ConnEvent::Failed(ConnError::Verify { addr, why });
            }
        }
        // SAFETY: nginx's SSL code took over the handlers for the handshake.
        unsafe {
            (*(*c).read).handler = Some(read_handler::<O>);
            (*(*c).write).handler = Some(write_handler::<O>);
        }
        self.stage = Stage::Ready;
        ConnEvent::Ready
    }

    /// An event of the connection: what it means for the owner (None: nothing yet).
    unsafe fn on_event<O: ConnOwner>(
        &mut self,
        ev: *mut ngx_event_t,
        write: bool,
    ) -> Option<ConnEvent> {
        // SAFETY: `ev` is one of this connection's events, delivered by nginx.
        let timed_out = unsafe { (*ev).timedout() != 0 };
        match self.stage {
            Stage::Connecting => {
                if timed_out {
                    return Some(ConnEvent::Failed(ConnError::ConnectTimeout {
                        addr: self.addr,
                    }));
                }
                // A refused connect can be reported on either side: SO_ERROR names it.
                let c = self.c();
                // SAFETY: the live connection's write event and socket.
                let err = unsafe {
                    crate::ngx_util::cancel_timer(&mut *(*c).write);
                    super::io::so_error((*c).fd)
                };
                if err != 0 {
                    let why = std::io::Error::from_raw_os_error(err).to_string();
                    return Some(ConnEvent::Failed(ConnError::Connect {
                        addr: self.addr,
                        why,
                    }));
                }
                // SAFETY: as `connect`'s contract.
                unsafe { self.established::<O>() }
            }
            Stage::Handshaking => None, // nginx's SSL code routes these to `tls_done`
            Stage::Ready if write => Some(ConnEvent::Writable),
            Stage::Ready if timed_out => {
                // SAFETY: `ev` is live.
                unsafe { (*ev).set_timedout(0) };
                Some(ConnEvent::ReadTimeout)
            }
            Stage::Ready => Some(ConnEvent::Readable),
        }
    }

    /// Why the last send or recv failed: what nginx logged for it (the OpenSSL reason on
    /// a TLS connection), else the OS error.
    fn io_error(&self) -> String {
        let os = std::io::Error::last_os_error();
        match self.side.take_captured() {
            c if !c.is_empty() => c,
            _ => os.to_string(),
        }
    }

    /// Sends `buf[*sent..]`. Ok(true): all out; Ok(false): the socket is full and the
    /// write event is armed.
    pub fn send(&mut self, buf: &mut [u8], sent: &mut usize) -> Result<bool, ConnError> {
        // SAFETY: the connection is live and ours.
        match unsafe { send_pending(self.c(), buf, sent) } {
            Sent::All => Ok(true),
            Sent::Again => Ok(false),
            Sent::Error => {
                let why = self.io_error();
                Err(ConnError::Send {
                    addr: self.addr,
                    why: self.peer_alert().unwrap_or(why),
                })
            }
        }
    }

    /// After a failed send on a TLS connection: what the peer said before it reset the
    /// connection, if it said anything (a server refusing the client certificate sends
    /// its alert and closes; the request written meanwhile meets a reset, and the
    /// alert, already received, explains it).
    fn peer_alert(&mut self) -> Option<String> {
        self.tls.as_ref()?;
        let mut b = [0u8; 64];
        match self.recv(&mut b) {
            Recv::Failed(ConnError::Recv { why, .. }) if why.contains("alert") => Some(why),
            _ => None,
        }
    }

    /// Reads what is there.
    pub fn recv(&mut self, buf: &mut [u8]) -> Recv {
        let c = self.c();
        // SAFETY: the connection is live; `recv` is nginx's (plain or TLS) reader and
        // writes at most `buf.len()` bytes into `buf`.
        let n = unsafe {
            let Some(recv) = (*c).recv else {
                return Recv::Closed;
            };
            recv(c, buf.as_mut_ptr(), buf.len())
        };
        if n > 0 {
            Recv::Data(n as usize)
        } else if n == 0 {
            Recv::Closed
        } else if n == NGX_AGAIN as isize {
            match self.wait_readable() {
                Ok(()) => Recv::Again,
                Err(e) => Recv::Failed(e),
            }
        } else {
            Recv::Failed(ConnError::Recv {
                addr: self.addr,
                why: self.io_error(),
            })
        }
    }

    /// Arms the read event (after a send, or when a read would block).
    pub fn wait_readable(&mut self) -> Result<(), ConnError> {
        // SAFETY: the connection is live.
        if unsafe { ngx_handle_read_event((*self.c()).read, 0) } != NGX_OK as ngx_int_t {
            return Err(ConnError::CannotWait {
                why: self.side.take_captured(),
            });
        }
        Ok(())
    }

    /// Whether bytes are known to be waiting.
    pub fn read_ready(&self) -> bool {
        // SAFETY: the connection is live.
        unsafe { (*(*self.c()).read).ready() != 0 }
    }

    /// Asks nginx to call the owner at once when this worker begins a graceful
    /// shutdown (a reload, `nginx -s quit`): nginx then runs the read handler of every
    /// connection marked idle, with `close` set, and the owner sees `Readable` while
    /// `process::exiting()` holds, so it can close the connection instead of keeping
    /// it until its next timer.
    pub fn wake_on_shutdown(&mut self) {
        // SAFETY: the connection is live; `idle` only tells ngx_close_idle_connections
        // to call the read handler.
        unsafe { (*self.c()).set_idle(1) };
    }

    /// Starts the read deadline unless one runs: it starts once per exchange, when the
    /// request is out (write events keep coming while a response trickles in and must
    /// not push it back).
    pub fn start_read_deadline(&mut self, ms: u64) {
        // SAFETY: the connection's live read event.
        unsafe {
            let rev = (*self.c()).read;
            if (*rev).timer_set() == 0 {
                ngx_add_timer(rev, ms as ngx_msec_t);
            }
        }
    }

    pub fn clear_read_deadline(&mut self) {
        // SAFETY: the connection's live read event.
        unsafe {
            let rev = (*self.c()).read;
            if (*rev).timer_set() != 0 {
                ngx_del_timer(rev);
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let c = self.c();
        if c.is_null() {
            return;
        }
        // SAFETY: the connection and its pool are ours; nginx forgets the connection's
        // events and timers in ngx_close_connection.
        unsafe {
            tls::shutdown(c);
            let pool = (*c).pool;
            ngx_close_connection(c);
            if !pool.is_null() {
                ngx_destroy_pool(pool);
            }
        }
        self.inner.pc.connection = ptr::null_mut();
    }
}

/// # Safety
/// `c.data` is the owner a `Conn::connect::<O>` was made for (its contract).
unsafe fn dispatch<O: ConnOwner>(owner: *mut O, ev: *mut ngx_event_t, write: bool) {
    // SAFETY: per the contract; the borrow of the connection ends before the owner is
    // called, so only one `&mut` to the owner exists at a time.
    unsafe {
        let event = match (*owner).conn_mut() {
            Some(conn) => conn.on_event::<O>(ev, write),
            None => return,
        };
        if let Some(e) = event {
            (*owner).on_conn_event(e);
        }
    }
}

unsafe extern "C" fn read_handler<O: ConnOwner>(ev: *mut ngx_event_t) {
    // SAFETY: nginx calls this for the read event of a connection made by `connect::<O>`.
    unsafe {
        let c = (*ev).data as *mut ngx_connection_t;
        dispatch((*c).data as *mut O, ev, false);
    }
}

unsafe extern "C" fn write_handler<O: ConnOwner>(ev: *mut ngx_event_t) {
    // SAFETY: as `read_handler`, for the write event.
    unsafe {
        let c = (*ev).data as *mut ngx_connection_t;
        dispatch((*c).data as *mut O, ev, true);
    }
}

unsafe extern "C" fn tls_done<O: ConnOwner>(c: *mut ngx_connection_t) {
    // SAFETY: nginx's SSL code calls this for a connection made by `connect::<O>`; as in
    // `dispatch`, one `&mut` to the owner at a time.
    unsafe {
        let owner = (*c).data as *mut O;
        let event = match (*owner).conn_mut() {
            Some(conn) => conn.handshake_done::<O>(),
            None => return,
        };
        (*owner).on_conn_event(event);
    }
}
