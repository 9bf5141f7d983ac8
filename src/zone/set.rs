//! The server set in the zone: slots (one per server, shared by every worker) and the
//! list that makes them the current set, replaced as a whole by `Locked::publish`.
//!
//! A `Slot` lives while it is in the current set or any session still uses it: `refs`
//! counts one for set membership plus one per open session. Whoever drops `refs` to zero
//! frees it, so a removed server keeps its sessions and is reclaimed when the last one
//! closes (or its process dies, see `ledger`), with no fixed delay.

use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::ptr;

use upsync_core::balancer::PeerState;
use upsync_core::servers::ServerSpec;

use std::sync::atomic::Ordering;

use upsync_core::balancer::{LcNode, PlanView};

use super::{Locked, PlanBlock, PlanRef, ZoneError};

/// Longest address text: `[ffff:...:ffff%scope]:65535` fits easily.
pub const NAME_MAX: usize = 64;

/// One server in the zone, 256 bytes (the slab allocator's 256-byte chunks: 100,000
/// servers take 25 MB).
#[repr(C)]
pub struct Slot {
    refs: u32,
    /// Its position in the current set (while `in_set`).
    index: u32,
    pub state: PeerState,
    /// The address nginx connects to (a `sockaddr_in` in its first bytes for IPv4).
    sockaddr: libc::sockaddr_in6,
    /// The server as the registry described it (`state` holds what balancing uses).
    spec_weight: u32,
    spec_max_fails: u32,
    spec_fail_timeout: u32,
    spec_max_conns: u32,
    spec_slow_start: u32,
    in_set: bool,
    spec_down: bool,
    spec_backup: bool,
    socklen: u8,
    name_len: u8,
    name: [u8; NAME_MAX],
    /// The last TLS session to this server (`proxy_ssl_session_reuse`), DER-encoded, in
    /// a block of this zone (null: none).
    ssl_session: *mut u8,
    ssl_session_len: u32,
    ssl_session_cap: u32,
    /// Once no one holds it: the next slot waiting to be freed, and since when
    /// (monotonic ms). See `Locked::unref`.
    retired_next: *mut Slot,
    retired_ms: u64,
}

const _: () = assert!(size_of::<Slot>() <= 256);

impl Slot {
    pub fn in_set(&self) -> bool {
        self.in_set
    }

    pub fn index(&self) -> usize {
        self.index as usize
    }

    /// Its position in the current set (for least_conn's tree, see `refresh_lc`).
    pub(super) fn set_index(&mut self, k: usize) {
        self.index = k as u32;
    }

    pub fn name(&self) -> &[u8] {
        &self.name[..self.name_len as usize]
    }

    /// The address nginx connects to, and its length.
    pub fn sockaddr(&self) -> (*const libc::sockaddr, u32) {
        (
            &self.sockaddr as *const libc::sockaddr_in6 as *const libc::sockaddr,
            self.socklen as u32,
        )
    }

    pub fn addr(&self) -> SocketAddr {
        let sin6 = &self.sockaddr;
        if sin6.sin6_family as i32 == libc::AF_INET6 {
            return SocketAddr::V6(std::net::SocketAddrV6::new(
                std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            ));
        }
        // SAFETY: an IPv4 slot holds a sockaddr_in in the first bytes (`init_slot`),
        // and sockaddr_in6 is larger and at least as aligned.
        let sin = unsafe { &*(sin6 as *const libc::sockaddr_in6 as *const libc::sockaddr_in) };
        SocketAddr::from((
            std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
            u16::from_be(sin.sin_port),
        ))
    }

    pub fn spec(&self) -> ServerSpec {
        ServerSpec {
            addr: self.addr(),
            weight: self.spec_weight,
            max_fails: self.spec_max_fails,
            fail_timeout: self.spec_fail_timeout,
            max_conns: self.spec_max_conns,
            down: self.spec_down,
            backup: self.spec_backup,
            slow_start: self.spec_slow_start,
        }
    }

