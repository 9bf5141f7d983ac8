//! The report rendered a slice at a time. `Renderer::step` asks a `ShowSource` for at
//! most one bounded batch of servers (or a few upstream summaries), renders them and
//! hands out the bytes that are ready, so a report of any size never holds the event
//! loop, or a zone lock, for more than one batch, and is never whole in memory unless
//! its head needs its length (the text report, and bodies up to `HOLD_MAX`).

use std::net::SocketAddr;

use super::{json, prom, Format, ServerView, ShowRequest, SourceView, UpstreamView};

/// Bodies up to this size are sent whole with a Content-Length, as they always were; a
/// larger JSON or Prometheus body is streamed, its end being the end of the connection.
/// The text report always has its Content-Length (the C module's head).
pub const HOLD_MAX: usize = 64 * 1024;

/// How many times the text report reads an upstream again whose server list changed
/// while it was being read, before it shows a mixed list.
const TEXT_RETRIES: u32 = 3;

/// What the report shows of an upstream besides its servers.
#[derive(Debug, Clone, Default)]
pub struct UpstreamHead {
    pub name: String,
    pub server_count: usize,
    /// Changes whenever the server list changes (a synced set's generation): a batch
    /// read under another version means the list changed meanwhile.
    pub version: u64,
    /// Servers may carry health views (the upstream has a `health_check`).
    pub checked: bool,
    /// None for upstreams nginx balances itself.
    pub source: Option<SourceView>,
    /// The servers, when the source reads the list whole together with its head (then
    /// `ShowSource::servers` is never asked for this upstream).
    pub whole: Option<Vec<ServerView>>,
}

/// Servers of one upstream, read in one go.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub servers: Vec<ServerView>,
    /// No server follows these.
    pub end: bool,
    /// The list's version when they were read (see `UpstreamHead::version`).
    pub version: u64,
}

/// Where a walk over one upstream's servers stands; the renderer starts each walk with
/// the default, the source moves it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Servers given so far: the next index while the list is unchanged.
    pub next: usize,
    /// The address of the last server given (None: none yet).
    pub after: Option<SocketAddr>,
}

