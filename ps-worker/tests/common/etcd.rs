//! Real etcd clusters for the coordinator tests (Debian's `etcd-server`
//! binary, installed by `.ci/run`): one or three members on loopback
//! ports with their own data folders, killed on drop; and `ps-server
//! --etcd` processes of one job.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Server, peer_token_file};

/// Whether an `etcd` binary is on PATH. Without one the coordinator tests
/// print SKIPPED, except in CI (`CI` set), where they fail: `.ci/run`
/// installs it.
pub fn etcd_available() -> bool {
    let found = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "etcd is not installed (apt-get install etcd-server; .ci/run does)"
        );
        eprintln!("SKIPPED (no etcd binary: apt-get install etcd-server)");
    }
    found
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An etcd cluster of child processes, killed on drop.
pub struct EtcdCluster {
    pub members: Vec<Option<Child>>,
    /// Client endpoints, `127.0.0.1:PORT`, in member order.
    pub endpoints: Vec<String>,
}

impl EtcdCluster {
    /// Starts `n` members with data under `dir`; returns once every one
    /// answers its health endpoint.
    pub fn start(dir: &Path, n: usize) -> EtcdCluster {
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let members = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| {
                let data = dir.join(format!("etcd-{i}"));
                std::fs::create_dir_all(&data).unwrap();
                let log = std::fs::File::create(dir.join(format!("etcd-{i}.log"))).unwrap();
                Some(
                    Command::new("etcd")
                        .args([
                            "--name",
                            &format!("m{i}"),
                            "--data-dir",
                            data.to_str().unwrap(),
                            "--listen-client-urls",
                            &format!("http://127.0.0.1:{client}"),
                            "--advertise-client-urls",
                            &format!("http://127.0.0.1:{client}"),
                            "--listen-peer-urls",
                            &format!("http://127.0.0.1:{peer}"),
                            "--initial-advertise-peer-urls",
                            &format!("http://127.0.0.1:{peer}"),
                            "--initial-cluster",
                            &initial.join(","),
                            "--initial-cluster-state",
                            "new",
                            "--heartbeat-interval",
                            "100",
                            "--election-timeout",
                            "1000",
                        ])
                        .stdout(Stdio::null())
                        .stderr(log)
                        .spawn()
                        .unwrap(),
                )
            })
            .collect();
        let cluster = EtcdCluster {
            members,
            endpoints: ports
                .iter()
                .map(|(client, _)| format!("127.0.0.1:{client}"))
                .collect(),
        };
        cluster.wait_healthy();
        cluster
    }

    fn wait_healthy(&self) {
        let job = self.job("health-check");
        // A thread of its own: the caller may be inside a runtime.
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            let runtime = runtime();
            while runtime.block_on(job.claim_num_shards(1)).is_err() {
                assert!(Instant::now() < deadline, "etcd did not come up");
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .join()
        .unwrap();
    }

    /// The endpoints as a flag value.
    pub fn flag(&self) -> String {
        self.endpoints.join(",")
    }

    /// A client of job `name`'s keys.
    pub fn job(&self, name: &str) -> ps_common::coordinator::Job {
        let etcd = ps_common::coordinator::Etcd::new(&self.endpoints).unwrap();
        ps_common::coordinator::Job::new(std::sync::Arc::new(etcd), name).unwrap()
    }

    /// Kills member `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// A runtime for the few async calls a synchronous test makes.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `ps-server --etcd` of shard `shard` of `shards` in job `job`, with a
/// 2 s lease and `extra` flags; returns once it listens.
pub fn coordinated_server(
    dir: &Path,
    etcd: &EtcdCluster,
    job: &str,
    (shard, shards): (u32, u32),
    extra: &[&str],
) -> Server {
    let mut args = vec![
        "--peer-token-file".to_string(),
        peer_token_file(dir),
        "--etcd".into(),
        etcd.flag(),
        "--job".into(),
        job.into(),
        "--lease-ttl-secs".into(),
        LEASE_TTL_SECS.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_with(shard, shards, &args)
}

/// The servers' lease in these tests.
pub const LEASE_TTL_SECS: u64 = 2;