    fn set_spec(&mut self, s: &ServerSpec, now_ms: Option<u64>) {
        let weight_changed = self.spec_weight != s.weight;
        // a server coming back from `down` ramps up again (slow_start)
        if let Some(now) = now_ms {
            if self.spec_down && !s.down {
                self.state.ramp_start_ms = now;
            }
        }
        self.spec_slow_start = s.slow_start;
        self.state.slow_start_ms = s.slow_start as u64 * 1000;
        self.spec_weight = s.weight;
        self.spec_max_fails = s.max_fails;
        self.spec_fail_timeout = s.fail_timeout;
        self.spec_max_conns = s.max_conns;
        self.spec_down = s.down;
        self.spec_backup = s.backup;
        let st = &mut self.state;
        st.weight = s.weight as i64;
        if weight_changed {
            st.effective_weight = st.weight;
            st.current_weight = 0;
        }
        st.max_fails = s.max_fails;
        st.fail_timeout = s.fail_timeout as i64;
        st.max_conns = s.max_conns;
        st.down = s.down;
        st.backup = s.backup;
    }

    /// A session takes a reference (see `Locked::acquire`).
    pub(super) fn refs_add(&mut self) {
        self.refs += 1;
    }

    /// A dead process's session is gone: its connection count (the reference is
    /// dropped by the caller).
    pub(super) fn session_ended(&mut self) {
        self.state.conns = self.state.conns.saturating_sub(1);
    }
}

#[repr(C)]
pub struct SharedSet {
    pub generation: u64,
    pub len: usize,
    // followed by `len` slot pointers
}

impl SharedSet {
    /// # Safety
    /// `self` must be followed by `len` slot pointers (as `alloc` lays it out).
    pub unsafe fn slots(&self) -> &[*mut Slot] {
        // SAFETY: per the contract the pointers follow the header in one allocation.
        unsafe {
            let first = (self as *const SharedSet).add(1) as *const *mut Slot;
            std::slice::from_raw_parts(first, self.len)
        }
    }

    /// Bytes of a list of `len` slots.
    fn size(len: usize) -> usize {
        size_of::<SharedSet>() + len * size_of::<*mut Slot>()
    }

    /// Allocates a list of `len` (null) slot pointers in `l`'s domain.
    fn alloc(l: &mut Locked<'_>, len: usize) -> *mut SharedSet {
        let set = l.alloc(Self::size(len)) as *mut SharedSet;
        if !set.is_null() {
            // SAFETY: a fresh allocation of the list's size, initialized before use.
            unsafe {
                ptr::write(set, SharedSet { generation: 0, len });
                ptr::write_bytes(set.add(1) as *mut *mut Slot, 0, len);
            }
        }
        set
    }

    /// Gives back a list from `alloc` (not its slots).
    ///
    /// # Safety
    /// `set` came from `alloc` in `l`'s domain and is referenced from nowhere now.
    unsafe fn free(l: &mut Locked<'_>, set: *mut SharedSet) {
        // SAFETY: per the contract.
        unsafe { l.free(set as *mut u8, Self::size((*set).len)) };
    }

    fn slots_mut(&mut self) -> &mut [*mut Slot] {
        // SAFETY: every SharedSet is made by `alloc`, followed by `len` pointers.
        unsafe {
            let first = (self as *mut SharedSet).add(1) as *mut *mut Slot;
            std::slice::from_raw_parts_mut(first, self.len)
        }
    }
}

/// A list of `n` fresh (zeroed) slots that belong to no set: memory set aside.
pub(super) fn alloc_unshared(l: &mut Locked<'_>, n: usize) -> Option<*mut SharedSet> {
    let set = SharedSet::alloc(l, n);
    if set.is_null() {
        return None;
    }
    for i in 0..n {
        let s = l.alloc(size_of::<Slot>()) as *mut Slot;
        // SAFETY: `set` is ours alone (not linked anywhere); on failure everything
        // allocated so far is given back.
        unsafe {
            if s.is_null() {
                (*set).len = i;
                free_unshared(l, set);
                return None;
            }
            (*set).slots_mut()[i] = s;
        }
    }
    Some(set)
}

