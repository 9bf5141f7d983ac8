//! What the master does for each upsync upstream while nginx reads a configuration
//! (`init_zone`) and once it is committed (`commit`, from `init_module`): dump
//! housekeeping, committing a reload's source switch or plan change, and the
//! `strong_dependency=on` first read at first start.

mod blocking;
mod zk_read;

use std::path::Path;

use std::ffi::c_void;

use ngx::ffi::*;
use ngx::ngx_log_error;

use crate::srv_conf::SrvConf;
use crate::zone::{DomainSpec, InitOutcome, SharedZone, Zone, ZoneError};
use upsync_core::balancer::Plan;
use upsync_core::conf::Target;
use upsync_core::dump;
use upsync_core::registry::zookeeper::ZkConfig;

/// The upsync upstreams of the configuration being read: the users of the shared zone,
/// each set up in it by `init_shared`.
#[derive(Default)]
pub struct ZoneUsers {
    pub confs: Vec<*mut SrvConf>,
}

/// The shared zone, initialized while nginx reads a configuration: every upsync
/// upstream's domain in it (see `zone` for the two phases of a reload).
///
/// # Safety
/// Called by nginx as the zone's `init`, for the zone `directives::shared_zone` declared.
pub unsafe extern "C" fn init_shared(
    shm_zone: *mut ngx_shm_zone_t,
    _old: *mut c_void,
) -> ngx_int_t {
    // SAFETY: `data` is the list of users made with the zone; `shm.addr` is the zone's
    // slab pool, mapped for the cycle's life.
    let (users, pool, log) = unsafe {
        (
            &*((*shm_zone).data as *const ZoneUsers),
            (*shm_zone).shm.addr as *mut ngx_slab_pool_t,
            (*shm_zone).shm.log,
        )
    };
    // SAFETY: `pool` is the zone's slab pool, set up by nginx.
    let Some(shared) = (unsafe { SharedZone::attach(pool) }) else {
        ngx_log_error!(
            NGX_LOG_EMERG,
            log,
            "upsync: the shared zone \"upsync\" is too small to be used; raise upsync_zone_size"
        );
        return NGX_ERROR as ngx_int_t;
    };
    for &conf in &users.confs {
        // SAFETY: each user is the SrvConf of an upsync upstream of this configuration,
        // which lives in its pool; one is borrowed at a time.
        let conf = unsafe { &mut *conf };
        let spec = DomainSpec {
            name: &conf.name,
            fingerprint: conf.fingerprint(),
            budget: conf.upsync.as_ref().map_or(0, |u| u.zone_size as u64),
        };
        let plan = || Plan::for_servers(&conf.initial, conf.method());
        match Zone::init(&shared, &spec, &conf.initial, plan) {
            Ok((zone, outcome)) => {
                conf.zone = Some(zone);
                conf.outcome = Some(outcome);
                conf.shared = Some(shared);
            }
            Err(e) => {
                let cap = if spec.budget > 0 {
                    "raise its zone_size= or upsync_zone_size"
                } else {
                    "raise upsync_zone_size"
                };
                ngx_log_error!(
                    NGX_LOG_EMERG,
                    log,
                    "{}: {e} (the configured servers); {cap}",
                    conf.log_prefix()
                );
                return NGX_ERROR as ngx_int_t;
            }
        }
    }
    NGX_OK as ngx_int_t
}

/// After a configuration is committed: frees the domains of upstreams it no longer
/// has, once no process holds sessions in them (old workers still serving them keep
/// them until they exit; the next commit looks again).
pub fn sweep(log: *mut ngx_log_t, shared: &SharedZone) {
    let freed = shared.sweep(&crate::process::pid_alive);
    if freed > 0 {
        ngx_log_error!(
            NGX_LOG_NOTICE,
            log,
            "upsync: freed the shared memory of {freed} upstream(s) no longer configured"
        );
    }
}

/// Why a first start stops.
#[derive(Debug)]
pub struct StartRefused;

