//! zkwatch: drives the sans-IO ZooKeeper client over blocking std sockets and prints
//! what it sees, one line per event, each prefixed with the wall clock in ms (for
//! latency measurements). A proof of the client against a real server, not part of the
//! module.
//!
//! ```text
//! zkwatch [--timeout MS] [--auth USER:PASS] [--chroot /x] [--mode auto|persistent|oneshot]
//!         [--layout ip_port|curator] [--duration SECS] [--print-children N]
//!         HOST:PORT[,HOST:PORT...] PATH
//! ```
//! Lines: `connect ADDR`, `disconnected ADDR: WHY`, `established id=0x.. timeout=.. resumed=..`,
//! `expired id=0x.. by_client=..`, `auth_failed`, `mode persistent|oneshot`,
//! `listing exists=.. count=N servers=M bad=K [children=a,b,...]`, `bad CHILD: WHY`,
//! `watch_error WHY`.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use upsync_core::registry::zookeeper::{
    servers_from, Event, Layout, Session, SessionEvent, WatchMode, ZkConfig,
};

fn wall_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

macro_rules! say {
    ($($arg:tt)*) => {{
        println!("{} {}", wall_ms(), format!($($arg)*));
    }};
}

struct Opts {
    cfg: ZkConfig,
    layout: Layout,
    duration: u64,
    print_children: usize,
    members: Vec<SocketAddr>,
    path: String,
}

fn usage() -> ! {
    eprintln!(
        "usage: zkwatch [--timeout MS] [--auth USER:PASS] [--chroot /x] \
         [--mode auto|persistent|oneshot] [--layout ip_port|curator] [--duration SECS] \
         [--print-children N] HOST:PORT[,HOST:PORT...] PATH"
    );
    std::process::exit(2)
}

fn parse_args() -> Opts {
    let mut cfg = ZkConfig::default();
    let mut layout = Layout::IpPort;
    let mut duration = 300;
    let mut print_children = 20;
    let mut pos = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--timeout" => cfg.session_timeout_ms = val().parse().unwrap_or_else(|_| usage()),
            "--auth" => cfg.auth = Some(val()),
            "--chroot" => cfg.chroot = val(),
            "--mode" => {
                cfg.watch_mode = match val().as_str() {
                    "auto" => WatchMode::Auto,
                    "persistent" => WatchMode::Persistent,
                    "oneshot" => WatchMode::OneShot,
                    _ => usage(),
                }
            }
            "--layout" => layout = Layout::parse(&val()).unwrap_or_else(|| usage()),
            "--duration" => duration = val().parse().unwrap_or_else(|_| usage()),
            "--print-children" => print_children = val().parse().unwrap_or_else(|_| usage()),
            _ if a.starts_with("--") => usage(),
            _ => pos.push(a),
        }
    }
    if pos.len() != 2 {
        usage();
    }
    let members: Vec<SocketAddr> = pos[0]
        .split(',')
        .map(|m| m.parse().unwrap_or_else(|_| usage()))
        .collect();
    if let Err(e) = cfg.validate() {
        eprintln!("zkwatch: {e}");
        std::process::exit(2);
    }
    Opts {
        cfg,
        layout,
        duration,
        print_children,
        members,
        path: pos[1].clone(),
    }
}

fn print_events(s: &mut Session, o: &Opts) {
    for ev in s.take_events() {
        match ev {
            Event::Session(SessionEvent::Established {
                id,
                timeout_ms,
                resumed,
            }) => say!("established id=0x{id:x} timeout={timeout_ms} resumed={resumed}"),
            Event::Session(SessionEvent::Expired { id, by_client }) => {
                say!("expired id=0x{id:x} by_client={by_client}")
            }
            Event::Session(SessionEvent::AuthFailed) => say!("auth_failed"),
            Event::Session(SessionEvent::ModeDetected(m)) => {
                say!("mode {}", format!("{m:?}").to_lowercase())
            }
            Event::Error { err, .. } => say!("watch_error {err}"),
            Event::Listing {
                exists, children, ..
            } => {
                let (ok, bad) = servers_from(o.layout, &children);
                let mut line = format!(
                    "listing exists={exists} count={} servers={} bad={}",
                    children.len(),
                    ok.len(),
                    bad.len()
                );
                if children.len() <= o.print_children {
                    let names: Vec<&str> = children.iter().map(|c| c.name.as_str()).collect();
                    line.push_str(&format!(" children={}", names.join(",")));
                    let lines: Vec<String> = ok.iter().map(|s| s.line()).collect();
                    line.push_str(&format!(" lines=[{}]", lines.join(" ")));
                }
                say!("{line}");
                for b in bad.iter().take(5) {
                    say!("bad {b}");
                }
            }
        }
    }
}

fn main() {
    let o = parse_args();
    let start = Instant::now();
    let now = || start.elapsed().as_millis() as u64;
    let end = o.duration * 1000;
    let mut s = Session::new(o.cfg.clone());
    s.watch(&o.path, now()).unwrap_or_else(|e| {
        eprintln!("zkwatch: {e}");
        std::process::exit(2)
    });
    let mut next = 0usize;
    let mut failures = 0u32;
    let mut buf = vec![0u8; 64 * 1024];
    while now() < end {
        let addr = o.members[next % o.members.len()];
        next += 1;
        say!("connect {addr}");
        let mut stream = match TcpStream::connect_timeout(&addr, Duration::from_millis(1000)) {
            Ok(st) => st,
            Err(e) => {
                say!("disconnected {addr}: connect: {e}");
                failures += 1;
                // a round over every member failed: wait a little, keeping the timers
                let pause = if failures as usize % o.members.len() == 0 {
                    300
                } else {
                    20
                };
                let until = now() + pause;
                while now() < until {
                    if s.next_deadline().is_some_and(|d| d <= now()) {
                        let _ = s.on_timer(now());
                        print_events(&mut s, &o);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
        s.on_connected(now());
        let why = loop {
            let out = s.take_output();
            if !out.is_empty() {
                if let Err(e) = stream.write_all(&out) {
                    break format!("write: {e}");
                }
            }
            print_events(&mut s, &o);
            if now() >= end {
                s.close(now());
                let _ = stream.write_all(&s.take_output());
                break "duration reached".to_string();
            }
            let wait = s
                .next_deadline()
                .map_or(1000, |d| d.saturating_sub(now()))
                .clamp(1, 1000);
            let _ = stream.set_read_timeout(Some(Duration::from_millis(wait)));
            match stream.read(&mut buf) {
                Ok(0) => break "closed by the server".to_string(),
                Ok(n) => {
                    if let Err(e) = s.on_data(&buf[..n], now()) {
                        break e.to_string();
                    }
                    failures = 0;
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => break format!("read: {e}"),
            }
            if s.next_deadline().is_some_and(|d| d <= now()) {
                if let Err(e) = s.on_timer(now()) {
                    break e.to_string();
                }
            }
        };
        s.on_disconnected(now());
        print_events(&mut s, &o);
        say!("disconnected {addr}: {why}");
        drop(stream);
        std::thread::sleep(Duration::from_millis(20));
    }
}
