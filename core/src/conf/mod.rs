//! Directive values, parsed into plain Rust types. No nginx symbols here: the directive
//! handlers in `module.rs` pass strings in and turn `ConfError`s into `nginx -t` messages.

pub mod kubernetes;
pub mod nacos;
pub mod time;
pub mod zookeeper;

use std::fmt;

use time::parse_time_ms;

pub use crate::balancer::Method;

/// Which registry protocol an upstream follows (`upsync_type=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// Consul KV: `GET /v1/kv/<prefix>/?recurse`, one key per server.
    ConsulKv,
    /// Consul catalog (`/v1/catalog/service/NAME`) or health (`/v1/health/service/NAME`),
    /// settings from service tags.
    ConsulServices,
    /// Consul health (`/v1/health/service/NAME`), passing instances only.
    ConsulHealth,
    /// etcd v2: `GET /v2/keys/<dir>?recursive=true`, then watches.
    EtcdV2,
    /// etcd v3 through its JSON gateway: the path is the key prefix.
    EtcdV3,
    /// Nacos naming: the instance list of one service, polled.
    Nacos,
    /// Kubernetes EndpointSlices of a Service: list, then watch.
    Kubernetes,
    /// ZooKeeper: the children of a znode, watched over one session per ensemble.
    ZooKeeper,
}

impl SourceKind {
    pub const ACCEPTED: &'static str =
        "consul, consul_services, consul_health, etcd, etcdv3, nacos, kubernetes, zookeeper";

    pub fn parse(s: &str) -> Option<SourceKind> {
        match s {
            "consul" => Some(SourceKind::ConsulKv),
            "consul_services" => Some(SourceKind::ConsulServices),
            "consul_health" => Some(SourceKind::ConsulHealth),
            "etcd" => Some(SourceKind::EtcdV2),
            "etcdv3" => Some(SourceKind::EtcdV3),
            "nacos" => Some(SourceKind::Nacos),
            "kubernetes" => Some(SourceKind::Kubernetes),
            "zookeeper" => Some(SourceKind::ZooKeeper),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SourceKind::ConsulKv => "consul",
            SourceKind::ConsulServices => "consul_services",
            SourceKind::ConsulHealth => "consul_health",
            SourceKind::EtcdV2 => "etcd",
            SourceKind::EtcdV3 => "etcdv3",
            SourceKind::Nacos => "nacos",
            SourceKind::Kubernetes => "kubernetes",
            SourceKind::ZooKeeper => "zookeeper",
        }
    }
}

/// One registry address: a host name or IP literal (without brackets) and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl HostPort {
    /// `host:port` as sent in the Host header and shown in logs.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Where a registry lives: `[http://|https://]HOST[:PORT][,HOST[:PORT]...]/PATH[?QUERY]`.
/// Several hosts form a failover list, tried in order. The port is 80 when omitted (as
/// in the C module), 443 with `https://`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// At least one; the first is tried first.
    pub hosts: Vec<HostPort>,
    /// `https://`: TLS to the registry.
    pub tls: bool,
    /// Path with its leading `/`, without the query.
    pub path: String,
    /// The user's own query parameters (without `?`), kept and sent along.
    pub query: String,
}

impl Endpoint {
    /// Every address, comma-separated, as configured.
    pub fn authorities(&self) -> String {
        self.hosts
            .iter()
            .map(HostPort::authority)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.tls {
            f.write_str("https://")?;
        }
        write!(f, "{}{}", self.authorities(), self.path)?;
        if !self.query.is_empty() {
            write!(f, "?{}", self.query)?;
        }
        Ok(())
    }
}

/// One resolved registry address and the configured host it came from (an index into
/// `Endpoint::hosts`, for the Host header and the TLS name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub addr: std::net::SocketAddr,
    pub host: usize,
}

/// TLS to the registry (`https://` addresses), with nginx's `proxy_ssl_*` meanings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSpec {
    /// `ssl_verify=`: check the certificate chain and the name (default on).
    pub verify: bool,
    /// `ssl_trusted_certificate=`: CA file; the system's default store when unset.
    pub trusted_certificate: Option<String>,
    /// `ssl_certificate=` and `ssl_certificate_key=`: client certificate (mutual TLS).
    pub certificate: Option<(String, String)>,
    /// `ssl_name=`: the name sent in SNI and checked against the certificate; each
    /// address's own host when unset.
    pub name: Option<String>,
}

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

/// A parsed `upsync` directive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpsyncSpec {
    pub endpoint: Endpoint,
    pub kind: SourceKind,
    /// Fallback poll period and the minimum delay between failed attempts.
    pub interval_ms: u64,
    /// How long one long poll may take before the client gives up on it.
    pub timeout_ms: u64,
    pub strong_dependency: bool,
    /// The most shared memory the upstream may use (`zone_size=`; 0: no cap, it shares
    /// the `upsync` zone with the other upstreams).
    pub zone_size: usize,
    /// File holding the registry credential (Consul ACL token), read when the
    /// configuration is loaded so the secret stays out of nginx.conf.
    pub token_file: Option<String>,
    /// Set for `https://` addresses.
    pub tls: Option<TlsSpec>,
    /// The service and API of `upsync_type=nacos`.
    pub nacos: Option<nacos::NacosSpec>,
    /// The Service and port of `upsync_type=kubernetes`.
    pub kubernetes: Option<kubernetes::K8sSpec>,
    /// The znode, chroot, layout and session timeout of `upsync_type=zookeeper`.
    pub zookeeper: Option<zookeeper::ZkSpec>,
}

