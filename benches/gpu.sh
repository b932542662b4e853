#!/usr/bin/env bash
# GPU check and benchmark, in one run (about 2-3 minutes on an H200):
#   1. build (skipped when PS_BIN_DIR holds prebuilt binaries, see below),
#   2. CUDA-vs-CPU parity tests (every kernel, every model),
#   3. kernel micro-benchmarks: gather/scatter GB/s next to the device's
#      copy bandwidth measured in the same run,
#   4. worker compute samples/s, CPU vs GPU, on ctr26, the DeepFM example,
#      the multi-task MMoE and cross-attention examples, the multi-class DNN
#      and the digits ResNet
#      and Inception examples,
#   5. end-to-end `ps-worker local` samples/s, CPU vs GPU (2 servers x 2 workers),
#      and the digits examples' top-1 accuracy trained on each.
#
# Usage: benches/gpu.sh [RESULTS_DIR]        (default: target/gpu-bench)
# Prebuilt: PS_BIN_DIR=DIR with ps-worker, ps-bench, test-cuda and
# test-ps_worker (the release test binaries of ps-worker's `cuda` test and lib).
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-target/gpu-bench}
mkdir -p "$RESULTS"
JSON="$RESULTS/results.jsonl"
: > "$JSON"

# cudarc loads libcuda and libnvrtc (CUDA 13) at run time: find nvrtc if the
# loader does not.
if ! ldconfig -p 2>/dev/null | grep -q 'libnvrtc.so.13'; then
  for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-13*/lib64; do
    if ls "$dir"/libnvrtc.so.13* >/dev/null 2>&1; then
      export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
      break
    fi
  done
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

if [ -n "${PS_BIN_DIR:-}" ]; then
  BIN=$PS_BIN_DIR
  TEST_CUDA="$BIN/test-cuda"
  TEST_LIB="$BIN/test-ps_worker"
else
  cargo build --release -p ps-worker -p ps-benches
  BIN=target/release
  bins=$(cargo test --release -p ps-worker --no-run --message-format=json 2>/dev/null |
    python3 -c 'import sys, json
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["target"]["name"], m["executable"])')
  TEST_CUDA=$(echo "$bins" | awk '$1 == "cuda" {print $2}')
  TEST_LIB=$(echo "$bins" | awk '$1 == "ps_worker" {print $2}')
fi

echo "== parity: every kernel, every model (CUDA vs CPU, relative error <= 1e-4)"
# A parity failure is reported at the end; the benchmarks still run.
status=0
"$TEST_CUDA" --nocapture --test-threads 1 || status=1
"$TEST_LIB" cuda --nocapture --test-threads 1 || status=1

echo "== kernels"
"$BIN/ps-bench" kernels --device cuda:0 | tee -a "$JSON"

echo "== worker compute (forward + backward, parameters in memory)"
"$BIN/ps-bench" gen-related-tasks --rows 20000 --out target/related/train.ffm
"$BIN/ps-bench" gen-related-tasks --rows 5000 --seed 2 --out target/related/test.ffm
"$BIN/ps-bench" gen-tasks --rows 20000 --out target/tasks/train.ffm
"$BIN/ps-bench" gen-tasks --rows 5000 --seed 2 --out target/tasks/test.ffm
"$BIN/ps-bench" gen-classes --rows 20000 --out target/classes/train.ffm
"$BIN/ps-bench" gen-classes --rows 5000 --seed 2 --out target/classes/test.ffm
for dev in cpu cuda:0; do
  "$BIN/ps-bench" compute --config examples/multitask-mmoe.toml --data job --device "$dev" --steps 30 | tee -a "$JSON"
  "$BIN/ps-bench" compute --config examples/ctr26.toml --data ctr26 --device "$dev" --steps 30 | tee -a "$JSON"
  "$BIN/ps-bench" compute --config examples/a9a-deepfm.toml --data job --device "$dev" --steps 30 | tee -a "$JSON"
  "$BIN/ps-bench" compute --config examples/multitask-cross-attention.toml --data job --device "$dev" --steps 30 | tee -a "$JSON"
  "$BIN/ps-bench" compute --config examples/multiclass-dnn.toml --data job --device "$dev" --steps 30 | tee -a "$JSON"
  for model in resnet inception; do
    for batch in 32 128; do
      "$BIN/ps-bench" compute --config "examples/digits-$model.toml" --data job --device "$dev" \
        --batch-size "$batch" --steps 30 | tee -a "$JSON"
    done
  done
done

echo "== end to end: ps-worker local, 2 servers x 2 workers"
"$BIN/ps-bench" gen-ctr26 --rows 400000 --out target/ctr26/train.libffm
for dev in cpu cuda:0; do
  RUST_LOG=warn "$BIN/ps-worker" local --config examples/ctr26.toml --device "$dev" \
    --servers 2 --workers 2 --report "$RESULTS/ctr26-${dev/:/}.json"
  RUST_LOG=warn "$BIN/ps-worker" local --config examples/a9a-deepfm.toml --device "$dev" \
    --servers 2 --workers 2 --report "$RESULTS/deepfm-${dev/:/}.json"
  for model in resnet inception; do
    RUST_LOG=warn "$BIN/ps-worker" local --config "examples/digits-$model.toml" --device "$dev" \
      --servers 2 --workers 2 --report "$RESULTS/digits-$model-${dev/:/}.json"
  done
done
for f in "$RESULTS"/ctr26-*.json "$RESULTS"/deepfm-*.json; do
  tr -d '\n ' < "$f" >> "$JSON"
  echo >> "$JSON"
done
echo "== results in $JSON"
if [ "$status" -ne 0 ]; then
  echo "PARITY TESTS FAILED (see above)"
fi
exit "$status"
