//! Nacos instance-list answers in the v1, v2 and v3 shapes, and how one instance becomes
//! a server: health and enabled filter, float weight to integer weight, metadata settings.

use serde_json::{Map, Value};

use super::super::{excerpt, Listing, RegistryError, Skipped};
use crate::conf::nacos::NacosApi;
use crate::servers::{apply_json_object, parse_addr, ServerSpec, SpecError, MAX_MAPPED_WEIGHT};

/// Nacos error codes that mean "no such service (yet)": the API exists and the service
/// has no instances.
pub const NOT_FOUND_CODES: [i64; 2] = [20004, 21008];

/// The metadata keys that become server settings (values as Nacos stores them: strings).
/// `down` drains an instance and keeps its weight (weight 0 drains it too).
pub const METADATA_KEYS: [&str; 6] = [
    "max_fails",
    "fail_timeout",
    "max_conns",
    "backup",
    "slow_start",
    "down",
];

/// What an instance-list answer holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// The service's instances, before filtering.
    Instances(Vec<Value>),
    /// Nacos's `{code, message}` envelope with an error code (v2, v3).
    Failed { code: i64, message: String },
    /// JSON, but not this API's shape: another API, or some other page's JSON.
    Foreign,
}

fn code_of(v: &Value) -> Option<i64> {
    v.get("code").and_then(Value::as_i64)
}

/// Reads an answer of `api` (HTTP 200, or an error status with a JSON body).
pub fn read_answer(body: &[u8], api: NacosApi) -> Result<Answer, RegistryError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| RegistryError::Json(e.to_string()))?;
    let list = |l: Option<&Value>| match l {
        Some(Value::Array(a)) => Some(Answer::Instances(a.clone())),
        // an empty service may come without its list
        Some(Value::Null) | None => Some(Answer::Instances(Vec::new())),
        Some(_) => None,
    };
    let answer = match api {
        NacosApi::V1 | NacosApi::Auto => match v.get("hosts") {
            Some(h) => list(Some(h)),
            None => None,
        },
        NacosApi::V2 | NacosApi::V3 => match code_of(&v) {
            Some(0) => match (api, v.get("data")) {
                (NacosApi::V2, Some(d @ Value::Object(_))) => list(d.get("hosts")),
                (NacosApi::V3, Some(d @ Value::Array(_))) => list(Some(d)),
                (NacosApi::V3, Some(Value::Null) | None) => list(None),
                _ => None,
            },
            Some(code) => Some(Answer::Failed {
                code,
                message: v
                    .get("message")
                    .and_then(Value::as_str)
                    .map(|m| excerpt(m.as_bytes()))
                    .unwrap_or_default(),
            }),
            None => None,
        },
    };
    Ok(answer.unwrap_or(Answer::Foreign))
}

/// Nacos's float weight (0 to 10000, default 1) as an nginx weight: `round(weight *
/// 100)`, at least 1 and at most 1,000,000, so 0.5 and 1.0 stay 50 and 100. Weight 0
/// means "no new traffic": the server is marked down. None for a negative, infinite or
/// NaN weight.
pub fn weight_of(w: f64) -> Option<(u32, bool)> {
    if !w.is_finite() || w < 0.0 {
        return None;
    }
    if w == 0.0 {
        return Some((1, true));
    }
    let scaled = (w * 100.0).round().clamp(1.0, MAX_MAPPED_WEIGHT as f64);
    Some((scaled as u32, false))
}

fn flag(inst: &Map<String, Value>, key: &'static str) -> Result<bool, SpecError> {
    match inst.get(key) {
        None | Some(Value::Null) => Ok(true),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s == "true" => Ok(true),
        Some(Value::String(s)) if s == "false" => Ok(false),
        Some(other) => Err(SpecError::Attribute {
            key,
            value: crate::servers::printable(&other.to_string(), 64),
            expected: "true or false",
        }),
    }
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
}

