//! Load tool for scripts/bench (not part of the module).
//!
//! `connbench serve PORT ID`: a TCP backend on 127.0.0.1:PORT that writes "ID\n" to
//! every connection and closes it.
//! `connbench load PORT SECONDS MAX_CONNS THREADS [send]`: opens connections to
//! 127.0.0.1:PORT (connect, [send a line,] read one line, close) from THREADS threads until SECONDS
//! pass or MAX_CONNS are done; prints `conns=N secs=S rate=R failed=F`.
//! `connbench reply PORT ID`: a TCP backend that reads one line from each connection,
//! then writes "ID\n" and closes it (one thread per connection).
//! `connbench serial PORT COUNT`: COUNT connections one after another, each sending
//! one line and read to its end (nginx has closed the session before the next one
//! starts, so every connection meets the same idle server); prints `conns=N failed=F`.
//! `connbench first PORT ID TIMEOUT_MS`: connects repeatedly until a connection greets
//! with ID; prints the milliseconds it took (or `timeout`).
//! `connbench serve-many FIRST_PORT COUNT OUTFILE`: binds COUNT free ports on 127.0.0.1
//! from FIRST_PORT up (skipping busy ones), writes them to OUTFILE, and answers every
//! connection on any of them with "p<port>\n" (one epoll loop, one thread).
//! `connbench latency PORT SECONDS MAX_CONNS`: one connection at a time, one every
//! millisecond at most (connect, read one line, close) until SECONDS pass or MAX_CONNS
//! are done; prints `conns=N failed=F p50_ms=.. p99_ms=.. max_ms=..`.
//! `connbench scrape PORT PATH SECONDS MAX`: GET PATH (HTTP/1.0) read to its end, again
//! and again until SECONDS pass or MAX answers are read; prints
//! `scrapes=N failed=F bytes=B mean_ms=.. max_ms=..` (B: bytes of the last answer).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn greet(port: u16) -> Option<String> {
    greet_after(port, false)
}

/// `greet`, sending a line first when `send` (for `reply` backends).
fn greet_after(port: u16, send: bool) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    if send {
        s.write_all(b"x\n").ok()?;
    }
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).ok()?;
    if line.is_empty() {
        None
    } else {
        Some(line.trim_end().to_string())
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let num = |i: usize| -> u64 { args[i].parse().expect("number") };
    match args.get(1).map(String::as_str) {
        Some("serve") => {
            let l = TcpListener::bind(("127.0.0.1", num(2) as u16)).expect("bind");
            let msg = format!("{}\n", args[3]);
            for mut c in l.incoming().flatten() {
                let _ = c.write_all(msg.as_bytes());
            }
        }
        Some("load") => {
            let (port, secs, max, threads) = (num(2) as u16, num(3), num(4), num(5));
            let send = args.get(6).map(String::as_str) == Some("send");
            let done = Arc::new(AtomicU64::new(0));
            let failed = Arc::new(AtomicU64::new(0));
            let start = Instant::now();
            let deadline = start + Duration::from_secs(secs);
            let hs: Vec<_> = (0..threads)
                .map(|_| {
                    let (done, failed) = (done.clone(), failed.clone());
                    std::thread::spawn(move || {
                        while Instant::now() < deadline
                            && done.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < max
                        {
                            match greet_after(port, send) {
                                Some(_) => done.fetch_add(1, Ordering::Relaxed),
                                None => failed.fetch_add(1, Ordering::Relaxed),
                            };
                        }
                    })
                })
                .collect();
            for h in hs {
                let _ = h.join();
            }
            let el = start.elapsed().as_secs_f64();
            let n = done.load(Ordering::Relaxed);
            println!(
                "conns={n} secs={el:.2} rate={:.0} failed={}",
                n as f64 / el,
                failed.load(Ordering::Relaxed)
            );
        }
        Some("reply") => {
            let l = TcpListener::bind(("127.0.0.1", num(2) as u16)).expect("bind");
            let msg = format!("{}\n", args[3]);
            for c in l.incoming().flatten() {
                let msg = msg.clone();
                std::thread::spawn(move || {
                    let _ = c.set_read_timeout(Some(Duration::from_secs(60)));
                    let mut r = BufReader::new(&c);
                    let mut line = String::new();
                    if r.read_line(&mut line).is_ok() {
                        let _ = (&c).write_all(msg.as_bytes());
                    }
                });
            }
        }
        Some("serial") => {
            let (port, count) = (num(2) as u16, num(3));
            let (mut done, mut failed) = (0u64, 0u64);
            for _ in 0..count {
                let ok = TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(60)))?;
                    s.write_all(b"x\n")?;
                    let mut all = Vec::new();
                    std::io::Read::read_to_end(&mut s, &mut all)?;
                    Ok(!all.is_empty())
                });
                match ok {
                    Ok(true) => done += 1,
                    _ => failed += 1,
                }
            }
            println!("conns={done} failed={failed}");
        }
        Some("first") => {
            let (port, id, timeout) = (num(2) as u16, args[3].clone(), num(4));
            let start = Instant::now();
            while start.elapsed() < Duration::from_millis(timeout) {
                if greet(port).as_deref() == Some(id.as_str()) {
                    println!("{:.3}", start.elapsed().as_secs_f64() * 1000.0);
                    return;
                }
            }
            println!("timeout");
        }
        Some("serve-many") => serve_many(num(2) as u16, num(3) as usize, &args[4]),
        Some("latency") => latency(num(2) as u16, num(3), num(4)),
        Some("scrape") => scrape(num(2) as u16, &args[3], num(4), num(5)),
        _ => {
            eprintln!("usage: connbench serve PORT ID | load PORT SECONDS MAX THREADS | first PORT ID TIMEOUT_MS | serve-many FIRST COUNT OUTFILE | latency PORT SECONDS MAX | scrape PORT PATH SECONDS MAX");
            std::process::exit(2);
        }
    }
}

