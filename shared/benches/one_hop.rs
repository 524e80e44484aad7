//! One hop through the kernel: a transaction commits in service A (a row and an event in
//! its outbox), the relay publishes it, service B handles it in its own transaction and
//! commits. Reports hops/s and the latency from A's commit to B's commit, next to the
//! floor measured in the same run: pgbench single-row insert commits at the same
//! concurrency.
//!
//!     cargo bench -p shared --bench one_hop
//!
//! Environment: BENCH_CONCURRENCY (writers in flight, a list; default 1,8,32),
//! BENCH_SECONDS (measured per level, default 20), BENCH_WARMUP_SECONDS (default 3),
//! BENCH_FLOOR=0 to skip pgbench (scripts/broker-restart-check.sh does).

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Deserialize;
use shared::messaging::{
    Broker, Consumer, Envelope, Handler, HandlerError, NewEvent, Observer, Outbox, Relay,
};
use sqlx::PgConnection;
use testkit::TestEnv;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const PING: &str = "bench.ping";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Deserialize)]
struct Ping {
    id: Uuid,
}

struct RecordPong;

#[async_trait]
impl Handler for RecordPong {
    fn event_type(&self) -> &'static str {
        PING
    }

    fn name(&self) -> &'static str {
        "record_pong"
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Envelope) -> Result<(), HandlerError> {
        let ping: Ping = event.data_as()?;
        sqlx::query("INSERT INTO pongs (id) VALUES ($1)")
            .bind(ping.id)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }
}

/// Wakes each writer when B has committed its ping.
#[derive(Default)]
struct Arrivals {
    waiting: Mutex<HashMap<Uuid, oneshot::Sender<Instant>>>,
}

impl Arrivals {
    fn expect(&self, ping: Uuid) -> oneshot::Receiver<Instant> {
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().expect("arrivals").insert(ping, tx);
        rx
    }
}

