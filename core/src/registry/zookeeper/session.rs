//! The session state machine: handshake and resumption, pings and timeouts, the
//! client-side expiry timer, re-arming watches after a reconnect, and turning replies and
//! notifications into listings. No I/O and no clock: see the module header.
//!
//! Timers follow the Java client: a ping after a third of the negotiated timeout without
//! sending (at least every 10 s), one ping in flight; no frame for two thirds of it is a
//! read timeout. While no connection carries the session, the client presumes it expired
//! once the session timeout has passed since it last heard from a server (a partitioned
//! client learns nothing from the ensemble).
//!
//! Watch modes: persistent recursive watches (`addWatch` mode 1, 3.6+) are added first,
//! then the list and every child's data are read without watches; later events re-read
//! only what changed. A persistent watch has no catch-up after a reconnect, so each
//! reconnect adds it again and reads everything. One-shot mode arms a child watch with
//! each getChildren2 and a data watch with each getData, so the read that follows a
//! firing is also its re-arm; after a reconnect that resumes the session, SetWatches
//! (op 101, which servers before 3.6 know; split at 128 KB) hands the armed watches back
//! with the last zxid and the server fires whatever changed meanwhile. `Auto` tries
//! `addWatch`; a server without it answers Unimplemented and closes the connection, and
//! the session continues in one-shot mode.

use std::collections::{BTreeMap, VecDeque};

use super::jute::{
    self, op, AddWatchRequest, AuthPacket, ConnectRequest, ConnectResponse, FrameDecoder,
    GetChildren2Response, GetDataResponse, JuteError, PathWatch, Reader, Record, ReplyHeader,
    SetWatches, Stat, WatcherEvent,
};
use super::watch::Watch;
use super::{validate_path, Code, Event, SessionEvent, WatchId, WatchMode, ZkConfig, ZkError};

/// getData requests in flight at once (a full read of 100,000 children is paced).
const MAX_DATA_IN_FLIGHT: usize = 256;
/// Events kept until taken (listings are coalesced per watch).
const MAX_EVENTS: usize = 1024;
const SET_WATCHES_BATCH: usize = 128 * 1024;
const MAX_PING_INTERVAL_MS: u64 = 10_000;
const MIN_PING_INTERVAL_MS: u64 = 100;
const MIN_READ_TIMEOUT_MS: u64 = 200;
/// Delay before a watch whose read failed (NoAuth, ...) is read again.
pub const RETRY_MS: u64 = 5_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conn {
    Down,
    Handshake { since: u64 },
    Up,
}

/// What a numbered request was, to interpret its reply. `bool`: it set a one-shot watch.
#[derive(Debug)]
enum Op {
    AddWatch(WatchId),
    SetWatches,
    List(WatchId, bool),
    Data(WatchId, String, bool),
    Exists(WatchId),
    Close,
}

/// The outgoing side of one connection.
struct Link {
    out: Vec<u8>,
    pending: VecDeque<(i32, Op)>,
    next_xid: i32,
    data_in_flight: usize,
    ping_in_flight: bool,
    last_send: u64,
}

impl Link {
    fn request(&mut self, code: i32, what: Op, now: u64, body: impl FnOnce(&mut Vec<u8>)) {
        let xid = self.next_xid;
        self.next_xid = if xid >= i32::MAX - 1 { 1 } else { xid + 1 };
        jute::put_request(&mut self.out, xid, code, body);
        if matches!(what, Op::Data(..)) {
            self.data_in_flight += 1;
        }
        self.pending.push_back((xid, what));
        self.last_send = now;
    }

    fn read(&mut self, code: i32, path: String, watch: bool, what: Op, now: u64) {
        self.request(code, what, now, |b| PathWatch { path, watch }.encode(b));
    }
}

pub struct Session {
    cfg: ZkConfig,
    /// "" or "/a/b" (no trailing slash).
    chroot: String,
    session_id: i64,
    passwd: Vec<u8>,
    last_zxid: i64,
    negotiated_ms: u32,
    /// The mode in use: `None` while `Auto` has not heard the server's answer yet.
    mode: Option<WatchMode>,
    conn: Conn,
    decoder: FrameDecoder,
    link: Link,
    last_recv: u64,
    /// When a server last answered within the session (base of the expiry timer).
    heard_at: u64,
    watches: BTreeMap<WatchId, Watch>,
    next_watch: u32,
    events: VecDeque<Event>,
}

