//! Directive values, parsed into plain Rust types. No nginx symbols here: the directive
//! handlers in `module.rs` pass strings in and turn `ConfError`s into `nginx -t` messages.

mod credential;
mod endpoint;
pub mod kubernetes;
mod lb;
pub mod nacos;
#[cfg(test)]
mod tests;
pub mod time;
mod upsync;
pub mod zookeeper;

pub use crate::balancer::Method;
pub use credential::{parse_credential, Credential, CredentialError};
pub use endpoint::{parse_endpoint, Endpoint, HostPort, Target, MAX_HOSTS};
pub use lb::{parse_lb, LbSpec};
pub use upsync::{parse_upsync, parse_upsync_in};

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
