//! Traffic reduction as a user sees it: each `[communication]` option moves
//! fewer bytes, measured by the same byte accounting clients and servers
//! report, and training still reaches reference quality.

#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::path::Path;
use std::time::Duration;

use common::counting_table;
use ps_common::config::{CommunicationConfig, JobConfig, WireValues};
use ps_common::pb::ValueEncoding;
use ps_server::Limits;
use ps_worker::client::{ClientConfig, WireFormat};
use ps_worker::cluster::LocalCluster;
use ps_worker::job::{self, DEFAULT_JOB, Report};

fn a9a(communication: CommunicationConfig, job_text: &str) -> Report {
    let mut job = JobConfig::from_toml(job_text, Path::new(".")).unwrap();
    job.communication = communication;
    let config = job::client_config(&job, Duration::from_secs(10));
    job::run_local(&job, 2, 2, &config, None).unwrap()
}

#[test]
fn half_precision_values_and_delta_keys_cut_the_bytes_and_keep_the_auc() {
    let base = a9a(CommunicationConfig::default(), DEFAULT_JOB);
    let small = a9a(
        CommunicationConfig {
            pull_values: WireValues::F16,
            push_values: WireValues::Bf16,
            delta_keys: true,
            ..Default::default()
        },
        DEFAULT_JOB,
    );
    let auc = small.val_auc.unwrap();
    assert!(auc >= 0.895, "AUC {auc}");
    let pull = small.pull_bytes as f64 / base.pull_bytes as f64;
    let push = small.push_bytes as f64 / base.push_bytes as f64;
    // Values shrink to half; keys (a9a ids < 124) were already 1-byte varints.
    assert!(pull < 0.75 && push < 0.75, "pull {pull:.3}, push {push:.3}");
    println!(
        "f16 pull + bf16 push + delta keys: AUC {auc:.4} (f32 {:.4}); bytes pull x{pull:.3}, push x{push:.3}",
        base.val_auc.unwrap()
    );
}

#[test]
fn the_significance_filter_pushes_fewer_rows_and_keeps_the_auc() {
    let base = a9a(CommunicationConfig::default(), DEFAULT_JOB);
    let filtered = a9a(
        CommunicationConfig {
            significance_threshold: Some(0.02),
            ..Default::default()
        },
        DEFAULT_JOB,
    );
    let auc = filtered.val_auc.unwrap();
    assert!(auc >= 0.895, "AUC {auc}");
    let fraction = filtered.pushed_row_fraction.unwrap();
    assert!(fraction < 0.9, "pushed {fraction:.3} of the rows");
    let push = filtered.push_bytes as f64 / base.push_bytes as f64;
    assert!(push < 0.9, "push bytes x{push:.3}");
    println!("significance 0.02: AUC {auc:.4}, rows pushed {fraction:.3}, push bytes x{push:.3}");
}

#[test]
fn the_row_cache_serves_hot_rows_sums_their_gradients_and_keeps_the_auc() {
    let base = a9a(CommunicationConfig::default(), DEFAULT_JOB);
    let cached = a9a(
        CommunicationConfig {
            row_cache_steps: 2,
            ..Default::default()
        },
        DEFAULT_JOB,
    );
    assert!(base.row_cache.is_none(), "off unless the job turns it on");
    let auc = cached.val_auc.unwrap();
    assert!(auc >= 0.895, "AUC {auc}");
    let cache = cached.row_cache.unwrap();
    // A row seen in two batches in a row serves 2 steps of every 3; a9a's
    // common features are in nearly every batch, its rare ones are not.
    assert!(cache.hit_rate > 0.3, "{cache:?}");
    assert!(
        cache.stats.rows_held > cache.stats.rows_flushed,
        "sums go out less often than gradients come in: {cache:?}"
    );
    let pull = cached.pull_bytes as f64 / base.pull_bytes as f64;
    let push = cached.push_bytes as f64 / base.push_bytes as f64;
    assert!(
        pull < 0.75 && push < 0.75,
        "pull x{pull:.3}, push x{push:.3}"
    );
    println!(
        "row cache 2 steps: AUC {auc:.4} (off {:.4}); hit rate {:.3}; bytes pull x{pull:.3}, push x{push:.3}",
        base.val_auc.unwrap(),
        cache.hit_rate
    );
}