/// Where a walk over a list sorted by address goes on: at `cursor.next` while the entry
/// before it is still the last one given, else after the last one given. So when the
/// list changes between batches, servers that stay in it are given exactly once.
/// `addr(i)`: the address of entry `i` of the list, `len` long; O(log len) calls.
pub fn resume_index(cursor: &Cursor, len: usize, addr: impl Fn(usize) -> SocketAddr) -> usize {
    let Some(after) = cursor.after else {
        return cursor.next.min(len);
    };
    let n = cursor.next;
    if n > 0 && n <= len && addr(n - 1) == after {
        return n;
    }
    let (mut lo, mut hi) = (0, len);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if addr(mid) <= after {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// What the report is made from.
pub trait ShowSource {
    /// The upstreams' names, in configuration order (asked once, at the start).
    fn names(&self) -> Vec<String>;
    /// Upstream `i`'s summary.
    fn head(&mut self, i: usize) -> UpstreamHead;
    /// At most `max` servers of upstream `i` from `cursor` on (moving it).
    fn servers(&mut self, i: usize, cursor: &mut Cursor, max: usize) -> Batch;
}

/// Views in memory as a source.
pub struct Views<'a>(pub &'a [UpstreamView]);

impl ShowSource for Views<'_> {
    fn names(&self) -> Vec<String> {
        self.0.iter().map(|u| u.name.clone()).collect()
    }

    fn head(&mut self, i: usize) -> UpstreamHead {
        let u = &self.0[i];
        UpstreamHead {
            name: u.name.clone(),
            server_count: u.servers.len(),
            version: 0,
            checked: u.servers.iter().any(|s| s.health.is_some()),
            source: u.source.clone(),
            whole: None,
        }
    }

    fn servers(&mut self, i: usize, cursor: &mut Cursor, max: usize) -> Batch {
        let all = &self.0[i].servers;
        let from = cursor.next.min(all.len());
        let to = from.saturating_add(max).min(all.len());
        cursor.next = to;
        Batch {
            servers: all[from..to].to_vec(),
            end: to == all.len(),
            version: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Begin,
    /// Text, JSON: upstream `order[k]` starts.
    Upstream,
    /// Text, JSON: the current upstream's servers.
    Servers,
    /// Prometheus: the selected upstreams' heads are read.
    Heads,
    /// Prometheus: family `prom::FAMILIES[f]`.
    Family(usize),
    Done,
}

/// One response being rendered: create it with the request, call `step` once per turn
/// of the event loop until it returns true.
pub struct Renderer {
    format: Format,
    /// The upstreams shown (indices of the source), in output order.
    order: Vec<usize>,
    /// Servers read and rendered per step at most.
    batch: usize,
    phase: Phase,
    /// Position in `order`.
    k: usize,
    /// Text, JSON: the current upstream's head.
    head: UpstreamHead,
    /// Prometheus: every shown upstream's head (`whole` lists kept for every family).
    heads: Vec<UpstreamHead>,
    /// Prometheus: the family's header is written, `heads[k]`'s servers are walked.
    family_open: bool,
    in_upstream: bool,
    label: String,
    cursor: Cursor,
    /// The current batch, `pos` of it rendered, `end`: nothing follows it.
    servers: Vec<ServerView>,
    pos: usize,
    end: bool,
    /// Servers written in the current upstream.
    written: usize,
    /// Text: where the current upstream starts in `body`, and how often it was read
    /// again.
    mark: usize,
    retries: u32,
    /// Rendered bytes not handed out yet.
    body: Vec<u8>,
    /// Hold the body while it is at most this long (None: until it is complete).
    hold: Option<usize>,
    released: bool,
    status: &'static str,
    ctype: &'static str,
}

impl Renderer {
    /// A renderer for `req`; `batch` bounds the servers one step reads and renders.
    pub fn new(req: &ShowRequest, src: &mut dyn ShowSource, batch: usize) -> Renderer {
        let names = src.names();
        let mut order: Vec<usize> = (0..names.len())
            .filter(|&i| req.upstream.as_ref().map_or(true, |n| &names[i] == n))
            .collect();
        let (ctype, hold) = match req.format {
            Format::Text => ("text/plain", None),
            Format::Json => ("application/json", Some(HOLD_MAX)),
            Format::Prometheus => ("text/plain; version=0.0.4", Some(HOLD_MAX)),
        };
        let mut r = Renderer {
            format: req.format,
            order: Vec::new(),
            batch: batch.max(1),
            phase: Phase::Begin,
            k: 0,
            head: UpstreamHead::default(),
            heads: Vec::new(),
            family_open: false,
            in_upstream: false,
            label: String::new(),
            cursor: Cursor::default(),
            servers: Vec::new(),
            pos: 0,
            end: false,
            written: 0,
            mark: 0,
            retries: 0,
            body: Vec::new(),
            hold,
            released: false,
            status: "200 OK",
            ctype,
        };
        if let (Some(n), true) = (&req.upstream, order.is_empty()) {
            r.body = format!("No upstream named \"{n}\"\n").into_bytes();
            r.status = "404 Not Found";
            r.ctype = "text/plain";
            r.hold = None;
            r.phase = Phase::Done;
            return r;
        }
        if req.format == Format::Json {
            // a JSON object: keys sorted, one entry per name (the last one)
            order.sort_by(|&a, &b| names[a].cmp(&names[b]));
            let keep: Vec<usize> = (0..order.len())
                .filter(|&j| j + 1 == order.len() || names[order[j + 1]] != names[order[j]])
                .map(|j| order[j])
                .collect();
            order = keep;
        }
        r.order = order;
        r
    }

    /// Holds the whole body, to send it with its Content-Length.
    pub fn hold_all(mut self) -> Renderer {
        self.hold = None;
        self
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// One slice of the response: at most `batch` servers read and rendered. Appends
    /// what is ready to send to `out` (nothing while the body is held); true once the
    /// whole response is in `out`.
    pub fn step(&mut self, src: &mut dyn ShowSource, out: &mut Vec<u8>) -> bool {
        let mut budget = self.batch;
        while budget > 0 && self.phase != Phase::Done {
            let used = match self.format {
                Format::Prometheus => self.advance_prom(src, budget),
                Format::Text | Format::Json => self.advance_doc(src, budget),
            };
            budget = budget.saturating_sub(used.max(1));
        }
        self.release(out);
        self.phase == Phase::Done
    }

    fn release(&mut self, out: &mut Vec<u8>) {
        let done = self.phase == Phase::Done;
        if !self.released {
            let over = self.hold.is_some_and(|max| self.body.len() > max);
            if !done && !over {
                return;
            }
            let length = match done {
                true => format!("Content-Length: {}\r\n", self.body.len()),
                false => String::new(),
            };
            let _ = std::io::Write::write_fmt(
                out,
                format_args!(
                    "HTTP/1.0 {}\r\nServer: nginx\r\nContent-Type: {}\r\n{length}Connection: close\r\n\r\n",
                    self.status, self.ctype
                ),
            );
            self.released = true;
        }
        out.append(&mut self.body);
    }

    /// Starts the walk over the servers of the upstream `head` describes.
    fn start_servers(&mut self, whole: Option<Vec<ServerView>>) {
        self.cursor = Cursor::default();
        self.end = whole.is_some();
        self.servers = whole.unwrap_or_default();
        self.pos = 0;
        self.written = 0;
    }

    /// Reads the next batch of upstream `order[k]` (the current one is rendered and
    /// more follow). Returns its version.
    fn fetch(&mut self, src: &mut dyn ShowSource, max: usize) -> u64 {
        let b = src.servers(self.order[self.k], &mut self.cursor, max);
        self.pos = 0;
        // (a source gives nothing only at the end; never wait for more then)
        self.end = b.end || b.servers.is_empty();
        self.servers = b.servers;
        b.version
    }

    /// The next `budget` units of work of the text or JSON report; returns the units
    /// used (servers read or rendered, one per upstream head).
    fn advance_doc(&mut self, src: &mut dyn ShowSource, budget: usize) -> usize {
        let text = self.format == Format::Text;
        match self.phase {
            Phase::Begin => {
                if text {
                    if self.order.is_empty() {
                        self.body.extend_from_slice(b"No upstreams defined\n");
                        self.phase = Phase::Done;
                        return 1;
                    }
                } else {
                    json::begin(&mut self.body);
                }
                self.phase = Phase::Upstream;
                1
            }
            Phase::Upstream => {
                if self.k == self.order.len() {
                    if !text {
                        json::end(&mut self.body, !self.order.is_empty());
                    }
                    self.phase = Phase::Done;
                    return 1;
                }
                let mut head = src.head(self.order[self.k]);
                let whole = head.whole.take();
                self.head = head;
                self.mark = self.body.len();
                if text {
                    let line = format!(
                        "Upstream name: {}; Backend server count: {}\n",
                        self.head.name, self.head.server_count
                    );
                    self.body.extend_from_slice(line.as_bytes());
                } else {
                    json::upstream_open(
                        &mut self.body,
                        self.k == 0,
                        &self.head.name,
                        self.head.server_count,
                    );
                }
                self.start_servers(whole);
                self.phase = Phase::Servers;
                1
            }
            Phase::Servers => {
                if self.pos == self.servers.len() {
                    if self.end {
                        if text {
                            self.body.push(b'\n');
                        } else {
                            json::upstream_close(
                                &mut self.body,
                                self.written,
                                self.head.source.as_ref(),
                            );
                        }
                        self.k += 1;
                        self.retries = 0;
                        self.phase = Phase::Upstream;
                        return 1;
                    }
                    let version = self.fetch(src, budget);
                    if text && version != self.head.version && self.retries < TEXT_RETRIES {
                        // the list changed since its count was written: read it again
                        self.body.truncate(self.mark);
                        self.retries += 1;
                        self.phase = Phase::Upstream;
                        return self.servers.len();
                    }
                    if self.servers.is_empty() {
                        return 1;
                    }
                }
                // (a batch is read at most `budget` long, and rendered in the same step)
                let n = budget.min(self.servers.len() - self.pos);
                for s in &self.servers[self.pos..self.pos + n] {
                    if text {
                        self.body.extend_from_slice(b"        ");
                        self.body.extend_from_slice(s.line().as_bytes());
                        self.body.push(b'\n');
                    } else {
                        json::server(&mut self.body, self.written == 0, s);
                    }
                    self.written += 1;
                }
                self.pos += n;
                n
            }
            Phase::Heads | Phase::Family(_) | Phase::Done => 1,
        }
    }

    /// The next `budget` units of work of the Prometheus report.
    fn advance_prom(&mut self, src: &mut dyn ShowSource, budget: usize) -> usize {
        match self.phase {
            Phase::Begin => {
                self.phase = Phase::Heads;
                1
            }
            Phase::Heads => {
                let n = budget.min(self.order.len() - self.k);
                for _ in 0..n {
                    self.heads.push(src.head(self.order[self.k]));
                    self.k += 1;
                }
                if self.k == self.order.len() {
                    self.k = 0;
                    self.phase = Phase::Family(0);
                }
                n
            }
            Phase::Family(f) => {
                let Some(fam) = prom::FAMILIES.get(f) else {
                    self.phase = Phase::Done;
                    return 1;
                };
                if !fam.rows.per_server() {
                    if prom::has_header(fam, &self.heads) {
                        prom::header(&mut self.body, fam);
                        prom::upstream_rows(&mut self.body, fam, &self.heads);
                    }
                    self.phase = Phase::Family(f + 1);
                    return self.heads.len();
                }
                self.advance_server_family(src, f, budget)
            }
            Phase::Upstream | Phase::Servers | Phase::Done => 1,
        }
    }

    fn advance_server_family(
        &mut self,
        src: &mut dyn ShowSource,
        f: usize,
        budget: usize,
    ) -> usize {
        let fam = &prom::FAMILIES[f];
        if !self.family_open {
            prom::header(&mut self.body, fam);
            self.family_open = true;
            self.in_upstream = false;
            self.k = 0;
            return 1;
        }
        if !self.in_upstream {
            if self.k == self.heads.len() {
                self.family_open = false;
                self.phase = Phase::Family(f + 1);
                return 1;
            }
            let head = &self.heads[self.k];
            if fam.rows.needs_health() && !head.checked {
                self.k += 1;
                return 1;
            }
            self.label = prom::label(&head.name);
            let whole = head.whole.clone();
            self.start_servers(whole);
            self.in_upstream = true;
            return 1;
        }
        if self.pos == self.servers.len() {
            if self.end {
                self.in_upstream = false;
                self.k += 1;
                return 1;
            }
            self.fetch(src, budget);
            if self.servers.is_empty() {
                return 1;
            }
        }
        let n = budget.min(self.servers.len() - self.pos);
        for s in &self.servers[self.pos..self.pos + n] {
            prom::server_rows(&mut self.body, fam, &self.label, s);
        }
        self.pos += n;
        n
    }
}
