//! ZooKeeper's wire format ("jute"): length-prefixed frames, the primitive encodings, and
//! the records this client sends and reads, each with an encoder and a bounds-checked
//! decoder (no panic and no allocation beyond the input's size on hostile bytes).
//!
//! Encodings (all big-endian): int = 4 bytes, long = 8, boolean = 1 byte, buffer and
//! ustring = int length (-1: null) + bytes, vector = int count (-1: null) + items.

use std::fmt;

/// Largest frame accepted by default (a children list of 100,000 `ip:port` names is
/// about 2.5 MB; znode data is 1 MB at most on a stock server).
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;

/// Reserved xids of replies that answer no numbered request.
pub const XID_NOTIFICATION: i32 = -1;
pub const XID_PING: i32 = -2;
pub const XID_AUTH: i32 = -4;
pub const XID_SET_WATCHES: i32 = -8;

/// Operation codes (`ZooDefs.OpCode`).
pub mod op {
    pub const EXISTS: i32 = 3;
    pub const GET_DATA: i32 = 4;
    pub const PING: i32 = 11;
    pub const GET_CHILDREN2: i32 = 12;
    pub const AUTH: i32 = 100;
    pub const SET_WATCHES: i32 = 101;
    pub const SET_WATCHES2: i32 = 105;
    pub const ADD_WATCH: i32 = 106;
    pub const CLOSE_SESSION: i32 = -11;
}

/// Watcher event types (`Watcher.Event.EventType`).
pub mod event {
    pub const NODE_CREATED: i32 = 1;
    pub const NODE_DELETED: i32 = 2;
    pub const NODE_DATA_CHANGED: i32 = 3;
    pub const NODE_CHILDREN_CHANGED: i32 = 4;
}

/// `addWatch` modes.
pub const ADD_WATCH_PERSISTENT: i32 = 0;
pub const ADD_WATCH_PERSISTENT_RECURSIVE: i32 = 1;

/// Why bytes from the server could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JuteError {
    #[error("{what} is truncated (needs {need} more bytes, {have} left)")]
    Truncated {
        what: &'static str,
        need: usize,
        have: usize,
    },
    #[error("{what} has a negative length {len}")]
    NegativeLength { what: &'static str, len: i32 },
    #[error("{what} is invalid: {why}")]
    Invalid {
        what: &'static str,
        why: &'static str,
    },
    #[error("frame length {len} is outside 1..={max} bytes")]
    FrameLength { len: i64, max: usize },
}

/// Appends jute encodings to a byte vector.
pub trait Put {
    fn put_i32(&mut self, v: i32);
    fn put_i64(&mut self, v: i64);
    fn put_bool(&mut self, v: bool);
    fn put_buffer(&mut self, v: Option<&[u8]>);
    fn put_str(&mut self, v: &str);
    fn put_strs(&mut self, v: &[String]);
}

impl Put for Vec<u8> {
    fn put_i32(&mut self, v: i32) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_i64(&mut self, v: i64) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_bool(&mut self, v: bool) {
        self.push(v as u8);
    }
    fn put_buffer(&mut self, v: Option<&[u8]>) {
        match v {
            None => self.put_i32(-1),
            Some(b) => {
                self.put_i32(i32::try_from(b.len()).unwrap_or(i32::MAX));
                self.extend_from_slice(b);
            }
        }
    }
    fn put_str(&mut self, v: &str) {
        self.put_buffer(Some(v.as_bytes()));
    }
    fn put_strs(&mut self, v: &[String]) {
        self.put_i32(i32::try_from(v.len()).unwrap_or(i32::MAX));
        for s in v {
            self.put_str(s);
        }
    }
}