#[test]
fn dense_top_k_with_error_feedback_trains_deepfm() {
    let job_text = include_str!("../../examples/a9a-deepfm.toml")
        .replace(
            "hidden = [64, 64], dropout = 0.1, batch_norm = true, residual = true",
            "hidden = [32]",
        )
        .replace("epochs = 4", "epochs = 1");
    let report = a9a(
        CommunicationConfig {
            dense_top_k: Some(0.25),
            ..Default::default()
        },
        &job_text,
    );
    let auc = report.val_auc.unwrap();
    assert!(auc >= 0.89, "AUC {auc}");
    let fraction = report.pushed_row_fraction.unwrap();
    assert!(fraction < 0.9, "pushed {fraction:.3} of the rows");
    println!("dense top-k 0.25: AUC {auc:.4}, rows pushed {fraction:.3}");
}

#[test]
fn clients_and_servers_count_the_same_payload_bytes_in_every_encoding() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let cluster = LocalCluster::start(2, Limits::default()).await.unwrap();
        for (pull_values, push_values, delta_keys) in [
            (ValueEncoding::F32, ValueEncoding::F32, false),
            (ValueEncoding::F16, ValueEncoding::Bf16, true),
        ] {
            let config = ClientConfig {
                wire: WireFormat {
                    pull_values,
                    push_values,
                    delta_keys,
                },
                ..ClientConfig::default()
            };
            let before: (u64, u64) = server_bytes(&cluster).await;
            let client = cluster.client(&config).await.unwrap();
            let table = format!("emb{}", delta_keys as u8);
            client
                .create_table(&counting_table(&table, 8))
                .await
                .unwrap();
            let keys: Vec<u64> = (0..500).map(|i| i * 7919 % 100_003).collect();
            client
                .push(&table, &keys, &vec![0.5; keys.len() * 8])
                .await
                .unwrap();
            client.flush().await.unwrap();
            let rows = client.pull(&table, &keys).await.unwrap();
            assert!(rows.iter().all(|&v| v == -0.5), "{pull_values:?}");
            let after = server_bytes(&cluster).await;
            let counted = client.bytes();
            assert_eq!(counted.pull_bytes, after.0 - before.0, "{pull_values:?}");
            assert_eq!(counted.push_bytes, after.1 - before.1, "{push_values:?}");
        }
    });
}

async fn server_bytes(cluster: &LocalCluster) -> (u64, u64) {
    let client = cluster.client(&ClientConfig::default()).await.unwrap();
    client
        .stats()
        .await
        .unwrap()
        .iter()
        .fold((0, 0), |(pull, push), s| {
            let r = s.requests.unwrap();
            (pull + r.pull_bytes, push + r.push_bytes)
        })
}

#[test]
fn small_requests_to_one_shard_travel_together() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let cluster = LocalCluster::start(2, Limits::default()).await.unwrap();
        let client = cluster.client(&ClientConfig::default()).await.unwrap();
        let names = ["a", "b", "c"];
        for name in names {
            client.create_table(&counting_table(name, 4)).await.unwrap();
        }
        let keys: Vec<u64> = (0..64).collect();
        let grads = vec![1.0f32; 64 * 4];
        let tables: Vec<_> = names
            .iter()
            .map(|&table| ps_worker::client::PushTable {
                table,
                keys: &keys,
                grads: &grads,
                lr_scale: None,
            })
            .collect();
        client.push_many(&tables).await.unwrap();
        client.flush().await.unwrap();
        let requests: Vec<(&str, &[u64])> = names.iter().map(|&n| (n, keys.as_slice())).collect();
        let rows = client.pull_many(&requests).await.unwrap();
        assert!(
            rows.iter()
                .all(|t| t.len() == 64 * 4 && t.iter().all(|&v| v == -1.0))
        );
        for stats in client.stats().await.unwrap() {
            let r = stats.requests.unwrap();
            assert_eq!(
                (r.push_many, r.pull_many),
                (1, 1),
                "one call each way per shard"
            );
            assert_eq!((r.push, r.pull), (3, 3), "carrying three tables");
        }
    });
}
