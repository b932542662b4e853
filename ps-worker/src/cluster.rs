//! `LocalCluster`: N real shards served over loopback gRPC inside this
//! process, for `ps-worker local` and for tests.
//!
//! Each shard is the same `ps_server::run` a `ps-server` process runs, bound
//! to `127.0.0.1:0`; the cluster hands out the addresses, direct handles to
//! the shards' stores (for assertions), and shuts every shard down when
//! dropped.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ps_common::PsError;
use ps_server::auth::Auth;
use ps_server::server::ServeError;
use ps_server::{Limits, ServerConfig, Shard};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::client::{ClientConfig, PsClient};

/// Shards running in this process on loopback ports.
#[derive(Debug)]
pub struct LocalCluster {
    addrs: Vec<String>,
    shards: Vec<Arc<Shard>>,
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<Result<(), ServeError>>>,
    backups: Vec<(String, Arc<Shard>)>,
    followers: Vec<(String, Arc<Shard>)>,
    /// The shards' credentials: no worker token, and a random peer token
    /// so that backups can join (see [`LocalCluster::add_backups`]).
    auth: Auth,
}

impl LocalCluster {
    /// Starts `num_shards` shards with the given limits. Each is accepting
    /// connections when this returns (its listener is bound).
    pub async fn start(num_shards: u32, limits: Limits) -> std::io::Result<LocalCluster> {
        Self::start_with_checkpoints(num_shards, limits, None).await
    }

    /// Like [`LocalCluster::start`], with every shard writing checkpoints under `checkpoint_dir`.
    pub async fn start_with_checkpoints(
        num_shards: u32,
        limits: Limits,
        checkpoint_dir: Option<PathBuf>,
    ) -> std::io::Result<LocalCluster> {
        let shards = (0..num_shards).map(|i| Shard::new(i, num_shards)).collect();
        Self::serve(shards, limits, checkpoint_dir).await
    }

    /// Shards restored from checkpoint directory `dir` (`DIR/NAME`, holding
    /// `shard-I.bin` for every shard), each file verified.
    pub async fn restore(dir: &Path, limits: Limits) -> Result<LocalCluster, PsError> {
        let num_shards = ps_server::checkpoint::shard_count(dir)?;
        let shards = (0..num_shards)
            .map(|i| Shard::restore(ps_server::checkpoint::load(dir, i, num_shards)?))
            .collect::<Result<Vec<_>, PsError>>()?;
        Self::serve(shards, limits, None)
            .await
            .map_err(|e| PsError::Internal(format!("cannot start local servers: {e}")))
    }

    async fn serve(
        shards: Vec<Shard>,
        limits: Limits,
        checkpoint_dir: Option<PathBuf>,
    ) -> std::io::Result<LocalCluster> {
        let num_shards = shards.len() as u32;
        let mut cluster = LocalCluster {
            addrs: Vec::new(),
            shards: Vec::new(),
            stops: Vec::new(),
            tasks: Vec::new(),
            backups: Vec::new(),
            followers: Vec::new(),
            auth: Auth::default().with_peer_token(&random_token()),
        };
        for (shard_id, shard) in (0..num_shards).zip(shards) {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            cluster.addrs.push(listener.local_addr()?.to_string());
            let shard = Arc::new(shard);
            let (stop, stopped) = oneshot::channel::<()>();
            let config = ServerConfig {
                limits,
                checkpoint_dir: checkpoint_dir.clone(),
                auth: cluster.auth.clone(),
                ..ServerConfig::new(shard_id, num_shards)
            };
            cluster.tasks.push(tokio::spawn(ps_server::run(
                listener,
                config,
                Arc::clone(&shard),
                async {
                    let _ = stopped.await;
                },
            )));
            cluster.shards.push(shard);
            cluster.stops.push(stop);
        }
        Ok(cluster)
    }

    /// Starts a backup for every shard and joins it to its primary (its
    /// snapshot loaded when this returns). Clients that connect afterwards
    /// learn the backups from the primaries and fail over to them.
    pub async fn add_backups(&mut self) -> Result<(), PsError> {
        let num_shards = self.shards.len() as u32;
        for shard_id in 0..num_shards {
            let (listener, addr) = bind_loopback("a backup").await?;
            let (stop, stopped) = oneshot::channel::<()>();
            let config = ServerConfig {
                auth: self.auth.clone(),
                ..ServerConfig::new(shard_id, num_shards)
            };
            let (shard, task) = ps_server::server::start_backup(
                listener,
                config,
                &self.addrs[shard_id as usize],
                std::time::Duration::from_secs(10),
                async {
                    let _ = stopped.await;
                },
            )
            .await?;
            self.tasks.push(task);
            self.stops.push(stop);
            self.backups.push((addr, shard));
        }
        Ok(())
    }

    /// Starts a read replica (`ps-server --follow`) of every shard; each is
    /// listening when this returns and loads its snapshot right after.
    pub async fn add_followers(&mut self) -> Result<(), PsError> {
        let num_shards = self.shards.len() as u32;
        for shard_id in 0..num_shards {
            let (listener, addr) = bind_loopback("a follower").await?;
            let (stop, stopped) = oneshot::channel::<()>();
            let config = ServerConfig {
                auth: self.auth.clone(),
                follow: vec![self.addrs[shard_id as usize].clone()],
                ..ServerConfig::new(shard_id, num_shards)
            };
            let (shard, task) = ps_server::server::start_follower(listener, config, async {
                let _ = stopped.await;
            });
            self.tasks.push(task);
            self.stops.push(stop);
            self.followers.push((addr, shard));
        }
        Ok(())
    }

    /// The followers' addresses and stores, in shard order (after
    /// [`LocalCluster::add_followers`]).
    pub fn followers(&self) -> &[(String, Arc<Shard>)] {
        &self.followers
    }

    /// The backups' addresses and stores, in shard order (after [`LocalCluster::add_backups`]).
    pub fn backups(&self) -> &[(String, Arc<Shard>)] {
        &self.backups
    }

    /// Shard addresses in shard order, as `--servers` takes them.
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// Direct access to shard `i`'s store.
    pub fn shard(&self, i: usize) -> &Arc<Shard> {
        &self.shards[i]
    }

    /// A client connected to every shard.
    pub async fn client(&self, config: &ClientConfig) -> Result<PsClient, PsError> {
        PsClient::connect(&self.addrs, config).await
    }

    /// Stops every shard after its in-flight requests and waits for it.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        for task in self.tasks.drain(..) {
            if let Ok(result) = task.await {
                result?;
            }
        }
        Ok(())
    }
}

/// A listener on a free loopback port, and its address; `what` names the
/// replica in the error.
async fn bind_loopback(what: &str) -> Result<(tokio::net::TcpListener, String), PsError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| PsError::Internal(format!("cannot bind {what}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| PsError::Internal(e.to_string()))?
        .to_string();
    Ok((listener, addr))
}

/// A random token (32 hex digits) for the cluster's peer calls.
fn random_token() -> String {
    use ps_common::ids::random_id;
    format!("{:016x}{:016x}", random_id(), random_id())
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
    }
}