/// Frees a list from `alloc_unshared` and its slots.
///
/// # Safety
/// Nothing else references the list or its slots.
pub(super) unsafe fn free_unshared(l: &mut Locked<'_>, set: *mut SharedSet) {
    if set.is_null() {
        return;
    }
    // SAFETY: per the contract the list and its slots are ours alone.
    unsafe {
        for &s in (*set).slots() {
            if !s.is_null() {
                l.free(s as *mut u8, size_of::<Slot>());
            }
        }
        SharedSet::free(l, set);
    }
}

impl Locked<'_> {
    /// Replaces the set with `specs` (normalized: sorted by address, one per address)
    /// and the plan with `plan` (built for `specs`). Servers that stay keep their slot,
    /// and so their counters and open sessions. On allocation failure nothing changes
    /// and the block is given back. `now_ms` (monotonic) starts the slow_start ramp of
    /// servers that are new or come back from `down`; None for the configured set.
    /// Returns the new generation.
    pub fn publish(
        &mut self,
        specs: &[ServerSpec],
        plan: PlanBlock,
        now_ms: Option<u64>,
    ) -> Result<u64, ZoneError> {
        self.publish_known(specs, plan, now_ms, None)
    }

    /// `publish`, told what the current set holds: `known` is (generation, its specs in
    /// set order) as the caller last published or read it. While that is still the
    /// set, the servers are matched on the caller's copy, and only the slots of servers
    /// added, removed or changed are touched: the lock is held for a pass over the
    /// pointers, not over 10,000 slots.
    pub fn publish_known(
        &mut self,
        specs: &[ServerSpec],
        plan: PlanBlock,
        now_ms: Option<u64>,
        known: Option<(u64, &[ServerSpec])>,
    ) -> Result<u64, ZoneError> {
        let old: Vec<*mut Slot> = self.slots().to_vec();
        let known = known
            .filter(|(g, k)| *g == self.generation() && k.len() == old.len())
            .map(|(_, k)| k);
        // SAFETY: the block was filled by its owner before publishing.
        let method = unsafe {
            PlanView::from_flat(std::slice::from_raw_parts(plan.ptr, plan.words)).map(|v| v.method)
        };
        let tree = self.alloc_lc(self.lc_nodes_for(method, specs.len()));
        let set = SharedSet::alloc(self, specs.len());
        let mut created: Vec<*mut Slot> = Vec::new();
        let fail = |l: &mut Locked<'_>, created: &[*mut Slot], plan: PlanBlock| {
            // SAFETY: everything given back here was allocated above in this domain and
            // was never linked anywhere.
            unsafe {
                for &c in created {
                    l.free(c as *mut u8, size_of::<Slot>());
                }
                if !set.is_null() {
                    SharedSet::free(l, set);
                }
                if let Some(t) = tree.filter(|t| !t.ptr.is_null()) {
                    l.free(t.ptr as *mut u8, t.words * size_of::<LcNode>());
                }
            }
            l.free_plan_block(plan);
            Err(ZoneError::Full {
                servers: specs.len(),
            })
        };
        let Some(tree) = tree else {
            return fail(self, &created, plan);
        };
        if set.is_null() {
            return fail(self, &created, plan);
        }
        // SAFETY: the lock is held for the whole body; every pointer below is a slot or
        // list of this domain (the old set's, or allocated here).
        unsafe {
            let addr_of = |j: usize| match known {
                Some(k) => k[j].addr,
                None => (*old[j]).addr(),
            };
            // which old slots stay (`known`: to touch only those that change)
            let mut kept = vec![false; old.len()];
            let mut oi = 0;
            for (k, spec) in specs.iter().enumerate() {
                while oi < old.len() && addr_of(oi) < spec.addr {
                    oi += 1;
                }
                let slot = if oi < old.len() && addr_of(oi) == spec.addr {
                    kept[oi] = true;
                    if let Some(k) = known {
                        if k[oi] != *spec {
                            let changed = old[oi];
                            (*changed).set_spec(spec, now_ms);
                        }
                    }
                    old[oi]
                } else {
                    let s = self.alloc(size_of::<Slot>()) as *mut Slot;
                    if s.is_null() {
                        return fail(self, &created, plan);
                    }
                    init_slot(s, spec);
                    (*s).state.ramp_start_ms = now_ms.unwrap_or(0);
                    self.health_seed(&mut *s);
                    created.push(s);
                    s
                };
                (*set).slots_mut()[k] = slot;
            }
            // Commit: a fresh slot gets its membership reference; an old one that did
            // not stay is out of the set and loses it. Without `known`, every member
            // takes its spec again (a cheap write when nothing changed).
            for &s in &created {
                (*s).refs = 1;
                (*s).in_set = true;
            }
            if known.is_none() {
                for (&s, spec) in (*set).slots().iter().zip(specs) {
                    (*s).set_spec(spec, now_ms);
                }
            }
            for (j, &s) in old.iter().enumerate() {
                if !kept[j] {
                    (*s).in_set = false;
                    self.unref(s);
                }
            }
            self.hdr.next_generation += 1;
            (*set).generation = self.hdr.next_generation;
            if !self.hdr.set.is_null() {
                SharedSet::free(self, self.hdr.set);
            }
            self.hdr.set = set;
            self.hdr
                .set_len
                .store(specs.len() as u64, Ordering::Relaxed);
            self.hdr
                .set_generation
                .store((*set).generation, Ordering::Relaxed);
            self.set_plan(PlanRef {
                ptr: plan.ptr,
                words: plan.words,
            });
            self.install_lc(tree);
            Ok((*set).generation)
        }
    }

    /// Drops the set (a domain being emptied): each slot loses its membership
    /// reference, and is freed unless a session still holds it.
    pub(super) fn clear_set(&mut self) {
        let set = std::mem::replace(&mut self.hdr.set, std::ptr::null_mut());
        if set.is_null() {
            return;
        }
        self.hdr.set_len.store(0, Ordering::Relaxed);
        // SAFETY: the list and its slots are this domain's; the lock is held and the
        // list is no longer reachable from the header.
        unsafe {
            let slots: Vec<*mut Slot> = (*set).slots().to_vec();
            for s in slots {
                (*s).in_set = false;
                self.unref(s);
            }
            SharedSet::free(self, set);
        }
    }

    /// Gives the current set a new plan (built for its servers, in set order).
    pub fn replace_plan(&mut self, plan: &upsync_core::balancer::Plan) -> Result<(), ZoneError> {
        let full = ZoneError::Full {
            servers: plan.primaries.len(),
        };
        let len = self.slots().len();
        let tree = self
            .alloc_lc(self.lc_nodes_for(Some(plan.method), len))
            .ok_or(full.clone())?;
        let block = match self.alloc_plan(plan) {
            Ok(b) => b,
            Err(e) => {
                if !tree.ptr.is_null() {
                    // SAFETY: allocated above, never published; the lock is held.
                    unsafe { self.free(tree.ptr as *mut u8, tree.words * size_of::<LcNode>()) };
                }
                return Err(e);
            }
        };
        self.set_plan(PlanRef {
            ptr: block.ptr,
            words: block.words,
        });
        self.install_lc(tree);
        Ok(())
    }

    /// Drops one reference on `slot`. When it was the last, the slot is retired: its
    /// name may still be read (nginx keeps a session's `$upstream_addr` pointing at it
    /// until the session's log line is written, just after the release), so it is
    /// freed only once every process has passed a quiet point since (`sweep_retired`).
    ///
    /// # Safety
    /// `slot` is a live slot of this zone on which the caller owns a reference.
    pub(super) unsafe fn unref(&mut self, slot: *mut Slot) {
        // SAFETY: per the contract; the lock is held (`&mut self`).
        unsafe {
            (*slot).refs -= 1;
            if (*slot).refs == 0 {
                if !(*slot).ssl_session.is_null() {
                    self.free((*slot).ssl_session, (*slot).ssl_session_cap as usize);
                    (*slot).ssl_session = ptr::null_mut();
                }
                (*slot).retired_ms = crate::ngx_util::mono_ms();
                (*slot).retired_next = self.hdr.retired;
                self.hdr.retired = slot;
            }
        }
    }

    /// Frees the retired slots no process can still read: those retired before the
    /// oldest of the processes' last quiet points (`quiet_ms`: an event-loop turn
    /// outside any session). None with no process at all.
    pub(super) fn sweep_retired(&mut self, quiet_ms: Option<u64>) {
        let mut link: *mut *mut Slot = &mut self.hdr.retired;
        // SAFETY: the retired list holds slots of this domain no one references; the
        // lock is held.
        unsafe {
            while !(*link).is_null() {
                let s = *link;
                if quiet_ms.map_or(true, |q| (*s).retired_ms < q) {
                    *link = (*s).retired_next;
                    self.free(s as *mut u8, size_of::<Slot>());
                } else {
                    link = &mut (*s).retired_next;
                }
            }
        }
    }

    /// The TLS session kept for `slot` (DER), copied into `out`; false when none.
    pub(super) fn slot_session(&self, slot: *mut Slot, out: &mut Vec<u8>) -> bool {
        // SAFETY: the caller holds a reference on `slot` (a ticket); the session block
        // is `ssl_session_len` bytes of this zone, read under the lock.
        unsafe {
            let s = &*slot;
            if s.ssl_session.is_null() || s.ssl_session_len == 0 {
                return false;
            }
            out.clear();
            out.extend_from_slice(std::slice::from_raw_parts(
                s.ssl_session,
                s.ssl_session_len as usize,
            ));
        }
        true
    }

    /// Keeps `der` as `slot`'s TLS session (a larger one gets a new block).
    pub(super) fn store_slot_session(&mut self, slot: *mut Slot, der: &[u8]) {
        // SAFETY: as in `slot_session`; blocks are allocated and freed under the lock.
        unsafe {
            let s = &mut *slot;
            if der.len() > s.ssl_session_cap as usize {
                if !s.ssl_session.is_null() {
                    self.free(s.ssl_session, s.ssl_session_cap as usize);
                }
                s.ssl_session = self.alloc(der.len());
                s.ssl_session_cap = if s.ssl_session.is_null() {
                    0
                } else {
                    der.len() as u32
                };
            }
            if s.ssl_session.is_null() {
                s.ssl_session_len = 0;
                return;
            }
            ptr::copy_nonoverlapping(der.as_ptr(), s.ssl_session, der.len());
            s.ssl_session_len = der.len() as u32;
        }
    }
}

