//! The registry credential of `token_file=`, as each registry takes it.

use std::fmt;

use super::SourceKind;

/// The registry credential read from `token_file=`.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// A Consul ACL token, sent as `X-Consul-Token`; for Kubernetes a bearer token.
    Token(String),
    /// etcd or Nacos user and password (`USER:PASSWORD` in the file): HTTP basic auth
    /// for etcd v2, a token from `/v3/auth/authenticate` for etcd v3, a token from the
    /// login API for Nacos.
    UserPassword { user: String, password: String },
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret, even in a debug dump.
        match self {
            Credential::Token(_) => f.write_str("Token(<hidden>)"),
            Credential::UserPassword { user, .. } => write!(f, "UserPassword({user}, <hidden>)"),
        }
    }
}

/// What a `token_file=` must hold (the error never says what it holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("must hold one non-empty line")]
    NotOneLine,
    #[error("must hold USER:PASSWORD for {0}")]
    NotUserPassword(&'static str),
}

/// Reads the content of a `token_file=` for a registry kind.
pub fn parse_credential(kind: SourceKind, content: &str) -> Result<Credential, CredentialError> {
    let line = content.trim();
    if line.is_empty() || line.contains(['\r', '\n']) || line.bytes().any(|b| b < b' ' || b == 0x7f)
    {
        return Err(CredentialError::NotOneLine);
    }
    match kind {
        SourceKind::ConsulKv
        | SourceKind::ConsulServices
        | SourceKind::ConsulHealth
        | SourceKind::Kubernetes => Ok(Credential::Token(line.to_string())),
        SourceKind::EtcdV2 | SourceKind::EtcdV3 | SourceKind::Nacos | SourceKind::ZooKeeper => {
            match line.split_once(':') {
                Some((u, p)) if !u.is_empty() && !p.is_empty() => Ok(Credential::UserPassword {
                    user: u.to_string(),
                    password: p.to_string(),
                }),
                _ => Err(CredentialError::NotUserPassword(match kind {
                    SourceKind::Nacos => "Nacos",
                    SourceKind::ZooKeeper => "ZooKeeper digest authentication",
                    _ => "etcd",
                })),
            }
        }
    }
}