/// A bounds-checked cursor over one frame's body.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], JuteError> {
        if self.remaining() < n {
            return Err(JuteError::Truncated {
                what,
                need: n,
                have: self.remaining(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn i32(&mut self, what: &'static str) -> Result<i32, JuteError> {
        let b = self.take(4, what)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn i64(&mut self, what: &'static str) -> Result<i64, JuteError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_be_bytes(a))
    }

    pub fn bool(&mut self, what: &'static str) -> Result<bool, JuteError> {
        Ok(self.take(1, what)?[0] != 0)
    }

    /// A buffer; `None` for the null encoding (length -1).
    pub fn buffer(&mut self, what: &'static str) -> Result<Option<&'a [u8]>, JuteError> {
        let len = self.i32(what)?;
        if len == -1 {
            return Ok(None);
        }
        if len < 0 {
            return Err(JuteError::NegativeLength { what, len });
        }
        self.take(len as usize, what).map(Some)
    }

    /// A string (null reads as empty). Invalid UTF-8 is replaced, not refused: a name
    /// that cannot be read back simply fails its own read later.
    pub fn string(&mut self, what: &'static str) -> Result<String, JuteError> {
        Ok(self
            .buffer(what)?
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default())
    }

    /// A vector of strings (null reads as empty). The count is checked against the bytes
    /// left (each item takes at least 4) before anything is allocated.
    pub fn strings(&mut self, what: &'static str) -> Result<Vec<String>, JuteError> {
        let n = self.i32(what)?;
        if n == -1 {
            return Ok(Vec::new());
        }
        if n < 0 {
            return Err(JuteError::NegativeLength { what, len: n });
        }
        let n = n as usize;
        if n > self.remaining() / 4 {
            return Err(JuteError::Truncated {
                what,
                need: n.saturating_mul(4),
                have: self.remaining(),
            });
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.string(what)?);
        }
        Ok(out)
    }
}

/// A record with a jute encoding.
pub trait Record: Sized {
    fn encode(&self, out: &mut Vec<u8>);
    fn decode(r: &mut Reader<'_>) -> Result<Self, JuteError>;
}

/// Appends one frame (4-byte length + body) built by `body`.
pub fn put_frame(out: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>)) {
    let at = out.len();
    out.put_i32(0);
    body(out);
    let len = i32::try_from(out.len() - at - 4).unwrap_or(i32::MAX);
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Appends a request frame: the header, then the body `record` writes.
pub fn put_request(out: &mut Vec<u8>, xid: i32, op: i32, record: impl FnOnce(&mut Vec<u8>)) {
    put_frame(out, |b| {
        RequestHeader { xid, op }.encode(b);
        record(b);
    });
}

/// Splits a byte stream into frames. Holds at most one incomplete frame; a length
/// outside `1..=max` is an error as soon as its 4 bytes arrive.
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    max: usize,
}

impl FrameDecoder {
    pub fn new(max: usize) -> FrameDecoder {
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            max: max.min(i32::MAX as usize),
        }
    }

    pub fn clear(&mut self) {
        self.buf = Vec::new();
        self.start = 0;
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame's body, if one is there.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, JuteError> {
        let avail = &self.buf[self.start..];
        if avail.len() < 4 {
            self.compact();
            return Ok(None);
        }
        let len = i32::from_be_bytes([avail[0], avail[1], avail[2], avail[3]]);
        if len < 1 || len as usize > self.max {
            return Err(JuteError::FrameLength {
                len: len as i64,
                max: self.max,
            });
        }
        let len = len as usize;
        if avail.len() < 4 + len {
            self.compact();
            return Ok(None);
        }
        let frame = avail[4..4 + len].to_vec();
        self.start += 4 + len;
        Ok(Some(frame))
    }

    /// Bytes buffered (an incomplete frame).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
    }
}

/// Opens or resumes a session; the first frame on a connection (no request header).
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    pub protocol_version: i32,
    pub last_zxid: i64,
    pub timeout_ms: i32,
    pub session_id: i64,
    pub passwd: Vec<u8>,
    pub read_only: bool,
}

impl fmt::Debug for ConnectRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ConnectRequest(session 0x{:x}, zxid 0x{:x}, timeout {} ms)",
            self.session_id, self.last_zxid, self.timeout_ms
        )
    }
}

impl Record for ConnectRequest {
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_i32(self.protocol_version);
        out.put_i64(self.last_zxid);
        out.put_i32(self.timeout_ms);
        out.put_i64(self.session_id);
        out.put_buffer(Some(&self.passwd));
        out.put_bool(self.read_only);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, JuteError> {
        Ok(ConnectRequest {
            protocol_version: r.i32("ConnectRequest.protocolVersion")?,
            last_zxid: r.i64("ConnectRequest.lastZxidSeen")?,
            timeout_ms: r.i32("ConnectRequest.timeOut")?,
            session_id: r.i64("ConnectRequest.sessionId")?,
            passwd: r
                .buffer("ConnectRequest.passwd")?
                .unwrap_or_default()
                .to_vec(),
            read_only: if r.remaining() > 0 {
                r.bool("ConnectRequest.readOnly")?
            } else {
                false
            },
        })
    }
}

