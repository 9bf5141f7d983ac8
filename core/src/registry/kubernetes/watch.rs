//! The events of a Kubernetes watch stream: one JSON object per line,
//! `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":{...}}`, read as they arrive
//! (complete objects only; a partial one waits for more bytes).

use serde_json::Value;

use super::super::excerpt;

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// ADDED or MODIFIED: the slice as it is now.
    Upsert(Value),
    /// DELETED: the slice as it was last.
    Delete(Value),
    /// BOOKMARK: nothing changed for this watch up to this resourceVersion.
    Bookmark(String),
    /// ERROR with code 410: the start resourceVersion is too old (compacted).
    Expired(String),
    /// Any other ERROR (a Status object).
    Error { code: u16, message: String },
}

/// `reason: message` of a Kubernetes Status object, shortened for a log line.
pub fn status_text(v: &Value) -> String {
    let reason = v.get("reason").and_then(Value::as_str).unwrap_or("");
    let message = v.get("message").and_then(Value::as_str).unwrap_or("");
    let text = match (reason.is_empty(), message.is_empty()) {
        (false, false) => format!("{reason}: {message}"),
        (false, true) => reason.to_string(),
        (true, false) => message.to_string(),
        (true, true) => v.to_string(),
    };
    excerpt(text.as_bytes())
}

/// Classifies one decoded watch message.
pub fn event(msg: Value) -> Result<Event, String> {
    let unexpected = |m: &Value| {
        format!(
            "unexpected watch event {}",
            excerpt(m.to_string().as_bytes())
        )
    };
    let Some(kind) = msg.get("type").and_then(Value::as_str) else {
        return Err(unexpected(&msg));
    };
    let kind = kind.to_string();
    let Value::Object(mut fields) = msg else {
        return Err("unexpected watch event".into());
    };
    let object = match fields.remove("object") {
        Some(o @ Value::Object(_)) => o,
        _ => {
            return Err(format!(
                "watch event {} has no object",
                excerpt(kind.as_bytes())
            ))
        }
    };
    match kind.as_str() {
        "ADDED" | "MODIFIED" => Ok(Event::Upsert(object)),
        "DELETED" => Ok(Event::Delete(object)),
        "BOOKMARK" => object
            .get("metadata")
            .and_then(|m| m.get("resourceVersion"))
            .and_then(Value::as_str)
            .filter(|rv| !rv.is_empty())
            .map(|rv| Event::Bookmark(rv.to_string()))
            .ok_or_else(|| "a BOOKMARK event has no metadata.resourceVersion".to_string()),
        "ERROR" => {
            let code = object.get("code").and_then(Value::as_u64).unwrap_or(0);
            let message = status_text(&object);
            if code == 410 {
                Ok(Event::Expired(message))
            } else {
                Ok(Event::Error {
                    code: u16::try_from(code).unwrap_or(0),
                    message,
                })
            }
        }
        other => Err(format!(
            "unknown watch event type \"{}\"",
            excerpt(other.as_bytes())
        )),
    }
}

/// The complete events in `body` after `*scanned`, advancing `*scanned` past them.
/// Stops at the first message that is not a valid event: the events before it are
/// returned with the error.
pub fn read_events(body: &[u8], scanned: &mut usize) -> (Vec<Event>, Option<String>) {
    let start = (*scanned).min(body.len());
    let mut it = serde_json::Deserializer::from_slice(&body[start..]).into_iter::<Value>();
    let mut out = Vec::new();
    loop {
        match it.next() {
            None => return (out, None),
            Some(Err(e)) if e.is_eof() => return (out, None),
            Some(Err(e)) => return (out, Some(format!("invalid JSON in the watch stream: {e}"))),
            Some(Ok(msg)) => {
                *scanned = start + it.byte_offset();
                match event(msg) {
                    Ok(ev) => out.push(ev),
                    Err(e) => return (out, Some(e)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_as_they_arrive() {
        let stream = concat!(
            r#"{"type":"ADDED","object":{"metadata":{"name":"a","resourceVersion":"5"}}}"#,
            "\n",
            r#"{"type":"BOOKMARK","object":{"kind":"EndpointSlice","metadata":{"resourceVersion":"9"}}}"#,
            "\n",
            r#"{"type":"ERROR","object":{"kind":"Status","status":"Failure","message":"too old resource version: 5 (9)","reason":"Expired","code":410}}"#,
            "\n"
        )
        .as_bytes();
        let mut scanned = 0;
        // a cut inside the first event: nothing yet
        assert_eq!(read_events(&stream[..20], &mut scanned), (vec![], None));
        assert_eq!(scanned, 0);
        let first_end = stream.iter().position(|&b| b == b'\n').unwrap();
        let (ev, err) = read_events(&stream[..first_end + 5], &mut scanned);
        assert!(err.is_none());
        assert!(matches!(&ev[..], [Event::Upsert(_)]));
        let (ev, err) = read_events(stream, &mut scanned);
        assert!(err.is_none());
        assert_eq!(
            ev,
            vec![
                Event::Bookmark("9".into()),
                Event::Expired("Expired: too old resource version: 5 (9)".into())
            ]
        );
        assert_eq!(scanned, stream.len() - 1);
        // errors, after the good events before them
        let (ev, err) = read_events(
            br#"{"type":"DELETED","object":{}} {"type":"NOPE","object":{}}"#,
            &mut 0,
        );
        assert_eq!(ev.len(), 1);
        assert!(err.unwrap().contains("unknown watch event type \"NOPE\""));
        assert!(read_events(b"[1]", &mut 0)
            .1
            .unwrap()
            .contains("unexpected watch event"));
        assert!(read_events(b"}", &mut 0)
            .1
            .unwrap()
            .contains("invalid JSON"));
        assert!(read_events(br#"{"type":"ADDED"}"#, &mut 0)
            .1
            .unwrap()
            .contains("no object"));
        let (ev, _) = read_events(
            br#"{"type":"ERROR","object":{"code":500,"message":"etcdserver: request timed out"}}"#,
            &mut 0,
        );
        assert_eq!(
            ev,
            vec![Event::Error {
                code: 500,
                message: "etcdserver: request timed out".into()
            }]
        );
    }
}
