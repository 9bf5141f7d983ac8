//! What the session sends once established and what it makes of the answers: re-arming
//! watches after a handshake, pacing the reads, and applying replies and notifications
//! to the watches. A child module of `session`, so it shares the session's fields.

use super::*;

impl Session {
    pub(super) fn add_watch(&mut self, id: WatchId, now: u64) {
        if let Some(w) = self.watches.get(&id) {
            let req = AddWatchRequest {
                path: w.server_path.clone(),
                mode: jute::ADD_WATCH_PERSISTENT_RECURSIVE,
            };
            self.link
                .request(op::ADD_WATCH, Op::AddWatch(id), now, |b| req.encode(b));
        }
    }

    /// After the handshake: persistent watches are added again and everything read; one-
    /// shot watches of a resumed session are handed back with SetWatches.
    pub(super) fn rearm(&mut self, resumed: bool, now: u64) {
        if !self.oneshot() {
            let ids: Vec<WatchId> = self.watches.keys().copied().collect();
            for id in ids {
                self.add_watch(id, now);
                if let Some(w) = self.watches.get_mut(&id) {
                    if resumed {
                        w.begin_full_read();
                    }
                }
            }
            return;
        }
        if !resumed {
            return;
        }
        let mut batch = SetWatches {
            relative_zxid: self.last_zxid,
            ..Default::default()
        };
        let mut size = 0;
        for w in self.watches.values_mut() {
            if w.failed {
                w.begin_full_read();
                continue;
            }
            if w.listed && w.exists && w.child_armed {
                size += w.server_path.len();
                batch.child.push(w.server_path.clone());
            } else if w.exists_armed {
                size += w.server_path.len();
                batch.exist.push(w.server_path.clone());
            } else if !w.exists_wanted {
                w.list_wanted = true;
            }
            let mut unarmed = Vec::new();
            for (name, node) in &w.children {
                if node.armed {
                    let p = w.child_path(name);
                    size += p.len();
                    batch.data.push(p);
                } else if !w.refresh_all {
                    unarmed.push(name.clone());
                }
                if size >= SET_WATCHES_BATCH {
                    Self::send_set_watches(&mut self.link, &mut batch, now);
                    size = 0;
                }
            }
            w.to_read.extend(unarmed);
        }
        if size > 0 {
            Self::send_set_watches(&mut self.link, &mut batch, now);
        }
    }

    fn send_set_watches(link: &mut Link, batch: &mut SetWatches, now: u64) {
        let full = std::mem::replace(
            batch,
            SetWatches {
                relative_zxid: batch.relative_zxid,
                ..Default::default()
            },
        );
        let (code, v2) = if full.needs_v2() {
            (op::SET_WATCHES2, true)
        } else {
            (op::SET_WATCHES, false)
        };
        // SetWatches answers with the reserved xid -8, in order with the other replies.
        let xid = jute::XID_SET_WATCHES;
        jute::put_request(&mut link.out, xid, code, |b| full.encode_v(b, v2));
        link.pending.push_back((xid, Op::SetWatches));
        link.last_send = now;
    }

    /// Sends the reads that are wanted (data reads paced by `MAX_DATA_IN_FLIGHT`).
    pub(super) fn pump(&mut self, now: u64) {
        if self.conn != Conn::Up {
            return;
        }
        let watched = self.oneshot();
        let link = &mut self.link;
        for (id, w) in self.watches.iter_mut() {
            if w.list_wanted && !w.list_in_flight {
                w.list_wanted = false;
                w.list_in_flight = true;
                let op = Op::List(*id, watched);
                link.read(op::GET_CHILDREN2, w.server_path.clone(), watched, op, now);
            }
            if w.exists_wanted && !w.exists_in_flight {
                w.exists_wanted = false;
                w.exists_in_flight = true;
                link.read(
                    op::EXISTS,
                    w.server_path.clone(),
                    true,
                    Op::Exists(*id),
                    now,
                );
            }
        }
        for (id, w) in self.watches.iter_mut() {
            while link.data_in_flight < MAX_DATA_IN_FLIGHT {
                let Some(name) = w.to_read.pop_first() else {
                    break;
                };
                let path = w.child_path(&name);
                *w.reading.entry(name.clone()).or_insert(0) += 1;
                link.read(
                    op::GET_DATA,
                    path,
                    watched,
                    Op::Data(*id, name, watched),
                    now,
                );
            }
        }
    }

    pub(super) fn emit_listings(&mut self) {
        let mut out = Vec::new();
        for (id, w) in self.watches.iter_mut() {
            out.extend(w.take_listing(*id));
        }
        for ev in out {
            self.push_event(ev);
        }
    }

