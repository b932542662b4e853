//! Shard store throughput: optimizer apply (rows/s), pull (rows/s), the
//! value codecs (MB/s), delta key encoding (keys/s) and key routing
//! (keys/s); `large_table` pulls and pushes rows of a table past the CPU's
//! caches (rows/s), apart and as a worker's step (a pull, then the push of
//! its keys).
//! Run: `cargo bench -p ps-benches --bench store`.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ps_benches::{emb_table, zipf_keys};
use ps_common::pb::ValueEncoding;
use ps_common::routing::{Placement, ShardRouter, mix64};
use ps_common::{OptimizerSpec, wire};
use ps_server::Shard;

const ROWS_PER_REQUEST: usize = 4096;

fn shard_with(optimizer: OptimizerSpec, dim: u32) -> Shard {
    let shard = Shard::new(0, 1);
    shard
        .create_table(emb_table(dim, optimizer))
        .expect("valid spec");
    shard
}

fn optimizers() -> [(&'static str, OptimizerSpec); 3] {
    [
        ("sgd", OptimizerSpec::sgd(0.05)),
        (
            "adagrad",
            OptimizerSpec::Adagrad {
                lr: 0.05,
                initial_accumulator: 0.1,
                eps: 1e-8,
                l2: 0.0,
                weight_decay: 0.0,
            },
        ),
        (
            "adam",
            OptimizerSpec::Adam {
                lr: 0.001,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                l2: 0.0,
                weight_decay: 0.0,
            },
        ),
    ]
}

fn apply(c: &mut Criterion) {
    // The allocator settings of the ps-server binary: a push's transient
    // buffers (decoded gradients, its undo record) are reused, not mapped anew.
    ps_common::memory::keep_freed_memory();
    let mut group = c.benchmark_group("apply");
    group.throughput(Throughput::Elements(ROWS_PER_REQUEST as u64));
    for dim in [16u32, 64] {
        for (name, optimizer) in optimizers() {
            let shard = shard_with(optimizer, dim);
            let keys = zipf_keys(ROWS_PER_REQUEST, 1_000_000, 7);
            let grads = vec![0.01f32; ROWS_PER_REQUEST * dim as usize];
            shard.push("emb", &keys, &grads).expect("warm-up push");
            group.bench_function(BenchmarkId::new(name, dim), |b| {
                b.iter(|| shard.push("emb", &keys, &grads).expect("push"))
            });
        }
    }
    group.finish();
}

fn pull(c: &mut Criterion) {
    let mut group = c.benchmark_group("pull");
    group.throughput(Throughput::Elements(ROWS_PER_REQUEST as u64));
    for dim in [16u32, 64] {
        let shard = shard_with(OptimizerSpec::sgd(0.05), dim);
        let keys = zipf_keys(ROWS_PER_REQUEST, 1_000_000, 7);
        let mut out = Vec::new();
        shard.pull("emb", &keys, &mut out).expect("warm-up pull");
        group.bench_function(BenchmarkId::from_parameter(dim), |b| {
            b.iter(|| {
                out.clear();
                shard.pull("emb", &keys, &mut out).expect("pull");
            })
        });
    }
    group.finish();
}

fn codec(c: &mut Criterion) {
    let values: Vec<f32> = (0..ROWS_PER_REQUEST * 16)
        .map(|i| i as f32 * 0.001)
        .collect();
    // Throughput is counted in f32 bytes for every encoding, so the MB/s
    // compare what each codec turns over.
    let mut group = c.benchmark_group("wire_values");
    group.throughput(Throughput::Bytes(values.len() as u64 * 4));
    for (name, encoding) in [
        ("f32", ValueEncoding::F32),
        ("f16", ValueEncoding::F16),
        ("bf16", ValueEncoding::Bf16),
    ] {
        let encoded = wire::encode_values(&values, encoding);
        group.bench_function(BenchmarkId::new("encode", name), |b| {
            b.iter(|| wire::encode_values(&values, encoding))
        });
        group.bench_function(BenchmarkId::new("decode", name), |b| {
            b.iter(|| wire::decode_values(&encoded, encoding).expect("decode"))
        });
    }
    group.finish();

    let mut keys = zipf_keys(ROWS_PER_REQUEST, 1_000_000, 3);
    keys.sort_unstable();
    let encoded = wire::encode_delta_keys(&keys).expect("sorted");
    let mut group = c.benchmark_group("wire_delta_keys");
    group.throughput(Throughput::Elements(keys.len() as u64));
    group.bench_function("encode", |b| {
        b.iter(|| wire::encode_delta_keys(&keys).expect("sorted"))
    });
    group.bench_function("decode", |b| {
        b.iter(|| wire::decode_delta_keys(&encoded, usize::MAX).expect("decode"))
    });
    group.finish();
}

/// Pulls and SGD pushes of 25,000 distinct keys scattered over a shard of
/// 1,000,000 rows (dim 16, 64 MB of floats: past the CPU's caches), as a
/// ctr26 step sends each of two shards: the path that prefetches rows and
/// index entries ahead. The benches above use a table that fits in cache.
fn large_table(c: &mut Criterion) {
    const ROWS: u64 = 1_000_000;
    const KEYS: usize = 25_000;
    const DIM: u32 = 16;
    let shard = shard_with(OptimizerSpec::sgd(0.05), DIM);
    let all: Vec<u64> = (0..ROWS).collect();
    let mut out = Vec::new();
    for block in all.chunks(100_000) {
        out.clear();
        shard.pull("emb", block, &mut out).expect("create rows");
    }
    // Sixteen requests in turn, so that one request's rows are not still
    // cached from its last turn.
    let requests: Vec<Vec<u64>> = (0..16u64)
        .map(|r| {
            let mut keys: Vec<u64> = (0..KEYS as u64 * 2)
                .map(|i| mix64(r << 32 | i) % ROWS)
                .collect();
            keys.sort_unstable();
            keys.dedup();
            keys.truncate(KEYS);
            // Back to a scattered order, as a client's de-duplication
            // leaves them: not the store's (segments are ranges of
            // `mix64(key)`), so a push's gradients are read out of order.
            keys.sort_unstable_by_key(|&k| mix64(k ^ 0x5555_5555_5555_5555));
            keys
        })
        .collect();
    let grads = vec![0.01f32; KEYS * DIM as usize];
    let mut group = c.benchmark_group("large_table");
    group.throughput(Throughput::Elements(KEYS as u64));
    let mut turn = 0;
    group.bench_function(BenchmarkId::new("pull", DIM), |b| {
        b.iter(|| {
            turn = (turn + 1) % requests.len();
            out.clear();
            shard.pull("emb", &requests[turn], &mut out).expect("pull");
        })
    });
    group.bench_function(BenchmarkId::new("push_sgd", DIM), |b| {
        b.iter(|| {
            turn = (turn + 1) % requests.len();
            shard.push("emb", &requests[turn], &grads).expect("push");
        })
    });
    // A worker's step: the push of the keys just pulled goes to the rows
    // the pull found (against `pull` + `push_sgd`, whose pushes mostly
    // find no pull before them and look every key up).
    group.bench_function(BenchmarkId::new("pull_then_push_sgd", DIM), |b| {
        b.iter(|| {
            turn = (turn + 1) % requests.len();
            out.clear();
            shard.pull("emb", &requests[turn], &mut out).expect("pull");
            shard.push("emb", &requests[turn], &grads).expect("push");
        })
    });
    group.finish();
}

/// A request's keys routed to shards: one at a time, and eight at a time
/// as the client's split and the shard's key check do.
fn routing(c: &mut Criterion) {
    // A ctr26 step's distinct keys (the client de-duplicates them): Zipf
    // draws with their repeats, or a few thousand keys routed over and
    // over, would let the branch predictor learn the keys' turns.
    let keys: Vec<u64> = (0..50_000).map(|i| mix64(i) >> 40).collect();
    let mut group = c.benchmark_group("routing");
    group.throughput(Throughput::Elements(keys.len() as u64));
    for shards in [2, 8, 64] {
        let router = ShardRouter::new(shards);
        group.bench_function(BenchmarkId::new("one_by_one", shards), |b| {
            b.iter(|| {
                keys.iter()
                    .map(|&k| router.shard_of(Placement::Sparse, k))
                    .collect::<Vec<u32>>()
            })
        });
        group.bench_function(BenchmarkId::new("eight_at_a_time", shards), |b| {
            b.iter(|| {
                let mut out = Vec::new();
                router.shards_of(Placement::Sparse, &keys, &mut out);
                out
            })
        });
    }
    group.finish();
}

criterion_group!(benches, apply, pull, large_table, codec, routing);
criterion_main!(benches);