/// # Safety
/// `s` is a fresh allocation of `size_of::<Slot>()` bytes.
unsafe fn init_slot(s: *mut Slot, spec: &ServerSpec) {
    // SAFETY: per the contract; all-zero is a valid Slot before the fields are set.
    let slot = unsafe {
        ptr::write_bytes(s as *mut u8, 0, size_of::<Slot>());
        &mut *s
    };
    let (storage, len) = sockaddr_of(&spec.addr);
    // SAFETY: `len` bytes of the storage are the address, at most a sockaddr_in6.
    unsafe {
        ptr::copy_nonoverlapping(
            &storage as *const libc::sockaddr_storage as *const u8,
            &mut slot.sockaddr as *mut libc::sockaddr_in6 as *mut u8,
            (len as usize).min(size_of::<libc::sockaddr_in6>()),
        );
    }
    slot.socklen = len as u8;
    let name = spec.addr.to_string();
    let n = name.len().min(NAME_MAX);
    slot.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    slot.name_len = n as u8;
    slot.state.effective_weight = spec.weight as i64;
    slot.spec_weight = spec.weight;
    slot.set_spec(spec, None);
}

/// Converts a socket address to the C form nginx connects with.
pub fn sockaddr_of(addr: &SocketAddr) -> (libc::sockaddr_storage, u32) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { MaybeUninit::zeroed().assume_init() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large enough and suitably aligned for any sockaddr.
            unsafe { ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as u32)
}
