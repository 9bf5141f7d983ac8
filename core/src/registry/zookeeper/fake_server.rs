//! A fake ZooKeeper server for tests: a tree with zxids, one-shot and persistent
//! recursive watches with the server's firing rules, SetWatches catch-up, sessions that
//! can expire, and switches for an old server (no addWatch) and refused credentials.

use std::collections::{BTreeMap, BTreeSet};

use super::jute::*;

#[derive(Debug, Clone)]
pub struct Node {
    pub data: Vec<u8>,
    pub mzxid: i64,
    pub pzxid: i64,
}

/// One request as the server read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub xid: i32,
    pub op: i32,
    pub path: String,
    pub watch: bool,
}

#[derive(Default)]
pub struct Fake {
    pub nodes: BTreeMap<String, Node>,
    pub zxid: i64,
    pub timeout_ms: i32,
    next_session: i64,
    /// Live sessions and their passwords.
    pub sessions: BTreeMap<i64, Vec<u8>>,
    /// The session of the current connection (0 before the handshake).
    pub session: i64,
    pub connected: bool,
    /// The server closed the connection (after Unimplemented, AuthFailed, expiry).
    pub closed: bool,
    /// A 3.5 server: addWatch is an unknown op.
    pub old: bool,
    pub refuse_auth: bool,
    /// Paths whose reads answer NoAuth.
    pub no_auth: BTreeSet<String>,
    child_w: BTreeSet<String>,
    data_w: BTreeSet<String>,
    exist_w: BTreeSet<String>,
    rec_w: BTreeSet<String>,
    /// Every request read, in order; `connects` every ConnectRequest.
    pub seen: Vec<Seen>,
    pub connects: Vec<ConnectRequest>,
    pub auths: Vec<AuthPacket>,
    pub set_watches: Vec<(i32, SetWatches)>,
    /// Notifications waiting to be sent with the next answer.
    queued: Vec<u8>,
}

fn parent(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) => "/",
        Some(i) => &path[..i],
        None => "/",
    }
}

impl Fake {
    pub fn new() -> Fake {
        Fake {
            timeout_ms: 6000,
            next_session: 0x100,
            ..Default::default()
        }
    }

    pub fn children(&self, path: &str) -> Vec<String> {
        self.nodes
            .keys()
            .filter(|k| k.as_str() != path && parent(k) == path && k.len() > 1)
            .map(|k| k.rsplit('/').next().unwrap_or("").to_string())
            .collect()
    }

    fn exists(&self, path: &str) -> bool {
        path == "/" || self.nodes.contains_key(path)
    }

    fn notify(&mut self, event_type: i32, path: &str) {
        let zxid = self.zxid;
        put_frame(&mut self.queued, |b| {
            ReplyHeader {
                xid: XID_NOTIFICATION,
                zxid,
                err: 0,
            }
            .encode(b);
            WatcherEvent {
                event_type,
                state: 3,
                path: path.into(),
            }
            .encode(b);
        });
    }

    fn recursive_hit(&self, path: &str) -> bool {
        self.rec_w.iter().any(|w| {
            path == w
                || w == "/"
                || (path.starts_with(w.as_str()) && path[w.len()..].starts_with('/'))
        })
    }

    /// Creates or changes a node, firing watches as the server does (only while a
    /// connection holds them).
    pub fn set(&mut self, path: &str, data: &[u8]) {
        self.zxid += 1;
        let z = self.zxid;
        if let Some(n) = self.nodes.get_mut(path) {
            n.data = data.to_vec();
            n.mzxid = z;
            let fire_data = self.data_w.remove(path);
            if fire_data || self.recursive_hit(path) {
                self.notify(event::NODE_DATA_CHANGED, path);
            }
            return;
        }
        self.nodes.insert(
            path.into(),
            Node {
                data: data.to_vec(),
                mzxid: z,
                pzxid: z,
            },
        );
        let par = parent(path).to_string();
        if let Some(p) = self.nodes.get_mut(&par) {
            p.pzxid = z;
        }
        if self.exist_w.remove(path) || self.recursive_hit(path) {
            self.notify(event::NODE_CREATED, path);
        }
        if self.child_w.remove(&par) {
            self.notify(event::NODE_CHILDREN_CHANGED, &par);
        }
    }

