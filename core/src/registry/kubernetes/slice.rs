//! One EndpointSlice (discovery.k8s.io/v1) as the servers it contributes, and the list
//! of a Service's slices.
//!
//! Each slice carries its own `ports` (slices of one Service may differ while Pods roll
//! over), so the port is chosen per slice by name and protocol. Endpoint conditions
//! (absent `ready` = ready; absent `serving` = as `ready`; absent `terminating` = not
//! terminating): ready -> a server; serving and terminating -> a `down` server (it gets
//! no new connections, its open sessions stay); anything else is left out. Only the
//! first address of an endpoint counts (the API defines no meaning for the others).

use std::net::{IpAddr, SocketAddr};

use serde_json::Value;

use super::super::{excerpt, RegistryError, Skipped};
use crate::conf::kubernetes::{Family, K8sSpec, PortSel};
use crate::servers::ServerSpec;

/// A slice that parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    pub name: String,
    pub resource_version: Option<String>,
    pub servers: Vec<ServerSpec>,
    /// Why endpoints of this slice are left out as a whole (no matching port, an
    /// address type the module does not use), for a note.
    pub unused: Option<String>,
    /// Endpoints that are not valid (or the whole slice, when it is not): skipped and
    /// reported, the rest applies.
    pub skipped: Vec<Skipped>,
}

fn bad(what: String, why: String) -> RegistryError {
    RegistryError::Object { what, why }
}

fn shown(v: &Value) -> String {
    excerpt(v.to_string().as_bytes())
}

/// A string field that may be absent (`None`) but is a string when present.
fn opt_str<'a>(v: &'a Value, key: &str, what: &str) -> Result<Option<&'a str>, RegistryError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(bad(
            what.to_string(),
            format!("\"{key}\" is not a string: {}", shown(other)),
        )),
    }
}

/// `metadata.name` and `metadata.resourceVersion` of an object.
pub fn meta(obj: &Value) -> Result<(String, Option<String>), RegistryError> {
    let what = "an EndpointSlice";
    let m = match obj.get("metadata") {
        Some(m @ Value::Object(_)) => m,
        _ => return Err(bad(what.into(), "it has no metadata".into())),
    };
    let name = match opt_str(m, "name", what)? {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => return Err(bad(what.into(), "it has no metadata.name".into())),
    };
    let what = format!("endpointslice \"{}\"", excerpt(name.as_bytes()));
    let rv = opt_str(m, "resourceVersion", &what)?.map(str::to_string);
    Ok((name, rv))
}

/// Whether the slice is labelled as one of `service`'s (the label selector of the
/// request asks for exactly those; anything else a proxy let through is ignored).
fn belongs(obj: &Value, service: &str) -> bool {
    obj.get("metadata")
        .and_then(|m| m.get("labels"))
        .and_then(|l| l.get("kubernetes.io/service-name"))
        .and_then(Value::as_str)
        == Some(service)
}

