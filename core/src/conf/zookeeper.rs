//! The ZooKeeper part of an `upsync` line: the ensemble (`HOST[:PORT]` list, port 2181
//! by default), the watched znode, and the `zk_*=` parameters (chroot, data layout,
//! session timeout).
//!
//! The path after the address is the znode whose children are the servers. A chroot,
//! which a ZooKeeper connect string writes after the host list (`host:port/chroot`),
//! is given as `zk_chroot=` instead, so the address keeps one meaning for every
//! registry: `10.0.0.1:2181/services/web zk_chroot=/prod` watches `/prod/services/web`.

use super::time::parse_time_ms;
use super::{parse_endpoint, ConfError, Endpoint};

/// How the children of the watched znode describe servers (`zk_layout=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZkLayout {
    /// The child's name is the server address, `IP:PORT` or `[IPv6]:PORT` (`%3A` for the
    /// colon is accepted too). Its data is empty (all defaults) or the same JSON object
    /// as a Consul KV value: `{"weight":2, "max_fails":3, "fail_timeout":"10s",
    /// "max_conns":100, "down":0, "backup":0, "slow_start":"30s"}`.
    #[default]
    IpPort,
    /// The child's name is an instance id and its data a Curator `ServiceInstance`
    /// (Apache Curator / Spring Cloud ServiceDiscovery):
    /// `{"name","id","address","port","sslPort","payload","enabled",...}`.
    ///
    /// - address: `address`, which must be an IP literal (host names are not resolved);
    /// - port: `port`, or `sslPort` when `port` is absent or null;
    /// - `"enabled": false` (Curator 5) makes the server `down`;
    /// - when `payload` is a JSON object, its server attributes (the `IpPort` keys:
    ///   weight, max_fails, fail_timeout, max_conns, down, backup, slow_start) apply,
    ///   then those of `payload.metadata` (Spring Cloud's `ZookeeperInstance` keeps its
    ///   metadata there, as strings: `"weight": "5"` works); other keys are ignored;
    /// - `payload.metadata.instance_status` other than `UP` (Spring Cloud's
    ///   `OUT_OF_SERVICE`, `DOWN`) makes the server `down`.
    Curator,
}

impl ZkLayout {
    pub const ACCEPTED: &'static str = "ip_port (children named IP:PORT; also written ipport) or curator (Curator/Spring Cloud ServiceInstance JSON)";

    pub fn parse(s: &str) -> Option<ZkLayout> {
        match s {
            "ip_port" | "ipport" => Some(ZkLayout::IpPort),
            "curator" => Some(ZkLayout::Curator),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ZkLayout::IpPort => "ip_port",
            ZkLayout::Curator => "curator",
        }
    }
}

/// What `upsync_type=zookeeper` watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZkSpec {
    /// `zk_chroot=` without a trailing slash ("" for none).
    pub chroot: String,
    /// The znode as the server knows it: the chroot followed by the configured path.
    pub server_path: String,
    pub layout: ZkLayout,
    /// `zk_session_timeout=`, asked of the server (which bounds it by its own
    /// minSessionTimeout and maxSessionTimeout).
    pub session_timeout_ms: u32,
}

/// The client port ZooKeeper listens on by default.
pub const DEFAULT_PORT: u16 = 2181;
pub const DEFAULT_SESSION_TIMEOUT_MS: u32 = 10_000;
const MIN_SESSION_TIMEOUT_MS: u64 = 200;
const MAX_SESSION_TIMEOUT_MS: u64 = 600_000;

/// The `zk_*=` parameters of an `upsync` line.
pub const PARAMS: [&str; 3] = ["zk_chroot", "zk_layout", "zk_session_timeout"];

/// Why a ZooKeeper `upsync` line is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZkConfError {
    #[error("\"{0}=\" applies to upsync_type=zookeeper only")]
    Only(String),
    #[error("invalid {param} \"{value}\": expected {expected}")]
    Value {
        param: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("invalid ZooKeeper path \"{path}\": {why}; expected HOST[:PORT][,HOST[:PORT]...]/PATH, PATH being the znode whose children are the servers, such as 127.0.0.1:2181/services/web")]
    Path { path: String, why: &'static str },
    #[error("TLS to ZooKeeper (https://) is not supported; list the plain client ports, such as 10.0.0.1:2181,10.0.0.2:2181/services/web")]
    Tls,
}

impl From<ZkConfError> for ConfError {
    fn from(e: ZkConfError) -> ConfError {
        ConfError::ZooKeeper(e)
    }
}

/// Why a path is not a znode path (as ZooKeeper checks them), or None.
fn path_problem(path: &str) -> Option<&'static str> {
    if !path.starts_with('/') {
        return Some("it must start with /");
    }
    if path == "/" {
        return None;
    }
    if path.ends_with('/') {
        return Some("it must not end with /");
    }
    if path.chars().any(|c| c.is_control()) {
        return Some("control characters are not allowed");
    }
    for comp in path[1..].split('/') {
        match comp {
            "" => return Some("empty component (//)"),
            "." | ".." => return Some("relative components (. or ..) are not allowed"),
            _ => {}
        }
    }
    None
}

