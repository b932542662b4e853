//! Prometheus metrics: per-RPC request counts by outcome and latency
//! histograms, and a minimal HTTP endpoint serving the text exposition
//! format (`GET /metrics`) for servers and workers alike.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The RPCs a shard serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    /// `Describe`.
    Describe,
    /// `CreateTable`.
    CreateTable,
    /// `Pull`.
    Pull,
    /// `Push`.
    Push,
    /// `Stats`.
    Stats,
    /// `Checkpoint`.
    Checkpoint,
    /// `Assign`.
    Assign,
    /// `Clock`.
    Clock,
    /// `PullMany`.
    PullMany,
    /// `PushMany`.
    PushMany,
    /// `Replicate`.
    Replicate,
    /// `Promote`.
    Promote,
    /// `Join`.
    Join,
}

const RPCS: [(Rpc, &str); 13] = [
    (Rpc::Describe, "describe"),
    (Rpc::CreateTable, "create_table"),
    (Rpc::Pull, "pull"),
    (Rpc::Push, "push"),
    (Rpc::Stats, "stats"),
    (Rpc::Checkpoint, "checkpoint"),
    (Rpc::Assign, "assign"),
    (Rpc::Clock, "clock"),
    (Rpc::PullMany, "pull_many"),
    (Rpc::PushMany, "push_many"),
    (Rpc::Replicate, "replicate"),
    (Rpc::Promote, "promote"),
    (Rpc::Join, "join"),
];

/// Upper bounds (seconds) of the latency histogram buckets.
const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

#[derive(Debug, Default)]
struct RpcStats {
    ok: AtomicU64,
    errors: AtomicU64,
    /// Non-cumulative counts per bucket, plus one for +Inf.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

/// Request outcomes and latencies of every RPC.
#[derive(Debug, Default)]
pub struct RpcMetrics {
    rpcs: [RpcStats; RPCS.len()],
}

impl RpcMetrics {
    /// Records one request.
    pub fn record(&self, rpc: Rpc, elapsed: Duration, ok: bool) {
        let stats = &self.rpcs[rpc as usize];
        let outcome = if ok { &stats.ok } else { &stats.errors };
        outcome.fetch_add(1, Ordering::Relaxed);
        let seconds = elapsed.as_secs_f64();
        let bucket = BUCKETS
            .iter()
            .position(|&b| seconds <= b)
            .unwrap_or(BUCKETS.len());
        stats.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        stats
            .sum_nanos
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Appends `ps_requests_total` and `ps_request_duration_seconds`.
    pub fn render(&self, out: &mut String) {
        out.push_str("# HELP ps_requests_total Requests served, by RPC and outcome.\n");
        out.push_str("# TYPE ps_requests_total counter\n");
        for ((_, name), stats) in RPCS.iter().zip(&self.rpcs) {
            for (status, n) in [("ok", &stats.ok), ("error", &stats.errors)] {
                let n = n.load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "ps_requests_total{{rpc=\"{name}\",status=\"{status}\"}} {n}"
                );
            }
        }
        out.push_str("# HELP ps_request_duration_seconds Time to serve a request.\n");
        out.push_str("# TYPE ps_request_duration_seconds histogram\n");
        for ((_, name), stats) in RPCS.iter().zip(&self.rpcs) {
            let mut cumulative = 0;
            for (i, count) in stats.buckets.iter().enumerate() {
                cumulative += count.load(Ordering::Relaxed);
                let le = BUCKETS.get(i).map_or("+Inf".to_string(), |b| b.to_string());
                let _ = writeln!(
                    out,
                    "ps_request_duration_seconds_bucket{{rpc=\"{name}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let sum = stats.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
            let _ = writeln!(
                out,
                "ps_request_duration_seconds_sum{{rpc=\"{name}\"}} {sum}"
            );
            let _ = writeln!(
                out,
                "ps_request_duration_seconds_count{{rpc=\"{name}\"}} {cumulative}"
            );
        }
    }
}

/// Appends one metric family with a single unlabeled sample.
pub fn gauge(out: &mut String, name: &str, kind: &str, help: &str, value: f64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// Binds `addr` and serves `render`'s text there on the current runtime
/// (see [`serve`]); returns the bound address (port 0 picks one).
pub async fn listen(
    addr: std::net::SocketAddr,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(serve(listener, render));
    Ok(bound)
}

/// Serves `GET /metrics` on `listener` with the text `render` returns, until
/// the task is dropped. Other paths get 404. One request per connection.
pub async fn serve(listener: TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            continue;
        };
        let render = Arc::clone(&render);
        tokio::spawn(async move {
            let mut request = Vec::with_capacity(1024);
            let mut buf = [0u8; 1024];
            // Read the request head (bounded: 8 KiB).
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&request);
            let (status, body) = if head.starts_with("GET /metrics ") {
                ("200 OK", render())
            } else {
                ("404 Not Found", "only GET /metrics is served\n".to_string())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_count_outcomes() {
        let m = RpcMetrics::default();
        m.record(Rpc::Pull, Duration::from_micros(50), true);
        m.record(Rpc::Pull, Duration::from_millis(3), true);
        m.record(Rpc::Pull, Duration::from_secs(10), false);
        let mut out = String::new();
        m.render(&mut out);
        assert!(
            out.contains("ps_requests_total{rpc=\"pull\",status=\"ok\"} 2"),
            "{out}"
        );
        assert!(out.contains("ps_requests_total{rpc=\"pull\",status=\"error\"} 1"));
        assert!(out.contains("ps_request_duration_seconds_bucket{rpc=\"pull\",le=\"0.0001\"} 1"));
        assert!(out.contains("ps_request_duration_seconds_bucket{rpc=\"pull\",le=\"0.005\"} 2"));
        assert!(out.contains("ps_request_duration_seconds_bucket{rpc=\"pull\",le=\"+Inf\"} 3"));
        assert!(out.contains("ps_request_duration_seconds_count{rpc=\"pull\"} 3"));
    }

    #[tokio::test]
    async fn the_endpoint_serves_metrics_and_refuses_other_paths() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve(listener, Arc::new(|| "x_total 7\n".to_string())));
        for (path, expect) in [("/metrics", "200 OK"), ("/", "404")] {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut reply = String::new();
            s.read_to_string(&mut reply).await.unwrap();
            assert!(reply.starts_with(&format!("HTTP/1.1 {expect}")), "{reply}");
            if path == "/metrics" {
                assert!(reply.ends_with("x_total 7\n"), "{reply}");
            }
        }
        server.abort();
    }
}
