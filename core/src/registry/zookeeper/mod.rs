//! ZooKeeper: a sans-IO client that watches service lists (the children of a path and
//! their data). The caller owns the socket and a monotonic millisecond clock and drives a
//! [`Session`]:
//!
//! ```text
//!   TCP up           -> on_connected(now), then write take_output()
//!   bytes read       -> on_data(bytes, now)?, write take_output(), handle take_events()
//!   EOF / error      -> on_disconnected(now), connect to the next member
//!   next_deadline()  -> on_timer(now)? at that time (pings, timeouts, client-side expiry)
//! ```
//! Any `Err` means: close this connection and connect again (the session survives it,
//! unless an [`SessionEvent::Expired`] says otherwise). `jute` is the wire format,
//! `session` the state machine, `watch` one watched path's bookkeeping, `layout` the
//! mapping from children to servers.

pub mod jute;
pub mod layout;
pub mod session;
mod watch;

#[cfg(test)]
mod fake_server;

use std::fmt;

use crate::conf::Credential;

pub use jute::JuteError;
pub use layout::{listing, servers_from, ChildError, Layout};
pub use session::Session;

/// How changes under a watched path are followed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WatchMode {
    /// Persistent recursive watches when the server has them (3.6+), else one-shot
    /// watches; decided by the server's answer to the first `addWatch`.
    #[default]
    Auto,
    /// `addWatch` mode 1 (PERSISTENT_RECURSIVE): one watch per path, re-read only what
    /// changed.
    Persistent,
    /// One-shot child and data watches, re-armed by each read (every ZooKeeper version).
    OneShot,
}

/// Client settings.
#[derive(Clone, PartialEq, Eq)]
pub struct ZkConfig {
    /// Requested session timeout; the server bounds it (2..20 ticks by default).
    pub session_timeout_ms: u32,
    /// Digest credentials `user:password`, sent after each connect.
    pub auth: Option<String>,
    /// Prefix of every path sent ("" or "/" for none); stripped from paths received.
    pub chroot: String,
    pub watch_mode: WatchMode,
    /// More children than this under one watched path is an error (the list is not used).
    pub max_children: usize,
    /// Largest frame accepted from the server.
    pub max_frame: usize,
}

impl Default for ZkConfig {
    fn default() -> Self {
        ZkConfig {
            session_timeout_ms: 30_000,
            auth: None,
            chroot: String::new(),
            watch_mode: WatchMode::Auto,
            max_children: 100_000,
            max_frame: jute::DEFAULT_MAX_FRAME,
        }
    }
}

impl fmt::Debug for ZkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the password, even in a debug dump.
        let auth = self
            .auth
            .as_deref()
            .map(|a| format!("{}:<hidden>", a.split(':').next().unwrap_or("")));
        f.debug_struct("ZkConfig")
            .field("session_timeout_ms", &self.session_timeout_ms)
            .field("auth", &auth)
            .field("chroot", &self.chroot)
            .field("watch_mode", &self.watch_mode)
            .field("max_children", &self.max_children)
            .field("max_frame", &self.max_frame)
            .finish()
    }
}

impl ZkConfig {
    /// The session settings of an `upsync_type=zookeeper` line: its session timeout
    /// and the digest credentials of its `token_file=` (`USER:PASSWORD`). No chroot:
    /// `zk_chroot=` is already part of the watched path, so upstreams with different
    /// chroots can share a session.
    pub fn for_upsync(zk: &crate::conf::zookeeper::ZkSpec, cred: Option<&Credential>) -> ZkConfig {
        ZkConfig {
            session_timeout_ms: zk.session_timeout_ms,
            auth: digest_of(cred),
            ..ZkConfig::default()
        }
    }

    /// Checks the settings (for `nginx -t`): a positive timeout, a valid chroot, and
    /// credentials of the form `user:password`.
    pub fn validate(&self) -> Result<(), ZkError> {
        if self.session_timeout_ms == 0 || self.session_timeout_ms > i32::MAX as u32 {
            return Err(ZkError::Config("session timeout must be 1 ms or more"));
        }
        if !self.chroot.is_empty() && self.chroot != "/" {
            validate_path(self.chroot.trim_end_matches('/'))?;
        }
        if let Some(a) = &self.auth {
            match a.split_once(':') {
                Some((u, _)) if !u.is_empty() => {}
                _ => return Err(ZkError::Config("digest credentials must be user:password")),
            }
        }
        Ok(())
    }

