//! `upsync_type=kubernetes` directive values: the Service (`/NAMESPACE/SERVICE` or
//! `in-cluster/[NAMESPACE/]SERVICE`), `k8s_port=`, `k8s_protocol=`, `k8s_address_type=`,
//! and what running inside a Pod supplies (API server address, token, CA, namespace).

use std::fmt;

/// Where a Pod finds its service account's credentials.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The address form that means "the API server of the cluster nginx runs in".
pub const IN_CLUSTER: &str = "in-cluster/";

/// `k8s_port=`: which port of the Service's endpoints becomes the server port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSel {
    /// Not given: the slice's unnamed port, else its only port of the protocol.
    Default,
    /// The Service port's name (slices carry it next to the endpoints' port number).
    Name(String),
    /// The endpoints' port number (the Pod's port; slices do not carry the Service's).
    Number(u16),
}

impl fmt::Display for PortSel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortSel::Default => f.write_str("the unnamed or only port"),
            PortSel::Name(n) => write!(f, "port \"{n}\""),
            PortSel::Number(n) => write!(f, "port {n}"),
        }
    }
}

/// `k8s_protocol=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

/// `k8s_address_type=`: which EndpointSlices to read by `addressType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4 and IPv6 slices (a dual-stack Service lists each Pod once per family).
    Any,
    V4,
    V6,
}

/// What `upsync_type=kubernetes` watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sSpec {
    pub namespace: String,
    pub service: String,
    pub port: PortSel,
    pub protocol: Protocol,
    pub family: Family,
    /// The address came from `in-cluster/` (KUBERNETES_SERVICE_HOST/_PORT).
    pub in_cluster: bool,
}

/// What a Pod's environment offers: variables and the service account files. A trait
/// so that directive parsing is tested without a cluster.
pub trait ClusterEnv {
    fn var(&self, name: &str) -> Option<String>;
    fn read(&self, path: &str) -> Result<String, String>;
}

/// The process environment and file system (read when the configuration is loaded).
pub struct SystemEnv;

impl ClusterEnv for SystemEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
    fn read(&self, path: &str) -> Result<String, String> {
        std::fs::read_to_string(path).map_err(|e| e.to_string())
    }
}

/// An RFC 1123 label, as Kubernetes requires for namespaces and Service names (at most
/// 63 lower-case letters, digits and `-`, starting and ending alphanumeric).
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// `NAMESPACE/SERVICE` (or just `SERVICE` when `namespace_optional`), a trailing `/`
/// allowed; `None` when it is not of that shape.
pub fn parse_service_path(
    path: &str,
    namespace_optional: bool,
) -> Option<(Option<String>, String)> {
    let p = path.trim_start_matches('/');
    let p = p.strip_suffix('/').unwrap_or(p);
    let parts: Vec<&str> = p.split('/').collect();
    match parts.as_slice() {
        [ns, svc] if is_dns_label(ns) && is_dns_label(svc) => {
            Some((Some(ns.to_string()), svc.to_string()))
        }
        [svc] if namespace_optional && is_dns_label(svc) => Some((None, svc.to_string())),
        _ => None,
    }
}

/// `k8s_port=NAME|NUMBER`: all digits is a number (1-65535), anything else a port name
/// (a DNS label).
pub fn parse_port(v: &str) -> Option<PortSel> {
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return match v.parse::<u16>() {
            Ok(n) if n > 0 => Some(PortSel::Number(n)),
            _ => None,
        };
    }
    is_dns_label(v).then(|| PortSel::Name(v.to_string()))
}

