//! End-to-end tests of `commerce up`: against fake services written in Python (crashes,
//! restarts, stopping), and against the real services (the whole system starts, answers
//! and stops).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Generous: Python start-up is slow on a busy machine. Every wait polls against it.
const TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);

/// A fake service: serves 200 on /ready and /health, prints its pid, exits 0 on SIGTERM.
const FAKE_SERVICE: &str = r#"#!/usr/bin/env python3
import http.server, os, signal, sys

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path in ("/ready", "/health") else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

def stop(*_):
    print("stopping", flush=True)
    sys.exit(0)

signal.signal(signal.SIGTERM, stop)
server = http.server.HTTPServer(("127.0.0.1", int(os.environ["__PORT_VAR__"])), Handler)
print(f"pid={os.getpid()}", flush=True)
print(f"workers={os.environ.get('COMMERCE__RUNTIME__WORKER_THREADS', 'unset')}", flush=True)
print(f"listening on {server.server_port}", file=sys.stderr, flush=True)
server.serve_forever()
"#;

/// Name and config key (as in `COMMERCE__<KEY>__PORT`) of the services under test.
const SERVICES: [(&str, &str); 3] = [
    ("gateway", "GATEWAY"),
    ("order-svc", "ORDER"),
    ("payment-svc", "PAYMENT"),
];

#[test]
fn supervises_restarts_and_stops_services() {
    let mut fx = Fixture::new("supervise");
    let ports = free_ports(SERVICES.len());
    let mut cmd = fx.commerce();
    cmd.args(["--only", "gateway,order-svc,payment-svc"]);
    cmd.args(["--grace-period-secs", "10"]);
    cmd.env_remove("COMMERCE__RUNTIME__WORKER_THREADS");
    for ((name, key), port) in SERVICES.iter().zip(&ports) {
        fx.write_fake(name, key);
        cmd.env(format!("COMMERCE__{key}__PORT"), port.to_string());
    }
    let mut out = fx.start(cmd);

    // 1 and 2: prefixed output from stdout and stderr, readiness, then the summary. Each
    // service is given its share of the cores for its runtime.
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let workers = format!("workers={}", (cores / SERVICES.len()).max(1));
    let mut pids = HashMap::new();
    for ((name, _), port) in SERVICES.iter().zip(&ports) {
        let pid = out.wait_for_pid(0, name);
        fx.pids.push(pid);
        pids.insert(*name, pid);
        out.wait_for(0, &workers, |line| line == prefixed(name, &workers));
        let listening = format!("listening on {port}");
        out.wait_for(0, &listening, |line| line == prefixed(name, &listening));
        out.wait_for_ready(0, name);
    }
    let (_, summary) = out.wait_for(0, "summary", |line| {
        message(line).starts_with("all 3 services ready in ")
    });
    let gateway = format!("— gateway at http://127.0.0.1:{}", ports[0]);
    assert!(summary.ends_with(&gateway), "{summary}");

    // 3: a crashed service is reported, restarted, and becomes ready again.
    let victim = "order-svc";
    let old_pid = pids[victim];
    kill(Pid::from_raw(old_pid), Signal::SIGKILL).expect("kill the fake order-svc");
    let crash = format!("{victim} exited with signal SIGKILL; restarting in 1s");
    let (crashed_at, _) = out.wait_for(0, &crash, |line| line == prefixed("commerce", &crash));
    let new_pid = out.wait_for_pid(crashed_at, victim);
    fx.pids.push(new_pid);
    assert_ne!(new_pid, old_pid);
    pids.insert(victim, new_pid);
    out.wait_for_ready(crashed_at, victim);

    // 4: SIGTERM stops every child gracefully, then the supervisor exits 0.
    let supervisor = fx.supervisor_pid();
    kill(supervisor, Signal::SIGTERM).expect("SIGTERM the supervisor");
    for (name, _) in SERVICES {
        let exit = format!("{name} exited with code 0");
        out.wait_for(crashed_at, &exit, |line| {
            line == prefixed("commerce", &exit)
        });
    }
    let status = fx.wait_supervisor();
    assert!(status.success(), "{status}\n{}", out.lines.join("\n"));
    for (name, pid) in pids {
        wait_until(&format!("{name} (pid {pid}) to be gone"), || !is_alive(pid));
    }
    fx.pids.clear();
}