/// Adds the default ZooKeeper port to every host of the list that has none.
fn with_default_ports(hostlist: &str) -> String {
    hostlist
        .split(',')
        .map(|h| {
            let has_port = match h.strip_prefix('[') {
                Some(v6) => v6.contains("]:"),
                None => h.contains(':'),
            };
            if has_port || h.is_empty() {
                h.to_string()
            } else {
                format!("{h}:{DEFAULT_PORT}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Builds the ensemble address and the watched znode of an `upsync` line from its first
/// argument and the `zk_*=` parameters.
pub fn parse(arg: &str, params: &[(&str, &str)]) -> Result<(Endpoint, ZkSpec), ConfError> {
    let mut chroot = None;
    let mut layout = None;
    let mut timeout = None;
    for &(k, v) in params {
        let given = match k {
            "zk_chroot" => {
                let c = v.trim_end_matches('/');
                if c.is_empty() && !v.is_empty() {
                    chroot.replace(String::new()).is_some() // "/": no chroot
                } else {
                    if path_problem(c).is_some() {
                        return Err(ZkConfError::Value {
                            param: "zk_chroot",
                            value: v.to_string(),
                            expected: "an absolute znode path without empty, . or .. components, such as /prod (the chroot of a ZooKeeper connect string)",
                        }
                        .into());
                    }
                    chroot.replace(c.to_string()).is_some()
                }
            }
            "zk_layout" => layout
                .replace(ZkLayout::parse(v).ok_or_else(|| ZkConfError::Value {
                    param: "zk_layout",
                    value: v.to_string(),
                    expected: ZkLayout::ACCEPTED,
                })?)
                .is_some(),
            "zk_session_timeout" => {
                let ms = parse_time_ms(v)
                    .filter(|ms| (MIN_SESSION_TIMEOUT_MS..=MAX_SESSION_TIMEOUT_MS).contains(ms))
                    .ok_or_else(|| ZkConfError::Value {
                        param: "zk_session_timeout",
                        value: v.to_string(),
                        expected: "a time from 200ms to 10m, such as 10s (the server bounds it by its minSessionTimeout and maxSessionTimeout)",
                    })?;
                timeout.replace(ms as u32).is_some()
            }
            _ => return Err(ConfError::UnknownParam(format!("{k}={v}"))),
        };
        if given {
            return Err(ConfError::DuplicateParam(k.to_string()));
        }
    }
    if arg.starts_with("https://") {
        return Err(ZkConfError::Tls.into());
    }
    let plain = arg.strip_prefix("http://").unwrap_or(arg);
    let (hostlist, path) = plain
        .find('/')
        .map(|i| plain.split_at(i))
        .ok_or_else(|| ConfError::Address(arg.to_string()))?;
    // errors quote the address as configured, not with the ports added
    let endpoint = parse_endpoint(&format!("{}{path}", with_default_ports(hostlist))).map_err(
        |e| match e {
            ConfError::Address(_) => ConfError::Address(arg.to_string()),
            ConfError::Port(_) => ConfError::Port(arg.to_string()),
            ConfError::TooManyHosts(_) => ConfError::TooManyHosts(arg.to_string()),
            other => other,
        },
    )?;
    let bad = |why| ZkConfError::Path {
        path: format!("{}{}", endpoint.path, query_part(&endpoint)),
        why,
    };
    if !endpoint.query.is_empty() {
        return Err(bad("a query (?...) has no meaning here").into());
    }
    let path = endpoint.path.trim_end_matches('/');
    if let Some(why) = path_problem(path) {
        return Err(bad(why).into());
    }
    let chroot = chroot.unwrap_or_default();
    let server_path = format!("{chroot}{path}");
    Ok((
        Endpoint {
            path: server_path.clone(),
            ..endpoint
        },
        ZkSpec {
            chroot,
            server_path,
            layout: layout.unwrap_or_default(),
            session_timeout_ms: timeout.unwrap_or(DEFAULT_SESSION_TIMEOUT_MS),
        },
    ))
}

fn query_part(e: &Endpoint) -> String {
    if e.query.is_empty() {
        String::new()
    } else {
        format!("?{}", e.query)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conf::{parse_credential, parse_upsync, Credential, SourceKind};

    fn zk(args: &[&str]) -> Result<(Endpoint, ZkSpec), ConfError> {
        parse_upsync(args).map(|s| {
            assert_eq!(s.kind, SourceKind::ZooKeeper);
            (s.endpoint, s.zookeeper.expect("zookeeper spec"))
        })
    }

    #[test]
    fn ensemble_path_and_defaults() {
        let (e, z) = zk(&[
            "10.0.0.1:2181,10.0.0.2,[::1]/services/web/",
            "upsync_type=zookeeper",
        ])
        .unwrap();
        assert_eq!(e.authorities(), "10.0.0.1:2181,10.0.0.2:2181,[::1]:2181");
        assert_eq!(e.path, "/services/web");
        assert_eq!(
            e.to_string(),
            "10.0.0.1:2181,10.0.0.2:2181,[::1]:2181/services/web"
        );
        assert_eq!(
            z,
            ZkSpec {
                chroot: String::new(),
                server_path: "/services/web".into(),
                layout: ZkLayout::IpPort,
                session_timeout_ms: DEFAULT_SESSION_TIMEOUT_MS,
            }
        );
    }

    #[test]
    fn parameters() {
        let (e, z) = zk(&[
            "zk-a:2182/web",
            "upsync_type=zookeeper",
            "zk_chroot=/prod/",
            "zk_layout=curator",
            "zk_session_timeout=4s",
        ])
        .unwrap();
        assert_eq!(e.path, "/prod/web", "the chroot is part of the znode shown");
        assert_eq!(z.server_path, "/prod/web");
        assert_eq!(z.chroot, "/prod");
        assert_eq!(z.layout, ZkLayout::Curator);
        assert_eq!(z.session_timeout_ms, 4000);
        let (_, z) = zk(&[
            "h/web",
            "upsync_type=zookeeper",
            "zk_layout=ipport",
            "zk_chroot=/",
        ])
        .unwrap();
        assert_eq!(
            (z.layout, z.server_path.as_str()),
            (ZkLayout::IpPort, "/web")
        );
    }

    #[test]
    fn errors_name_the_parameter_and_what_is_accepted() {
        let err = |a: &[&str]| parse_upsync(a).unwrap_err().to_string();
        let e = err(&["h:1/web", "upsync_type=zookeeper", "zk_layout=dubbo"]);
        assert!(
            e.contains("zk_layout \"dubbo\"") && e.contains("ip_port") && e.contains("curator"),
            "{e}"
        );
        let e = err(&[
            "h:1/web",
            "upsync_type=zookeeper",
            "zk_session_timeout=10ms",
        ]);
        assert!(
            e.contains("zk_session_timeout \"10ms\"") && e.contains("200ms to 10m"),
            "{e}"
        );
        let e = err(&["h:1/web", "upsync_type=zookeeper", "zk_chroot=prod"]);
        assert!(
            e.contains("zk_chroot \"prod\"") && e.contains("absolute"),
            "{e}"
        );
        let e = err(&["h:1/web", "upsync_type=zookeeper", "zk_chroot=/a//b"]);
        assert!(e.contains("zk_chroot \"/a//b\""), "{e}");
        let e = err(&["h:1/a//b", "upsync_type=zookeeper"]);
        assert!(
            e.contains("invalid ZooKeeper path \"/a//b\": empty component"),
            "{e}"
        );
        let e = err(&["h:1/a/./b", "upsync_type=zookeeper"]);
        assert!(e.contains("relative components"), "{e}");
        let e = err(&["h:1/a?x=1", "upsync_type=zookeeper"]);
        assert!(e.contains("\"/a?x=1\"") && e.contains("query"), "{e}");
        let e = err(&["https://h:1/a", "upsync_type=zookeeper"]);
        assert!(e.contains("TLS to ZooKeeper"), "{e}");
        let e = err(&["h:1/v1/kv/a/", "upsync_type=consul", "zk_layout=curator"]);
        assert_eq!(e, "\"zk_layout=\" applies to upsync_type=zookeeper only");
        let e = err(&[
            "h:1/a",
            "upsync_type=zookeeper",
            "zk_layout=curator",
            "zk_layout=ip_port",
        ]);
        assert_eq!(e, "\"zk_layout=\" is given twice");
        let e = err(&["h:x/a", "upsync_type=zookeeper"]);
        assert!(e.starts_with("invalid port"), "{e}");
        let e = err(&["h:1", "upsync_type=zookeeper"]);
        assert!(e.starts_with("invalid address"), "{e}");
        let e = err(&["h,,g/a", "upsync_type=zookeeper"]);
        assert!(e.starts_with("invalid address \"h,,g/a\""), "{e}");
        let e = err(&["h:1/a", "upsync_type=zookeeper", "nacos_group=x"]);
        assert!(e.contains("nacos"), "{e}");
    }

    #[test]
    fn digest_credentials() {
        assert_eq!(
            parse_credential(SourceKind::ZooKeeper, "upsync:s3cret:x\n"),
            Ok(Credential::UserPassword {
                user: "upsync".into(),
                password: "s3cret:x".into()
            })
        );
        let e = parse_credential(SourceKind::ZooKeeper, "nocolon").unwrap_err();
        assert_eq!(
            e.to_string(),
            "must hold USER:PASSWORD for ZooKeeper digest authentication"
        );
    }
}