#[async_trait::async_trait]
impl Observer for Arrivals {
    async fn committed(&self, event: &Envelope) {
        let at = Instant::now();
        let ping = event.data_as::<Ping>().map(|p| p.id);
        if let Ok(ping) = ping
            && let Some(waiter) = self.waiting.lock().expect("arrivals").remove(&ping)
        {
            let _ = waiter.send(at);
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

struct Floor {
    tps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// pgbench: single-row insert transactions, `clients` at a time, for `seconds`.
fn pgbench(database: &str, clients: u64, seconds: u64) -> anyhow::Result<Floor> {
    let dir = std::env::temp_dir().join(format!("one-hop-pgbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let script = dir.join("insert.sql");
    std::fs::write(&script, "INSERT INTO floor DEFAULT VALUES;\n")?;
    let output = Command::new("pgbench")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-n", "-j", "2"])
        .args(["-c", &clients.to_string(), "-T", &seconds.to_string()])
        .arg("-f")
        .arg(&script)
        .arg("-l")
        .arg(format!("--log-prefix={}", dir.join("log").display()))
        .arg(database)
        .current_dir(&dir)
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "pgbench failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let tps = stdout
        .lines()
        .find(|l| l.starts_with("tps = "))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no tps in pgbench output:\n{stdout}"))?;
    // Per-transaction logs: the third column is the latency in microseconds.
    let mut latencies = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("log"))
        {
            for line in std::fs::read_to_string(&path)?.lines() {
                if let Some(us) = line
                    .split_whitespace()
                    .nth(2)
                    .and_then(|v| v.parse::<f64>().ok())
                {
                    latencies.push(us / 1000.0);
                }
            }
        }
    }
    std::fs::remove_dir_all(&dir)?;
    latencies.sort_by(f64::total_cmp);
    Ok(Floor {
        tps,
        p50_ms: percentile(&latencies, 50.0),
        p99_ms: percentile(&latencies, 99.0),
    })
}

/// One hop run: (hops per second, sorted latencies in ms, events sent, rows in B).
async fn hops(
    test_env: &TestEnv,
    concurrency: u64,
    seconds: u64,
    warmup: u64,
) -> anyhow::Result<(f64, Vec<f64>, u64, i64)> {
    let mut settings = test_env.settings();
    settings.postgres.max_connections = u32::try_from(concurrency).unwrap_or(8) + 4;
    settings.messaging.retry_delays_ms = vec![1_000];
    test_env.track(&settings);
    let a = shared::db::bootstrap(&settings, "hopa", None).await?;
    let b = shared::db::bootstrap(&settings, "hopb", None).await?;
    sqlx::query("CREATE TABLE pings (id UUID PRIMARY KEY, at TIMESTAMPTZ NOT NULL DEFAULT now())")
        .execute(&a)
        .await?;
    sqlx::query("CREATE TABLE pongs (id UUID PRIMARY KEY, at TIMESTAMPTZ NOT NULL DEFAULT now())")
        .execute(&b)
        .await?;

    let arrivals = Arc::new(Arrivals::default());
    let stop = CancellationToken::new();
    let topology_a = test_env.topology("hopa");
    let broker_a = Broker::new(settings.amqp.url.clone(), "bench-a");
    let broker_b = Broker::new(settings.amqp.url.clone(), "bench-b");
    let relay = Relay::new(
        a.clone(),
        broker_a.clone(),
        &topology_a,
        Duration::from_millis(settings.messaging.outbox_poll_interval_ms),
        settings.messaging.outbox_batch_size,
    );
    let consumer = Consumer::new(
        test_env.topology("hopb"),
        broker_b.clone(),
        b.clone(),
        &settings.messaging,
        vec![Arc::new(RecordPong)],
    )?
    .observer(arrivals.clone());
    consumer.declare().await?;
    let relay_task = tokio::spawn(relay.run(stop.clone()));
    let consumer_task = tokio::spawn(Arc::new(consumer).run(stop.clone()));

    // Closed loop, like pgbench's clients: each writer has one hop in flight at a time.
    let outbox = Outbox::new(&topology_a);
    let window_start = Instant::now() + Duration::from_secs(warmup);
    let window_end = window_start + Duration::from_secs(seconds);
    let mut writers = Vec::new();
    for _ in 0..concurrency {
        let (a, outbox, arrivals) = (a.clone(), outbox.clone(), arrivals.clone());
        writers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut sent = 0u64;
            while Instant::now() < window_end {
                let ping = Uuid::now_v7();
                let arrived = arrivals.expect(ping);
                let mut tx = a.begin().await?;
                sqlx::query("INSERT INTO pings (id) VALUES ($1)")
                    .bind(ping)
                    .execute(&mut *tx)
                    .await?;
                outbox
                    .enqueue(
                        &mut tx,
                        NewEvent::new(PING, ping, serde_json::json!({"id": ping}))?,
                    )
                    .await?;
                tx.commit().await?;
                let committed = Instant::now();
                sent += 1;
                let received = tokio::time::timeout(Duration::from_secs(30), arrived)
                    .await
                    .map_err(|_| anyhow::anyhow!("ping {ping} not handled within 30 s"))??;
                if committed >= window_start && received < window_end {
                    latencies.push(received.saturating_duration_since(committed));
                }
            }
            anyhow::Ok((sent, latencies))
        }));
    }
    let mut sent = 0;
    let mut in_window = Vec::new();
    for writer in writers {
        let (n, latencies) = writer.await??;
        sent += n;
        in_window.extend(latencies.iter().map(|l| l.as_secs_f64() * 1000.0));
    }
    let pongs: i64 = sqlx::query_scalar("SELECT count(*) FROM pongs")
        .fetch_one(&b)
        .await?;
    stop.cancel();
    let _ = relay_task.await;
    let _ = consumer_task.await;
    broker_a.close().await;
    broker_b.close().await;
    a.close().await;
    b.close().await;
    in_window.sort_by(f64::total_cmp);
    let per_second = in_window.len() as f64 / seconds as f64;
    Ok((per_second, in_window, sent, pongs))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let levels: Vec<u64> = std::env::var("BENCH_CONCURRENCY")
        .unwrap_or_else(|_| "1,8,32".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    let seconds = env_or("BENCH_SECONDS", 20);
    let warmup = env_or("BENCH_WARMUP_SECONDS", 3);

    println!(
        "| concurrency | one hop: hops/s | p50 ms | p99 ms | floor: pgbench commits/s | p50 ms | p99 ms | hops / floor commits | all delivered |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for concurrency in levels {
        // A namespace per level: fresh tables, queues and outbox each time.
        let test_env = TestEnv::new();
        let floor_pool = test_env.database("floor").await;
        sqlx::query(
            "CREATE TABLE floor (id BIGSERIAL PRIMARY KEY, at TIMESTAMPTZ NOT NULL DEFAULT now())",
        )
        .execute(&floor_pool)
        .await?;
        floor_pool.close().await;
        let floor = if env_or("BENCH_FLOOR", 1) == 0 {
            Floor {
                tps: f64::NAN,
                p50_ms: f64::NAN,
                p99_ms: f64::NAN,
            }
        } else {
            eprintln!("concurrency {concurrency}: pgbench for {seconds} s …");
            pgbench(
                &format!("{}_floor", test_env.namespace),
                concurrency,
                seconds,
            )?
        };
        eprintln!("concurrency {concurrency}: one hop for {warmup} + {seconds} s …");
        let (per_second, latencies, sent, pongs) =
            hops(&test_env, concurrency, seconds, warmup).await?;
        println!(
            "| {concurrency} | {per_second:.0} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} | {:.3} | {} ({sent} sent) |",
            percentile(&latencies, 50.0),
            percentile(&latencies, 99.0),
            floor.tps,
            floor.p50_ms,
            floor.p99_ms,
            per_second / floor.tps,
            if pongs == i64::try_from(sent).unwrap_or(-1) {
                "yes"
            } else {
                "NO"
            },
        );
    }
    println!();
    println!(
        "peak RSS of the benchmark process (relay, consumer and writers of both services; \
         pgbench excluded): {:.0} MiB",
        peak_rss_mib()
    );
    Ok(())
}