/// Every service, with the key of its `COMMERCE__<KEY>__PORT` variable.
const ALL_SERVICES: [(&str, &str); 8] = [
    ("gateway", "GATEWAY"),
    ("user-svc", "USER"),
    ("product-svc", "PRODUCT"),
    ("order-svc", "ORDER"),
    ("payment-svc", "PAYMENT"),
    ("inventory-svc", "INVENTORY"),
    ("notification-svc", "NOTIFICATION"),
    ("file-svc", "FILE"),
];

/// `make up` in a test: the real binaries (built by `cargo build --bins`, which `make
/// test` runs first) in a namespace of their own, on free ports.
#[test]
fn the_whole_system_starts_answers_and_stops() {
    let env = testkit::TestEnv::new();
    let mut fx = Fixture::new("system");
    let bin_dir = PathBuf::from(env!("CARGO_BIN_EXE_commerce"))
        .parent()
        .expect("target dir")
        .to_path_buf();
    let ports = free_ports(ALL_SERVICES.len());
    let mut cmd = Fixture::commerce_in(&bin_dir);
    cmd.env("COMMERCE__NAMESPACE", &env.namespace);
    cmd.env("COMMERCE__LOG__FORMAT", "json");
    for ((_, key), port) in ALL_SERVICES.iter().zip(&ports) {
        cmd.env(format!("COMMERCE__{key}__PORT"), port.to_string());
    }
    let mut out = fx.start(cmd);
    out.wait_for(0, "all services ready", |line| {
        message(line).starts_with("all 8 services ready in ")
    });

    for ((name, _), port) in ALL_SERVICES.iter().zip(&ports) {
        for path in ["/health", "/ready", "/metrics"] {
            let (status, body) = http_get(*port, path);
            assert_eq!(status, 200, "{name} {path}: {body}");
            if path == "/metrics" {
                assert!(
                    body.contains("http_requests_total"),
                    "{name} {path}: {body}"
                );
            }
        }
        let (status, body) = http_get(*port, "/no-such-route");
        assert_eq!(status, 404, "{name}");
        assert!(body.contains(r#""status":404"#), "{name}: {body}");
    }

    kill(fx.supervisor_pid(), Signal::SIGTERM).expect("SIGTERM the supervisor");
    for (name, _) in ALL_SERVICES {
        let exit = format!("{name} exited with code 0");
        out.wait_for(0, &exit, |line| line == prefixed("commerce", &exit));
    }
    let status = fx.wait_supervisor();
    assert!(status.success(), "{status}\n{}", out.lines.join("\n"));
}

/// A plain HTTP/1.0 GET: (status, body).
fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::Write as _;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(TIMEOUT))
        .expect("read timeout");
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, body)| body)
        .to_owned();
    (status, body)
}

#[test]
fn missing_executables_are_reported() {
    let mut fx = Fixture::new("missing");
    let mut cmd = fx.commerce();
    cmd.args(["--only", "order-svc"]).stderr(Stdio::piped());
    fx.start(cmd);
    let status = fx.wait_supervisor();
    let mut stderr = String::new();
    if let Some(pipe) = fx
        .supervisor
        .as_mut()
        .and_then(|child| child.stderr.as_mut())
    {
        pipe.read_to_string(&mut stderr).expect("read stderr");
    }
    assert!(!status.success());
    assert!(stderr.contains("order-svc"), "{stderr}");
    assert!(stderr.contains("cargo build --bins"), "{stderr}");
}

/// A temp dir of fake services plus everything started from it; cleans up even on failure.
struct Fixture {
    dir: PathBuf,
    supervisor: Option<Child>,
    /// Fake service pids, killed on drop in case the supervisor died without stopping them.
    pids: Vec<i32>,
}

impl Fixture {
    fn new(test: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("commerce-up-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self {
            dir,
            supervisor: None,
            pids: Vec::new(),
        }
    }

    fn write_fake(&self, name: &str, port_key: &str) {
        let path = self.dir.join(name);
        let script = FAKE_SERVICE.replace("__PORT_VAR__", &format!("COMMERCE__{port_key}__PORT"));
        std::fs::write(&path, script).expect("write fake service");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("make fake service executable");
    }

