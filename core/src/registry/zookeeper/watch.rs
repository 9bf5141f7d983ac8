//! One watched path's bookkeeping: its children and their data as last read, which reads
//! are wanted or in flight, which one-shot watches the server holds for it, and when the
//! list is complete enough to report.

use std::collections::{BTreeMap, BTreeSet};

use super::jute::event;
use super::{Child, Event, WatchId};

/// A child as last read. `data` is `None` until its first read completes.
#[derive(Debug, Default)]
pub(super) struct Node {
    pub data: Option<Vec<u8>>,
    /// One-shot mode: the server holds a data watch for it (set by the last getData).
    pub armed: bool,
}

#[derive(Debug)]
pub(super) struct Watch {
    /// As the caller gave it (no chroot).
    pub path: String,
    /// With the chroot, as sent.
    pub server_path: String,
    pub children: BTreeMap<String, Node>,
    pub exists: bool,
    /// A children list arrived in this session (or the path was found missing).
    pub listed: bool,
    pub list_wanted: bool,
    pub list_in_flight: bool,
    pub exists_wanted: bool,
    pub exists_in_flight: bool,
    /// One-shot mode: the server holds a child watch (set by the last getChildren2).
    pub child_armed: bool,
    /// One-shot mode: the server holds an exists watch on the missing path.
    pub exists_armed: bool,
    pub to_read: BTreeSet<String>,
    /// getData requests in flight per child.
    pub reading: BTreeMap<String, u32>,
    /// The next list reply re-reads every child's data (a full read).
    pub refresh_all: bool,
    /// Report the list once settled even if nothing changed (after a full read).
    pub forced: bool,
    /// The list changed since it was last reported.
    pub dirty: bool,
    /// A read failed; no list is reported until `retry_at`, when all is read again.
    pub failed: bool,
    pub retry_at: Option<u64>,
    /// The last list had more children than allowed.
    pub over_limit: bool,
}

enum Rel<'a> {
    Itself,
    Child(&'a str),
    Other,
}

/// Whether a child name can be a real znode name (the server never sends others).
fn valid_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/')
}

impl Watch {
    pub fn new(path: &str, server_path: String) -> Watch {
        Watch {
            path: path.to_string(),
            server_path,
            children: BTreeMap::new(),
            exists: false,
            listed: false,
            list_wanted: false,
            list_in_flight: false,
            exists_wanted: false,
            exists_in_flight: false,
            child_armed: false,
            exists_armed: false,
            to_read: BTreeSet::new(),
            reading: BTreeMap::new(),
            refresh_all: false,
            forced: false,
            dirty: false,
            failed: false,
            retry_at: None,
            over_limit: false,
        }
    }

    pub fn child_path(&self, name: &str) -> String {
        if self.server_path == "/" {
            format!("/{name}")
        } else {
            format!("{}/{name}", self.server_path)
        }
    }

    /// Reads the list and every child's data again; the result is reported even if it
    /// did not change. No one-shot watch is assumed to be held any more.
    pub fn begin_full_read(&mut self) {
        self.list_wanted = true;
        self.refresh_all = true;
        self.forced = true;
        self.failed = false;
        self.retry_at = None;
        self.child_armed = false;
        self.exists_armed = false;
        for n in self.children.values_mut() {
            n.armed = false;
        }
    }

    /// The connection dropped: what was in flight is wanted again.
    pub fn on_disconnect(&mut self) {
        if std::mem::take(&mut self.list_in_flight) {
            self.list_wanted = true;
        }
        if std::mem::take(&mut self.exists_in_flight) {
            self.exists_wanted = true;
        }
        for (name, _) in std::mem::take(&mut self.reading) {
            if self.children.contains_key(&name) {
                self.to_read.insert(name);
            }
        }
    }