impl Session {
    pub fn new(cfg: ZkConfig) -> Session {
        let chroot = cfg.chroot.trim_end_matches('/').to_string();
        let mode = match cfg.watch_mode {
            WatchMode::Auto => None,
            m => Some(m),
        };
        Session {
            decoder: FrameDecoder::new(cfg.max_frame),
            cfg,
            chroot,
            session_id: 0,
            passwd: Vec::new(),
            last_zxid: 0,
            negotiated_ms: 0,
            mode,
            conn: Conn::Down,
            link: Link {
                out: Vec::new(),
                pending: VecDeque::new(),
                next_xid: 1,
                data_in_flight: 0,
                ping_in_flight: false,
                last_send: 0,
            },
            last_recv: 0,
            heard_at: 0,
            watches: BTreeMap::new(),
            next_watch: 1,
            events: VecDeque::new(),
        }
    }

    /// Watches the children of `path` (and their data) as a service list. The first
    /// [`Event::Listing`] follows the first complete read.
    pub fn watch(&mut self, path: &str, now: u64) -> Result<WatchId, ZkError> {
        validate_path(path)?;
        let id = WatchId(self.next_watch);
        self.next_watch = self.next_watch.wrapping_add(1);
        let server_path = match (self.chroot.as_str(), path) {
            ("", p) => p.to_string(),
            (c, "/") => c.to_string(),
            (c, p) => format!("{c}{p}"),
        };
        let mut w = Watch::new(path, server_path);
        w.begin_full_read();
        self.watches.insert(id, w);
        if self.conn == Conn::Up {
            if self.mode != Some(WatchMode::OneShot) {
                self.add_watch(id, now);
            }
            self.pump(now);
        }
        Ok(id)
    }

    /// Stops reporting a watch. A persistent watch stays on the server until the
    /// connection closes; its notifications are ignored.
    pub fn unwatch(&mut self, id: WatchId) {
        self.watches.remove(&id);
        self.events
            .retain(|e| !matches!(e, Event::Listing { watch, .. } if *watch == id));
    }

    /// The TCP connection is up: queues the ConnectRequest (resuming the session if
    /// there is one) and the digest credentials.
    pub fn on_connected(&mut self, now: u64) {
        self.drop_connection();
        self.conn = Conn::Handshake { since: now };
        self.last_recv = now;
        let resume = self.session_id != 0;
        let req = ConnectRequest {
            protocol_version: 0,
            last_zxid: if resume { self.last_zxid } else { 0 },
            timeout_ms: self.cfg.session_timeout_ms.min(i32::MAX as u32) as i32,
            session_id: self.session_id,
            passwd: if resume {
                self.passwd.clone()
            } else {
                vec![0; 16]
            },
            read_only: false,
        };
        jute::put_frame(&mut self.link.out, |b| req.encode(b));
        if let Some(auth) = &self.cfg.auth {
            let packet = AuthPacket {
                auth_type: 0,
                scheme: "digest".into(),
                auth: auth.as_bytes().to_vec(),
            };
            jute::put_request(&mut self.link.out, jute::XID_AUTH, op::AUTH, |b| {
                packet.encode(b)
            });
        }
        self.link.last_send = now;
    }

    /// The connection is gone. The session is kept: the next connection resumes it and
    /// re-arms the watches.
    pub fn on_disconnected(&mut self, _now: u64) {
        self.drop_connection();
    }

    /// Bytes read from the connection. On `Err` the connection is already treated as
    /// closed: close the socket and connect again.
    pub fn on_data(&mut self, bytes: &[u8], now: u64) -> Result<(), ZkError> {
        if self.conn == Conn::Down {
            return Ok(());
        }
        self.decoder.push(bytes);
        loop {
            let res = match self.decoder.next_frame() {
                Ok(None) => return Ok(()),
                Ok(Some(frame)) => self.handle_frame(&frame, now),
                Err(e) => Err(e.into()),
            };
            if let Err(e) = res {
                self.drop_connection();
                return Err(e);
            }
        }
    }