fn serve_many(first: u16, count: usize, outfile: &str) {
    use std::os::fd::AsRawFd;
    let mut listeners = Vec::with_capacity(count);
    let mut port = first;
    while listeners.len() < count && port < u16::MAX {
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            l.set_nonblocking(true).expect("nonblocking");
            listeners.push((port, l));
        }
        port += 1;
    }
    let list: String = listeners.iter().map(|(p, _)| format!("{p}\n")).collect();
    std::fs::write(outfile, list).expect("write port list");
    // SAFETY: plain epoll calls on descriptors we own; events is a local buffer.
    unsafe {
        let ep = libc::epoll_create1(0);
        assert!(ep >= 0, "epoll_create1");
        for (i, (_, l)) in listeners.iter().enumerate() {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: i as u64,
            };
            assert_eq!(
                libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, l.as_raw_fd(), &mut ev),
                0
            );
        }
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        loop {
            let n = libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, -1);
            for e in events.iter().take(n.max(0) as usize) {
                let (p, l) = &listeners[e.u64 as usize];
                while let Ok((mut c, _)) = l.accept() {
                    let _ = c.write_all(format!("p{p}\n").as_bytes());
                }
            }
        }
    }
}

fn latency(port: u16, secs: u64, max: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut ms, mut failed) = (Vec::new(), 0u64);
    while Instant::now() < deadline && (ms.len() as u64) + failed < max {
        let t0 = Instant::now();
        match greet(port) {
            Some(_) => ms.push(t0.elapsed().as_secs_f64() * 1000.0),
            None => failed += 1,
        }
        if let Some(rest) = Duration::from_millis(1).checked_sub(t0.elapsed()) {
            std::thread::sleep(rest);
        }
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms.get(((ms.len() as f64 * q) as usize).min(ms.len().saturating_sub(1)));
    let show = |v: Option<&f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
    println!(
        "conns={} failed={failed} p50_ms={} p99_ms={} max_ms={}",
        ms.len(),
        show(at(0.5)),
        show(at(0.99)),
        show(ms.last())
    );
}

fn scrape(port: u16, path: &str, secs: u64, max: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let (mut n, mut failed, mut bytes, mut total, mut most) = (0u64, 0u64, 0usize, 0.0, 0.0f64);
    while Instant::now() < deadline && n + failed < max {
        let t0 = Instant::now();
        let got = TcpStream::connect(("127.0.0.1", port)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
            let mut all = Vec::new();
            std::io::Read::read_to_end(&mut s, &mut all)?;
            Ok(all)
        });
        match got {
            Ok(all) if all.starts_with(b"HTTP/1.0 200") => {
                let el = t0.elapsed().as_secs_f64() * 1000.0;
                n += 1;
                bytes = all.len();
                total += el;
                most = most.max(el);
            }
            _ => failed += 1,
        }
    }
    println!(
        "scrapes={n} failed={failed} bytes={bytes} mean_ms={:.1} max_ms={most:.1}",
        total / n.max(1) as f64
    );
}
