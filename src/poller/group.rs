//! Upstreams that share one poll: a Consul KV group (`registry::consul_group`), the
//! upstreams on one registry whose KV prefixes have the same parent. Which upstreams
//! group; the members' leases (the worker holding the first upstream's lease, the
//! lead's, holds every member's, so each upstream's status names it and each publish
//! checks its own zone); what an answer brings each member (published through its own
//! `Publisher` only when its part changed) and what a failure records in each status.

use crate::zone::reaped_line;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use ngx::ffi::*;

use super::{Poller, Publisher};
use crate::driver::Side;
use crate::process::my_pid;
use crate::process::observe;
use crate::srv_conf::SrvConf;
use upsync_core::registry::consul_group::{group_indexes, share_key, KvGroup, ShareKey};
use upsync_core::registry::Part;

/// One upstream of a group other than the lead (whose side is the poller's own).
pub(super) struct Member {
    /// The upstream's configuration (it outlives the worker's pollers).
    conf: *const SrvConf,
    pub publisher: Publisher,
    /// The upstream's own log lines (`upsync: upstream "NAME" (consul ...)`).
    pub side: Rc<Side>,
    /// The lease epoch of this member's zone while this worker runs the group's poll.
    pub epoch: Option<u64>,
}

impl Member {
    fn new(conf: &SrvConf) -> Member {
        let side = Side::new(conf.log_prefix());
        Member {
            conf,
            publisher: Publisher::new(conf, side.clone()),
            side,
            epoch: None,
        }
    }

    /// Takes or renews the member zone's lease for `me` until `until`; returns whether
    /// it had to be taken anew (another worker wrote the zone meanwhile). A zone that
    /// serves another source now is left alone.
    fn hold(&mut self, me: i64, until: u64) -> bool {
        let (epoch, taken) = self.publisher.hold(self.epoch, me, until);
        self.epoch = epoch;
        taken
    }

    /// Its part of an answer did not change: only the status moves on.
    fn touch(&self, position: u64, in_use: &str) {
        let mut l = self.publisher.zone.lock();
        if !self.publisher.may_publish(&l, self.epoch) {
            return;
        }
        l.mark_synced(position, in_use);
    }
}

/// The key under which an upstream shares its poll: what `share_key` compares, and
/// the registry's resolved addresses (in any order).
fn key(conf: &SrvConf) -> Option<(ShareKey, Vec<SocketAddr>)> {
    let spec = conf.upsync.as_ref()?;
    let k = share_key(spec, conf.credential.as_ref())?;
    let mut addrs: Vec<SocketAddr> = conf.addrs.iter().map(|t| t.addr).collect();
    addrs.sort();
    addrs.dedup();
    Some((k, addrs))
}

/// `consul 127.0.0.1:8500/v1/kv/upstreams/ for upstreams "a", "b" and 298 more`.
fn prefix(lead: &SrvConf, parent_path: String, names: &[&str]) -> String {
    let mut ep = lead
        .upsync
        .as_ref()
        .expect("grouped upstreams have upsync")
        .endpoint
        .clone();
    ep.path = parent_path;
    format!(
        "upsync: consul {ep} for upstreams {}",
        crate::ngx_util::quoted_names(names)
    )
}

