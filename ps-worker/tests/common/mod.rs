//! The harness every process test shares: real `ps-server` binaries on
//! loopback ports (started, read for readiness, killed on drop), their
//! Stats, temporary folders, the peer token replication needs, and the
//! counting table whose rows count the pushes applied to them.
//!
//! - [`workers`]: `ps-worker` processes on the a9a job, and their reports.
//! - [`etcd`]: real etcd clusters and `ps-server --etcd` processes.
//! - [`pki`]: test certificates.

#![allow(dead_code)] // each test crate uses a part of it
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

pub mod etcd;
pub mod pki;
pub mod workers;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Path of a workspace binary. `ps-server` belongs to another package, so
/// cargo does not rebuild it for these tests: build it (once per test
/// process; a no-op when fresh) so a stale binary is never tested.
pub fn binary(name: &str) -> PathBuf {
    static BUILD_SERVER: std::sync::Once = std::sync::Once::new();
    if name == "ps-worker" {
        return PathBuf::from(env!("CARGO_BIN_EXE_ps-worker"));
    }
    // Integration tests live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap().to_path_buf();
    BUILD_SERVER.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-p", "ps-server", "--bin", "ps-server"]);
        // cargo gives this test process the variables of the ps-worker
        // package. Inherited, they make build scripts that watch them (ring
        // watches CARGO_MANIFEST_DIR) look dirty, and ring, rustls, tonic
        // and the workspace crates recompile here and again on the next
        // outer build.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if is_package_variable(&key) {
                build.env_remove(key.as_ref());
            }
        }
        if profile_dir.ends_with("release") {
            build.arg("--release");
        }
        assert!(
            build.status().unwrap().success(),
            "building ps-server failed"
        );
    });
    profile_dir.join(name)
}

/// Variables cargo sets for one package's test binary (not the ones that
/// configure cargo itself, such as `CARGO_HOME` or `CARGO_TARGET_DIR`).
fn is_package_variable(key: &str) -> bool {
    const EXACT: [&str; 8] = [
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "OUT_DIR",
    ];
    EXACT.contains(&key) || key.starts_with("CARGO_PKG_") || key.starts_with("CARGO_BIN_EXE_")
}

/// A `ps-server` child process, killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: String,
    /// Its stdout, past the `listening on` line.
    pub stdout: BufReader<std::process::ChildStdout>,
    /// Lines printed before `listening on` (e.g. `restored ...`).
    pub before: Vec<String>,
}

impl Server {
    pub fn start(shard: u32, shards: u32) -> Server {
        Self::start_with(shard, shards, &[])
    }

    pub fn start_with(shard: u32, shards: u32, extra: &[&str]) -> Server {
        let mut child = Command::new(binary("ps-server"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--shard-id",
                &shard.to_string(),
                "--num-shards",
                &shards.to_string(),
            ])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // Readiness: the server prints its bound address once it listens.
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut before = Vec::new();
        let addr = loop {
            let mut line = String::new();
            assert!(
                stdout.read_line(&mut line).unwrap() > 0,
                "ps-server exited before listening; it printed {before:?}"
            );
            match line.trim().strip_prefix("listening on ") {
                Some(addr) => break addr.to_string(),
                None => before.push(line.trim().to_string()),
            }
        };
        Server {
            child,
            addr,
            stdout,
            before,
        }
    }

    /// Reads stdout until a line starting with `prefix`; returns that line.
    pub fn wait_for_line(&mut self, prefix: &str) -> String {
        loop {
            let mut line = String::new();
            assert!(
                self.stdout.read_line(&mut line).unwrap() > 0,
                "ps-server closed stdout before printing {prefix:?}"
            );
            if line.starts_with(prefix) {
                return line.trim().to_string();
            }
        }
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh folder for one test.
pub fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ps-proc-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Shard `addr`'s Stats, over a fresh connection.
pub fn stats_of(addr: &str) -> ps_common::pb::StatsResponse {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            ps_common::pb::parameter_server_client::ParameterServerClient::connect(format!(
                "http://{addr}"
            ))
            .await
            .unwrap()
            .stats(ps_common::pb::StatsRequest {})
            .await
            .unwrap()
            .into_inner()
        })
}

/// A sparse table of zeros trained by SGD with rate 1: a gradient of -1
/// adds exactly 1, so rows count the pushes applied to them.
pub fn counting_table(name: &str, dim: u32) -> ps_common::TableSpec {
    use ps_common::{InitializerSpec, OptimizerSpec, TableKind, TableSpec};
    TableSpec {
        name: name.into(),
        kind: TableKind::Sparse,
        dim,
        initializer: InitializerSpec::Zeros,
        optimizer: OptimizerSpec::sgd(1.0),
        seed: 0,
        lifecycle: Default::default(),
    }
}

/// Resident memory of process `pid`, in bytes (Linux).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// The peer token of the tests' replicated servers.
pub const PEER_TOKEN: &str = "peer-token-of-the-process-tests";

/// A file holding [`PEER_TOKEN`], in `dir`; its path as a flag value.
pub fn peer_token_file(dir: &Path) -> String {
    let file = dir.join("peer.token");
    std::fs::write(&file, PEER_TOKEN).unwrap();
    file.to_str().unwrap().to_string()
}

impl Server {
    /// A primary of shard `shard` of `shards` that takes backups (it holds
    /// the peer token in `dir`).
    pub fn primary(dir: &Path, shard: u32, shards: u32) -> Server {
        Server::start_with(shard, shards, &["--peer-token-file", &peer_token_file(dir)])
    }

    /// A backup of `primary` (shard `shard` of `shards`), joined when this returns.
    pub fn backup_of(dir: &Path, primary: &Server, shard: u32, shards: u32) -> Server {
        let mut backup = Server::start_with(
            shard,
            shards,
            &[
                "--peer-token-file",
                &peer_token_file(dir),
                "--join",
                &primary.addr,
            ],
        );
        let joined = backup.wait_for_line("joined ");
        assert!(joined.contains("as backup through write"), "{joined}");
        backup
    }

    /// Sends `signal` (e.g. `-STOP`) to the process.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args([signal, &pid])
                .status()
                .unwrap()
                .success()
        );
    }
}