/// The answer to a `ConnectRequest`: a timeout <= 0 means the session expired.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectResponse {
    pub protocol_version: i32,
    pub timeout_ms: i32,
    pub session_id: i64,
    pub passwd: Vec<u8>,
    /// Absent from servers before 3.4 (read as false).
    pub read_only: bool,
}

impl fmt::Debug for ConnectResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ConnectResponse(session 0x{:x}, timeout {} ms, read_only {})",
            self.session_id, self.timeout_ms, self.read_only
        )
    }
}

impl Record for ConnectResponse {
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_i32(self.protocol_version);
        out.put_i32(self.timeout_ms);
        out.put_i64(self.session_id);
        out.put_buffer(Some(&self.passwd));
        out.put_bool(self.read_only);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, JuteError> {
        Ok(ConnectResponse {
            protocol_version: r.i32("ConnectResponse.protocolVersion")?,
            timeout_ms: r.i32("ConnectResponse.timeOut")?,
            session_id: r.i64("ConnectResponse.sessionId")?,
            passwd: r
                .buffer("ConnectResponse.passwd")?
                .unwrap_or_default()
                .to_vec(),
            read_only: if r.remaining() > 0 {
                r.bool("ConnectResponse.readOnly")?
            } else {
                false
            },
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub xid: i32,
    pub op: i32,
}

impl Record for RequestHeader {
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_i32(self.xid);
        out.put_i32(self.op);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, JuteError> {
        Ok(RequestHeader {
            xid: r.i32("RequestHeader.xid")?,
            op: r.i32("RequestHeader.type")?,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyHeader {
    pub xid: i32,
    pub zxid: i64,
    pub err: i32,
}

impl Record for ReplyHeader {
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_i32(self.xid);
        out.put_i64(self.zxid);
        out.put_i32(self.err);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, JuteError> {
        Ok(ReplyHeader {
            xid: r.i32("ReplyHeader.xid")?,
            zxid: r.i64("ReplyHeader.zxid")?,
            err: r.i32("ReplyHeader.err")?,
        })
    }
}

/// `{type 0, scheme, auth}`; for digest, auth is `user:password`.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthPacket {
    pub auth_type: i32,
    pub scheme: String,
    pub auth: Vec<u8>,
}

impl fmt::Debug for AuthPacket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuthPacket({}, <hidden>)", self.scheme)
    }
}

impl Record for AuthPacket {
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_i32(self.auth_type);
        out.put_str(&self.scheme);
        out.put_buffer(Some(&self.auth));
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, JuteError> {
        Ok(AuthPacket {
            auth_type: r.i32("AuthPacket.type")?,
            scheme: r.string("AuthPacket.scheme")?,
            auth: r.buffer("AuthPacket.auth")?.unwrap_or_default().to_vec(),
        })
    }
}

/// `{path, watch}`: the body of getChildren2, getData and exists requests alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathWatch {
    pub path: String,
    pub watch: bool,
}

impl Record for PathWatch {
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_str(&self.path);
        out.put_bool(self.watch);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, JuteError> {
        Ok(PathWatch {
            path: r.string("request.path")?,
            watch: r.bool("request.watch")?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddWatchRequest {
    pub path: String,
    pub mode: i32,
}

impl Record for AddWatchRequest {
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_str(&self.path);
        out.put_i32(self.mode);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, JuteError> {
        Ok(AddWatchRequest {
            path: r.string("AddWatchRequest.path")?,
            mode: r.i32("AddWatchRequest.mode")?,
        })
    }
}

/// SetWatches (op 101: the first three lists) or SetWatches2 (op 105: all five).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetWatches {
    pub relative_zxid: i64,
    pub data: Vec<String>,
    pub exist: Vec<String>,
    pub child: Vec<String>,
    pub persistent: Vec<String>,
    pub persistent_recursive: Vec<String>,
}

impl SetWatches {
    /// Whether this needs SetWatches2 (servers before 3.6 know only SetWatches).
    pub fn needs_v2(&self) -> bool {
        !self.persistent.is_empty() || !self.persistent_recursive.is_empty()
    }

    pub fn encode_v(&self, out: &mut Vec<u8>, v2: bool) {
        out.put_i64(self.relative_zxid);
        out.put_strs(&self.data);
        out.put_strs(&self.exist);
        out.put_strs(&self.child);
        if v2 {
            out.put_strs(&self.persistent);
            out.put_strs(&self.persistent_recursive);
        }
    }

    pub fn decode_v(r: &mut Reader<'_>, v2: bool) -> Result<Self, JuteError> {
        let mut s = SetWatches {
            relative_zxid: r.i64("SetWatches.relativeZxid")?,
            data: r.strings("SetWatches.dataWatches")?,
            exist: r.strings("SetWatches.existWatches")?,
            child: r.strings("SetWatches.childWatches")?,
            ..Default::default()
        };
        if v2 {
            s.persistent = r.strings("SetWatches2.persistentWatches")?;
            s.persistent_recursive = r.strings("SetWatches2.persistentRecursiveWatches")?;
        }
        Ok(s)
    }
}

/// A node's metadata (68 bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stat {
    pub czxid: i64,
    pub mzxid: i64,
    pub ctime: i64,
    pub mtime: i64,
    pub version: i32,
    pub cversion: i32,
    pub aversion: i32,
    pub ephemeral_owner: i64,
    pub data_length: i32,
    pub num_children: i32,
    pub pzxid: i64,
}

impl Record for Stat {
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_i64(self.czxid);
        out.put_i64(self.mzxid);
        out.put_i64(self.ctime);
        out.put_i64(self.mtime);
        out.put_i32(self.version);
        out.put_i32(self.cversion);
        out.put_i32(self.aversion);
        out.put_i64(self.ephemeral_owner);
        out.put_i32(self.data_length);
        out.put_i32(self.num_children);
        out.put_i64(self.pzxid);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, JuteError> {
        Ok(Stat {
            czxid: r.i64("Stat.czxid")?,
            mzxid: r.i64("Stat.mzxid")?,
            ctime: r.i64("Stat.ctime")?,
            mtime: r.i64("Stat.mtime")?,
            version: r.i32("Stat.version")?,
            cversion: r.i32("Stat.cversion")?,
            aversion: r.i32("Stat.aversion")?,
            ephemeral_owner: r.i64("Stat.ephemeralOwner")?,
            data_length: r.i32("Stat.dataLength")?,
            num_children: r.i32("Stat.numChildren")?,
            pzxid: r.i64("Stat.pzxid")?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetChildren2Response {
    pub children: Vec<String>,
    pub stat: Stat,
}

impl Record for GetChildren2Response {
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_strs(&self.children);
        self.stat.encode(out);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, JuteError> {
        Ok(GetChildren2Response {
            children: r.strings("GetChildren2Response.children")?,
            stat: Stat::decode(r)?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetDataResponse {
    pub data: Vec<u8>,
    pub stat: Stat,
}

impl Record for GetDataResponse {
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_buffer(Some(&self.data));
        self.stat.encode(out);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, JuteError> {
        Ok(GetDataResponse {
            data: r
                .buffer("GetDataResponse.data")?
                .unwrap_or_default()
                .to_vec(),
            stat: Stat::decode(r)?,
        })
    }
}

/// `{type, state, path}`, the body of a notification (xid -1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatcherEvent {
    pub event_type: i32,
    pub state: i32,
    pub path: String,
}

impl Record for WatcherEvent {
    fn encode(&self, out: &mut Vec<u8>) {
        out.put_i32(self.event_type);
        out.put_i32(self.state);
        out.put_str(&self.path);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, JuteError> {
        Ok(WatcherEvent {
            event_type: r.i32("WatcherEvent.type")?,
            state: r.i32("WatcherEvent.state")?,
            path: r.string("WatcherEvent.path")?,
        })
    }
}

#[cfg(test)]
#[path = "jute_tests.rs"]
mod tests;
