//! The dump file: the current server set as `server ...;` lines that the upstream block
//! `include`s, so nginx starts with the last known set when the registry is down.
//! Written atomically (temp file, fsync, rename, fsync of the directory): a crash at any
//! point leaves either the old file or the new one, never a torn include.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::servers::{parse_addr, ServerSpec};

/// A dump line that is not a `server` line this module writes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {why}: \"{text}\"")]
pub struct DumpError {
    pub line: usize,
    pub why: String,
    pub text: String,
}

/// The file's text: one line per server, in set order.
pub fn render(servers: &[ServerSpec]) -> String {
    let mut out = String::with_capacity(servers.len() * 64);
    for s in servers {
        out.push_str(&s.line());
        out.push('\n');
    }
    out
}

/// Parses the text back (comments and blank lines allowed). Used to check dumps, and by
/// the crash-safety tools; nginx itself reads the file through `include`.
pub fn parse(text: &str) -> Result<Vec<ServerSpec>, DumpError> {
    let mut out = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let err = |why: &str| DumpError {
            line: n + 1,
            why: why.to_string(),
            text: crate::servers::printable(raw, 200),
        };
        let body = line.strip_suffix(';').ok_or_else(|| err("missing \";\""))?;
        let mut words = body.split_ascii_whitespace();
        if words.next() != Some("server") {
            return Err(err("expected \"server\""));
        }
        let addr = words.next().ok_or_else(|| err("missing address"))?;
        let mut spec = ServerSpec::new(parse_addr(addr).map_err(|e| err(&e.to_string()))?);
        for w in words {
            let num = |v: &str| v.parse::<u32>().map_err(|_| err("bad number"));
            match w.split_once('=') {
                Some(("weight", v)) => spec.weight = num(v)?.max(1),
                Some(("max_fails", v)) => spec.max_fails = num(v)?,
                Some(("max_conns", v)) => spec.max_conns = num(v)?,
                Some(("fail_timeout", v)) => {
                    spec.fail_timeout = crate::conf::time::parse_time_ms(v)
                        .map(|ms| ms / 1000)
                        .filter(|&secs| secs <= crate::servers::MAX_FAIL_TIMEOUT as u64)
                        .map(|secs| secs as u32)
                        .ok_or_else(|| err("bad fail_timeout"))?
                }
                None if w == "down" => spec.down = true,
                None if w == "backup" => spec.backup = true,
                _ => return Err(err("unknown parameter")),
            }
        }
        out.push(spec);
    }
    Ok(out)
}

/// The directory a dump path lives in (`.` for a bare file name).
fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

/// A dump written to a temp file beside its target and flushed to disk, not yet in
/// place: `commit` renames it over the target; dropping it removes the temp file. The
/// split lets the writer check, right before the rename, that the set it wrote is still
/// the one to keep.
#[derive(Debug)]
pub struct TempDump {
    tmp: PathBuf,
    path: PathBuf,
    committed: bool,
}

impl TempDump {
    /// Writes `contents` to `.NAME.tmp.PID` in the dump's directory. The temp file is
    /// created exclusively and never through a symlink (`O_CREAT|O_EXCL|O_NOFOLLOW`),
    /// with the mode of the existing dump (0644 for a new one) set on the open file.
    pub fn write(path: &Path, contents: &[u8]) -> io::Result<TempDump> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let name = path.file_name().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "dump path has no file name")
        })?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp.{}", std::process::id()));
        let tmp = dir_of(path).join(tmp_name);
        // the mode of the dump being replaced (never of what a symlink points at)
        let mode = fs::symlink_metadata(path)
            .ok()
            .filter(|m| m.file_type().is_file())
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o644);
        let open = || {
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)
        };
        let mut f = match open() {
            // a temp file of a dead process that had our pid (or anything planted there):
            // unlink it (unlink never follows a symlink) and create ours afresh
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                fs::remove_file(&tmp)?;
                open()?
            }
            r => r?,
        };
        let guard = TempDump {
            tmp,
            path: path.to_path_buf(),
            committed: false,
        };
        // the umask may have narrowed the creation mode: set it on the open file
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()?;
        Ok(guard)
    }

    /// Renames the temp file over the target (atomic). `sync_dir` then makes the rename
    /// itself survive a power cut.
    pub fn commit(mut self) -> io::Result<()> {
        fs::rename(&self.tmp, &self.path)?;
        self.committed = true;
        Ok(())
    }
}

/// Syncs the directory of `path`, so a rename into it is on disk.
pub fn sync_dir(path: &Path) {
    if let Ok(d) = fs::File::open(dir_of(path)) {
        let _ = d.sync_all();
    }
}

impl Drop for TempDump {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `contents` to `path` atomically: `TempDump::write`, `commit`, `sync_dir`.
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    TempDump::write(path, contents)?.commit()?;
    sync_dir(path);
    Ok(())
}