pub const DEFAULT_INTERVAL_MS: u64 = 5_000;
/// About 300 bytes per server: room for ~20,000 servers and an update in flight. Pages
/// are only touched as they are used.
/// The default size of the shared zone all upsync upstreams live in
/// (`upsync_zone_size`): 100,000 servers fit, and pages cost memory only once used.
pub const DEFAULT_SHARED_ZONE_SIZE: usize = 128 * 1024 * 1024;

/// The smallest `upsync_zone_size`.
pub const MIN_SHARED_ZONE_SIZE: usize = 1024 * 1024;
const MIN_ZONE_SIZE: usize = 64 * 1024;
pub const DEFAULT_TIMEOUT_MS: u64 = 360_000;

/// A directive value nginx must refuse. The Display text is the `nginx -t` message; the
/// handler prefixes the directive name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfError {
    #[error("invalid address \"{0}\": expected [https://]HOST[:PORT][,HOST[:PORT]...]/PATH, for example 127.0.0.1:8500/v1/kv/upstreams/NAME/")]
    Address(String),
    #[error("invalid port in \"{0}\": expected a number from 1 to 65535")]
    Port(String),
    #[error("missing upsync_type=; accepted: {}", SourceKind::ACCEPTED)]
    MissingType,
    #[error("unknown upsync_type \"{0}\"; accepted: {accepted}", accepted = SourceKind::ACCEPTED)]
    UnknownType(String),
    #[error("invalid time \"{0}\": expected an nginx time such as 500ms, 5s or 6m, at most 7d")]
    Time(String),
    #[error("invalid value \"{0}\": it must be \"on\" or \"off\"")]
    OnOff(String),
    #[error("unknown parameter \"{0}\"; accepted: upsync_type=, upsync_interval=, upsync_timeout=, strong_dependency=, zone_size=, token_file=, ssl_verify=, ssl_trusted_certificate=, ssl_certificate=, ssl_certificate_key=, ssl_name=; with upsync_type=nacos also nacos_namespace=, nacos_group=, nacos_clusters=, nacos_api=; with upsync_type=kubernetes also k8s_port=, k8s_protocol=, k8s_address_type=; with upsync_type=zookeeper also zk_chroot=, zk_layout=, zk_session_timeout=")]
    UnknownParam(String),
    #[error("invalid zone_size \"{0}\": expected a size of at least 64k, such as 32m (the most shared memory this upstream may use)")]
    ZoneSize(String),
    #[error("\"{0}\" is given twice")]
    Duplicate(&'static str),
    #[error("\"{0}=\" is given twice")]
    DuplicateParam(String),
    #[error("\"{0}=\" applies to upsync_type=nacos only")]
    NacosOnly(String),
    #[error("invalid {param} \"{value}\": expected {expected}")]
    NacosValue {
        param: String,
        value: String,
        expected: &'static str,
    },
    #[error("invalid Nacos service \"{0}\": expected HOST:PORT/SERVICE (with nacos_namespace=, nacos_group=, nacos_clusters=) or an instance-list path such as HOST:PORT/nacos/v1/ns/instance/list?serviceName=NAME&groupName=GROUP&namespaceId=ID")]
    NacosPath(String),
    #[error("unknown query parameter \"{key}\" in the Nacos path; accepted: {accepted}")]
    NacosQuery { key: String, accepted: &'static str },
    #[error("{param}= and {path_key} in the path both set it, differently; give one")]
    NacosConflict {
        param: &'static str,
        path_key: &'static str,
    },
    #[error("path \"{path}\" does not fit upsync_type={kind}: expected a path under {expected}")]
    PathForKind {
        path: String,
        kind: &'static str,
        expected: &'static str,
    },
    #[error("\"{0}\" applies to https:// registry addresses only")]
    TlsOnly(&'static str),
    #[error("ssl_certificate= and ssl_certificate_key= must be given together")]
    CertWithoutKey,
    #[error("invalid ssl_name \"{0}\": expected a host name or IP address")]
    TlsName(String),
    #[error("too many registry addresses in \"{0}\": at most {max}", max = MAX_HOSTS)]
    TooManyHosts(String),
    #[error("unknown method \"{0}\"; accepted: {accepted}", accepted = LbSpec::ACCEPTED)]
    UnknownLb(String),
    #[error("invalid Kubernetes Service \"{0}\": expected [https://]HOST[:PORT][,HOST[:PORT]...]/NAMESPACE/SERVICE or in-cluster/[NAMESPACE/]SERVICE, names in lower case (letters, digits, '-'), such as https://10.0.0.1:6443/default/web")]
    K8sService(String),
    #[error("\"{0}\" applies to upsync_type=kubernetes only")]
    K8sOnly(&'static str),
    #[error("invalid k8s_port \"{0}\": expected the Service port's name (lower-case letters, digits, '-') or the endpoints' port number (1-65535)")]
    K8sPort(String),
    #[error("invalid k8s_protocol \"{0}\": expected TCP or UDP")]
    K8sProtocol(String),
    #[error("invalid k8s_address_type \"{0}\": expected IPv4, IPv6 or any")]
    K8sAddressType(String),
    #[error("in-cluster/: {0}")]
    InCluster(String),
    #[error(transparent)]
    ZooKeeper(zookeeper::ZkConfError),
}

/// Most registry addresses in one failover list.
pub const MAX_HOSTS: usize = 16;

fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && (host.parse::<std::net::Ipv6Addr>().is_ok()
            || host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_'))
}

/// One `HOST[:PORT]` of the address list.
fn parse_host_port(hostport: &str, default_port: u16, arg: &str) -> Result<HostPort, ConfError> {
    let bad = || ConfError::Address(arg.to_string());
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(bad)?;
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad());
        }
        match after {
            "" => (h, None),
            p if p.starts_with(':') => (h, Some(&p[1..])),
            _ => return Err(bad()),
        }
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.contains(':') && !hostport.starts_with('[') || !valid_host(host) {
        return Err(bad());
    }
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(ConfError::Port(arg.to_string())),
        },
    };
    Ok(HostPort {
        host: host.to_string(),
        port,
    })
}