/// Starts this worker's pollers for the HTTP upstreams of `confs`: one per group of
/// upstreams that share a poll (ordered by name, the first is the lead), one per other
/// upstream.
///
/// # Safety
/// As `start`, for each configuration.
pub unsafe fn start_all(confs: &[*const SrvConf]) {
    // SAFETY: per the contract the configurations outlive the worker's pollers.
    let mut confs: Vec<&SrvConf> = confs.iter().map(|&c| unsafe { &*c }).collect();
    confs.sort_by(|a, b| a.name.cmp(&b.name));
    let keys: Vec<_> = confs.iter().map(|c| key(c)).collect();
    for members in group_indexes(&keys) {
        let group: Vec<&SrvConf> = members.iter().map(|&i| confs[i]).collect();
        let source = (group.len() > 1)
            .then(|| {
                let specs: Vec<_> = group.iter().filter_map(|c| c.upsync.as_ref()).collect();
                KvGroup::new(&specs, group[0].credential.as_ref())
            })
            .flatten();
        match source {
            None => {
                for c in group {
                    // SAFETY: per the contract.
                    unsafe { super::start(c) };
                }
            }
            Some(source) => {
                let lead = group[0];
                let names: Vec<&str> = group.iter().map(|c| c.name.as_str()).collect();
                let side = Side::new(prefix(lead, source.path().to_string(), &names));
                let interval = group
                    .iter()
                    .filter_map(|c| c.upsync.as_ref().map(|u| u.interval_ms))
                    .min()
                    .unwrap_or(upsync_core::conf::DEFAULT_INTERVAL_MS);
                let others = group[1..].iter().map(|c| Member::new(c)).collect();
                // SAFETY: per the contract.
                unsafe { super::start_with(lead, Box::new(source), side, interval, others) };
            }
        }
    }
}

impl Poller {
    /// Hands each member what the last answer brought for it: a changed part is
    /// published, an unchanged one only moves the status on.
    pub(super) fn publish_parts(&mut self, position: u64, in_use: &str, answered: Instant) {
        if self.members.is_empty() {
            return;
        }
        let parts = self.source.take_parts();
        for (m, part) in self.members.iter_mut().zip(parts) {
            match part {
                Part::Changed(snap) => m
                    .publisher
                    .publish(m.epoch, snap, position, in_use, answered),
                Part::Same => m.touch(position, in_use),
            }
        }
    }

    /// Records a failed read in every member's status (the lead's is recorded by the
    /// caller).
    pub(super) fn members_record_error(&self, msg: &str, failures: Option<u64>) {
        for m in &self.members {
            m.publisher.record_error(m.epoch, msg, failures);
        }
    }

    /// Reclaims, in every member's zone, what exited processes' sessions held.
    pub(super) fn members_reap(&self, now: u64) {
        for m in &self.members {
            let reaped = m.publisher.zone.lock().reap_dead(now, &mut observe);
            if let Some(line) = reaped_line(reaped) {
                m.side.error_log(NGX_LOG_NOTICE, &line);
            }
        }
    }

    /// Takes or renews every member's lease along with the lead's; returns whether one
    /// had to be taken anew while the poll ran (its zone was written by another worker:
    /// everything is read again).
    pub(super) fn members_hold(&mut self, until: u64) -> bool {
        let me = my_pid();
        let mut taken = false;
        for m in &mut self.members {
            taken |= m.hold(me, until);
        }
        taken
    }

    /// Consul filtered the group's answer (`X-Consul-Results-Filtered-By-ACLs`): the
    /// token may read each member's prefix but not everything under the parent (keys
    /// of others). Rather than keep every member's set frozen, this worker stops the
    /// group's poll and polls the upstreams one by one, each under its own lease; a
    /// group poller of another worker that takes the lead's lease later meets the same
    /// answer and does the same. An upstream whose own prefix is filtered still says
    /// so, alone. Nothing runs on this poller after it returns.
    pub(super) fn dissolve(&mut self) {
        let confs: Vec<*const SrvConf> = std::iter::once(self.conf)
            .chain(self.members.iter().map(|m| m.conf))
            .collect();
        self.log(
            NGX_LOG_WARN,
            &format!(
                "the ACL token may not read every key under the parent prefix (X-Consul-Results-Filtered-By-ACLs): these {} upstreams poll one by one from now on, each on its own connection",
                confs.len()
            ),
        );
        self.shutdown();
        for c in confs {
            // SAFETY: the configurations outlive the worker's pollers (`start_all`'s
            // contract); this poller is stopped and no longer touches their zones.
            unsafe { super::start(&*c) };
        }
    }

    /// This worker no longer runs the poll: the members' epochs go (`release`: and
    /// their leases are given back, so another worker takes over at once).
    pub(super) fn members_drop(&mut self, release: bool) {
        let me = my_pid();
        for m in &mut self.members {
            if m.epoch.take().is_some() && release {
                m.publisher.zone.lock().release_lease(me);
            }
        }
    }
}
