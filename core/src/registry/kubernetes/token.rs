//! The bearer token of `token_file=`, read again when the file changes on disk.
//!
//! Projected service account tokens expire (an hour by default) and the kubelet
//! replaces the file well before that; the API server checks a token only when a
//! request starts, so an open watch is not cut when it rotates. The source therefore
//! looks at the file before each request (a `stat`, at most once per `min_gap`) and
//! reads it when its identity (inode, size, modification time) changed, and reads it
//! unconditionally after a 401. These are small blocking `std::fs` calls on nginx's
//! event loop: acceptable for one local file, bounded by the rate limit, and never
//! made more often than requests are sent.

use std::time::{Duration, Instant, SystemTime};

/// At most one `stat` of the file per this much time (hot-loop guard).
pub const MIN_CHECK_GAP: Duration = Duration::from_secs(1);
/// Earlier tokens kept only so that text echoing them can still be redacted.
const KEEP_PREVIOUS: usize = 3;

/// What identifies one version of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    modified: Option<SystemTime>,
}

fn stamp(path: &str) -> Result<Stamp, String> {
    let m = std::fs::metadata(path).map_err(|e| e.to_string())?;
    #[cfg(unix)]
    let ino = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let ino = 0;
    Ok(Stamp {
        ino,
        len: m.len(),
        modified: m.modified().ok(),
    })
}

/// The outcome of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refresh {
    /// Not looked at (rate limit), or the same token.
    Unchanged,
    /// The file holds a new token, now in use.
    Changed,
    /// The file cannot be read or holds no token; the previous token stays in use.
    Failed(String),
}

pub struct TokenFile {
    path: String,
    token: String,
    stamp: Option<Stamp>,
    checked: Option<Instant>,
    previous: Vec<String>,
    pub min_gap: Duration,
}

/// A token as the file holds it: one line of visible ASCII (a JWT), surrounding
/// whitespace ignored.
pub fn parse_token(content: &str) -> Result<String, String> {
    let t = content.trim();
    if t.is_empty() {
        return Err("the file is empty".into());
    }
    if !t.bytes().all(|b| b > b' ' && b < 0x7f) {
        return Err("the file must hold one token (one line of printable characters)".into());
    }
    Ok(t.to_string())
}

impl TokenFile {
    /// `token` is what the configuration loader read from `path`.
    pub fn new(path: &str, token: &str) -> TokenFile {
        TokenFile {
            path: path.to_string(),
            token: token.to_string(),
            stamp: stamp(path).ok(),
            checked: None,
            previous: Vec::new(),
            min_gap: MIN_CHECK_GAP,
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// The token in use and the ones used before it.
    pub fn all(&self) -> Vec<String> {
        let mut v = vec![self.token.clone()];
        v.extend(self.previous.iter().cloned());
        v
    }

    /// Looks at the file (at most once per `min_gap` unless `force`) and takes its
    /// token when the file changed (always read when `force`).
    pub fn refresh(&mut self, now: Instant, force: bool) -> Refresh {
        if !force {
            if let Some(at) = self.checked {
                if now.saturating_duration_since(at) < self.min_gap {
                    return Refresh::Unchanged;
                }
            }
        }
        self.checked = Some(now);
        let st = match stamp(&self.path) {
            Ok(s) => s,
            Err(e) => return Refresh::Failed(e),
        };
        if !force && self.stamp.as_ref() == Some(&st) {
            return Refresh::Unchanged;
        }
        let token = match std::fs::read_to_string(&self.path)
            .map_err(|e| e.to_string())
            .and_then(|c| parse_token(&c))
        {
            Ok(t) => t,
            Err(e) => return Refresh::Failed(e),
        };
        self.stamp = Some(st);
        if token == self.token {
            return Refresh::Unchanged;
        }
        let old = std::mem::replace(&mut self.token, token);
        self.previous.retain(|p| *p != old && *p != self.token);
        self.previous.insert(0, old);
        self.previous.truncate(KEEP_PREVIOUS);
        Refresh::Changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> String {
        let dir = std::env::temp_dir().join(format!("upsync-token-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("token").to_string_lossy().into_owned()
    }

    /// Replaces the file the way the kubelet does: a new file renamed over the old.
    fn replace(path: &str, content: &str) {
        let tmp = format!("{path}.new");
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    #[test]
    fn rotation_is_picked_up_rate_limited() {
        let path = temp("rotate");
        std::fs::write(&path, "tok-1\n").unwrap();
        let mut t = TokenFile::new(&path, "tok-1");
        let t0 = Instant::now();
        assert_eq!(t.refresh(t0, false), Refresh::Unchanged);
        replace(&path, "tok-2\n");
        // within the gap: not even looked at
        assert_eq!(
            t.refresh(t0 + Duration::from_millis(10), false),
            Refresh::Unchanged
        );
        assert_eq!(t.token(), "tok-1");
        assert_eq!(
            t.refresh(t0 + Duration::from_secs(2), false),
            Refresh::Changed
        );
        assert_eq!(t.token(), "tok-2");
        assert_eq!(t.all(), vec!["tok-2".to_string(), "tok-1".to_string()]);
        // same content rewritten: no change
        replace(&path, "tok-2");
        assert_eq!(
            t.refresh(t0 + Duration::from_secs(4), false),
            Refresh::Unchanged
        );
        // a forced read (after a 401) ignores the gap
        replace(&path, "tok-3");
        assert_eq!(
            t.refresh(t0 + Duration::from_secs(4), true),
            Refresh::Changed
        );
        // a broken file keeps the token in use
        replace(&path, "  \n");
        assert!(matches!(
            t.refresh(t0 + Duration::from_secs(9), false),
            Refresh::Failed(_)
        ));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            t.refresh(t0 + Duration::from_secs(19), true),
            Refresh::Failed(_)
        ));
        assert_eq!(t.token(), "tok-3");
        // the previous tokens are bounded
        for i in 4..10 {
            replace(&path, &format!("tok-{i}"));
            assert_eq!(
                t.refresh(t0 + Duration::from_secs(20 + i), true),
                Refresh::Changed
            );
        }
        assert_eq!(t.all().len(), 1 + KEEP_PREVIOUS);
        assert!(parse_token("a b").is_err());
    }
}
