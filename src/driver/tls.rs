//! TLS to `https://` registries with nginx's own SSL library (`ngx_ssl_*`, OpenSSL
//! underneath): one `SSL_CTX` per upstream, made when the configuration is read; a TLS
//! session on the poller's connection; and the checks nginx's `proxy_ssl_verify` makes
//! (chain, then name) after the handshake. Also a blocking TLS stream for the master's
//! `strong_dependency=on` read.

pub use imp::*;

/// Why TLS to a registry could not be set up or trusted. The texts are the causes in
/// `nginx -t` messages and log lines.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    #[error("https:// registries need nginx built with SSL (--with-stream_ssl_module)")]
    #[cfg_attr(ngx_feature = "ssl", allow(dead_code))]
    NoSsl,
    #[error("out of memory")]
    NoMemory,
    #[error("cannot create the TLS context")]
    Context,
    #[error("cannot set up TLS session resumption")]
    SessionCache,
    #[error("cannot load ssl_certificate=\"{0}\" with its key")]
    Certificate(String),
    #[error("cannot load ssl_trusted_certificate=\"{0}\"")]
    TrustedCertificate(String),
    #[error("cannot load the system's trusted certificates: {0}")]
    SystemStore(String),
    #[error("the registry's certificate is not trusted: {why} (verify error {code})")]
    Untrusted { why: String, code: i64 },
    #[error("the registry sent no certificate")]
    NoCertificate,
    #[error(
        "the registry's certificate does not match \"{0}\" (set ssl_name= to the name it carries)"
    )]
    NameMismatch(String),
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
    #[error("TLS: {0}")]
    OpenSsl(String),
}

#[cfg(ngx_feature = "ssl")]
mod imp {
    use std::ffi::{c_char, c_int, c_void, CStr, CString};
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::os::fd::AsRawFd;
    use std::ptr;

    use ngx::ffi::*;

    use super::TlsError;
    use upsync_core::conf::TlsSpec;

    /// Maximum certificate chain length checked (nginx's `proxy_ssl_verify_depth` is 1 by
    /// default, which rejects any intermediate CA: registries often use one).
    const VERIFY_DEPTH: ngx_int_t = 9;

    /// A string in the configuration pool, as nginx's file loaders want it.
    ///
    /// # Safety
    /// `cf` is the configuration being parsed.
    unsafe fn pool_str(cf: *mut ngx_conf_t, s: &str) -> Option<ngx_str_t> {
        // SAFETY: per the contract its pool is live.
        unsafe { crate::ngx_util::pool_str((*cf).pool, s) }
    }

    /// The oldest queued OpenSSL error as text, and an empty queue.
    fn openssl_error() -> String {
        let mut first = String::new();
        // SAFETY: the error queue is thread-local; the buffer is large enough and
        // ERR_error_string_n always terminates it.
        unsafe {
            loop {
                let e = ERR_get_error();
                if e == 0 {
                    break;
                }
                if first.is_empty() {
                    let mut buf = [0 as c_char; 256];
                    ERR_error_string_n(e, buf.as_mut_ptr(), buf.len());
                    first = CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned();
                }
            }
        }
        if first.is_empty() {
            "no detail from OpenSSL".into()
        } else {
            first
        }
    }