    /// The user of the digest credentials (not secret).
    pub fn auth_user(&self) -> Option<&str> {
        self.auth
            .as_deref()
            .map(|a| a.split(':').next().unwrap_or(""))
    }
}

/// The digest credentials (`user:password`) of a `token_file=` credential.
pub fn digest_of(cred: Option<&Credential>) -> Option<String> {
    match cred? {
        Credential::UserPassword { user, password } => Some(format!("{user}:{password}")),
        Credential::Token(t) => Some(t.clone()),
    }
}

/// Identifies a watched path within one [`Session`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WatchId(pub u32);

/// One child of a watched path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Child {
    pub name: String,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The full current list of children (sorted by name) with their data, after a
    /// complete read and after each change. `exists` is false when the path itself
    /// does not exist (the list is then empty).
    Listing {
        watch: WatchId,
        exists: bool,
        children: Vec<Child>,
    },
    Session(SessionEvent),
    /// A watch (or, with `None`, the session) hit an error that needs no reconnect;
    /// the last listing stays valid and the read is retried.
    Error {
        watch: Option<WatchId>,
        err: ZkError,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    Established {
        id: i64,
        timeout_ms: u32,
        resumed: bool,
    },
    /// The session is gone (the server said so, or, with `by_client`, no member
    /// answered within the session timeout); the next connect opens a new one and
    /// reads everything again.
    Expired { id: i64, by_client: bool },
    /// The server refused the digest credentials (AuthFailed) and closed the
    /// connection. The session id is kept, so a retry (paced by the caller) resumes it
    /// rather than leaving a new session behind on the server each time. A stock
    /// server accepts any digest credential; wrong ones show as NoAuth errors on reads.
    AuthFailed,
    /// What `WatchMode::Auto` found the server supports.
    ModeDetected(WatchMode),
}

/// A ZooKeeper error code with its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Code(pub i32);

impl Code {
    pub const UNIMPLEMENTED: Code = Code(-6);
    pub const NO_NODE: Code = Code(-101);
    pub const NO_AUTH: Code = Code(-102);
    pub const SESSION_EXPIRED: Code = Code(-112);
    pub const AUTH_FAILED: Code = Code(-115);
    pub const SESSION_MOVED: Code = Code(-118);

    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "Ok",
            -1 => "SystemError",
            -2 => "RuntimeInconsistency",
            -3 => "DataInconsistency",
            -4 => "ConnectionLoss",
            -5 => "MarshallingError",
            -6 => "Unimplemented",
            -7 => "OperationTimeout",
            -8 => "BadArguments",
            -12 => "UnknownSession",
            -13 => "NewConfigNoQuorum",
            -14 => "ReconfigInProgress",
            -100 => "APIError",
            -101 => "NoNode",
            -102 => "NoAuth",
            -103 => "BadVersion",
            -108 => "NoChildrenForEphemerals",
            -110 => "NodeExists",
            -111 => "NotEmpty",
            -112 => "SessionExpired",
            -113 => "InvalidCallback",
            -114 => "InvalidACL",
            -115 => "AuthFailed",
            -118 => "SessionMoved",
            -119 => "NotReadOnly",
            -120 => "EphemeralOnLocalSession",
            -121 => "NoWatcher",
            -122 => "RequestTimeout",
            -123 => "ReconfigDisabled",
            -124 => "SessionClosedRequireSaslAuth",
            -125 => "QuotaExceeded",
            -127 => "ThrottledOp",
            _ => "unknown error",
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)?;
        if *self == Code::NO_AUTH {
            f.write_str(
                ": the node's ACL does not let these credentials read it (check the digest user and password)",
            )?;
        }
        Ok(())
    }
}

