//! The `upstream_show` report, byte-compatible with the C module: an HTTP/1.0 response whose
//! body lists every stream upstream and its servers.

/// One upstream as the report shows it.
pub struct UpstreamView<'a> {
    pub name: &'a str,
    /// Complete `server ...;` lines (see `ServerSpec::line`).
    pub lines: Vec<String>,
}

/// The body: `Upstream name: NAME; Backend server count: N`, the servers indented by eight
/// spaces, a blank line after each upstream; `No upstreams defined` when there are none.
pub fn render_body(upstreams: &[UpstreamView<'_>]) -> String {
    if upstreams.is_empty() {
        return "No upstreams defined\n".to_string();
    }
    let mut out = String::new();
    for u in upstreams {
        out.push_str(&format!(
            "Upstream name: {}; Backend server count: {}\n",
            u.name,
            u.lines.len()
        ));
        for l in &u.lines {
            out.push_str("        ");
            out.push_str(l);
            out.push('\n');
        }
        out.push('\n');
    }
    out
}

/// Wraps a body in the C module's response head (same headers, same order).
pub fn render_response(body: &str, content_type: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.0 200 OK\r\nServer: nginx\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_reference_layout() {
        let views = [UpstreamView {
            name: "test",
            lines: vec![
                "server 127.0.0.1:8088 weight=40 max_fails=2 fail_timeout=10s;".into(),
                "server 127.0.0.1:8089 weight=20 max_fails=0 fail_timeout=30s;".into(),
            ],
        }];
        let body = render_body(&views);
        assert_eq!(
            body,
            "Upstream name: test; Backend server count: 2\n        server 127.0.0.1:8088 weight=40 max_fails=2 fail_timeout=10s;\n        server 127.0.0.1:8089 weight=20 max_fails=0 fail_timeout=30s;\n\n"
        );
        let resp = String::from_utf8(render_response(&body, "text/plain")).unwrap();
        assert!(
            resp.starts_with("HTTP/1.0 200 OK\r\nServer: nginx\r\nContent-Type: text/plain\r\n")
        );
        assert!(resp.contains(&format!("Content-Length: {}\r\n", body.len())));
        assert!(resp.ends_with(&body));
        assert_eq!(render_body(&[]), "No upstreams defined\n");
    }
}