/// The port number this slice gives the endpoints, `Ok(None)` when it has none that
/// fits (its endpoints are left out), or an error for bad data or an ambiguous choice.
fn choose_port(
    obj: &Value,
    spec: &K8sSpec,
    what: &str,
) -> Result<Result<u16, String>, RegistryError> {
    let ports = match obj.get("ports") {
        None | Some(Value::Null) => return Ok(Err("it lists no ports".into())),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(bad(
                what.into(),
                format!("\"ports\" is not a list: {}", shown(other)),
            ))
        }
    };
    let proto = spec.protocol.name();
    // (name, number or None for "all ports") of the entries with our protocol
    let mut ours: Vec<(String, Option<u16>)> = Vec::new();
    let mut all = Vec::new();
    for p in ports {
        if !p.is_object() {
            return Err(bad(
                what.into(),
                format!("a port is not an object: {}", shown(p)),
            ));
        }
        let name = opt_str(p, "name", what)?.unwrap_or("").to_string();
        let protocol = opt_str(p, "protocol", what)?.unwrap_or("TCP");
        let number = match p.get("port") {
            None | Some(Value::Null) => None,
            Some(n) => match n.as_u64() {
                Some(n @ 1..=65535) => Some(n as u16),
                _ => {
                    return Err(bad(
                        what.into(),
                        format!(
                            "port \"{}\" has an invalid number {}",
                            excerpt(name.as_bytes()),
                            shown(n)
                        ),
                    ))
                }
            },
        };
        all.push(format!(
            "{}/{}{}",
            number.map_or("*".to_string(), |n| n.to_string()),
            excerpt(protocol.as_bytes()),
            if name.is_empty() {
                String::new()
            } else {
                format!(" \"{}\"", excerpt(name.as_bytes()))
            }
        ));
        if protocol == proto {
            ours.push((name, number));
        }
    }
    let missing = || {
        format!(
            "it has no {proto} {} (it has: {})",
            spec.port,
            if all.is_empty() {
                "none".into()
            } else {
                all.join(", ")
            }
        )
    };
    let found = match &spec.port {
        PortSel::Name(n) => ours.iter().find(|(name, _)| name == n).map(|p| p.1),
        PortSel::Number(n) => ours
            .iter()
            .find(|(_, num)| *num == Some(*n))
            .or_else(|| ours.iter().find(|(_, num)| num.is_none()))
            .map(|_| Some(*n)),
        PortSel::Default => match ours.iter().find(|(name, _)| name.is_empty()) {
            Some(p) => Some(p.1),
            None if ours.len() == 1 => Some(ours[0].1),
            None if ours.len() > 1 => {
                return Err(bad(
                    what.into(),
                    format!(
                        "the Service has several {proto} ports ({}): choose one with k8s_port=",
                        all.join(", ")
                    ),
                ))
            }
            None => None,
        },
    };
    Ok(match found {
        Some(Some(n)) => Ok(n),
        // `port` absent means "all ports": only a number can pick one
        Some(None) => Err(format!("its {proto} {} has no number", spec.port)),
        None => Err(missing()),
    })
}

/// A condition flag: absent or null is `default`.
fn condition(
    c: Option<&Value>,
    key: &str,
    default: bool,
    what: &str,
) -> Result<bool, RegistryError> {
    match c.and_then(|c| c.get(key)) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(other) => Err(bad(
            what.into(),
            format!("conditions.{key} is not a boolean: {}", shown(other)),
        )),
    }
}

/// Parses one EndpointSlice. `Ok(None)`: not one of the Service's slices.
/// One EndpointSlice of the Service (None: another Service's). A slice whose data is
/// bad as a whole contributes no server and is reported as skipped; a bad endpoint is
/// skipped alone. Only an object without even a name is an error of the answer.
pub fn parse_slice(obj: &Value, spec: &K8sSpec) -> Result<Option<Slice>, RegistryError> {
    match slice_of(obj, spec) {
        Err(RegistryError::Object { what, why }) if obj.is_object() => {
            let (name, resource_version) = meta(obj)?;
            if !belongs(obj, &spec.service) {
                return Ok(None);
            }
            Ok(Some(Slice {
                name,
                resource_version,
                servers: Vec::new(),
                unused: None,
                skipped: vec![Skipped::new(&what, why)],
            }))
        }
        other => other,
    }
}