/// Everything that can go wrong. No variant carries the password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZkError {
    #[error("malformed data from the server: {0}")]
    Malformed(#[from] JuteError),
    #[error("reply to request {got} while the reply to {expected} was due")]
    XidMismatch { got: i32, expected: i32 },
    #[error("reply to request {0}, which was never sent")]
    UnexpectedReply(i32),
    #[error("session 0x{id:x} has expired (the server refused to resume it)")]
    SessionExpired { id: i64 },
    #[error("session 0x{id:x} presumed expired: no member answered within the session timeout of {timeout_ms} ms")]
    SessionLost { id: i64, timeout_ms: u32 },
    #[error("the server refused digest authentication as \"{user}\" ({code})")]
    AuthFailed { user: String, code: Code },
    #[error("the session moved to another server (SessionMoved); reconnecting")]
    SessionMoved,
    #[error("no answer from the server for {ms} ms (read timeout: 2/3 of the session timeout)")]
    ReadTimeout { ms: u64 },
    #[error("no answer to the session handshake within {ms} ms")]
    HandshakeTimeout { ms: u64 },
    #[error("the server does not support persistent watches (addWatch needs ZooKeeper 3.6 or later){}", if *fallback { "; using one-shot watches" } else { "" })]
    AddWatchUnsupported { fallback: bool },
    #[error("{op} {path}: {code}")]
    Server {
        op: &'static str,
        path: String,
        code: Code,
    },
    #[error("{path} has {count} children, more than the limit of {max}; the list is not used")]
    TooManyChildren {
        path: String,
        count: usize,
        max: usize,
    },
    #[error("invalid ZooKeeper path \"{path}\": {why}")]
    InvalidPath { path: String, why: &'static str },
    #[error("invalid ZooKeeper settings: {0}")]
    Config(&'static str),
}

/// Checks a path as ZooKeeper does: absolute, no empty, `.` or `..` component, no
/// trailing slash (except the root), no control or NUL character.
pub fn validate_path(path: &str) -> Result<(), ZkError> {
    let bad = |why| {
        Err(ZkError::InvalidPath {
            path: crate::servers::printable(path, 128),
            why,
        })
    };
    if !path.starts_with('/') {
        return bad("must start with /");
    }
    if path == "/" {
        return Ok(());
    }
    if path.ends_with('/') {
        return bad("must not end with /");
    }
    if path.chars().any(|c| c.is_control()) {
        return bad("control characters are not allowed");
    }
    for comp in path[1..].split('/') {
        match comp {
            "" => return bad("empty component (//)"),
            "." | ".." => return bad("relative components (. or ..) are not allowed"),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked_like_zookeeper() {
        for ok in ["/", "/a", "/services/web", "/a/b.c/d..e"] {
            assert!(validate_path(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "a", "/a/", "//a", "/a//b", "/a/./b", "/a/..", "/a\0b", "/a\nb",
        ] {
            assert!(validate_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn config_debug_and_errors_never_show_the_password() {
        let cfg = ZkConfig {
            auth: Some("upsync:s3cret-pw".into()),
            ..Default::default()
        };
        let shown = format!("{cfg:?}");
        assert!(
            shown.contains("upsync:<hidden>") && !shown.contains("s3cret"),
            "{shown}"
        );
        assert!(cfg.validate().is_ok());
        let err = ZkError::AuthFailed {
            user: cfg.auth_user().unwrap().into(),
            code: Code::AUTH_FAILED,
        };
        assert_eq!(
            err.to_string(),
            "the server refused digest authentication as \"upsync\" (AuthFailed (-115))"
        );
        let bad = ZkConfig {
            auth: Some("nocolon".into()),
            ..Default::default()
        };
        assert!(!bad.validate().unwrap_err().to_string().contains("nocolon"));
        let bad = ZkConfig {
            chroot: "/a//b".into(),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn codes_have_names() {
        assert_eq!(Code(-101).to_string(), "NoNode (-101)");
        assert!(Code(-102).to_string().starts_with("NoAuth (-102): "));
        assert_eq!(Code(-999).to_string(), "unknown error (-999)");
    }
}