/// Creates an empty dump file (and its missing directories, 0755) when there is none,
/// so that an `include` of it works before the registry has ever answered. The file is
/// created exclusively and never through a symlink, mode 0644. Returns what it made:
/// the directories (outermost first), then the file; empty when the file was there.
pub fn create_if_missing(path: &Path) -> io::Result<Vec<PathBuf>> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if fs::symlink_metadata(path).is_ok() {
        return Ok(Vec::new());
    }
    let mut made: Vec<PathBuf> = dir_of(path)
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && fs::symlink_metadata(d).is_err())
        .map(Path::to_path_buf)
        .collect();
    made.reverse();
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir_of(path))?;
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(_) => {
            made.push(path.to_path_buf());
            Ok(made)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// What is unsafe about where a dump is written: a dump path that is a symlink (the
/// dump would go wherever it points), or a directory others may write to without the
/// sticky bit (anyone could replace the file nginx `include`s).
pub fn path_warnings(path: &Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        out.push(format!(
            "\"{}\" is a symlink: the dump replaces the link itself (never its target); point upsync_dump_path at the real file",
            path.display()
        ));
    }
    let dir = dir_of(path);
    if let Ok(m) = fs::metadata(dir) {
        let mode = m.permissions().mode();
        if mode & 0o002 != 0 && mode & 0o1000 == 0 {
            out.push(format!(
                "the directory \"{}\" is writable by everyone and not sticky (mode {:o}): anyone could replace the dump nginx includes",
                dir.display(),
                mode & 0o7777
            ));
        }
    }
    out
}

/// Removes temp files a killed writer left beside `path` (`.NAME.tmp.PID` whose PID is
/// gone). Returns how many were removed.
pub fn remove_stale_temps(path: &Path, pid_alive: impl Fn(u32) -> bool) -> usize {
    let dir = dir_of(path);
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return 0;
    };
    let prefix = format!(".{name}.tmp.");
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let fname = e.file_name();
        let Some(f) = fname.to_str() else { continue };
        let Some(pid) = f.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !pid_alive(pid) && fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_parse_round_trip() {
        let text = "server 127.0.0.1:8088 weight=40 max_fails=3 fail_timeout=20s down;\n\
                    server 127.0.0.1:8089 weight=20 max_fails=0 fail_timeout=30s;\n";
        let specs = parse(text).unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(render(&specs), text);
        let mut s = specs[1].clone();
        s.backup = true;
        s.max_conns = 3;
        assert_eq!(parse(&render(&[s.clone()])).unwrap(), vec![s]);
    }

    #[test]
    fn parse_errors_name_the_line() {
        assert!(parse("server 127.0.0.1:1 weight=1\n")
            .unwrap_err()
            .to_string()
            .contains("line 1"));
        assert_eq!(parse("# c\n\nserver x:1;\n").unwrap_err().line, 3);
        assert!(parse("upstream a;\n").is_err());
        assert!(parse("server 127.0.0.1:1 color=red;\n").is_err());
        // found by fuzzing: 2^32 s used to wrap to 0
        assert!(parse("server 127.0.0.1:8080 fail_timeout=4294967296s;\n").is_err());
        assert_eq!(parse("# only a comment\n").unwrap(), vec![]);
    }

    #[test]
    fn missing_dumps_are_created_safely() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("upsync-dump-new-{}", std::process::id()));
        let p = dir.join("sub/servers_x.conf");
        assert_eq!(
            create_if_missing(&p).unwrap(),
            [dir.clone(), dir.join("sub"), p.clone()]
        );
        assert_eq!(fs::read(&p).unwrap(), b"");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
        assert!(create_if_missing(&p).unwrap().is_empty(), "kept");
        // a symlink planted at the path is neither followed nor replaced
        let target = dir.join("target");
        fs::write(&target, "secret").unwrap();
        let link = dir.join("sub/link.conf");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(create_if_missing(&link).unwrap().is_empty());
        assert_eq!(fs::read_to_string(&target).unwrap(), "secret");
        assert!(path_warnings(&link)[0].contains("is a symlink"));
        // a dump over a planted symlink replaces the link, never writes the target
        write_atomic(&link, b"server 127.0.0.1:1;\n").unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "secret");
        assert!(!fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        // a world-writable directory without the sticky bit is reported
        let open = dir.join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(path_warnings(&open.join("x.conf"))[0].contains("writable by everyone"));
        fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(path_warnings(&open.join("x.conf")).is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn atomic_write_replaces_and_cleans_up() {
        let dir = std::env::temp_dir().join(format!("upsync-dump-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("servers_test.conf");
        write_atomic(&p, b"one\n").unwrap();
        write_atomic(&p, b"two\n").unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "two\n");
        let leftovers: Vec<_> = fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).collect();
        assert_eq!(leftovers.len(), 1, "temp files left behind");
        assert!(write_atomic(&dir.join("missing-dir/x.conf"), b"x").is_err());
        fs::write(dir.join(".servers_test.conf.tmp.999999"), "partial").unwrap();
        fs::write(dir.join(".servers_test.conf.tmp.1"), "live writer").unwrap();
        assert_eq!(remove_stale_temps(&p, |pid| pid == 1), 1);
        assert!(dir.join(".servers_test.conf.tmp.1").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