    fn commerce(&self) -> Command {
        Self::commerce_in(&self.dir)
    }

    /// `commerce up` running the service executables found in `bin_dir`.
    fn commerce_in(bin_dir: &std::path::Path) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_commerce"));
        cmd.arg("up")
            .arg("--bin-dir")
            .arg(bin_dir)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        cmd
    }

    /// Starts the supervisor and streams its stdout lines from a background thread.
    fn start(&mut self, mut cmd: Command) -> Output {
        let mut child = cmd.spawn().expect("start commerce");
        let stdout = child.stdout.take().expect("piped stdout");
        self.supervisor = Some(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Output {
            rx,
            lines: Vec::new(),
        }
    }

    fn supervisor_pid(&self) -> Pid {
        let child = self.supervisor.as_ref().expect("supervisor started");
        Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"))
    }

    fn wait_supervisor(&mut self) -> ExitStatus {
        let child = self.supervisor.as_mut().expect("supervisor started");
        let mut status = None;
        wait_until("the supervisor to exit", || {
            status = child.try_wait().expect("try_wait");
            status.is_some()
        });
        status.expect("exited")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(child) = self.supervisor.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for &pid in &self.pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Everything the supervisor printed so far, and the stream of what comes next.
struct Output {
    rx: Receiver<String>,
    lines: Vec<String>,
}

impl Output {
    /// Waits for the first line at index `from` or later matching `pred`; returns it and its index.
    fn wait_for(
        &mut self,
        from: usize,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> (usize, String) {
        let deadline = Instant::now() + TIMEOUT;
        let mut next = from;
        loop {
            if let Some(i) = (next..self.lines.len()).find(|&i| pred(&self.lines[i])) {
                return (i, self.lines[i].clone());
            }
            next = next.max(self.lines.len());
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => self.lines.push(line),
                Err(RecvTimeoutError::Timeout) => {
                    self.fail(&format!("timed out waiting for {what}"))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.fail(&format!("output ended before {what}"))
                }
            }
        }
    }

    /// The pid a (re)started fake service reports.
    fn wait_for_pid(&mut self, from: usize, name: &str) -> i32 {
        let pid_prefix = prefixed(name, "pid=");
        let (_, line) = self.wait_for(from, &format!("{name}'s pid"), |line| {
            line.starts_with(&pid_prefix)
        });
        line[pid_prefix.len()..].parse().expect("numeric pid")
    }

    fn wait_for_ready(&mut self, from: usize, name: &str) {
        let ready = prefixed("commerce", &format!("{name} ready ("));
        self.wait_for(from, &format!("{name} ready"), |line| {
            line.starts_with(&ready) && line.ends_with(" ms)")
        });
    }

    fn fail(&self, reason: &str) -> ! {
        panic!("{reason}; supervisor output:\n{}", self.lines.join("\n"));
    }
}

/// A line as the supervisor prints it for `source` (a service or `commerce`), colour off.
fn prefixed(source: &str, text: &str) -> String {
    format!("{source:<16} | {text}")
}

fn message(line: &str) -> &str {
    line.split_once(" | ").map_or("", |(_, text)| text)
}

/// Distinct free ports: all listeners are held until every port is chosen.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

fn is_alive(pid: i32) -> bool {
    kill(Pid::from_raw(pid), None).is_ok()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(POLL);
    }
}

#[test]
fn keys_rotate_adds_a_key_that_signs() {
    let dir = std::env::temp_dir().join(format!("commerce-keys-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let commerce = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_commerce"))
            .args(["keys", "--dir"])
            .arg(&dir)
            .args(args)
            .output()
            .expect("run commerce keys");
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).expect("utf-8")
    };
    let first = commerce(&["rotate"]);
    let second = commerce(&["rotate"]);
    let listed = commerce(&["list"]);
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 2, "{listed}");
    assert!(
        lines[0].ends_with("verifies") && lines[1].ends_with("signs"),
        "{listed}"
    );
    let newest = lines[1].split_whitespace().next().expect("id");
    assert!(second.contains(newest) && !first.contains(newest));
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