    /// Bytes to write now.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.link.out)
    }

    pub fn take_events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// When `on_timer` must run next (`None`: nothing is timed).
    pub fn next_deadline(&self) -> Option<u64> {
        let expiry = self.expiry_at();
        match self.conn {
            Conn::Down => expiry,
            Conn::Handshake { since } => {
                let hs = since.saturating_add(self.read_timeout_ms());
                Some(expiry.map_or(hs, |e| e.min(hs)))
            }
            Conn::Up => {
                let mut d = self.last_recv.saturating_add(self.read_timeout_ms());
                if !self.link.ping_in_flight {
                    d = d.min(self.link.last_send.saturating_add(self.ping_interval_ms()));
                }
                for w in self.watches.values() {
                    if let Some(r) = w.retry_at {
                        d = d.min(r);
                    }
                }
                Some(d)
            }
        }
    }

    /// Pings, read and handshake timeouts, retries of failed reads, and the client-side
    /// expiry. `Err`: close the connection (if any) and connect again.
    pub fn on_timer(&mut self, now: u64) -> Result<(), ZkError> {
        match self.conn {
            Conn::Down => {
                self.check_expiry(now);
                Ok(())
            }
            Conn::Handshake { since } => {
                if let Some(e) = self.check_expiry(now) {
                    self.drop_connection();
                    return Err(e);
                }
                if now >= since.saturating_add(self.read_timeout_ms()) {
                    self.drop_connection();
                    return Err(ZkError::HandshakeTimeout {
                        ms: now.saturating_sub(since),
                    });
                }
                Ok(())
            }
            Conn::Up => {
                if now >= self.last_recv.saturating_add(self.read_timeout_ms()) {
                    let ms = now.saturating_sub(self.last_recv);
                    self.drop_connection();
                    return Err(ZkError::ReadTimeout { ms });
                }
                if !self.link.ping_in_flight
                    && now >= self.link.last_send.saturating_add(self.ping_interval_ms())
                {
                    jute::put_request(&mut self.link.out, jute::XID_PING, op::PING, |_| {});
                    self.link.ping_in_flight = true;
                    self.link.last_send = now;
                }
                let due: Vec<WatchId> = self
                    .watches
                    .iter()
                    .filter(|(_, w)| w.retry_at.is_some_and(|r| r <= now))
                    .map(|(id, _)| *id)
                    .collect();
                for id in due {
                    if let Some(w) = self.watches.get_mut(&id) {
                        w.begin_full_read();
                    }
                    if self.mode != Some(WatchMode::OneShot) {
                        self.add_watch(id, now);
                    }
                }
                self.pump(now);
                Ok(())
            }
        }
    }

    /// Ends the session on the server (closeSession) and forgets it; the server closes
    /// the connection after its answer.
    pub fn close(&mut self, now: u64) {
        if self.conn == Conn::Up {
            self.link.request(op::CLOSE_SESSION, Op::Close, now, |_| {});
        }
        self.reset_session();
    }

    /// The session id, once a session is established.
    pub fn session_id(&self) -> Option<i64> {
        (self.session_id != 0).then_some(self.session_id)
    }

    /// The highest zxid seen in a reply of this session (0 before any): ZooKeeper's
    /// position, shown as the upstream's index.
    pub fn last_zxid(&self) -> i64 {
        self.last_zxid
    }

    /// The watch mode in use (`None` while `Auto` has not found out yet).
    pub fn mode(&self) -> Option<WatchMode> {
        self.mode
    }

    /// True while a connection carries the session.
    pub fn is_established(&self) -> bool {
        self.conn == Conn::Up
    }

    /// The negotiated session timeout (0 before the first session).
    pub fn negotiated_timeout_ms(&self) -> u32 {
        self.negotiated_ms
    }

    /// Forms of the credentials to hide from any text that quotes a server.
    pub fn secrets(&self) -> Vec<String> {
        match &self.cfg.auth {
            None => Vec::new(),
            Some(a) => {
                let mut v = vec![a.clone()];
                if let Some((_, p)) = a.split_once(':') {
                    if !p.is_empty() {
                        v.push(p.to_string());
                    }
                }
                v
            }
        }
    }

    fn oneshot(&self) -> bool {
        self.mode == Some(WatchMode::OneShot)
    }

    fn session_timeout(&self) -> u64 {
        if self.negotiated_ms > 0 {
            self.negotiated_ms as u64
        } else {
            self.cfg.session_timeout_ms as u64
        }
    }

    fn read_timeout_ms(&self) -> u64 {
        (self.session_timeout() * 2 / 3).max(MIN_READ_TIMEOUT_MS)
    }

    fn ping_interval_ms(&self) -> u64 {
        (self.session_timeout() / 3).clamp(MIN_PING_INTERVAL_MS, MAX_PING_INTERVAL_MS)
    }

    fn expiry_at(&self) -> Option<u64> {
        (self.session_id != 0 && self.conn != Conn::Up)
            .then(|| self.heard_at.saturating_add(self.session_timeout()))
    }

    /// The client-side expiry: no server answered within the session timeout.
    fn check_expiry(&mut self, now: u64) -> Option<ZkError> {
        let at = self.expiry_at()?;
        if now < at {
            return None;
        }
        let (id, timeout_ms) = (self.session_id, self.negotiated_ms);
        self.push_event(Event::Session(SessionEvent::Expired {
            id,
            by_client: true,
        }));
        self.reset_session();
        Some(ZkError::SessionLost { id, timeout_ms })
    }

    /// Forgets the session: the next connect opens a new one and reads all again.
    fn reset_session(&mut self) {
        self.session_id = 0;
        self.passwd.clear();
        self.last_zxid = 0;
        self.negotiated_ms = 0;
        for w in self.watches.values_mut() {
            w.begin_full_read();
        }
    }

    fn drop_connection(&mut self) {
        self.conn = Conn::Down;
        self.decoder.clear();
        self.link.out.clear();
        self.link.pending.clear();
        self.link.data_in_flight = 0;
        self.link.ping_in_flight = false;
        for w in self.watches.values_mut() {
            w.on_disconnect();
        }
    }

    fn push_event(&mut self, ev: Event) {
        if let Event::Listing { watch, .. } = &ev {
            let id = *watch;
            self.events
                .retain(|e| !matches!(e, Event::Listing { watch, .. } if *watch == id));
        }
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(ev);
    }

    fn handle_frame(&mut self, frame: &[u8], now: u64) -> Result<(), ZkError> {
        self.last_recv = now;
        match self.conn {
            Conn::Down => Ok(()),
            Conn::Handshake { .. } => self.on_connect_response(frame, now),
            Conn::Up => {
                self.heard_at = now;
                self.on_reply(frame, now)?;
                self.pump(now);
                self.emit_listings();
                Ok(())
            }
        }
    }

    fn on_connect_response(&mut self, frame: &[u8], now: u64) -> Result<(), ZkError> {
        let resp = ConnectResponse::decode(&mut Reader::new(frame))?;
        if resp.timeout_ms <= 0 {
            let id = self.session_id;
            self.push_event(Event::Session(SessionEvent::Expired {
                id,
                by_client: false,
            }));
            self.reset_session();
            return Err(ZkError::SessionExpired { id });
        }
        if resp.session_id == 0 || resp.passwd.is_empty() || resp.passwd.len() > 64 {
            return Err(JuteError::Invalid {
                what: "ConnectResponse",
                why: "no session id or password",
            }
            .into());
        }
        let resumed = self.session_id != 0 && resp.session_id == self.session_id;
        if !resumed {
            self.reset_session();
        }
        self.session_id = resp.session_id;
        self.passwd = resp.passwd;
        self.negotiated_ms = resp.timeout_ms as u32;
        self.conn = Conn::Up;
        self.heard_at = now;
        self.push_event(Event::Session(SessionEvent::Established {
            id: resp.session_id,
            timeout_ms: resp.timeout_ms as u32,
            resumed,
        }));
        self.rearm(resumed, now);
        self.pump(now);
        Ok(())
    }
}

#[path = "exchange.rs"]
mod exchange;

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