    /// Creates the client context of one upstream's registry. nginx logs the file errors
    /// itself (naming the file); the caller adds the upstream.
    ///
    /// # Safety
    /// `cf` is the configuration being parsed; the context lives as long as its pool.
    pub unsafe fn create_context(
        cf: *mut ngx_conf_t,
        spec: &TlsSpec,
    ) -> Result<*mut c_void, TlsError> {
        // SAFETY: per the contract `cf` and its pool are live; the context is allocated
        // in that pool and freed by the cleanup registered on it; nginx's loaders read
        // NUL-terminated pool strings.
        unsafe {
            let ssl = ngx_pcalloc((*cf).pool, std::mem::size_of::<ngx_ssl_t>()) as *mut ngx_ssl_t;
            if ssl.is_null() {
                return Err(TlsError::NoMemory);
            }
            (*ssl).log = (*cf).log;
            if ngx_ssl_create(
                ssl,
                (NGX_SSL_TLSv1_2 | NGX_SSL_TLSv1_3) as ngx_uint_t,
                ptr::null_mut(),
            ) != NGX_OK as ngx_int_t
            {
                return Err(TlsError::Context);
            }
            let cln = ngx_pool_cleanup_add((*cf).pool, 0);
            if cln.is_null() {
                return Err(TlsError::NoMemory);
            }
            (*cln).handler = Some(ngx_ssl_cleanup_ctx);
            (*cln).data = ssl as *mut c_void;

            // Keep client sessions (handed to `save_session`) so a reconnect resumes instead
            // of a full handshake: etcd v3 watches end with a new connection.
            if ngx_ssl_client_session_cache(cf, ssl, 1) != NGX_OK as ngx_int_t {
                return Err(TlsError::SessionCache);
            }
            if let Some((cert, key)) = &spec.certificate {
                let (Some(mut c), Some(mut k)) = (pool_str(cf, cert), pool_str(cf, key)) else {
                    return Err(TlsError::NoMemory);
                };
                if ngx_ssl_certificate(cf, ssl, &mut c, &mut k, ptr::null_mut())
                    != NGX_OK as ngx_int_t
                {
                    return Err(TlsError::Certificate(cert.clone()));
                }
            }
            if spec.verify {
                match &spec.trusted_certificate {
                    Some(ca) => {
                        let Some(mut f) = pool_str(cf, ca) else {
                            return Err(TlsError::NoMemory);
                        };
                        if ngx_ssl_trusted_certificate(cf, ssl, &mut f, VERIFY_DEPTH)
                            != NGX_OK as ngx_int_t
                        {
                            return Err(TlsError::TrustedCertificate(ca.clone()));
                        }
                    }
                    None => {
                        if SSL_CTX_set_default_verify_paths((*ssl).ctx as *mut SSL_CTX) != 1 {
                            return Err(TlsError::SystemStore(openssl_error()));
                        }
                        SSL_CTX_set_verify_depth((*ssl).ctx as *mut SSL_CTX, VERIFY_DEPTH as c_int);
                    }
                }
            }
            Ok(ssl as *mut c_void)
        }
    }

    fn is_ip(name: &str) -> bool {
        name.parse::<std::net::IpAddr>().is_ok()
    }

    /// Sets SNI (host names only: RFC 6066 has no IP addresses in SNI).
    ///
    /// # Safety
    /// `s` is a live SSL connection.
    unsafe fn set_server_name(s: *mut SSL, name: &str) {
        if is_ip(name) {
            return;
        }
        if let Ok(n) = CString::new(name) {
            // SAFETY: per the contract `s` is live; OpenSSL copies the name.
            unsafe {
                SSL_ctrl(
                    s,
                    SSL_CTRL_SET_TLSEXT_HOSTNAME as c_int,
                    TLSEXT_NAMETYPE_host_name as _,
                    n.as_ptr() as *mut c_void,
                );
            }
        }
    }