/// Splits `[http://|https://]HOST[:PORT][,HOST[:PORT]...]/PATH[?QUERY]`.
pub fn parse_endpoint(arg: &str) -> Result<Endpoint, ConfError> {
    let (tls, rest) = match arg.strip_prefix("https://") {
        Some(r) => (true, r),
        None => (false, arg.strip_prefix("http://").unwrap_or(arg)),
    };
    let slash = rest
        .find('/')
        .ok_or_else(|| ConfError::Address(arg.to_string()))?;
    let (hostlist, path_query) = rest.split_at(slash);
    let (path, query) = match path_query.split_once('?') {
        Some((p, q)) => (p, q),
        None => (path_query, ""),
    };
    // No spaces or control characters anywhere in what goes on the request line: they
    // would let a configuration inject headers into registry requests.
    let unsafe_byte = |b: u8| b <= b' ' || b == 0x7f;
    if hostlist.is_empty()
        || path.len() < 2
        || path.bytes().any(unsafe_byte)
        || query.bytes().any(unsafe_byte)
    {
        return Err(ConfError::Address(arg.to_string()));
    }
    let default_port = if tls { 443 } else { 80 };
    let hosts = hostlist
        .split(',')
        .map(|hp| parse_host_port(hp, default_port, arg))
        .collect::<Result<Vec<_>, _>>()?;
    if hosts.len() > MAX_HOSTS {
        return Err(ConfError::TooManyHosts(arg.to_string()));
    }
    Ok(Endpoint {
        hosts,
        tls,
        path: path.to_string(),
        query: query.to_string(),
    })
}

/// Longest upsync_interval / upsync_timeout: a week (and far from timer overflow).
const MAX_TIME_MS: u64 = 7 * 86_400_000;

fn parse_time_param(v: &str, default: u64) -> Result<u64, ConfError> {
    match parse_time_ms(v) {
        // The C module treats 0 as "use the default"; keep that for drop-in configs.
        Some(0) => Ok(default),
        Some(ms) if ms <= MAX_TIME_MS => Ok(ms),
        _ => Err(ConfError::Time(v.to_string())),
    }
}

fn parse_on_off(v: &str) -> Result<bool, ConfError> {
    match v.to_ascii_lowercase().as_str() {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(ConfError::OnOff(v.to_string())),
    }
}

/// Checks that the path suits the protocol and normalizes it: a Consul KV prefix always ends
/// in `/`, so `upstreams/test` never matches `upstreams/test01`.
fn normalize_path(kind: SourceKind, ep: &mut Endpoint) -> Result<(), ConfError> {
    let (needles, expected): (&[&str], &'static str) = match kind {
        SourceKind::ConsulKv => (&["/v1/kv/"], "/v1/kv/"),
        SourceKind::ConsulServices => (
            &["/v1/catalog/service/", "/v1/health/service/"],
            "/v1/catalog/service/ or /v1/health/service/",
        ),
        SourceKind::ConsulHealth => (&["/v1/health/service/"], "/v1/health/service/"),
        SourceKind::EtcdV2 => (&["/v2/keys/"], "/v2/keys/"),
        // the key prefix itself, e.g. /upstreams/NAME/
        SourceKind::EtcdV3 => (&["/"], "/ (the key prefix, such as /upstreams/NAME/)"),
        // checked by nacos::parse, which knows both forms
        SourceKind::Nacos => return Ok(()),
        // checked by kubernetes_service() instead
        SourceKind::Kubernetes => (&["/"], "/NAMESPACE/SERVICE"),
        // checked by zookeeper::parse
        SourceKind::ZooKeeper => return Ok(()),
    };
    let ok = needles
        .iter()
        .any(|n| ep.path.find(n).is_some_and(|i| ep.path.len() > i + n.len()));
    if !ok {
        return Err(ConfError::PathForKind {
            path: ep.path.clone(),
            kind: kind.name(),
            expected,
        });
    }
    match kind {
        SourceKind::ConsulKv | SourceKind::EtcdV2 | SourceKind::EtcdV3 => {
            if !ep.path.ends_with('/') {
                ep.path.push('/');
            }
        }
        SourceKind::ConsulServices | SourceKind::ConsulHealth | SourceKind::Kubernetes => {
            while ep.path.ends_with('/') {
                ep.path.pop();
            }
        }
        SourceKind::Nacos | SourceKind::ZooKeeper => {}
    }
    Ok(())
}

