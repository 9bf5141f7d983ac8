//! The Nacos part of an `upsync` line: which service (namespace, group, name, clusters)
//! and which instance-list API, from `/SERVICE` plus `nacos_*=` parameters or from an
//! open-API path copied from the Nacos docs or console.

use super::{ConfError, Endpoint};

/// Which instance-list API to read (`nacos_api=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NacosApi {
    /// Try v3, then v2, then v1, and keep the first that answers in its own shape.
    Auto,
    /// `/nacos/v1/ns/instance/list` (Nacos 1.x; 2.x; 3.x with client API compatibility).
    V1,
    /// `/nacos/v2/ns/instance/list` (Nacos 2.2+): `{code, message, data:{hosts}}`.
    V2,
    /// `/nacos/v3/client/ns/instance/list` (Nacos 3.x): `{code, message, data:[...]}`.
    V3,
}

impl NacosApi {
    pub const ACCEPTED: &'static str = "auto, v1, v2 or v3";

    pub fn name(self) -> &'static str {
        match self {
            NacosApi::Auto => "auto",
            NacosApi::V1 => "v1",
            NacosApi::V2 => "v2",
            NacosApi::V3 => "v3",
        }
    }
}

/// A Nacos service to sync from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NacosSpec {
    /// The server's context path, `/nacos` unless a copied path says otherwise.
    pub context: String,
    pub namespace: String,
    pub group: String,
    pub service: String,
    /// Only instances of these clusters (all clusters when empty).
    pub clusters: Vec<String>,
    pub api: NacosApi,
}

pub const DEFAULT_NAMESPACE: &str = "public";
pub const DEFAULT_GROUP: &str = "DEFAULT_GROUP";

/// The `nacos_*=` parameters of an `upsync` line.
pub const PARAMS: [&str; 4] = [
    "nacos_namespace",
    "nacos_group",
    "nacos_clusters",
    "nacos_api",
];

/// Query parameters accepted in a copied instance-list path.
const QUERY_KEYS: &str =
    "serviceName, groupName, namespaceId, clusters, clusterName, healthyOnly (ignored)";

/// The instance-list paths of the three APIs, after the context path.
const LIST_PATHS: [(&str, NacosApi); 3] = [
    ("/v1/ns/instance/list", NacosApi::V1),
    ("/v2/ns/instance/list", NacosApi::V2),
    ("/v3/client/ns/instance/list", NacosApi::V3),
];

/// Decodes `%XX` escapes (and `+` as a space, as a servlet does in a query); None
/// when an escape is broken or the result is not UTF-8.
pub fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn bad_value(param: &str, value: &str, expected: &'static str) -> ConfError {
    ConfError::NacosValue {
        param: param.to_string(),
        value: value.to_string(),
        expected,
    }
}

/// A name (namespace, group, service, cluster): not empty, no control characters.
fn name(param: &str, value: &str) -> Result<String, ConfError> {
    if value.is_empty() || value.chars().any(char::is_control) {
        return Err(bad_value(param, value, "a non-empty name"));
    }
    Ok(value.to_string())
}

fn clusters(param: &str, value: &str) -> Result<Vec<String>, ConfError> {
    let list: Vec<&str> = value.split(',').map(str::trim).collect();
    if list
        .iter()
        .any(|c| c.is_empty() || c.chars().any(char::is_control))
    {
        return Err(bad_value(
            param,
            value,
            "cluster names separated by commas, such as A,B",
        ));
    }
    Ok(list.into_iter().map(str::to_string).collect())
}

/// One setting, from the path (`from_path`) and/or a parameter: both given is an error
/// unless they agree.
fn merge<T: PartialEq>(
    param: &'static str,
    path_key: &'static str,
    from_param: Option<T>,
    from_path: Option<T>,
) -> Result<Option<T>, ConfError> {
    match (from_param, from_path) {
        (Some(a), Some(b)) if a != b => Err(ConfError::NacosConflict { param, path_key }),
        (a, b) => Ok(a.or(b)),
    }
}