/// Commits one upstream: housekeeping, then what its zone's initialization prepared,
/// then `strong_dependency` at first start. `user` is the worker user and group (when
/// nginx switches to one). Only a first start's strong_dependency read can fail.
pub fn commit(
    log: *mut ngx_log_t,
    conf: &mut SrvConf,
    first_start: bool,
    user: Option<(u32, u32)>,
) -> Result<(), StartRefused> {
    let (Some(spec), Some(zone)) = (conf.upsync.clone(), conf.zone) else {
        return Ok(());
    };
    hand_over_created(log, conf, user);
    if let Some((uid, gid)) = user {
        check_dump_dir(log, conf, uid, gid);
    }
    let stale = dump::remove_stale_temps(Path::new(&conf.dump_path()), |pid| {
        crate::process::pid_alive(pid as i64)
    });
    if stale > 0 {
        ngx_log_error!(
            NGX_LOG_NOTICE,
            log,
            "{}: removed {stale} temporary dump file(s) left by a killed process",
            conf.log_prefix()
        );
    }
    match conf.outcome {
        Some(InitOutcome::Kept) => {
            let n = zone.lock().slots().len();
            ngx_log_error!(
                NGX_LOG_NOTICE,
                log,
                "{}: keeping the running set of {n} servers across the reload",
                conf.log_prefix()
            );
            replan(log, conf, zone);
        }
        Some(InitOutcome::Switch) => {
            // the same plan the zone's initialization sized the reserve with
            let plan = Plan::for_servers(&conf.initial, conf.method());
            match zone.commit_switch(conf.fingerprint(), &conf.initial, &plan) {
                Ok(()) => {
                    ngx_log_error!(
                        NGX_LOG_NOTICE,
                        log,
                        "{}: the source changed: serving the {} configured servers until the registry answers{}",
                        conf.log_prefix(),
                        conf.initial.len(),
                        if spec.strong_dependency { " (strong_dependency applies at first start only)" } else { "" }
                    );
                }
                Err(e) => {
                    ngx_log_error!(
                        NGX_LOG_ERR,
                        log,
                        "{}: the source changed, but the configured servers cannot be applied: {e}; the previous servers serve until the registry answers",
                        conf.log_prefix()
                    );
                }
            }
        }
        Some(InitOutcome::Fresh) | None => {}
    }
    if first_start && spec.strong_dependency {
        strong_dependency_read(log, conf, zone)?;
    }
    Ok(())
}

/// What the configuration created for the dump (directories, the empty file) belongs
/// to the worker user, which rewrites the dump there.
pub fn hand_over_created(log: *mut ngx_log_t, conf: &mut SrvConf, user: Option<(u32, u32)>) {
    let made = std::mem::take(&mut conf.created_dump);
    let Some((uid, gid)) = user else {
        return;
    };
    for p in made {
        if let Err(e) = std::os::unix::fs::lchown(&p, Some(uid), Some(gid)) {
            ngx_log_error!(
                NGX_LOG_WARN,
                log,
                "{}: cannot give \"{}\" to the worker user (uid {uid}): {e}",
                conf.log_prefix(),
                p.display()
            );
        }
    }
}

/// A reload kept the zone but changed `upsync_lb`: the running set gets a plan for the
/// new method (old workers' picks fall back to round robin where the plan lacks
/// something their method needs).
fn replan(log: *mut ngx_log_t, conf: &SrvConf, zone: Zone) {
    let method = conf.method();
    let (specs, generation) = {
        let l = zone.lock();
        if l.plan().map(|p| p.method) == Some(method) {
            return;
        }
        (l.specs(), l.generation())
    };
    let plan = Plan::for_servers(&specs, method);
    let mut l = zone.lock();
    if l.generation() != generation {
        return; // a poller published meanwhile (with its own method's plan)
    }
    if let Err(e) = l.replace_plan(&plan) {
        drop(l);
        ngx_log_error!(
            NGX_LOG_ERR,
            log,
            "{}: cannot build the plan for \"upsync_lb {}\": {e}",
            conf.log_prefix(),
            conf.method_name()
        );
    }
}