/// Parses the arguments of `upsync` (everything after the directive name).
/// `in-cluster/` addresses read the process environment and the service account files.
pub fn parse_upsync(args: &[&str]) -> Result<UpsyncSpec, ConfError> {
    parse_upsync_in(args, &kubernetes::SystemEnv)
}

/// `parse_upsync` with the environment `in-cluster/` reads from given.
pub fn parse_upsync_in(
    args: &[&str],
    env: &dyn kubernetes::ClusterEnv,
) -> Result<UpsyncSpec, ConfError> {
    let first = args
        .first()
        .ok_or_else(|| ConfError::Address(String::new()))?;
    // `in-cluster/...` becomes an address once the type is known (Kubernetes only).
    let in_cluster = first.starts_with(kubernetes::IN_CLUSTER);
    let mut endpoint = if in_cluster {
        parse_endpoint("in-cluster/x/x")?
    } else {
        parse_endpoint(first)?
    };
    let mut k8s_port = None;
    let mut k8s_protocol = None;
    let mut k8s_family = None;
    let mut kind = None;
    let mut interval = None;
    let mut timeout = None;
    let mut strong = None;
    let mut zone_size = None;
    let mut token_file = None;
    let mut ssl_verify = None;
    let mut ssl_trusted = None;
    let mut ssl_cert = None;
    let mut ssl_key = None;
    let mut ssl_name = None;
    let mut nacos_params: Vec<(&str, &str)> = Vec::new();
    let mut zk_params: Vec<(&str, &str)> = Vec::new();
    for arg in &args[1..] {
        let (k, v) = arg
            .split_once('=')
            .ok_or_else(|| ConfError::UnknownParam(arg.to_string()))?;
        let dup = |slot: bool, name| {
            if slot {
                Err(ConfError::Duplicate(name))
            } else {
                Ok(())
            }
        };
        match k {
            "upsync_type" => {
                dup(kind.is_some(), "upsync_type")?;
                kind = Some(
                    SourceKind::parse(v).ok_or_else(|| ConfError::UnknownType(v.to_string()))?,
                );
            }
            "upsync_interval" => {
                dup(interval.is_some(), "upsync_interval")?;
                interval = Some(parse_time_param(v, DEFAULT_INTERVAL_MS)?);
            }
            "upsync_timeout" => {
                dup(timeout.is_some(), "upsync_timeout")?;
                timeout = Some(parse_time_param(v, DEFAULT_TIMEOUT_MS)?);
            }
            "strong_dependency" => {
                dup(strong.is_some(), "strong_dependency")?;
                strong = Some(parse_on_off(v)?);
            }
            "token_file" => {
                dup(token_file.is_some(), "token_file")?;
                if v.is_empty() {
                    return Err(ConfError::UnknownParam(arg.to_string()));
                }
                token_file = Some(v.to_string());
            }
            "ssl_verify" => {
                dup(ssl_verify.is_some(), "ssl_verify")?;
                ssl_verify = Some(parse_on_off(v)?);
            }
            "ssl_trusted_certificate" | "ssl_certificate" | "ssl_certificate_key" => {
                let (slot, name) = match k {
                    "ssl_trusted_certificate" => (&mut ssl_trusted, "ssl_trusted_certificate"),
                    "ssl_certificate" => (&mut ssl_cert, "ssl_certificate"),
                    _ => (&mut ssl_key, "ssl_certificate_key"),
                };
                dup(slot.is_some(), name)?;
                if v.is_empty() {
                    return Err(ConfError::UnknownParam(arg.to_string()));
                }
                *slot = Some(v.to_string());
            }
            "ssl_name" => {
                dup(ssl_name.is_some(), "ssl_name")?;
                if !valid_host(v) {
                    return Err(ConfError::TlsName(v.to_string()));
                }
                ssl_name = Some(v.to_string());
            }
            "k8s_port" => {
                dup(k8s_port.is_some(), "k8s_port")?;
                k8s_port = Some(
                    kubernetes::parse_port(v).ok_or_else(|| ConfError::K8sPort(v.to_string()))?,
                );
            }
            "k8s_protocol" => {
                dup(k8s_protocol.is_some(), "k8s_protocol")?;
                k8s_protocol = Some(
                    kubernetes::parse_protocol(v)
                        .ok_or_else(|| ConfError::K8sProtocol(v.to_string()))?,
                );
            }
            "k8s_address_type" => {
                dup(k8s_family.is_some(), "k8s_address_type")?;
                k8s_family = Some(
                    kubernetes::parse_family(v)
                        .ok_or_else(|| ConfError::K8sAddressType(v.to_string()))?,
                );
            }
            "zone_size" => {
                dup(zone_size.is_some(), "zone_size")?;
                zone_size = Some(
                    time::parse_size(v)
                        .filter(|&n| n >= MIN_ZONE_SIZE)
                        .ok_or_else(|| ConfError::ZoneSize(v.to_string()))?,
                );
            }
            k if nacos::PARAMS.contains(&k) => nacos_params.push((k, v)),
            k if zookeeper::PARAMS.contains(&k) => zk_params.push((k, v)),
            _ => return Err(ConfError::UnknownParam(arg.to_string())),
        }
    }
    let kind = kind.ok_or(ConfError::MissingType)?;
    let k8s = if kind == SourceKind::Kubernetes {
        let (ep, k8s) = kubernetes_service(first, endpoint, in_cluster, env)?;
        endpoint = ep;
        if in_cluster {
            // The Pod's own credentials, unless given explicitly.
            let sa = kubernetes::SERVICE_ACCOUNT_DIR;
            token_file.get_or_insert_with(|| format!("{sa}/token"));
            ssl_trusted.get_or_insert_with(|| format!("{sa}/ca.crt"));
        }
        Some(kubernetes::K8sSpec {
            port: k8s_port.unwrap_or(kubernetes::PortSel::Default),
            protocol: k8s_protocol.unwrap_or(kubernetes::Protocol::Tcp),
            family: k8s_family.unwrap_or(kubernetes::Family::Any),
            ..k8s
        })
    } else {
        if in_cluster {
            return Err(ConfError::K8sOnly("in-cluster/"));
        }
        let given = [
            (k8s_port.is_some(), "k8s_port="),
            (k8s_protocol.is_some(), "k8s_protocol="),
            (k8s_family.is_some(), "k8s_address_type="),
        ];
        if let Some((_, name)) = given.iter().find(|(set, _)| *set) {
            return Err(ConfError::K8sOnly(name));
        }
        normalize_path(kind, &mut endpoint)?;
        None
    };
    let zk = if kind == SourceKind::ZooKeeper {
        let (ep, zk) = zookeeper::parse(first, &zk_params)?;
        endpoint = ep;
        Some(zk)
    } else if let Some((k, _)) = zk_params.first() {
        return Err(zookeeper::ZkConfError::Only(k.to_string()).into());
    } else {
        None
    };
    let nacos = if kind == SourceKind::Nacos {
        Some(nacos::parse(&endpoint, &nacos_params)?)
    } else if let Some((k, _)) = nacos_params.first() {
        return Err(ConfError::NacosOnly(k.to_string()));
    } else {
        None
    };
    let tls = if endpoint.tls {
        let certificate = match (ssl_cert, ssl_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => return Err(ConfError::CertWithoutKey),
        };
        Some(TlsSpec {
            verify: ssl_verify.unwrap_or(true),
            trusted_certificate: ssl_trusted,
            certificate,
            name: ssl_name,
        })
    } else {
        let given = [
            (ssl_verify.is_some(), "ssl_verify="),
            (ssl_trusted.is_some(), "ssl_trusted_certificate="),
            (ssl_cert.is_some(), "ssl_certificate="),
            (ssl_key.is_some(), "ssl_certificate_key="),
            (ssl_name.is_some(), "ssl_name="),
        ];
        if let Some((_, name)) = given.iter().find(|(set, _)| *set) {
            return Err(ConfError::TlsOnly(name));
        }
        None
    };
    Ok(UpsyncSpec {
        endpoint,
        kind,
        interval_ms: interval.unwrap_or(DEFAULT_INTERVAL_MS),
        timeout_ms: timeout.unwrap_or(DEFAULT_TIMEOUT_MS),
        strong_dependency: strong.unwrap_or(false),
        zone_size: zone_size.unwrap_or(0),
        token_file,
        tls,
        nacos,
        kubernetes: k8s,
        zookeeper: zk,
    })
}