fn slice_of(obj: &Value, spec: &K8sSpec) -> Result<Option<Slice>, RegistryError> {
    if !obj.is_object() {
        return Err(bad(
            "an EndpointSlice".into(),
            format!("not a JSON object: {}", shown(obj)),
        ));
    }
    let (name, resource_version) = meta(obj)?;
    if !belongs(obj, &spec.service) {
        return Ok(None);
    }
    let what = format!("endpointslice \"{}\"", excerpt(name.as_bytes()));
    let mut slice = Slice {
        name,
        resource_version,
        servers: Vec::new(),
        unused: None,
        skipped: Vec::new(),
    };
    let v6 = match opt_str(obj, "addressType", &what)? {
        Some("IPv4") => false,
        Some("IPv6") => true,
        Some("FQDN") => {
            slice.unused = Some("its addressType is FQDN (host names are not resolved)".into());
            return Ok(Some(slice));
        }
        Some(other) => {
            return Err(bad(
                what,
                format!("unknown addressType \"{}\"", excerpt(other.as_bytes())),
            ))
        }
        None => return Err(bad(what, "it has no addressType".into())),
    };
    if (spec.family == Family::V4 && v6) || (spec.family == Family::V6 && !v6) {
        return Ok(Some(slice)); // filtered by k8s_address_type=, as configured
    }
    let endpoints = match obj.get("endpoints") {
        None | Some(Value::Null) => return Ok(Some(slice)),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(bad(
                what,
                format!("\"endpoints\" is not a list: {}", shown(other)),
            ))
        }
    };
    let port = match choose_port(obj, spec, &what)? {
        Ok(p) => p,
        Err(why) => {
            if !endpoints.is_empty() {
                slice.unused = Some(format!(
                    "{why}; its {} endpoints are left out",
                    endpoints.len()
                ));
            }
            return Ok(Some(slice));
        }
    };
    for (i, ep) in endpoints.iter().enumerate() {
        let mut what = format!("{what}, endpoint {i}");
        if let Some(pod) = ep
            .get("targetRef")
            .and_then(|t| t.get("name"))
            .and_then(Value::as_str)
        {
            what.push_str(&format!(" ({})", excerpt(pod.as_bytes())));
        }
        match endpoint(ep, v6, port, &what) {
            Ok(Some(s)) => slice.servers.push(s),
            Ok(None) => {} // not ready: left out
            Err(RegistryError::Object { what, why }) => {
                slice.skipped.push(Skipped::new(&what, why))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Some(slice))
}

/// One endpoint as a server: ready -> a server, serving and terminating -> a `down`
/// server (it keeps its sessions, takes no new ones), otherwise None (left out).
fn endpoint(
    ep: &Value,
    v6: bool,
    port: u16,
    what: &str,
) -> Result<Option<ServerSpec>, RegistryError> {
    if !ep.is_object() {
        return Err(bad(
            what.into(),
            format!("not a JSON object: {}", shown(ep)),
        ));
    }
    let first = match ep.get("addresses") {
        Some(Value::Array(a)) if !a.is_empty() => &a[0],
        _ => return Err(bad(what.into(), "it has no addresses".into())),
    };
    let ip: Option<IpAddr> = first.as_str().and_then(|s| s.parse().ok());
    let ip = match ip {
        Some(ip @ IpAddr::V4(_)) if !v6 => ip,
        Some(ip @ IpAddr::V6(_)) if v6 => ip,
        _ => {
            return Err(bad(
                what.into(),
                format!(
                    "address {} is not an {} address",
                    shown(first),
                    if v6 { "IPv6" } else { "IPv4" }
                ),
            ))
        }
    };
    let c = match ep.get("conditions") {
        None | Some(Value::Null) => None,
        Some(c @ Value::Object(_)) => Some(c),
        Some(other) => {
            return Err(bad(
                what.into(),
                format!("\"conditions\" is not an object: {}", shown(other)),
            ))
        }
    };
    let ready = condition(c, "ready", true, what)?;
    let serving = condition(c, "serving", ready, what)?;
    let terminating = condition(c, "terminating", false, what)?;
    let down = if ready {
        false
    } else if serving && terminating {
        true
    } else {
        return Ok(None);
    };
    let mut s = ServerSpec::new(SocketAddr::new(ip, port));
    s.down = down;
    Ok(Some(s))
}

/// A list response: its resourceVersion (where the watch starts) and the slices.
pub fn parse_list(body: &[u8], spec: &K8sSpec) -> Result<(String, Vec<Slice>), RegistryError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| RegistryError::Json(e.to_string()))?;
    let meta = v.get("metadata");
    let rv = match meta
        .and_then(|m| m.get("resourceVersion"))
        .and_then(Value::as_str)
    {
        Some(rv) if !rv.is_empty() => rv.to_string(),
        _ => {
            return Err(RegistryError::Json(
                "the list has no metadata.resourceVersion".into(),
            ))
        }
    };
    if meta
        .and_then(|m| m.get("continue"))
        .and_then(Value::as_str)
        .is_some_and(|c| !c.is_empty())
    {
        return Err(RegistryError::Json(
            "the API server cut the list into pages (metadata.continue), which was not asked for"
                .into(),
        ));
    }
    let items = match v.get("items") {
        None | Some(Value::Null) => return Ok((rv, Vec::new())),
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(RegistryError::Json(format!(
                "\"items\" is not a list: {}",
                shown(other)
            )))
        }
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        out.extend(parse_slice(item, spec)?);
    }
    Ok((rv, out))
}