    /// A children list arrived. `watched`: it set a one-shot child watch.
    pub fn apply_list(
        &mut self,
        names: Vec<String>,
        watched: bool,
        max: usize,
    ) -> Result<(), usize> {
        self.list_in_flight = false;
        self.child_armed = watched;
        if names.len() > max {
            self.over_limit = true;
            self.refresh_all = true;
            self.forced = true;
            self.to_read.clear();
            return Err(names.len());
        }
        self.over_limit = false;
        if !self.exists {
            self.dirty = true;
        }
        self.exists = true;
        self.listed = true;
        let new: BTreeSet<String> = names.into_iter().filter(|n| valid_name(n)).collect();
        let before = self.children.len();
        self.children.retain(|k, _| new.contains(k));
        self.to_read.retain(|k| new.contains(k));
        if self.children.len() != before {
            self.dirty = true;
        }
        let refresh = std::mem::take(&mut self.refresh_all);
        for name in new {
            match self.children.get_mut(&name) {
                None => {
                    self.children.insert(name.clone(), Node::default());
                    self.to_read.insert(name);
                    self.dirty = true;
                }
                Some(node) if refresh => {
                    node.armed = false;
                    self.to_read.insert(name);
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The path does not exist. `oneshot`: an exists watch must be set to learn when it
    /// is created (persistent watches fire for a missing path by themselves).
    pub fn apply_missing(&mut self, oneshot: bool) {
        self.list_in_flight = false;
        if self.exists || !self.children.is_empty() || !self.listed {
            self.dirty = true;
        }
        self.exists = false;
        self.listed = true;
        self.over_limit = false;
        self.refresh_all = false;
        self.child_armed = false;
        self.children.clear();
        self.to_read.clear();
        if oneshot && !self.exists_armed {
            self.exists_wanted = true;
        }
    }

    /// The answer to exists(watch): `found` means the path appeared meanwhile.
    pub fn apply_exists(&mut self, found: bool) {
        self.exists_in_flight = false;
        if found {
            self.list_wanted = true;
        } else {
            self.exists_armed = true;
        }
    }

    pub fn done_reading(&mut self, name: &str) {
        if let Some(n) = self.reading.get_mut(name) {
            *n -= 1;
            if *n == 0 {
                self.reading.remove(name);
            }
        }
    }

    /// A child's data arrived. `watched`: it set a one-shot data watch.
    pub fn apply_data(&mut self, name: &str, data: Vec<u8>, watched: bool) {
        self.done_reading(name);
        if let Some(node) = self.children.get_mut(name) {
            if node.data.as_deref() != Some(&data[..]) {
                self.dirty = true;
                node.data = Some(data);
            }
            node.armed = watched;
        }
    }

    /// A child's read found it gone.
    pub fn child_gone(&mut self, name: &str) {
        self.done_reading(name);
        if self.children.remove(name).is_some() {
            self.dirty = true;
        }
        self.to_read.remove(name);
    }

    /// A read of this watch failed with `err`. Returns true for the first failure of a
    /// round (the one to report).
    pub fn fail(&mut self, now: u64, retry_ms: u64) -> bool {
        self.to_read.clear();
        if self.failed {
            return false;
        }
        self.failed = true;
        self.retry_at = Some(now.saturating_add(retry_ms));
        true
    }

    fn relation<'a>(&self, path: &'a str) -> Rel<'a> {
        if path == self.path {
            return Rel::Itself;
        }
        let Some(at) = path.rfind('/') else {
            return Rel::Other;
        };
        let parent = if at == 0 { "/" } else { &path[..at] };
        let name = &path[at + 1..];
        if parent == self.path && valid_name(name) {
            Rel::Child(name)
        } else {
            Rel::Other
        }
    }

    /// A notification for `path` (chroot already removed). Works for both modes: one-shot
    /// watches fire children-changed on the path and data-changed/deleted on a child;
    /// persistent recursive ones fire created/deleted/data-changed for the path and every
    /// descendant (grandchildren are ignored).
    pub fn notify(&mut self, event_type: i32, path: &str, oneshot: bool, max: usize) {
        match self.relation(path) {
            Rel::Other => {}
            Rel::Itself => match event_type {
                event::NODE_CREATED => {
                    self.exists_armed = false;
                    self.list_wanted = true;
                }
                event::NODE_DELETED => {
                    self.exists_armed = false;
                    self.apply_missing(oneshot);
                }
                event::NODE_CHILDREN_CHANGED => {
                    self.child_armed = false;
                    self.list_wanted = true;
                }
                _ => {}
            },
            // A child created or deleted: the list is read again before anything is
            // reported. One transaction (a multi) notifies child by child, but the
            // server answers a read only after it applied the whole transaction, so
            // the list read after the first notification has all of it: no
            // intermediate set is ever reported.
            Rel::Child(name) => match event_type {
                event::NODE_CREATED => {
                    self.list_wanted = true;
                    if !self.over_limit
                        && self.children.len() < max
                        && !self.children.contains_key(name)
                    {
                        self.children.insert(name.to_string(), Node::default());
                        self.to_read.insert(name.to_string());
                        self.exists = true;
                        self.dirty = true;
                    }
                }
                event::NODE_DELETED => {
                    self.list_wanted = true;
                    if !self.over_limit && self.children.remove(name).is_some() {
                        self.to_read.remove(name);
                        self.dirty = true;
                    }
                }
                event::NODE_DATA_CHANGED => {
                    if let Some(node) = self.children.get_mut(name) {
                        node.armed = false;
                        if !self.over_limit {
                            self.to_read.insert(name.to_string());
                        }
                    }
                }
                _ => {}
            },
        }
    }

    /// Nothing is wanted or in flight, so every child's data is known (a child without
    /// data is always in `to_read` or `reading`, or a failure or the limit holds the
    /// list back until a full read).
    fn settled(&self) -> bool {
        self.listed
            && !self.failed
            && !self.over_limit
            && !self.list_wanted
            && !self.list_in_flight
            && !self.exists_wanted
            && !self.exists_in_flight
            && self.to_read.is_empty()
            && self.reading.is_empty()
    }

    /// The listing to report, if the list is settled and changed (or a full read ended).
    pub fn take_listing(&mut self, id: WatchId) -> Option<Event> {
        if !self.settled() || !(self.dirty || self.forced) {
            return None;
        }
        self.dirty = false;
        self.forced = false;
        Some(Event::Listing {
            watch: id,
            exists: self.exists,
            children: self
                .children
                .iter()
                .map(|(name, n)| Child {
                    name: name.clone(),
                    data: n.data.clone().unwrap_or_default(),
                })
                .collect(),
        })
    }
}