/// The address and Service of `upsync_type=kubernetes`: `/NAMESPACE/SERVICE` after the
/// API server's address, or `in-cluster/[NAMESPACE/]SERVICE` with the address from
/// the environment (always https) and the namespace, when not given, from the
/// service account.
fn kubernetes_service(
    arg: &str,
    mut endpoint: Endpoint,
    in_cluster: bool,
    env: &dyn kubernetes::ClusterEnv,
) -> Result<(Endpoint, kubernetes::K8sSpec), ConfError> {
    let bad = || ConfError::K8sService(arg.to_string());
    let (namespace, service) = if in_cluster {
        let rest = &arg[kubernetes::IN_CLUSTER.len()..];
        let (ns, svc) = kubernetes::parse_service_path(rest, true).ok_or_else(bad)?;
        let authority = kubernetes::in_cluster_authority(env).map_err(ConfError::InCluster)?;
        let ns = match ns {
            Some(ns) => ns,
            None => kubernetes::in_cluster_namespace(env).map_err(ConfError::InCluster)?,
        };
        endpoint = parse_endpoint(&format!("https://{authority}/{ns}/{svc}")).map_err(|_| {
            ConfError::InCluster(format!(
                "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT give the invalid address \"{}\"",
                crate::servers::printable(&authority, 128)
            ))
        })?;
        (ns, svc)
    } else {
        if !endpoint.query.is_empty() {
            return Err(bad());
        }
        match kubernetes::parse_service_path(&endpoint.path, false).ok_or_else(bad)? {
            (Some(ns), svc) => (ns, svc),
            (None, _) => return Err(bad()),
        }
    };
    endpoint.path = format!("/{namespace}/{service}");
    Ok((
        endpoint,
        kubernetes::K8sSpec {
            namespace,
            service,
            port: kubernetes::PortSel::Default,
            protocol: kubernetes::Protocol::Tcp,
            family: kubernetes::Family::Any,
            in_cluster,
        },
    ))
}