/// How an instance is named in errors: `ip:port` as given, else its instanceId, else
/// its place in the list.
fn instance_name(inst: &Map<String, Value>, index: usize) -> String {
    if let (Some(ip), Some(port)) = (inst.get("ip").and_then(Value::as_str), inst.get("port")) {
        let port = port
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| port.to_string());
        return excerpt(format!("{ip}:{port}").as_bytes());
    }
    match inst.get("instanceId").and_then(Value::as_str) {
        Some(id) if !id.is_empty() => excerpt(id.as_bytes()),
        _ => format!("instance #{}", index + 1),
    }
}

/// One instance as a server, or None when it takes no traffic: unhealthy, disabled, or
/// outside the configured clusters. Only instances that would become servers are
/// validated.
pub fn server_of(
    inst: &Value,
    index: usize,
    clusters: &[String],
) -> Result<Option<ServerSpec>, RegistryError> {
    let Some(obj) = inst.as_object() else {
        return Err(RegistryError::Entry {
            key: format!("instance #{}", index + 1),
            err: SpecError::NotObject(excerpt(inst.to_string().as_bytes())),
        });
    };
    let key = instance_name(obj, index);
    let err = |err| RegistryError::Entry {
        key: key.clone(),
        err,
    };
    if !clusters.is_empty() {
        let cluster = obj
            .get("clusterName")
            .and_then(Value::as_str)
            .unwrap_or("DEFAULT");
        if !clusters.iter().any(|c| c == cluster) {
            return Ok(None);
        }
    }
    if !flag(obj, "enabled").map_err(err)? || !flag(obj, "healthy").map_err(err)? {
        return Ok(None);
    }
    let ip = obj.get("ip").and_then(Value::as_str).unwrap_or("");
    let port = obj
        .get("port")
        .and_then(number)
        .filter(|p| p.fract() == 0.0 && (1.0..=65535.0).contains(p));
    let text = match (ip.parse::<std::net::IpAddr>(), port) {
        (Ok(std::net::IpAddr::V6(v6)), Some(p)) => format!("[{v6}]:{p}"),
        (_, Some(p)) => format!("{ip}:{p}"),
        (_, None) => format!(
            "{ip}:{}",
            obj.get("port").map(Value::to_string).unwrap_or_default()
        ),
    };
    let mut spec = ServerSpec::new(parse_addr(&text).map_err(err)?);
    let raw_weight = obj.get("weight").cloned().unwrap_or(Value::from(1.0));
    let (weight, down) = number(&raw_weight).and_then(weight_of).ok_or_else(|| {
        err(SpecError::Attribute {
            key: "weight",
            value: crate::servers::printable(&raw_weight.to_string(), 64),
            expected: "a number from 0 to 10000",
        })
    })?;
    spec.weight = weight;
    spec.down = down;
    match obj.get("metadata") {
        None | Some(Value::Null) => {}
        Some(Value::Object(meta)) => {
            let picked: Map<String, Value> = meta
                .iter()
                .filter(|(k, _)| METADATA_KEYS.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            apply_json_object(&mut spec, &picked).map_err(err)?;
        }
        Some(other) => {
            return Err(err(SpecError::NotObject(format!(
                "metadata {}",
                excerpt(other.to_string().as_bytes())
            ))))
        }
    }
    Ok(Some(spec))
}

/// The servers of a list of instances: a bad instance is skipped and reported (the
/// policy of every registry here); the others apply.
pub fn servers_of(instances: &[Value], clusters: &[String]) -> Result<Listing, RegistryError> {
    let mut out = Listing::default();
    for (i, inst) in instances.iter().enumerate() {
        match server_of(inst, i, clusters) {
            Ok(Some(s)) => out.servers.push(s),
            Ok(None) => {} // another cluster, unhealthy or disabled: not in the set
            Err(RegistryError::Entry { key, err }) => out.skipped.push(Skipped::new(&key, err)),
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// An answer of `api` read all the way to servers (a "not found" envelope is an empty
/// list); for tests and the fuzzer, which the source's own handling builds on.
pub fn parse_list(
    body: &[u8],
    api: NacosApi,
    clusters: &[String],
) -> Result<Listing, RegistryError> {
    match read_answer(body, api)? {
        Answer::Instances(list) => servers_of(&list, clusters),
        Answer::Failed { code, .. } if NOT_FOUND_CODES.contains(&code) => Ok(Listing::default()),
        Answer::Failed { code, message } => Err(RegistryError::Status {
            code: 200,
            body: format!("Nacos error {code}: {message}"),
        }),
        Answer::Foreign => Err(RegistryError::Json(format!(
            "not a Nacos {} instance list: {}",
            api.name(),
            excerpt(body)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The servers of an answer; the first skipped instance comes back as an error
    /// with the text its log line carries.
    fn parse_list(
        body: &[u8],
        api: NacosApi,
        clusters: &[String],
    ) -> Result<Vec<ServerSpec>, RegistryError> {
        let l = super::parse_list(body, api, clusters)?;
        match l.skipped.first() {
            Some(s) => Err(RegistryError::Server(format!(
                "entry \"{}\": {}",
                s.key, s.cause
            ))),
            None => Ok(l.servers),
        }
    }

    /// The v1 answer as the Nacos 1.x open-API docs show it (two hosts added).
    const V1: &str = r#"{"name":"DEFAULT_GROUP@@nacos.test.1","groupName":"DEFAULT_GROUP","clusters":"","cacheMillis":10000,
        "hosts":[
          {"instanceId":"10.10.10.10#8888#DEFAULT#DEFAULT_GROUP@@nacos.test.1","ip":"10.10.10.10","port":8888,"weight":1.0,
           "healthy":true,"enabled":true,"ephemeral":false,"clusterName":"DEFAULT","serviceName":"DEFAULT_GROUP@@nacos.test.1",
           "metadata":{},"instanceHeartBeatInterval":5000,"instanceIdGenerator":"simple","instanceHeartBeatTimeOut":15000,"ipDeleteTimeout":30000},
          {"instanceId":"10.10.10.11#8888#DEFAULT#DEFAULT_GROUP@@nacos.test.1","ip":"10.10.10.11","port":8888,"weight":0.5,
           "healthy":true,"enabled":true,"ephemeral":true,"clusterName":"DEFAULT","serviceName":"DEFAULT_GROUP@@nacos.test.1",
           "metadata":{"max_fails":"3","fail_timeout":"20s","max_conns":"100","backup":"true","slow_start":"30s","weight":"9","version":"1.2"}},
          {"instanceId":"10.10.10.12#8888#DEFAULT#DEFAULT_GROUP@@nacos.test.1","ip":"10.10.10.12","port":8888,"weight":1.0,
           "healthy":false,"enabled":true,"clusterName":"DEFAULT","metadata":{}},
          {"instanceId":"10.10.10.13#8888#DEFAULT#DEFAULT_GROUP@@nacos.test.1","ip":"10.10.10.13","port":8888,"weight":1.0,
           "healthy":true,"enabled":false,"clusterName":"DEFAULT","metadata":{}}
        ],
        "lastRefTime":1528787794594,"checksum":"c6a1f24a8d6c9ee3cd9d4e1b2f8d5f8a","allIPs":false,"reachProtectionThreshold":false,"valid":true}"#;

    /// The v2 answer as the Nacos 2.x open-API docs show it.
    const V2: &str = r#"{"code":0,"message":"success","data":{"name":"DEFAULT_GROUP@@test_service","groupName":"DEFAULT_GROUP",
        "clusters":"","cacheMillis":10000,"hosts":[{"ip":"127.0.0.1","port":8080,"weight":1.0,"healthy":true,"enabled":true,
        "ephemeral":true,"clusterName":"DEFAULT","serviceName":"DEFAULT_GROUP@@test_service","metadata":{"value":"1"},
        "instanceHeartBeatTimeOut":15000,"ipDeleteTimeout":30000,"instanceHeartBeatInterval":5000}],
        "lastRefTime":1662554390814,"checksum":"","allIPs":false,"reachProtectionThreshold":false,"valid":true}}"#;

    /// The v3 client API answer as the Nacos 3.x docs show it: `data` is the list.
    const V3: &str = r#"{"code":0,"message":"success","data":[{"ip":"127.0.0.1","port":3306,"weight":1.0,"healthy":true,
        "enabled":true,"ephemeral":true,"clusterName":"DEFAULT","serviceName":"DEFAULT_GROUP@@test1","metadata":{},
        "ipDeleteTimeout":30000,"instanceIdGenerator":"simple","instanceHeartBeatInterval":5000,"instanceHeartBeatTimeOut":15000}]}"#;

    fn addrs(list: &[ServerSpec]) -> Vec<String> {
        list.iter().map(|s| s.addr.to_string()).collect()
    }

    #[test]
    fn golden_answers_of_every_shape() {
        let v1 = parse_list(V1.as_bytes(), NacosApi::V1, &[]).unwrap();
        assert_eq!(addrs(&v1), ["10.10.10.10:8888", "10.10.10.11:8888"]);
        assert_eq!(
            (v1[0].weight, v1[0].max_fails, v1[0].backup),
            (100, 2, false)
        );
        let s = &v1[1];
        assert_eq!(
            (
                s.weight,
                s.max_fails,
                s.fail_timeout,
                s.max_conns,
                s.backup,
                s.slow_start
            ),
            (50, 3, 20, 100, true, 30),
            "metadata settings; metadata weight is not one of them"
        );
        let v2 = parse_list(V2.as_bytes(), NacosApi::V2, &[]).unwrap();
        assert_eq!(
            (addrs(&v2), v2[0].weight),
            (vec!["127.0.0.1:8080".to_string()], 100)
        );
        let v3 = parse_list(V3.as_bytes(), NacosApi::V3, &[]).unwrap();
        assert_eq!(addrs(&v3), ["127.0.0.1:3306"]);
        // each shape is foreign to the other APIs
        for (body, api) in [
            (V1, NacosApi::V2),
            (V1, NacosApi::V3),
            (V2, NacosApi::V1),
            (V2, NacosApi::V3),
            (V3, NacosApi::V1),
            (V3, NacosApi::V2),
        ] {
            assert_eq!(
                read_answer(body.as_bytes(), api).unwrap(),
                Answer::Foreign,
                "{api:?}"
            );
        }
    }

    #[test]
    fn envelopes_errors_and_empty_services() {
        let nf = br#"{"code":21008,"message":"service not exist","data":null}"#;
        assert_eq!(parse_list(nf, NacosApi::V2, &[]).unwrap(), vec![]);
        assert_eq!(parse_list(nf, NacosApi::V3, &[]).unwrap(), vec![]);
        let denied = br#"{"code":10001,"message":"access denied","data":null}"#;
        let e = parse_list(denied, NacosApi::V2, &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("10001") && e.contains("access denied"), "{e}");
        assert_eq!(
            parse_list(br#"{"hosts":[]}"#, NacosApi::V1, &[]).unwrap(),
            vec![]
        );
        assert_eq!(
            parse_list(br#"{"code":0,"data":[]}"#, NacosApi::V3, &[]).unwrap(),
            vec![]
        );
        assert_eq!(
            parse_list(br#"{"code":0,"data":{"hosts":null}}"#, NacosApi::V2, &[]).unwrap(),
            vec![]
        );
        assert!(matches!(
            parse_list(b"<html>", NacosApi::V1, &[]),
            Err(RegistryError::Json(_))
        ));
        let e =
            parse_list(br#"{"status":404,"error":"Not Found"}"#, NacosApi::V1, &[]).unwrap_err();
        assert!(
            e.to_string().contains("not a Nacos v1 instance list"),
            "{e}"
        );
    }

    #[test]
    fn weight_mapping() {
        assert_eq!(weight_of(1.0), Some((100, false)));
        assert_eq!(weight_of(0.5), Some((50, false)));
        assert_eq!(
            weight_of(0.004),
            Some((1, false)),
            "tiny weights still get traffic"
        );
        assert_eq!(weight_of(0.015), Some((2, false)));
        assert_eq!(weight_of(2.345), Some((235, false)));
        assert_eq!(weight_of(10000.0), Some((1_000_000, false)));
        assert_eq!(weight_of(1e12), Some((1_000_000, false)), "clamped");
        assert_eq!(weight_of(0.0), Some((1, true)), "weight 0: down");
        for bad in [-1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(weight_of(bad), None);
        }
        let one = |w: &str| {
            let body = format!(r#"{{"hosts":[{{"ip":"1.2.3.4","port":80,"weight":{w}}}]}}"#);
            parse_list(body.as_bytes(), NacosApi::V1, &[])
        };
        let b =
            br#"{"hosts":[{"ip":"1.2.3.4","port":80,"weight":0.4,"metadata":{"down":"true"}}]}"#;
        let d = parse_list(b, NacosApi::V1, &[]).unwrap();
        assert!(
            d[0].down && d[0].weight == 40,
            "down from metadata keeps the weight"
        );
        let zero = one("0").unwrap();
        assert!(zero[0].down && zero[0].weight == 1);
        assert_eq!(one("\"2.5\"").unwrap()[0].weight, 250);
        let e = one("-3").unwrap_err().to_string();
        assert!(
            e.contains("1.2.3.4:80") && e.contains("weight") && e.contains("0 to 10000"),
            "{e}"
        );
    }

    #[test]
    fn filters_and_bad_instances() {
        let body = br#"{"hosts":[
            {"ip":"10.0.0.1","port":80,"clusterName":"A"},
            {"ip":"10.0.0.2","port":80,"clusterName":"B"},
            {"ip":"10.0.0.3","port":80},
            {"ip":"not an ip","port":80,"healthy":false},
            {"ip":"::1","port":81,"clusterName":"B"}]}"#;
        let all = parse_list(body, NacosApi::V1, &[]).unwrap();
        assert_eq!(
            addrs(&all),
            ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "[::1]:81"]
        );
        let b = parse_list(body, NacosApi::V1, &["B".into()]).unwrap();
        assert_eq!(addrs(&b), ["10.0.0.2:80", "[::1]:81"]);
        let d = parse_list(body, NacosApi::V1, &["DEFAULT".into()]).unwrap();
        assert_eq!(addrs(&d), ["10.0.0.3:80"]);
        for (bad, why) in [
            (
                r#"{"instanceId":"x#1","ip":"web-1","port":80}"#,
                "host names are not resolved",
            ),
            (
                r#"{"instanceId":"x#1","ip":"web-1","port":80}"#,
                "entry \"web-1:80\": invalid",
            ),
            (r#"{"instanceId":"x#1","port":80}"#, "entry \"x#1\""),
            (r#"{"ip":"10.0.0.1","port":0}"#, "invalid server address"),
            (
                r#"{"ip":"10.0.0.1","port":70000}"#,
                "invalid server address",
            ),
            (
                r#"{"ip":"10.0.0.1","port":80,"healthy":"maybe"}"#,
                "true or false",
            ),
            (
                r#"{"ip":"10.0.0.1","port":80,"metadata":{"max_fails":"-1"}}"#,
                "max_fails",
            ),
            (r#"{"ip":"10.0.0.1","port":80,"metadata":"x"}"#, "metadata"),
            (r#""10.0.0.1:80""#, "instance #1"),
        ] {
            let b = format!(r#"{{"hosts":[{bad}]}}"#);
            let e = parse_list(b.as_bytes(), NacosApi::V1, &[])
                .unwrap_err()
                .to_string();
            assert!(e.contains(why) && e.starts_with("entry \""), "{bad}: {e}");
        }
    }
}