    /// The peer's certificate, with a reference the caller frees (`X509_free`).
    ///
    /// OpenSSL 3 names the function SSL_get1_peer_certificate (the old name is a macro),
    /// OpenSSL 1.1.1 (RHEL 8) only SSL_get_peer_certificate; both take a reference. It
    /// is looked up in the process (nginx links libssl) so that the module loads with
    /// either library instead of naming a symbol one of them lacks.
    ///
    /// # Safety
    /// `s` is a live SSL connection.
    unsafe fn peer_certificate(s: *mut SSL) -> *mut X509 {
        type GetPeer = unsafe extern "C" fn(*const SSL) -> *mut X509;
        static GET_PEER: std::sync::OnceLock<Option<GetPeer>> = std::sync::OnceLock::new();
        let f = GET_PEER.get_or_init(|| {
            [c"SSL_get1_peer_certificate", c"SSL_get_peer_certificate"]
                .iter()
                // SAFETY: dlsym with a NUL-terminated name only looks the symbol up.
                .map(|name| unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) })
                .find(|p| !p.is_null())
                // SAFETY: both functions have this signature.
                .map(|p| unsafe { std::mem::transmute::<*mut c_void, GetPeer>(p) })
        });
        match f {
            // SAFETY: per the contract `s` is live.
            Some(f) => unsafe { f(s) },
            None => ptr::null_mut(),
        }
    }

    /// Checks a finished handshake like `proxy_ssl_verify on`: the chain first, then that the
    /// certificate names `name` (a DNS name, or an IP address in its IP SANs).
    ///
    /// # Safety
    /// `s` is an SSL connection whose handshake completed.
    pub unsafe fn verify_peer(s: *mut SSL, name: &str) -> Result<(), TlsError> {
        // SAFETY: per the contract `s` completed its handshake.
        let rc = unsafe { SSL_get_verify_result(s) };
        if rc != X509_V_OK as std::ffi::c_long {
            // SAFETY: OpenSSL returns a static C string for any code.
            let why = unsafe { CStr::from_ptr(X509_verify_cert_error_string(rc)) }
                .to_string_lossy()
                .into_owned();
            return Err(TlsError::Untrusted {
                why,
                code: rc as i64,
            });
        }
        // SAFETY: as above; the reference is freed below.
        let cert = unsafe { peer_certificate(s) };
        if cert.is_null() {
            return Err(TlsError::NoCertificate);
        }
        // SAFETY: `cert` is a live certificate; the names are NUL-terminated.
        let ok = unsafe {
            let ok = match CString::new(name) {
                Ok(n) if is_ip(name) => X509_check_ip_asc(cert, n.as_ptr(), 0) == 1,
                Ok(n) => X509_check_host(cert, n.as_ptr(), name.len(), 0, ptr::null_mut()) == 1,
                Err(_) => false,
            };
            X509_free(cert);
            ok
        };
        if ok {
            Ok(())
        } else {
            Err(TlsError::NameMismatch(name.to_string()))
        }
    }

    /// Puts a TLS session on a freshly connected nginx connection and starts the handshake.
    /// Returns what `ngx_ssl_handshake` returns; with NGX_AGAIN, `done` is called when the
    /// handshake ends (or its timer fires).
    ///
    /// # Safety
    /// `c` is a connected nginx connection with a pool; `ssl` a context from
    /// `create_context`.
    pub unsafe fn start_handshake(
        c: *mut ngx_connection_t,
        ssl: *mut c_void,
        name: &str,
        resume: *mut c_void,
        done: unsafe extern "C" fn(*mut ngx_connection_t),
        save: unsafe extern "C" fn(*mut ngx_connection_t),
    ) -> ngx_int_t {
        // SAFETY: per the contract; the TLS connection is created on `c` and freed with
        // it; `resume` is null or a session nginx takes its own reference on.
        unsafe {
            let ssl = ssl as *mut ngx_ssl_t;
            if ngx_ssl_create_connection(ssl, c, NGX_SSL_CLIENT as ngx_uint_t)
                != NGX_OK as ngx_int_t
            {
                return NGX_ERROR as ngx_int_t;
            }
            set_server_name((*(*c).ssl).connection as *mut SSL, name);
            if !resume.is_null()
                && ngx_ssl_set_session(c, resume as *mut SSL_SESSION) != NGX_OK as ngx_int_t
            {
                return NGX_ERROR as ngx_int_t;
            }
            (*(*c).ssl).save_session = Some(save);
            let rc = ngx_ssl_handshake(c);
            if rc == NGX_AGAIN as ngx_int_t {
                (*(*c).ssl).handler = Some(done);
            }
            rc
        }
    }

    /// A new session of the connection, to resume later (a reference the caller frees
    /// with `free_session`); null when there is none.
    ///
    /// # Safety
    /// `c` is a live nginx connection with a TLS session.
    pub unsafe fn get_session(c: *mut ngx_connection_t) -> *mut c_void {
        // SAFETY: per the contract.
        unsafe { ngx_ssl_get_session(c) as *mut c_void }
    }

    /// Drops a session reference from `get_session`.
    ///
    /// # Safety
    /// `s` is null or a reference from `get_session`, freed once.
    pub unsafe fn free_session(s: *mut c_void) {
        if !s.is_null() {
            // SAFETY: per the contract, a reference we own, freed once.
            unsafe { SSL_SESSION_free(s as *mut SSL_SESSION) };
        }
    }

    /// The connection's TLS session, DER-encoded (None: none, or larger than nginx's
    /// session buffer).
    ///
    /// # Safety
    /// `c` is a live nginx connection with a TLS session.
    pub unsafe fn session_der(c: *mut ngx_connection_t) -> Option<Vec<u8>> {
        // SAFETY: per the contract; the session reference is freed before returning, and
        // i2d writes at most the length it reported.
        unsafe {
            let s = ngx_ssl_get_session(c);
            if s.is_null() {
                return None;
            }
            let len = i2d_SSL_SESSION(s, ptr::null_mut());
            let der = (len > 0 && len as u32 <= NGX_SSL_MAX_SESSION_SIZE).then(|| {
                let mut der = vec![0u8; len as usize];
                let mut p = der.as_mut_ptr();
                i2d_SSL_SESSION(s, &mut p);
                der
            });
            SSL_SESSION_free(s);
            der
        }
    }

    /// Offers a session (DER, from `session_der`) for resumption on a connection about
    /// to handshake. Returns what ngx_ssl_set_session does.
    ///
    /// # Safety
    /// `c` is a live nginx connection with a TLS connection not yet handshaken.
    pub unsafe fn set_session_der(c: *mut ngx_connection_t, der: &[u8]) -> ngx_int_t {
        // SAFETY: per the contract; d2i reads at most `len` bytes; nginx takes its own
        // reference on the session, ours is freed here.
        unsafe {
            let mut p = der.as_ptr();
            let s = d2i_SSL_SESSION(ptr::null_mut(), &mut p, der.len() as std::ffi::c_long);
            if s.is_null() {
                ERR_clear_error();
                return NGX_OK as ngx_int_t; // not a session: a full handshake then
            }
            let rc = ngx_ssl_set_session(c, s);
            SSL_SESSION_free(s);
            rc
        }
    }

    /// Whether the connection's handshake completed.
    ///
    /// # Safety
    /// `c` is a live nginx connection on which `start_handshake` was called.
    pub unsafe fn handshaked(c: *mut ngx_connection_t) -> bool {
        // SAFETY: per the contract.
        unsafe { !(*c).ssl.is_null() && (*(*c).ssl).handshaked() != 0 }
    }

    /// `verify_peer` for the TLS session of an nginx connection.
    ///
    /// # Safety
    /// `c` is a live nginx connection whose handshake completed.
    pub unsafe fn verify_connection(c: *mut ngx_connection_t, name: &str) -> Result<(), TlsError> {
        // SAFETY: per the contract the connection has a finished TLS session.
        unsafe { verify_peer((*(*c).ssl).connection as *mut SSL, name) }
    }

    /// Ends the TLS session of a connection about to be closed: close_notify if the socket
    /// takes it at once, never waiting for the peer's.
    ///
    /// # Safety
    /// `c` is a live nginx connection.
    pub unsafe fn shutdown(c: *mut ngx_connection_t) {
        // SAFETY: per the contract.
        unsafe {
            if (*c).ssl.is_null() {
                return;
            }
            (*(*c).ssl).set_no_wait_shutdown(1);
            if ngx_ssl_shutdown(c) == NGX_AGAIN as ngx_int_t {
                // The socket is full: drop the close_notify rather than wait for it.
                (*(*c).ssl).set_no_send_shutdown(1);
                ngx_ssl_shutdown(c);
            }
        }
    }

    /// A blocking TLS stream over a std socket, for the master's one-shot read.
    pub struct BlockingTls {
        ssl: *mut SSL,
        _sock: TcpStream,
        connected: bool,
        /// nginx's SSL callbacks (the client session cache's, and the certificate
        /// verification's, which logs at debug level in `--with-debug` builds) look the
        /// nginx connection up from the SSL object: an inert one, with no session
        /// saving and a log that writes nothing, stands in.
        _stand_in: Box<(ngx_connection_t, ngx_ssl_connection_t, ngx_log_t)>,
    }

    impl BlockingTls {
        /// # Safety
        /// `ctx` is a context from `create_context` that outlives the stream.
        pub unsafe fn connect(
            ctx: *mut c_void,
            sock: TcpStream,
            name: &str,
            verify: bool,
        ) -> Result<BlockingTls, TlsError> {
            // SAFETY: per the contract `ctx` is a live nginx TLS context; the SSL object
            // is owned by the returned stream and freed on drop (`me` owns it before any
            // error return below).
            unsafe {
                let ssl = SSL_new((*(ctx as *mut ngx_ssl_t)).ctx as *mut SSL_CTX);
                if ssl.is_null() {
                    return Err(TlsError::OpenSsl(openssl_error()));
                }
                let mut me = BlockingTls {
                    ssl,
                    _sock: sock,
                    connected: false,
                    _stand_in: Box::new(std::mem::zeroed()),
                };
                let (c, sc, log) = &mut *me._stand_in;
                c.ssl = sc;
                // log_level 0 with no file: ngx_log_error's level test fails for every
                // level above NGX_LOG_STDERR, which nginx's SSL callbacks never use.
                log.log_level = 0;
                c.log = log;
                if SSL_set_ex_data(ssl, ngx_ssl_connection_index, c as *mut _ as *mut c_void) != 1 {
                    return Err(TlsError::OpenSsl(openssl_error()));
                }
                if SSL_set_fd(ssl, me._sock.as_raw_fd()) != 1 {
                    return Err(TlsError::OpenSsl(openssl_error()));
                }
                set_server_name(ssl, name);
                if SSL_connect(ssl) != 1 {
                    return Err(TlsError::Handshake(openssl_error()));
                }
                me.connected = true;
                if verify {
                    verify_peer(ssl, name)?;
                }
                Ok(me)
            }
        }
    }

    impl Drop for BlockingTls {
        fn drop(&mut self) {
            // SAFETY: `ssl` came from SSL_new and is freed once; the error queue is left
            // empty for nginx's own SSL calls in this process.
            unsafe {
                if self.connected {
                    SSL_shutdown(self.ssl);
                }
                SSL_free(self.ssl);
                ERR_clear_error();
            }
        }
    }

    impl Read for BlockingTls {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(c_int::MAX as usize) as c_int;
            // SAFETY: `buf` is valid for `n` bytes.
            let rc = unsafe { SSL_read(self.ssl, buf.as_mut_ptr() as *mut c_void, n) };
            if rc > 0 {
                return Ok(rc as usize);
            }
            // SAFETY: `ssl` is live; SSL_get_error only reads its state.
            let e = unsafe { SSL_get_error(self.ssl, rc) };
            if e == SSL_ERROR_ZERO_RETURN as c_int {
                return Ok(0);
            }
            if e == SSL_ERROR_SYSCALL as c_int {
                let os = std::io::Error::last_os_error();
                if os.raw_os_error().unwrap_or(0) != 0 {
                    return Err(os);
                }
                return Ok(0); // the peer closed without close_notify
            }
            Err(std::io::Error::other(openssl_error()))
        }
    }

    impl Write for BlockingTls {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = buf.len().min(c_int::MAX as usize) as c_int;
            // SAFETY: `buf` is valid for `n` bytes.
            let rc = unsafe { SSL_write(self.ssl, buf.as_ptr() as *const c_void, n) };
            if rc > 0 {
                Ok(rc as usize)
            } else {
                Err(std::io::Error::other(openssl_error()))
            }
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}