/// A parsed `upsync_lb`: the method, and the hash key when one was given (the hash
/// methods use `$remote_addr` by default).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LbSpec {
    pub method: Method,
    pub key: Option<String>,
}

impl LbSpec {
    pub const ACCEPTED: &'static str =
        "roundrobin, least_conn, ip_hash, hash_modula [KEY], hash_ketama [KEY], hash KEY [consistent], random [two [least_conn]]";

    /// The method's name as configured, for logs and status.
    pub fn name(&self) -> &'static str {
        match self.method {
            Method::RoundRobin => "roundrobin",
            Method::LeastConn => "least_conn",
            Method::IpHash => "ip_hash",
            Method::HashModula => "hash_modula",
            Method::HashKetama => "hash_ketama",
            Method::Random { two: false } => "random",
            Method::Random { two: true } => "random two",
        }
    }
}

/// Parses the arguments of `upsync_lb` (the C module's five names, plus nginx's own
/// `hash KEY [consistent]` and `random [two [least_conn]]` forms).
pub fn parse_lb(args: &[&str]) -> Result<LbSpec, ConfError> {
    let bad = || ConfError::UnknownLb(args.join(" "));
    let key = |a: Option<&&str>| a.map(|k| k.to_string());
    let spec = match args {
        ["roundrobin" | "round_robin"] => LbSpec {
            method: Method::RoundRobin,
            key: None,
        },
        ["least_conn"] => LbSpec {
            method: Method::LeastConn,
            key: None,
        },
        ["ip_hash"] => LbSpec {
            method: Method::IpHash,
            key: None,
        },
        ["hash_modula", rest @ ..] if rest.len() <= 1 => LbSpec {
            method: Method::HashModula,
            key: key(rest.first()),
        },
        ["hash_ketama", rest @ ..] if rest.len() <= 1 => LbSpec {
            method: Method::HashKetama,
            key: key(rest.first()),
        },
        ["hash", k] => LbSpec {
            method: Method::HashModula,
            key: Some(k.to_string()),
        },
        ["hash", k, "consistent"] => LbSpec {
            method: Method::HashKetama,
            key: Some(k.to_string()),
        },
        ["random"] => LbSpec {
            method: Method::Random { two: false },
            key: None,
        },
        ["random", "two"] | ["random", "two", "least_conn"] => LbSpec {
            method: Method::Random { two: true },
            key: None,
        },
        _ => return Err(bad()),
    };
    if spec.key.as_deref() == Some("") {
        return Err(bad());
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(args: &[&str]) -> UpsyncSpec {
        parse_upsync(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    #[test]
    fn seed_configurations() {
        let s = ok(&[
            "127.0.0.1:8500/v1/kv/upstreams/my_tcp_backend/",
            "upsync_type=consul",
            "upsync_interval=500ms",
            "upsync_timeout=6m",
            "strong_dependency=on",
        ]);
        assert_eq!(s.kind, SourceKind::ConsulKv);
        assert_eq!(s.endpoint.hosts[0].host, "127.0.0.1");
        assert_eq!(s.endpoint.hosts[0].port, 8500);
        assert_eq!(s.tls, None);
        assert_eq!(s.endpoint.path, "/v1/kv/upstreams/my_tcp_backend/");
        assert_eq!(
            (s.interval_ms, s.timeout_ms, s.strong_dependency),
            (500, 360_000, true)
        );

        let s = ok(&[
            "127.0.0.1:8500/v1/health/service/my-service",
            "upsync_type=consul_services",
        ]);
        assert_eq!(s.kind, SourceKind::ConsulServices);
        assert_eq!(
            (s.interval_ms, s.timeout_ms, s.strong_dependency),
            (5000, 360_000, false)
        );

        let s = ok(&[
            "127.0.0.1:2379/v2/keys/upstreams/my_backend",
            "upsync_type=etcd",
        ]);
        assert_eq!(s.endpoint.path, "/v2/keys/upstreams/my_backend/");
    }

    #[test]
    fn endpoint_forms() {
        let e = parse_endpoint("consul.service:8500/v1/kv/a/").unwrap();
        assert_eq!(
            (e.hosts[0].host.as_str(), e.hosts[0].port),
            ("consul.service", 8500)
        );
        let e = parse_endpoint("consul/v1/kv/a/").unwrap();
        assert_eq!(e.hosts[0].port, 80);
        let e = parse_endpoint("[::1]:8500/v1/kv/a/?dc=dc2").unwrap();
        assert_eq!(
            (e.hosts[0].host.as_str(), e.hosts[0].port, e.query.as_str()),
            ("::1", 8500, "dc=dc2")
        );
        assert_eq!(e.to_string(), "[::1]:8500/v1/kv/a/?dc=dc2");
        let e = parse_endpoint("http://127.0.0.1:8500/v1/kv/a/").unwrap();
        assert_eq!(e.authorities(), "127.0.0.1:8500");
        assert!(!e.tls);
    }

    #[test]
    fn failover_lists_and_tls() {
        let e = parse_endpoint("https://10.0.0.1:2379,etcd-b,[::1]:2381/v2/keys/x/").unwrap();
        assert!(e.tls);
        assert_eq!(e.authorities(), "10.0.0.1:2379,etcd-b:443,[::1]:2381");
        assert_eq!(
            e.to_string(),
            "https://10.0.0.1:2379,etcd-b:443,[::1]:2381/v2/keys/x/"
        );
        for bad in [
            "a:1,/v1/kv/x/",
            ",a:1/v1/kv/x/",
            "a:1,,b:2/v1/kv/x/",
            "::1/v1/kv/x/",
            "https:///v1/kv/x/",
        ] {
            assert!(
                matches!(parse_endpoint(bad), Err(ConfError::Address(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_endpoint("a:1,b:x/v1/kv/x/"),
            Err(ConfError::Port(_))
        ));
        let many = vec!["h:1"; MAX_HOSTS + 1].join(",") + "/v1/kv/x/";
        assert!(matches!(
            parse_endpoint(&many),
            Err(ConfError::TooManyHosts(_))
        ));

        let s = ok(&["https://127.0.0.1:2379/p/", "upsync_type=etcdv3"]);
        assert_eq!(
            s.tls,
            Some(TlsSpec {
                verify: true,
                trusted_certificate: None,
                certificate: None,
                name: None
            })
        );
        let s = ok(&[
            "https://127.0.0.1:2379/p/",
            "upsync_type=etcdv3",
            "ssl_verify=off",
            "ssl_trusted_certificate=/ca.pem",
            "ssl_certificate=/c.pem",
            "ssl_certificate_key=/k.pem",
            "ssl_name=etcd.internal",
        ]);
        let t = s.tls.unwrap();
        assert!(!t.verify);
        assert_eq!(t.trusted_certificate.as_deref(), Some("/ca.pem"));
        assert_eq!(t.certificate, Some(("/c.pem".into(), "/k.pem".into())));
        assert_eq!(t.name.as_deref(), Some("etcd.internal"));
        let err = |a: &[&str]| parse_upsync(a).unwrap_err();
        assert_eq!(
            err(&["127.0.0.1:2379/p/", "upsync_type=etcdv3", "ssl_verify=off"]),
            ConfError::TlsOnly("ssl_verify=")
        );
        assert_eq!(
            err(&["https://h:1/p/", "upsync_type=etcdv3", "ssl_certificate=/c"]),
            ConfError::CertWithoutKey
        );
        assert_eq!(
            err(&["https://h:1/p/", "upsync_type=etcdv3", "ssl_name=a b"]),
            ConfError::TlsName("a b".into())
        );
    }

    #[test]
    fn credentials_per_registry() {
        assert_eq!(
            parse_credential(SourceKind::ConsulKv, "  abc-123\n"),
            Ok(Credential::Token("abc-123".into()))
        );
        assert_eq!(
            parse_credential(SourceKind::EtcdV3, "root:pa:ss\n"),
            Ok(Credential::UserPassword {
                user: "root".into(),
                password: "pa:ss".into()
            })
        );
        for (kind, bad) in [
            (SourceKind::EtcdV2, "nopassword"),
            (SourceKind::EtcdV2, ":pw"),
            (SourceKind::EtcdV3, "user:"),
            (SourceKind::ConsulKv, ""),
            (SourceKind::ConsulKv, "a\nb"),
        ] {
            assert!(parse_credential(kind, bad).is_err(), "{bad:?}");
        }
        let dbg = format!(
            "{:?}",
            Credential::UserPassword {
                user: "u".into(),
                password: "s3cret".into()
            }
        );
        assert!(!dbg.contains("s3cret"), "{dbg}");
    }

    #[test]
    fn rejects_with_specific_errors() {
        use ConfError::*;
        type Case<'a> = (&'a [&'a str], fn(&ConfError) -> bool);
        let cases: &[Case] = &[
            (&["127.0.0.1:8500"], |e| matches!(e, Address(_))),
            (&["127.0.0.1:8500/", "upsync_type=consul"], |e| {
                matches!(e, Address(_))
            }),
            (&[":8500/v1/kv/a/", "upsync_type=consul"], |e| {
                matches!(e, Address(_))
            }),
            (&["127.0.0.1:0/v1/kv/a/", "upsync_type=consul"], |e| {
                matches!(e, Port(_))
            }),
            (&["127.0.0.1:70000/v1/kv/a/", "upsync_type=consul"], |e| {
                matches!(e, Port(_))
            }),
            (&["127.0.0.1:/v1/kv/a/", "upsync_type=consul"], |e| {
                matches!(e, Port(_))
            }),
            (&["127.0.0.1:85a/v1/kv/a/", "upsync_type=consul"], |e| {
                matches!(e, Port(_))
            }),
            (&["127.0.0.1:8500/v1/kv/a/"], |e| matches!(e, MissingType)),
            (&["127.0.0.1:8500/v1/kv/a/", "upsync_type=zk"], |e| {
                matches!(e, UnknownType(_))
            }),
            (&["127.0.0.1:8500/v1/kv/a/", "upsync_type=Consul"], |e| {
                matches!(e, UnknownType(_))
            }),
            (
                &[
                    "127.0.0.1:8500/v1/kv/a/",
                    "upsync_type=consul",
                    "upsync_interval=5x",
                ],
                |e| matches!(e, Time(_)),
            ),
            (
                &[
                    "127.0.0.1:8500/v1/kv/a/",
                    "upsync_type=consul",
                    "upsync_timeout=-1",
                ],
                |e| matches!(e, Time(_)),
            ),
            (
                &[
                    "127.0.0.1:8500/v1/kv/a/",
                    "upsync_type=consul",
                    "strong_dependency=yes",
                ],
                |e| matches!(e, OnOff(_)),
            ),
            (
                &["127.0.0.1:8500/v1/kv/a/", "upsync_type=consul", "foo=bar"],
                |e| matches!(e, UnknownParam(_)),
            ),
            (
                &["127.0.0.1:8500/v1/kv/a/", "upsync_type=consul", "bare"],
                |e| matches!(e, UnknownParam(_)),
            ),
            (
                &[
                    "127.0.0.1:8500/v1/kv/a/",
                    "upsync_type=consul",
                    "zone_size=1k",
                ],
                |e| matches!(e, ZoneSize(_)),
            ),
            (
                &[
                    "127.0.0.1:8500/v1/kv/a/",
                    "upsync_type=consul",
                    "zone_size=lots",
                ],
                |e| matches!(e, ZoneSize(_)),
            ),
            (
                &[
                    "127.0.0.1:8500/v1/kv/a/",
                    "upsync_type=consul",
                    "upsync_type=etcd",
                ],
                |e| matches!(e, Duplicate(_)),
            ),
            (&["127.0.0.1:8500/v2/keys/a/", "upsync_type=consul"], |e| {
                matches!(e, PathForKind { .. })
            }),
            (&["127.0.0.1:8500/v1/kv/", "upsync_type=consul"], |e| {
                matches!(e, PathForKind { .. })
            }),
            (
                &[
                    "127.0.0.1:8500/v1/kv/a/",
                    "upsync_type=consul",
                    "ssl_name=x",
                ],
                |e| matches!(e, TlsOnly(_)),
            ),
        ];
        for (args, check) in cases {
            let err = parse_upsync(args).expect_err(&format!("{args:?} should fail"));
            assert!(check(&err), "{args:?}: unexpected {err:?}");
            assert!(!err.to_string().is_empty());
        }
    }

    #[test]
    fn zero_time_means_default_like_c_module() {
        let s = ok(&[
            "h:1/v1/kv/a/",
            "upsync_type=consul",
            "upsync_interval=0",
            "upsync_timeout=0s",
        ]);
        assert_eq!(
            (s.interval_ms, s.timeout_ms),
            (DEFAULT_INTERVAL_MS, DEFAULT_TIMEOUT_MS)
        );
    }

    #[test]
    fn lb_methods() {
        let m = |a: &[&str]| parse_lb(a).map(|s| (s.method, s.key));
        assert_eq!(m(&["roundrobin"]), Ok((Method::RoundRobin, None)));
        assert_eq!(m(&["round_robin"]), Ok((Method::RoundRobin, None)));
        assert_eq!(m(&["least_conn"]), Ok((Method::LeastConn, None)));
        assert_eq!(m(&["ip_hash"]), Ok((Method::IpHash, None)));
        assert_eq!(m(&["hash_modula"]), Ok((Method::HashModula, None)));
        assert_eq!(
            m(&["hash_ketama", "$remote_port"]),
            Ok((Method::HashKetama, Some("$remote_port".into())))
        );
        assert_eq!(
            m(&["hash", "$x"]),
            Ok((Method::HashModula, Some("$x".into())))
        );
        assert_eq!(
            m(&["hash", "$x", "consistent"]),
            Ok((Method::HashKetama, Some("$x".into())))
        );
        assert_eq!(m(&["random"]), Ok((Method::Random { two: false }, None)));
        assert_eq!(
            m(&["random", "two", "least_conn"]),
            Ok((Method::Random { two: true }, None))
        );
        for bad in [
            &["rr"][..],
            &["least_conn", "x"],
            &["hash"],
            &["hash", "$x", "ring"],
            &["random", "three"],
            &["ip_hash", "$x"],
        ] {
            let e = parse_lb(bad).unwrap_err();
            assert!(e.to_string().contains("accepted: roundrobin"), "{e}");
        }
    }
}