    pub fn delete(&mut self, path: &str) {
        self.zxid += 1;
        let z = self.zxid;
        if self.nodes.remove(path).is_none() {
            return;
        }
        let par = parent(path).to_string();
        if let Some(p) = self.nodes.get_mut(&par) {
            p.pzxid = z;
        }
        let d = self.data_w.remove(path);
        let c = self.child_w.remove(path);
        if d || c || self.recursive_hit(path) {
            self.notify(event::NODE_DELETED, path);
        }
        if self.child_w.remove(&par) {
            self.notify(event::NODE_CHILDREN_CHANGED, &par);
        }
    }

    /// The connection closed: the server drops its watches.
    pub fn disconnect(&mut self) {
        self.connected = false;
        self.closed = false;
        self.session = 0;
        self.child_w.clear();
        self.data_w.clear();
        self.exist_w.clear();
        self.rec_w.clear();
        self.queued.clear();
    }

    pub fn expire(&mut self, id: i64) {
        self.sessions.remove(&id);
    }

    /// Answers everything in `bytes` (the client's output), plus queued notifications.
    pub fn serve(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
        d.push(bytes);
        let mut out = std::mem::take(&mut self.queued);
        while let Some(f) = d.next_frame().unwrap() {
            if self.closed {
                break;
            }
            if !self.connected {
                self.handshake(&f, &mut out);
            } else {
                self.request(&f, &mut out);
            }
        }
        out.extend(std::mem::take(&mut self.queued));
        out
    }

    fn handshake(&mut self, f: &[u8], out: &mut Vec<u8>) {
        let req = ConnectRequest::decode(&mut Reader::new(f)).unwrap();
        self.connects.push(req.clone());
        let known = self.sessions.get(&req.session_id);
        let (id, timeout, passwd) = if req.session_id == 0 {
            self.next_session += 1;
            let id = self.next_session;
            let pw = vec![id as u8; 16];
            self.sessions.insert(id, pw.clone());
            (id, self.timeout_ms, pw)
        } else if known == Some(&req.passwd) {
            (req.session_id, self.timeout_ms, req.passwd.clone())
        } else {
            (0, 0, vec![0; 16])
        };
        put_frame(out, |b| {
            ConnectResponse {
                protocol_version: 0,
                timeout_ms: timeout,
                session_id: id,
                passwd,
                read_only: false,
            }
            .encode(b)
        });
        if timeout == 0 {
            self.closed = true;
        } else {
            self.connected = true;
            self.session = id;
        }
    }

    fn reply(&self, out: &mut Vec<u8>, xid: i32, err: i32, body: impl FnOnce(&mut Vec<u8>)) {
        let zxid = self.zxid;
        put_frame(out, |b| {
            ReplyHeader { xid, zxid, err }.encode(b);
            body(b);
        });
    }

    fn stat(&self, path: &str) -> Stat {
        let n = self.nodes.get(path);
        Stat {
            mzxid: n.map_or(0, |n| n.mzxid),
            pzxid: n.map_or(0, |n| n.pzxid),
            data_length: n.map_or(0, |n| n.data.len() as i32),
            num_children: self.children(path).len() as i32,
            ..Default::default()
        }
    }