    pub(super) fn on_reply(&mut self, frame: &[u8], now: u64) -> Result<(), ZkError> {
        let mut r = Reader::new(frame);
        let hdr = ReplyHeader::decode(&mut r)?;
        match hdr.xid {
            jute::XID_NOTIFICATION => {
                let ev = WatcherEvent::decode(&mut r)?;
                self.on_notification(&ev);
                Ok(())
            }
            jute::XID_PING => {
                self.link.ping_in_flight = false;
                Ok(())
            }
            jute::XID_AUTH => {
                if hdr.err == 0 {
                    return Ok(());
                }
                self.push_event(Event::Session(SessionEvent::AuthFailed));
                Err(ZkError::AuthFailed {
                    user: self.cfg.auth_user().unwrap_or("").to_string(),
                    code: Code(hdr.err),
                })
            }
            xid => {
                let Some((want, what)) = self.link.pending.pop_front() else {
                    return Err(ZkError::UnexpectedReply(xid));
                };
                if want != xid {
                    return Err(ZkError::XidMismatch {
                        got: xid,
                        expected: want,
                    });
                }
                if matches!(what, Op::Data(..)) {
                    self.link.data_in_flight = self.link.data_in_flight.saturating_sub(1);
                }
                if hdr.zxid > self.last_zxid {
                    self.last_zxid = hdr.zxid;
                }
                if Code(hdr.err) == Code::SESSION_EXPIRED {
                    let id = self.session_id;
                    self.push_event(Event::Session(SessionEvent::Expired {
                        id,
                        by_client: false,
                    }));
                    self.reset_session();
                    return Err(ZkError::SessionExpired { id });
                }
                if Code(hdr.err) == Code::SESSION_MOVED {
                    return Err(ZkError::SessionMoved);
                }
                self.on_result(what, Code(hdr.err), &mut r, now)
            }
        }
    }

    fn fail(&mut self, id: WatchId, err: ZkError, now: u64) {
        if self
            .watches
            .get_mut(&id)
            .is_some_and(|w| w.fail(now, RETRY_MS))
        {
            self.push_event(Event::Error {
                watch: Some(id),
                err,
            });
        }
    }

    fn on_result(
        &mut self,
        what: Op,
        code: Code,
        r: &mut Reader<'_>,
        now: u64,
    ) -> Result<(), ZkError> {
        let max = self.cfg.max_children;
        let oneshot = self.oneshot();
        let server_err = |op, path: &str| ZkError::Server {
            op,
            path: crate::servers::printable(path, 256),
            code,
        };
        match what {
            Op::Close => Ok(()),
            Op::SetWatches => match code.0 {
                0 => Ok(()),
                _ => Err(server_err("setWatches", "(re-armed watches)")),
            },
            Op::AddWatch(id) => {
                if code.0 == 0 {
                    if self.mode.is_none() {
                        self.mode = Some(WatchMode::Persistent);
                        self.push_event(Event::Session(SessionEvent::ModeDetected(
                            WatchMode::Persistent,
                        )));
                    }
                    return Ok(());
                }
                if code == Code::UNIMPLEMENTED {
                    let fallback = self.cfg.watch_mode == WatchMode::Auto;
                    if fallback {
                        self.mode = Some(WatchMode::OneShot);
                        self.push_event(Event::Session(SessionEvent::ModeDetected(
                            WatchMode::OneShot,
                        )));
                    }
                    // The server closes the connection after this answer.
                    return Err(ZkError::AddWatchUnsupported { fallback });
                }
                let Some(path) = self.watches.get(&id).map(|w| w.server_path.clone()) else {
                    return Ok(());
                };
                self.fail(id, server_err("addWatch", &path), now);
                Ok(())
            }
            Op::List(id, watched) => {
                let Some(w) = self.watches.get_mut(&id) else {
                    return Ok(());
                };
                match code {
                    Code(0) => {
                        let resp = GetChildren2Response::decode(r)?;
                        let was_over = w.over_limit;
                        if let Err(count) = w.apply_list(resp.children, watched, max) {
                            let err = ZkError::TooManyChildren {
                                path: crate::servers::printable(&w.server_path, 256),
                                count,
                                max,
                            };
                            if !was_over {
                                self.push_event(Event::Error {
                                    watch: Some(id),
                                    err,
                                });
                            }
                        }
                    }
                    Code::NO_NODE => w.apply_missing(oneshot),
                    _ => {
                        w.list_in_flight = false;
                        let path = w.server_path.clone();
                        self.fail(id, server_err("getChildren", &path), now);
                    }
                }
                Ok(())
            }
            Op::Data(id, name, watched) => {
                let Some(w) = self.watches.get_mut(&id) else {
                    return Ok(());
                };
                match code {
                    Code(0) => {
                        let resp = GetDataResponse::decode(r)?;
                        w.apply_data(&name, resp.data, watched);
                    }
                    Code::NO_NODE => w.child_gone(&name),
                    _ => {
                        w.done_reading(&name);
                        let path = w.child_path(&name);
                        self.fail(id, server_err("getData", &path), now);
                    }
                }
                Ok(())
            }
            Op::Exists(id) => {
                let Some(w) = self.watches.get_mut(&id) else {
                    return Ok(());
                };
                match code {
                    Code(0) => {
                        Stat::decode(r)?;
                        w.apply_exists(true);
                    }
                    Code::NO_NODE => w.apply_exists(false),
                    _ => {
                        w.exists_in_flight = false;
                        let path = w.server_path.clone();
                        self.fail(id, server_err("exists", &path), now);
                    }
                }
                Ok(())
            }
        }
    }

    /// Routes a notification to every watch it concerns (chroot removed first; paths
    /// outside the chroot are ignored).
    fn on_notification(&mut self, ev: &WatcherEvent) {
        let path = if self.chroot.is_empty() {
            ev.path.as_str()
        } else if ev.path == self.chroot {
            "/"
        } else {
            match ev.path.strip_prefix(self.chroot.as_str()) {
                Some(rest) if rest.starts_with('/') => rest,
                _ => return,
            }
        };
        let oneshot = self.oneshot();
        let max = self.cfg.max_children;
        for w in self.watches.values_mut() {
            w.notify(ev.event_type, path, oneshot, max);
        }
    }
}
