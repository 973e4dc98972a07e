//! `covm serve` under idle and slow clients, with a file limit of 256 (as a small container has):
//! idle connections do not take it down, slow headers and bodies are cut off, idle keep-alive
//! connections are closed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_covm");

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `covm serve` with at most 256 open files.
fn serve(data: &std::path::Path) -> (Server, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = std::fs::File::create(data.with_extension("log")).unwrap();
    let script = format!(
        "ulimit -n 256 && exec {BIN} serve --driver sim --data-dir {} --listen 127.0.0.1:{port}",
        data.display()
    );
    let child = Command::new("sh")
        .args(["-c", &script])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("covm serve starts");
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "covm serve did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    (Server(child), port)
}

/// One request on a new connection; the status line.
fn get(port: u16, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.lines().next().unwrap_or_default().to_owned())
}

/// Seconds until the server closes `s` (it sends nothing more), at most `max`.
fn closed_after(mut s: TcpStream, max: Duration) -> Option<Duration> {
    let started = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = [0u8; 4096];
    while started.elapsed() < max {
        match s.read(&mut buf) {
            Ok(0) => return Some(started.elapsed()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Some(started.elapsed()),
        }
    }
    None
}

#[test]
fn idle_and_slow_clients_do_not_take_covm_down() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, port) = serve(&dir.path().join("data"));
    // 300 connections that send nothing, on a server with 256 files.
    let mut idle = Vec::new();
    for _ in 0..300 {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => idle.push(s),
            Err(e) => panic!("connect: {e}"),
        }
    }
    let started = Instant::now();
    let status = get(port, "/healthz").expect("/healthz answers beside 300 idle connections");
    assert!(status.contains("200"), "{status}");
    assert!(started.elapsed() < Duration::from_secs(3), "/healthz took {:?}", started.elapsed());
    // Headers that never end, and a body that never arrives, are cut off.
    let mut slow_head = TcpStream::connect(("127.0.0.1", port)).unwrap();
    slow_head.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").unwrap();
    let mut slow_body = TcpStream::connect(("127.0.0.1", port)).unwrap();
    slow_body
        .write_all(b"POST /api/v1/session HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"us")
        .unwrap();
    let head = std::thread::spawn(move || closed_after(slow_head, Duration::from_secs(30)));
    let body = std::thread::spawn(move || {
        let mut s = slow_body;
        s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
        let started = Instant::now();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        (started.elapsed(), out)
    });
    // The idle connections were closed too (after the header timeout), so there is room again.
    let first = idle.remove(0);
    let idle_closed = closed_after(first, Duration::from_secs(30));
    assert!(
        idle_closed.is_some_and(|t| t < Duration::from_secs(15)),
        "an idle connection stayed open: {idle_closed:?}"
    );
    let head = head.join().unwrap();
    assert!(head.is_some_and(|t| t < Duration::from_secs(15)), "slow headers were held: {head:?}");
    let (took, answer) = body.join().unwrap();
    assert!(took < Duration::from_secs(30), "a slow body was held {took:?}");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    let status = get(port, "/healthz").unwrap();
    assert!(status.contains("200"), "{status}");
}