    fn request(&mut self, f: &[u8], out: &mut Vec<u8>) {
        let mut r = Reader::new(f);
        let h = RequestHeader::decode(&mut r).unwrap();
        let mut seen = Seen {
            xid: h.xid,
            op: h.op,
            path: String::new(),
            watch: false,
        };
        match h.op {
            op::PING => self.reply(out, h.xid, 0, |_| {}),
            op::AUTH => {
                self.auths.push(AuthPacket::decode(&mut r).unwrap());
                if self.refuse_auth {
                    self.reply(out, h.xid, -115, |_| {});
                    self.closed = true;
                } else {
                    self.reply(out, h.xid, 0, |_| {});
                }
            }
            op::ADD_WATCH => {
                let req = AddWatchRequest::decode(&mut r).unwrap();
                seen.path = req.path.clone();
                if self.old {
                    self.reply(out, h.xid, -6, |_| {});
                    self.closed = true;
                } else {
                    assert_eq!(req.mode, ADD_WATCH_PERSISTENT_RECURSIVE);
                    self.rec_w.insert(req.path);
                    self.reply(out, h.xid, 0, |b| b.put_i32(0));
                }
            }
            op::SET_WATCHES | op::SET_WATCHES2 => {
                let sw = SetWatches::decode_v(&mut r, h.op == op::SET_WATCHES2).unwrap();
                for p in &sw.data {
                    match self.nodes.get(p) {
                        None => self.notify(event::NODE_DELETED, p),
                        Some(n) if n.mzxid > sw.relative_zxid => {
                            self.notify(event::NODE_DATA_CHANGED, p)
                        }
                        Some(_) => {
                            self.data_w.insert(p.clone());
                        }
                    }
                }
                for p in &sw.exist {
                    if self.exists(p) {
                        self.notify(event::NODE_CREATED, p);
                    } else {
                        self.exist_w.insert(p.clone());
                    }
                }
                for p in &sw.child {
                    match self.nodes.get(p) {
                        None => self.notify(event::NODE_DELETED, p),
                        Some(n) if n.pzxid > sw.relative_zxid => {
                            self.notify(event::NODE_CHILDREN_CHANGED, p)
                        }
                        Some(_) => {
                            self.child_w.insert(p.clone());
                        }
                    }
                }
                self.rec_w.extend(sw.persistent_recursive.iter().cloned());
                self.set_watches.push((h.op, sw));
                // the catch-up events go out before the answer
                out.extend(std::mem::take(&mut self.queued));
                self.reply(out, h.xid, 0, |_| {});
            }
            op::GET_CHILDREN2 | op::GET_DATA | op::EXISTS => {
                let req = PathWatch::decode(&mut r).unwrap();
                seen.path = req.path.clone();
                seen.watch = req.watch;
                let p = req.path;
                if self.no_auth.contains(&p) {
                    self.reply(out, h.xid, -102, |_| {});
                } else if !self.exists(&p) {
                    if h.op == op::EXISTS && req.watch {
                        self.exist_w.insert(p.clone());
                    }
                    self.reply(out, h.xid, -101, |_| {});
                } else if h.op == op::GET_CHILDREN2 {
                    if req.watch {
                        self.child_w.insert(p.clone());
                    }
                    let resp = GetChildren2Response {
                        children: self.children(&p),
                        stat: self.stat(&p),
                    };
                    self.reply(out, h.xid, 0, |b| resp.encode(b));
                } else if h.op == op::GET_DATA {
                    if req.watch {
                        self.data_w.insert(p.clone());
                    }
                    let resp = GetDataResponse {
                        data: self
                            .nodes
                            .get(&p)
                            .map(|n| n.data.clone())
                            .unwrap_or_default(),
                        stat: self.stat(&p),
                    };
                    self.reply(out, h.xid, 0, |b| resp.encode(b));
                } else {
                    if req.watch {
                        self.data_w.insert(p.clone());
                    }
                    let st = self.stat(&p);
                    self.reply(out, h.xid, 0, |b| st.encode(b));
                }
            }
            op::CLOSE_SESSION => {
                self.sessions.remove(&self.session);
                self.reply(out, h.xid, 0, |_| {});
                self.closed = true;
            }
            other => panic!("fake server: unexpected op {other}"),
        }
        self.seen.push(seen);
    }
}