/// `strong_dependency=on` at first start: the master reads the registry before any
/// worker runs; nginx does not start when it cannot.
fn strong_dependency_read(
    log: *mut ngx_log_t,
    conf: &SrvConf,
    zone: Zone,
) -> Result<(), StartRefused> {
    let spec = conf.upsync.as_ref().expect("upsync configured");
    let timeout = std::time::Duration::from_millis(spec.timeout_ms.clamp(1_000, 5_000));
    let wrap = |sock: std::net::TcpStream,
                t: &Target|
     -> Result<Box<dyn blocking::Stream>, crate::driver::tls::TlsError> {
        match &spec.tls {
            None => Ok(Box::new(sock)),
            Some(tls) => {
                let name = conf.tls_name(t);
                // SAFETY: the context was made for this configuration and lives with it.
                let s = unsafe {
                    crate::driver::tls::BlockingTls::connect(conf.ssl, sock, &name, tls.verify)
                }?;
                Ok(Box::new(s))
            }
        }
    };
    let fetched = match (
        upsync_core::registry::source_for(spec, conf.credential.as_ref()),
        &spec.zookeeper,
    ) {
        (Some(mut source), _) => blocking::fetch(
            &conf.addrs,
            &spec.endpoint,
            source.as_mut(),
            3,
            timeout,
            zone.usage().response_limit(),
            &wrap,
        )
        .map_err(|e| e.to_string()),
        (None, Some(zk)) => zk_read::fetch(
            &conf.addrs.iter().map(|t| t.addr).collect::<Vec<_>>(),
            &ZkConfig::for_upsync(zk, conf.credential.as_ref()),
            &zk.server_path,
            zk.layout,
            3,
            timeout,
        )
        .map_err(|e| e.to_string()),
        (None, None) => Err("no source for this upsync_type".to_string()),
    };
    let snap = match fetched {
        Ok(snap) => snap,
        Err(e) => {
            ngx_log_error!(
                NGX_LOG_EMERG,
                log,
                "{}: strong_dependency=on and the registry cannot be read: {e}; nginx does not start",
                conf.log_prefix()
            );
            return Err(StartRefused);
        }
    };
    if snap.servers.is_empty() {
        ngx_log_error!(
            NGX_LOG_WARN,
            log,
            "{}: strong_dependency=on: the registry lists no servers; starting with the configured ones",
            conf.log_prefix()
        );
        return Ok(());
    }
    let plan = Plan::for_servers(&snap.servers, conf.method());
    let published = {
        let mut l = zone.lock();
        match l.alloc_plan_block(plan.flat_words()) {
            Some(mut block) => {
                block.fill(&plan);
                l.publish(&snap.servers, block, None).map(|_| ())
            }
            None => Err(ZoneError::Full {
                servers: snap.servers.len(),
            }),
        }
    };
    if let Err(e) = published {
        ngx_log_error!(
            NGX_LOG_EMERG,
            log,
            "{}: strong_dependency=on: {e}",
            conf.log_prefix()
        );
        return Err(StartRefused);
    }
    let path = conf.dump_path();
    if let Err(e) = dump::write_atomic(Path::new(&path), dump::render(&snap.servers).as_bytes()) {
        ngx_log_error!(
            NGX_LOG_ERR,
            log,
            "{}: cannot write the dump file \"{path}\": {e}",
            conf.log_prefix()
        );
    }
    ngx_log_error!(
        NGX_LOG_NOTICE,
        log,
        "{}: strong_dependency=on: starting with {} servers from the registry",
        conf.log_prefix(),
        snap.servers.len()
    );
    Ok(())
}

/// Warns at startup when the worker user cannot replace the dump file (the dump is
/// written by a worker, atomically, so it needs write access to the directory).
fn check_dump_dir(log: *mut ngx_log_t, conf: &SrvConf, uid: u32, gid: u32) {
    use std::os::unix::fs::MetadataExt;
    let path = conf.dump_path();
    let dir = match Path::new(&path).parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let Ok(m) = std::fs::metadata(&dir) else {
        return;
    };
    let mode = m.mode();
    let writable = (m.uid() == uid && mode & 0o200 != 0)
        || (m.gid() == gid && mode & 0o020 != 0)
        || mode & 0o002 != 0;
    if !writable {
        ngx_log_error!(
            NGX_LOG_WARN,
            log,
            "{}: worker user (uid {uid}) cannot write to \"{}\"; the dump file \"{path}\" will not be updated",
            conf.log_prefix(),
            dir.display()
        );
    }
}