/// nginx built without SSL (no `--with-stream_ssl_module` nor `--with-http_ssl_module`):
/// the same interface; `https://` registries are refused when the configuration is read.
#[cfg(not(ngx_feature = "ssl"))]
mod imp {
    use std::ffi::c_void;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    use ngx::ffi::{ngx_conf_t, ngx_connection_t, ngx_int_t, NGX_ERROR};

    use super::TlsError;
    use upsync_core::conf::TlsSpec;

    pub unsafe fn create_context(
        _cf: *mut ngx_conf_t,
        _spec: &TlsSpec,
    ) -> Result<*mut c_void, TlsError> {
        Err(TlsError::NoSsl)
    }

    pub unsafe fn start_handshake(
        _c: *mut ngx_connection_t,
        _ssl: *mut c_void,
        _name: &str,
        _resume: *mut c_void,
        _done: unsafe extern "C" fn(*mut ngx_connection_t),
        _save: unsafe extern "C" fn(*mut ngx_connection_t),
    ) -> ngx_int_t {
        NGX_ERROR as ngx_int_t
    }

    pub unsafe fn get_session(_c: *mut ngx_connection_t) -> *mut c_void {
        std::ptr::null_mut()
    }

    pub unsafe fn free_session(_s: *mut c_void) {}

    pub unsafe fn handshaked(_c: *mut ngx_connection_t) -> bool {
        false
    }

    pub unsafe fn verify_connection(
        _c: *mut ngx_connection_t,
        _name: &str,
    ) -> Result<(), TlsError> {
        Err(TlsError::NoSsl)
    }

    pub unsafe fn shutdown(_c: *mut ngx_connection_t) {}

    pub struct BlockingTls;

    impl BlockingTls {
        pub unsafe fn connect(
            _ctx: *mut c_void,
            _sock: TcpStream,
            _name: &str,
            _verify: bool,
        ) -> Result<BlockingTls, TlsError> {
            Err(TlsError::NoSsl)
        }
    }

    impl Read for BlockingTls {
        fn read(&mut self, _buf: &mut [u8]) -> std::io::Result<usize> {
            Ok(0)
        }
    }

    impl Write for BlockingTls {
        fn write(&mut self, _buf: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("no TLS"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
