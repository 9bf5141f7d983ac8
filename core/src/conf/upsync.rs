//! The `upsync` directive's arguments: the address, `upsync_type=` and the parameters.

use super::endpoint::valid_host;
use super::time::parse_time_ms;
use super::*;

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