pub fn parse_protocol(v: &str) -> Option<Protocol> {
    match v.to_ascii_uppercase().as_str() {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

pub fn parse_family(v: &str) -> Option<Family> {
    match v.to_ascii_lowercase().as_str() {
        "ipv4" => Some(Family::V4),
        "ipv6" => Some(Family::V6),
        "any" => Some(Family::Any),
        _ => None,
    }
}

/// The API server address a Pod is given: `KUBERNETES_SERVICE_HOST:KUBERNETES_SERVICE_PORT`
/// (an IPv6 host is bracketed), or why there is none.
pub fn in_cluster_authority(env: &dyn ClusterEnv) -> Result<String, String> {
    let host = env.var("KUBERNETES_SERVICE_HOST");
    let port = env.var("KUBERNETES_SERVICE_PORT");
    match (host, port) {
        (Some(h), Some(p)) => Ok(if h.contains(':') && !h.starts_with('[') {
            format!("[{h}]:{p}")
        } else {
            format!("{h}:{p}")
        }),
        _ => Err("KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set (nginx does not run in a Pod, or its master's environment was cleared); outside a cluster give the API server: https://HOST:PORT/NAMESPACE/SERVICE".into()),
    }
}

/// The namespace of the Pod's service account, for `in-cluster/SERVICE`.
pub fn in_cluster_namespace(env: &dyn ClusterEnv) -> Result<String, String> {
    let path = format!("{SERVICE_ACCOUNT_DIR}/namespace");
    let ns = env.read(&path).map_err(|e| {
        format!(
            "cannot read the namespace from {path}: {e}; give it as in-cluster/NAMESPACE/SERVICE"
        )
    })?;
    let ns = ns.trim();
    if !is_dns_label(ns) {
        return Err(format!(
            "{path} does not hold a namespace name; give it as in-cluster/NAMESPACE/SERVICE"
        ));
    }
    Ok(ns.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_paths_ports() {
        assert!(is_dns_label("web-1"));
        for bad in ["", "-a", "a-", "Web", "a_b", "a.b", &"a".repeat(64)] {
            assert!(!is_dns_label(bad), "{bad:?}");
        }
        assert_eq!(
            parse_service_path("/default/web/", false),
            Some((Some("default".into()), "web".into()))
        );
        assert_eq!(parse_service_path("/web", false), None);
        assert_eq!(parse_service_path("/web", true), Some((None, "web".into())));
        assert_eq!(parse_service_path("/a/b/c", true), None);
        assert_eq!(parse_service_path("/a//b", true), None);
        assert_eq!(parse_port("8080"), Some(PortSel::Number(8080)));
        assert_eq!(
            parse_port("http-alt"),
            Some(PortSel::Name("http-alt".into()))
        );
        for bad in ["0", "65536", "", "Http", "a b"] {
            assert_eq!(parse_port(bad), None, "{bad:?}");
        }
        assert_eq!(parse_protocol("udp"), Some(Protocol::Udp));
        assert_eq!(parse_protocol("SCTP"), None);
        assert_eq!(parse_family("IPv6"), Some(Family::V6));
    }

    /// A Pod's environment, made up.
    struct FakePod {
        vars: Vec<(&'static str, &'static str)>,
        namespace: Option<&'static str>,
    }

    impl ClusterEnv for FakePod {
        fn var(&self, name: &str) -> Option<String> {
            self.vars
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
        fn read(&self, path: &str) -> Result<String, String> {
            match (path.strip_prefix(SERVICE_ACCOUNT_DIR), self.namespace) {
                (Some("/namespace"), Some(ns)) => Ok(format!("{ns}\n")),
                _ => Err("No such file or directory (os error 2)".into()),
            }
        }
    }

    fn pod(host: &'static str) -> FakePod {
        FakePod {
            vars: vec![
                ("KUBERNETES_SERVICE_HOST", host),
                ("KUBERNETES_SERVICE_PORT", "443"),
            ],
            namespace: Some("shop"),
        }
    }

    use crate::conf::{parse_upsync, parse_upsync_in, ConfError, SourceKind};

    #[test]
    fn directive_out_of_cluster() {
        let s = parse_upsync(&[
            "https://10.0.0.1:6443,10.0.0.2:6443/prod/web/",
            "upsync_type=kubernetes",
            "k8s_port=http",
            "k8s_protocol=udp",
            "token_file=/etc/nginx/k8s.token",
            "ssl_trusted_certificate=/etc/nginx/k8s-ca.crt",
        ])
        .unwrap();
        assert_eq!(s.kind, SourceKind::Kubernetes);
        assert_eq!(
            s.endpoint.to_string(),
            "https://10.0.0.1:6443,10.0.0.2:6443/prod/web"
        );
        let k = s.kubernetes.unwrap();
        assert_eq!((k.namespace.as_str(), k.service.as_str()), ("prod", "web"));
        assert_eq!(k.port, PortSel::Name("http".into()));
        assert_eq!(
            (k.protocol, k.family, k.in_cluster),
            (Protocol::Udp, Family::Any, false)
        );
        assert_eq!(s.token_file.as_deref(), Some("/etc/nginx/k8s.token"));
        // plain http, as `kubectl proxy` serves it
        let s = parse_upsync(&[
            "127.0.0.1:8001/default/db",
            "upsync_type=kubernetes",
            "k8s_port=5432",
        ])
        .unwrap();
        assert!(s.tls.is_none());
        assert_eq!(s.kubernetes.unwrap().port, PortSel::Number(5432));
        let err = |a: &[&str]| parse_upsync(a).unwrap_err();
        for bad in [
            "h:1/web",
            "h:1/Prod/web",
            "h:1/a/b/c",
            "h:1/prod/web?x=1",
            "h:1/prod/we_b",
        ] {
            assert!(
                matches!(
                    err(&[bad, "upsync_type=kubernetes"]),
                    ConfError::K8sService(_)
                ),
                "{bad}"
            );
        }
        let e = err(&["h:1/web", "upsync_type=kubernetes"]).to_string();
        assert!(
            e.contains("/NAMESPACE/SERVICE") && e.contains("in-cluster/"),
            "{e}"
        );
        assert_eq!(
            err(&["h:1/v1/kv/x/", "upsync_type=consul", "k8s_port=http"]),
            ConfError::K8sOnly("k8s_port=")
        );
        assert_eq!(
            err(&["in-cluster/web", "upsync_type=etcdv3"]),
            ConfError::K8sOnly("in-cluster/")
        );
        assert_eq!(
            err(&["h:1/a/b", "upsync_type=kubernetes", "k8s_port=0"]),
            ConfError::K8sPort("0".into())
        );
        assert_eq!(
            err(&["h:1/a/b", "upsync_type=kubernetes", "k8s_protocol=SCTP"]),
            ConfError::K8sProtocol("SCTP".into())
        );
        assert_eq!(
            err(&["h:1/a/b", "upsync_type=kubernetes", "k8s_address_type=v4"]),
            ConfError::K8sAddressType("v4".into())
        );
        assert_eq!(
            err(&[
                "h:1/a/b",
                "upsync_type=kubernetes",
                "k8s_port=a",
                "k8s_port=b"
            ]),
            ConfError::Duplicate("k8s_port")
        );
    }

    #[test]
    fn directive_in_cluster() {
        let s = parse_upsync_in(
            &["in-cluster/web", "upsync_type=kubernetes"],
            &pod("10.96.0.1"),
        )
        .unwrap();
        assert_eq!(s.endpoint.to_string(), "https://10.96.0.1:443/shop/web");
        let k = s.kubernetes.as_ref().unwrap();
        assert_eq!((k.namespace.as_str(), k.in_cluster), ("shop", true));
        assert_eq!(
            s.token_file.as_deref(),
            Some("/var/run/secrets/kubernetes.io/serviceaccount/token")
        );
        let tls = s.tls.unwrap();
        assert!(tls.verify);
        assert_eq!(
            tls.trusted_certificate.as_deref(),
            Some("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
        );
        // explicit namespace, an IPv6 API server, files given explicitly
        let s = parse_upsync_in(
            &[
                "in-cluster/prod/web",
                "upsync_type=kubernetes",
                "token_file=/t",
                "ssl_trusted_certificate=/ca",
            ],
            &pod("fd00::1"),
        )
        .unwrap();
        assert_eq!(s.endpoint.to_string(), "https://[fd00::1]:443/prod/web");
        assert_eq!(s.token_file.as_deref(), Some("/t"));
        assert_eq!(s.tls.unwrap().trusted_certificate.as_deref(), Some("/ca"));
        // outside a Pod: clear errors
        let none = FakePod {
            vars: vec![],
            namespace: None,
        };
        let e = parse_upsync_in(&["in-cluster/prod/web", "upsync_type=kubernetes"], &none)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "in-cluster/: KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set"
            ),
            "{e}"
        );
        let no_ns = FakePod {
            namespace: None,
            ..pod("10.96.0.1")
        };
        let e = parse_upsync_in(&["in-cluster/web", "upsync_type=kubernetes"], &no_ns)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cannot read the namespace from /var/run/secrets/kubernetes.io/serviceaccount/namespace")
                && e.contains("in-cluster/NAMESPACE/SERVICE"),
            "{e}"
        );
        let e = parse_upsync_in(
            &["in-cluster/web", "upsync_type=kubernetes"],
            &pod("bad host"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("invalid address \"bad host:443\""), "{e}");
    }
}
