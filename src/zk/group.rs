//! Which `upsync_type=zookeeper` upstreams share a session: those on the same ensemble
//! (the same resolved member addresses, in any order) with the same digest
//! credentials. The chroot is part of each watched path, so it does not split a group.
//! Within a group, upstreams are ordered by name; the first one's zone holds the lease
//! that decides which worker runs the session.

use std::net::SocketAddr;

use crate::srv_conf::SrvConf;
use upsync_core::registry::zookeeper::{digest_of, ZkConfig};

/// The upstreams of one ensemble and the settings of their shared session.
pub struct Group<'a> {
    /// Ordered by name; `confs[0]` is the lead.
    pub confs: Vec<&'a SrvConf>,
    /// The lead's member addresses, in its failover order.
    pub addrs: Vec<SocketAddr>,
    /// The smallest session timeout any of them asks for, and the credentials.
    pub cfg: ZkConfig,
    /// The smallest `upsync_interval` (the reconnect backoff base and the lease tick).
    pub interval_ms: u64,
}

fn key(conf: &SrvConf) -> (Vec<SocketAddr>, Option<String>) {
    let mut addrs: Vec<SocketAddr> = conf.addrs.iter().map(|t| t.addr).collect();
    addrs.sort();
    addrs.dedup();
    (addrs, digest_of(conf.credential.as_ref()))
}

/// Groups the ZooKeeper upstreams by ensemble; groups come in the order of their lead's
/// name.
pub fn groups<'a>(confs: &[&'a SrvConf]) -> Vec<Group<'a>> {
    let mut sorted: Vec<&SrvConf> = confs
        .iter()
        .copied()
        .filter(|c| c.upsync.as_ref().is_some_and(|u| u.zookeeper.is_some()))
        .collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut keyed: Vec<(_, Vec<&SrvConf>)> = Vec::new();
    for c in sorted {
        let k = key(c);
        match keyed.iter_mut().find(|(kk, _)| *kk == k) {
            Some((_, list)) => list.push(c),
            None => keyed.push((k, vec![c])),
        }
    }
    keyed
        .into_iter()
        .map(|(_, confs)| {
            let lead = confs[0];
            let spec = |c: &SrvConf| {
                let u = c.upsync.as_ref().expect("filtered on upsync");
                (
                    u.zookeeper.as_ref().expect("filtered on zookeeper").clone(),
                    u.interval_ms,
                )
            };
            let (zk, _) = spec(lead);
            let mut cfg = ZkConfig::for_upsync(&zk, lead.credential.as_ref());
            let mut interval_ms = u64::MAX;
            for c in &confs {
                let (zk, interval) = spec(c);
                cfg.session_timeout_ms = cfg.session_timeout_ms.min(zk.session_timeout_ms);
                interval_ms = interval_ms.min(interval);
            }
            let mut addrs: Vec<SocketAddr> = Vec::new();
            for t in &lead.addrs {
                if !addrs.contains(&t.addr) {
                    addrs.push(t.addr);
                }
            }
            Group {
                confs,
                addrs,
                cfg,
                interval_ms,
            }
        })
        .collect()
}