/// Builds the Nacos service of an `upsync` line from its path and `nacos_*=` parameters.
pub fn parse(endpoint: &Endpoint, params: &[(&str, &str)]) -> Result<NacosSpec, ConfError> {
    let mut namespace = None;
    let mut group = None;
    let mut cluster_list = None;
    let mut api = None;
    for &(k, v) in params {
        let given = match k {
            "nacos_namespace" => namespace.replace(name(k, v)?).is_some(),
            "nacos_group" => group.replace(name(k, v)?).is_some(),
            "nacos_clusters" => cluster_list.replace(clusters(k, v)?).is_some(),
            "nacos_api" => {
                let a = match v {
                    "auto" => NacosApi::Auto,
                    "v1" => NacosApi::V1,
                    "v2" => NacosApi::V2,
                    "v3" => NacosApi::V3,
                    _ => return Err(bad_value(k, v, NacosApi::ACCEPTED)),
                };
                api.replace(a).is_some()
            }
            _ => return Err(ConfError::UnknownParam(format!("{k}={v}"))),
        };
        if given {
            return Err(ConfError::DuplicateParam(k.to_string()));
        }
    }

    let path = &endpoint.path;
    let bad_path = || ConfError::NacosPath(endpoint.to_string());
    let copied = LIST_PATHS
        .iter()
        .find_map(|(p, _)| path.strip_suffix(p).map(|ctx| ctx.to_string()));
    let (context, mut service, q_group, q_namespace, q_clusters) = match copied {
        Some(context) => {
            if context.is_empty() || !context.starts_with('/') {
                return Err(bad_path());
            }
            let mut service = None;
            let mut q_group = None;
            let mut q_namespace = None;
            let mut q_clusters = None;
            for pair in endpoint.query.split('&').filter(|p| !p.is_empty()) {
                let (k, raw) = pair.split_once('=').unwrap_or((pair, ""));
                let v = percent_decode(raw, true).ok_or_else(bad_path)?;
                match k {
                    "serviceName" => service = Some(name("serviceName", &v)?),
                    "groupName" => q_group = Some(name("groupName", &v)?),
                    // The docs' default namespace is `public`; an empty one means it too.
                    "namespaceId" if v.is_empty() => {}
                    "namespaceId" => q_namespace = Some(name("namespaceId", &v)?),
                    "clusters" | "clusterName" if v.is_empty() => {}
                    "clusters" | "clusterName" => q_clusters = Some(clusters(k, &v)?),
                    "healthyOnly" => {} // healthyOnly=false is always sent
                    _ => {
                        return Err(ConfError::NacosQuery {
                            key: k.to_string(),
                            accepted: QUERY_KEYS,
                        })
                    }
                }
            }
            let service = service.ok_or_else(bad_path)?;
            (context, service, q_group, q_namespace, q_clusters)
        }
        None => {
            let raw = path.strip_prefix('/').unwrap_or(path);
            if raw.contains('/') || !endpoint.query.is_empty() {
                return Err(bad_path());
            }
            let v = percent_decode(raw, false).ok_or_else(bad_path)?;
            ("/nacos".to_string(), name("service", &v)?, None, None, None)
        }
    };
    // Nacos shows grouped names as GROUP@@SERVICE: accept that form too.
    let mut at_group = None;
    if let Some((g, s)) = service.split_once("@@") {
        if g.is_empty() || s.is_empty() {
            return Err(bad_path());
        }
        at_group = Some(g.to_string());
        service = s.to_string();
    }
    let path_group = merge(
        "groupName",
        "GROUP@@ in the service name",
        q_group,
        at_group,
    )?;
    let group = merge("nacos_group", "groupName=", group, path_group)?;
    let namespace = merge("nacos_namespace", "namespaceId=", namespace, q_namespace)?;
    let cluster_list = merge("nacos_clusters", "clusters=", cluster_list, q_clusters)?;
    Ok(NacosSpec {
        context,
        namespace: namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.to_string()),
        group: group.unwrap_or_else(|| DEFAULT_GROUP.to_string()),
        service,
        clusters: cluster_list.unwrap_or_default(),
        api: api.unwrap_or(NacosApi::Auto),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conf::{parse_upsync, SourceKind};
    use crate::http::percent_encode;

    fn nacos(args: &[&str]) -> Result<NacosSpec, ConfError> {
        parse_upsync(args).map(|s| {
            assert_eq!(s.kind, SourceKind::Nacos);
            s.nacos.expect("nacos spec")
        })
    }

    #[test]
    fn service_form_with_defaults_and_parameters() {
        let s = nacos(&["127.0.0.1:8848/orders", "upsync_type=nacos"]).unwrap();
        assert_eq!(
            s,
            NacosSpec {
                context: "/nacos".into(),
                namespace: "public".into(),
                group: "DEFAULT_GROUP".into(),
                service: "orders".into(),
                clusters: vec![],
                api: NacosApi::Auto,
            }
        );
        let s = nacos(&[
            "10.0.0.1:8848,10.0.0.2:8848/orders",
            "upsync_type=nacos",
            "nacos_namespace=3f8c-dev",
            "nacos_group=PAY",
            "nacos_clusters=sh, bj",
            "nacos_api=v2",
        ])
        .unwrap();
        assert_eq!(
            (s.namespace.as_str(), s.group.as_str(), s.api),
            ("3f8c-dev", "PAY", NacosApi::V2)
        );
        assert_eq!(s.clusters, vec!["sh".to_string(), "bj".to_string()]);
        // the grouped name Nacos shows, and escapes in the service name
        let s = nacos(&["h:1/PAY@@orders", "upsync_type=nacos"]).unwrap();
        assert_eq!((s.group.as_str(), s.service.as_str()), ("PAY", "orders"));
        let s = nacos(&["h:1/providers:com.x.Api%3A1.0", "upsync_type=nacos"]).unwrap();
        assert_eq!(s.service, "providers:com.x.Api:1.0");
    }

    #[test]
    fn copied_open_api_paths() {
        let s = nacos(&[
            "127.0.0.1:8848/nacos/v1/ns/instance/list?serviceName=nacos.test.1&groupName=G1&namespaceId=dev%2Dns&clusters=c1,c2&healthyOnly=true",
            "upsync_type=nacos",
        ])
        .unwrap();
        assert_eq!(
            (s.service.as_str(), s.group.as_str(), s.namespace.as_str()),
            ("nacos.test.1", "G1", "dev-ns")
        );
        assert_eq!(s.clusters, vec!["c1".to_string(), "c2".to_string()]);
        assert_eq!(
            s.api,
            NacosApi::Auto,
            "the copied version does not fix the API"
        );
        let s = nacos(&[
            "h:8848/nacos/v3/client/ns/instance/list?serviceName=test1&namespaceId=&clusterName=DEFAULT",
            "upsync_type=nacos",
        ])
        .unwrap();
        assert_eq!((s.namespace.as_str(), s.clusters.len()), ("public", 1));
        // a changed context path is kept; the grouped name works in serviceName too
        let s = nacos(&[
            "h:8848/registry/v2/ns/instance/list?serviceName=DEFAULT_GROUP%40%40web",
            "upsync_type=nacos",
            "nacos_group=DEFAULT_GROUP",
        ])
        .unwrap();
        assert_eq!(
            (s.context.as_str(), s.service.as_str()),
            ("/registry", "web")
        );
    }

    #[test]
    fn errors_name_the_parameter_and_what_is_accepted() {
        let err = |a: &[&str]| nacos(a).unwrap_err().to_string();
        let e = err(&["h:1/s", "upsync_type=nacos", "nacos_api=v4"]);
        assert!(
            e.contains("nacos_api") && e.contains("auto, v1, v2 or v3"),
            "{e}"
        );
        let e = err(&["h:1/s", "upsync_type=nacos", "nacos_group="]);
        assert!(e.contains("nacos_group") && e.contains("non-empty"), "{e}");
        let e = err(&["h:1/s", "upsync_type=nacos", "nacos_clusters=a,,b"]);
        assert!(e.contains("nacos_clusters") && e.contains("commas"), "{e}");
        let e = err(&["h:1/s", "upsync_type=nacos", "nacos_api=v1", "nacos_api=v2"]);
        assert!(e.contains("nacos_api") && e.contains("twice"), "{e}");
        let e = err(&["h:1/a/b", "upsync_type=nacos"]);
        assert!(e.contains("/SERVICE") && e.contains("serviceName="), "{e}");
        let e = err(&[
            "h:1/nacos/v1/ns/instance/list?groupName=G",
            "upsync_type=nacos",
        ]);
        assert!(e.contains("serviceName="), "{e}");
        let e = err(&[
            "h:1/nacos/v1/ns/instance/list?serviceName=s&udpPort=9",
            "upsync_type=nacos",
        ]);
        assert!(e.contains("udpPort") && e.contains("groupName"), "{e}");
        let e = err(&[
            "h:1/nacos/v1/ns/instance/list?serviceName=s&groupName=A",
            "upsync_type=nacos",
            "nacos_group=B",
        ]);
        assert!(
            e.contains("nacos_group=") && e.contains("groupName="),
            "{e}"
        );
        let e = err(&["h:1/s?x=1", "upsync_type=nacos"]);
        assert!(e.contains("/SERVICE"), "{e}");
        // nacos_* on another registry type
        let e = parse_upsync(&["h:1/v1/kv/x/", "upsync_type=consul", "nacos_group=G"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("nacos_group=") && e.contains("upsync_type=nacos"),
            "{e}"
        );
    }

    #[test]
    fn percent_coding() {
        assert_eq!(percent_encode("a b@@c/d:é"), "a%20b%40%40c%2Fd%3A%C3%A9");
        assert_eq!(percent_decode("a%20b+c", true).as_deref(), Some("a b c"));
        assert_eq!(percent_decode("a+c", false).as_deref(), Some("a+c"));
        assert_eq!(percent_decode("%zz", true), None);
        assert_eq!(percent_decode("%4", true), None);
        assert_eq!(percent_decode("%ff", true), None);
    }
}
