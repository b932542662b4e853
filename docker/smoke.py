#!/usr/bin/env python3
"""Manifest smoke test: run the StatefulSets', the Job's and the serving
Deployment's containers as local processes, exactly as the manifests say
(command, args, env from the ConfigMaps kustomization.yaml generates), with
pod names, ordinals and completion indices substituted, pod DNS names
mapped to 127.0.0.1 ports and the Secrets to files, then check that etcd
(3 members) makes one server of each shard primary and the other its
standby, that the job trains while the primary of shard 0 is killed
(SIGKILL) mid-training and its standby takes over, that the followers and
the serving pod answer predictions, that the servers shut down cleanly, and
that a server pod restarted on its volume restores its checkpoint.

Usage: smoke.py BIN_DIR   (a folder holding ps-server and ps-worker; the
`etcd` binary must be on PATH)
"""

import base64
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
K8S = os.path.join(HERE, "k8s")


def load(name, kind=None):
    """The manifest in `name` (of `kind`, when the file holds several)."""
    with open(os.path.join(K8S, name)) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    if kind is not None:
        docs = [d for d in docs if d["kind"] == kind]
    if len(docs) != 1:
        fail(f"{name}: expected one {kind or 'manifest'}, found {len(docs)}")
    return docs[0]


def fail(message):
    print(f"smoke: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def topology(kustomization):
    """shards and workers, checked against replicas and the Job patch."""
    literals = {}
    for generator in kustomization["configMapGenerator"]:
        if generator["name"] == "ps-topology":
            for literal in generator["literals"]:
                key, value = literal.split("=", 1)
                literals[key] = value
    shards, workers = int(literals["shards"]), int(literals["workers"])
    replicas = {r["name"]: r["count"] for r in kustomization["replicas"]}
    for name in ["ps-server-a", "ps-server-b", "ps-follower"]:
        if replicas.get(name) != shards:
            fail(f"replicas of {name} {replicas.get(name)} != shards {shards}")
    patch = yaml.safe_load(kustomization["patches"][0]["patch"])
    for op in patch:
        if op["value"] != workers:
            fail(f"Job patch {op['path']} = {op['value']} != workers {workers}")
    return literals, shards, workers


# Pod fields the manifests read through the downward API.
POD_FIELDS = {"metadata.labels['batch.kubernetes.io/controller-uid']": "smoke-job-uid"}


def read_until(proc, what, prefixes):
    """Lines `proc` prints until one starting with one of `prefixes`
    (included, last)."""
    printed = []
    while True:
        line = proc.stdout.readline()
        if not line:
            fail(f"{what} exited before printing {prefixes!r}; it printed {printed!r}")
        printed.append(line.strip())
        if line.startswith(tuple(prefixes)):
            return printed


def expand(args, env):
    """Kubernetes' $(VAR) expansion of container args."""
    out = []
    for arg in args:
        for name, value in env.items():
            arg = arg.replace(f"$({name})", value)
        out.append(arg)
    return out


def start_etcd(work, path, pods):
    """etcd.yaml's members as local processes; returns the DNS mapping of
    their client endpoints."""
    statefulset = load("etcd.yaml", "StatefulSet")
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    n = statefulset["spec"]["replicas"]
    name, service = statefulset["metadata"]["name"], statefulset["spec"]["serviceName"]
    clients = [free_port() for _ in range(n)]
    peers = [free_port() for _ in range(n)]
    client_dns = {f"{name}-{i}.{service}:2379": f"127.0.0.1:{p}" for i, p in enumerate(clients)}
    peer_dns = {f"{name}-{i}.{service}:2380": f"127.0.0.1:{p}" for i, p in enumerate(peers)}
    for i in range(n):
        pod = f"{name}-{i}"
        data = os.path.join(work, f"etcd-{i}")
        rewrites = {
            "--data-dir": {"/var/lib/etcd/data": data},
            "--listen-client-urls": {"0.0.0.0:2379": f"127.0.0.1:{clients[i]}"},
            "--advertise-client-urls": client_dns,
            "--listen-peer-urls": {"0.0.0.0:2380": f"127.0.0.1:{peers[i]}"},
            "--initial-advertise-peer-urls": peer_dns,
            "--initial-cluster": peer_dns,
        }
        env = container_env(container, {}, {"PATH": path, "PS_SMOKE_REWRITES": json.dumps(rewrites)})
        args = expand(container["args"], {"POD_NAME": pod})
        log = open(os.path.join(work, f"etcd-{i}.log"), "w")
        pods.append((subprocess.Popen(container["command"] + args, env=env,
                                      stdout=subprocess.DEVNULL, stderr=log), None))
    return client_dns


POD_FIELDS["metadata.name"] = None  # set per pod (etcd members)


def container_env(container, config_maps, extra):
    env = dict(os.environ)
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "configMapKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["configMapKeyRef"]
            env[item["name"]] = config_maps[ref["name"]][ref["key"]]
        else:
            path = item["valueFrom"]["fieldRef"]["fieldPath"]
            if path not in POD_FIELDS:
                fail(f"the smoke test does not know pod field {path}")
            if POD_FIELDS[path] is not None:
                env[item["name"]] = POD_FIELDS[path]
    env.update(extra)
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until_listening(proc, what):
    """The lines a server prints before `listening on ADDR` (which it prints
    once it serves)."""
    printed = []
    while True:
        line = proc.stdout.readline()
        if not line:
            fail(f"{what} exited before listening; it printed {printed!r}")
        if line.startswith("listening on "):
            return printed
        printed.append(line.strip())


def write_wrapper(folder, name, real):
    """A `name` on PATH that rewrites flag values as PS_SMOKE_REWRITES (JSON:
    flag -> {old: new}) says, appends PS_SMOKE_APPEND (JSON list), then runs
    the real binary: each process gets its own mapping through its env."""
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(f"""#!{sys.executable}
import json, os, sys
rewrites = json.loads(os.environ.get("PS_SMOKE_REWRITES", "{{}}"))
args, out = sys.argv[1:], []
i = 0
while i < len(args):
    out.append(args[i])
    if args[i] in rewrites and i + 1 < len(args):
        value = args[i + 1]
        for old, new in rewrites[args[i]].items():
            value = value.replace(old, new)
        out.append(value)
        i += 1
    i += 1
out += json.loads(os.environ.get("PS_SMOKE_APPEND", "[]"))
os.execv({json.dumps(real)}, [{json.dumps(real)}] + out)
""")
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


def main():
    if len(sys.argv) != 2:
        fail("usage: smoke.py BIN_DIR")
    signal.alarm(1200)  # never hang CI: the whole test ends within 20 minutes
    bins = os.path.abspath(sys.argv[1])
    if shutil.which("etcd") is None:
        fail("no etcd binary on PATH (apt-get install etcd-server)")
    kustomization = load("kustomization.yaml")
    literals, shards, workers = topology(kustomization)
    config_maps = {"ps-topology": literals}
    server_sets = [d for d in yaml.safe_load_all(open(os.path.join(K8S, "statefulset.yaml"))) if d]
    names = [d["metadata"]["name"] for d in server_sets]
    if names != ["ps-server-a", "ps-server-b"]:
        fail(f"statefulset.yaml holds {names}, not ps-server-a and ps-server-b")
    # The two server sets differ only in name and replica-set label.
    a, b = (yaml.safe_dump(d).replace(d["metadata"]["name"], "X").replace("replica-set: a", "replica-set: X")
            .replace("replica-set: b", "replica-set: X") for d in server_sets)
    if a != b:
        fail("ps-server-a and ps-server-b differ beyond their name and replica-set label")
    statefulset = server_sets[0]
    job = load("job.yaml")
    server = statefulset["spec"]["template"]["spec"]["containers"][0]
    worker = job["spec"]["template"]["spec"]["containers"][0]
    grpc_port = next(p["containerPort"] for p in server["ports"] if p["name"] == "grpc")
    probe = server["readinessProbe"]["grpc"]
    if probe["port"] != grpc_port or probe.get("service") != "ps.v1.ParameterServer":
        fail(f"readiness probe {probe} does not check ps.v1.ParameterServer on port {grpc_port}")
    if job["spec"]["completionMode"] != "Indexed":
        fail("the worker Job must be Indexed (rank = completion index)")

    work = tempfile.mkdtemp(prefix="ps-smoke-")
    shutil.copy(os.path.join(K8S, "job.toml"), os.path.join(work, "job.toml"))
    # The Secrets ps-peer-token, ps-auth-token and ps-predict-token,
    # mounted as files.
    tokens = {}
    for secret, mount in [("peer", "/etc/ps-peer/token"), ("auth", "/etc/ps-auth/token"),
                          ("predict", "/etc/ps-predict/token")]:
        tokens[mount] = os.path.join(work, f"{secret}-token")
        with open(tokens[mount], "w") as f:
            f.write(base64.b64encode(os.urandom(32)).decode())
    wrappers = os.path.join(work, "bin")
    os.makedirs(wrappers)
    for name in ["ps-server", "ps-worker"]:
        write_wrapper(wrappers, name, os.path.join(bins, name))
    write_wrapper(wrappers, "etcd", shutil.which("etcd"))
    path = wrappers + os.pathsep + os.environ["PATH"]
    service = statefulset["spec"]["serviceName"]
    pods = {f"{n}-{i}": free_port() for n in names for i in range(shards)}
    dns = {f"{pod}.{service}:{grpc_port}": f"127.0.0.1:{port}" for pod, port in pods.items()}
    running = []
    try:
        etcd_dns = start_etcd(work, path, running)

        def start_pod(pod):
            """Server pod `pod` (NAME-ORDINAL), as its StatefulSet runs it,
            on its own volume."""
            data = os.path.join(work, f"data-{pod}")
            rewrites = {
                "--listen": {f"0.0.0.0:{grpc_port}": f"127.0.0.1:{pods[pod]}"},
                "--advertise": dns,
                "--etcd": etcd_dns,
                "--checkpoint-dir": {"/data/checkpoints": data},
                "--metrics-listen": {"0.0.0.0:9100": "127.0.0.1:0"},
                "--peer-token-file": tokens,
                "--auth-token-file": tokens,
            }
            proc = run_container(server, config_maps, path, rewrites, {"HOSTNAME": pod})
            running.append((proc, data))
            until_listening(proc, pod)
            return proc, data

        servers = {pod: start_pod(pod) for pod in pods}
        primaries = {}
        for pod, (proc, _) in servers.items():
            said = read_until(proc, pod, ["primary of shard ", "joined "])
            if said[-1].startswith("primary of shard "):
                shard = int(said[-1].split()[3])
                if shard in primaries:
                    fail(f"two primaries of shard {shard}: {primaries[shard]} and {pod}")
                primaries[shard] = pod
        if sorted(primaries) != list(range(shards)):
            fail(f"etcd named primaries of shards {sorted(primaries)}, not of all {shards}")
        print(f"smoke: etcd (3 members) named a primary per shard ({primaries}); the other pods joined them")

        workers_running = []
        for rank in range(workers):
            report = os.path.join(work, f"report-{rank}.json")
            rewrites = {
                "--etcd": etcd_dns,
                "--config": {"/etc/ps/job.toml": os.path.join(work, "job.toml")},
                "--metrics-listen": {"0.0.0.0:9100": "127.0.0.1:0"},
                "--auth-token-file": tokens,
            }
            env = container_env(worker, config_maps, {
                "JOB_COMPLETION_INDEX": str(rank),
                "PATH": path,
                "RUST_LOG": "warn",
                "PS_SMOKE_REWRITES": json.dumps(rewrites),
                "PS_SMOKE_APPEND": json.dumps(["--report", report]),
            })
            proc = subprocess.Popen(worker["command"] + worker["args"], env=env,
                                    stdout=subprocess.DEVNULL)
            workers_running.append((proc, report))
        # Mid-training, the primary of shard 0 dies (SIGKILL): its standby
        # is promoted when the lease runs out and the workers follow.
        time.sleep(2)
        victim = primaries[0]
        killed, _ = servers.pop(victim)
        killed.kill()
        killed.wait()
        standby = next(pod for pod in servers if pod.endswith("-0"))
        said = read_until(servers[standby][0], standby, ["primary of shard 0 at epoch "])
        print(f"smoke: killed {victim} mid-training; {standby} says {said[-1]!r}")
        for rank, (proc, report) in enumerate(workers_running):
            if proc.wait(timeout=600) != 0:
                fail(f"worker {rank} exited with {proc.returncode}")
            with open(report) as f:
                r = json.load(f)
            if r["rank"] != rank or r["workers"] != workers or r["servers"] != shards:
                fail(f"worker {rank} ran as {r['rank']} of {r['workers']} on {r['servers']} shards")
            if not r["val_auc"] or r["val_auc"] < 0.89:
                fail(f"worker {rank} reached AUC {r['val_auc']}")
            print(f"smoke: worker {rank}: {r['train_samples']} samples, val AUC {r['val_auc']:.4f}, "
                  f"{r['pushes']['failovers']} failover(s)")
        serving(config_maps, shards, etcd_dns, path, work, tokens, running)
        for pod, (proc, data) in servers.items():
            proc.send_signal(signal.SIGTERM)
            if proc.wait(timeout=60) != 0:
                fail(f"server {pod} exited with {proc.returncode} on SIGTERM")
            shard = pod.rsplit("-", 1)[1]
            if not os.path.exists(os.path.join(data, "shutdown", f"shard-{shard}.bin")):
                fail(f"server {pod} wrote no shutdown checkpoint")
        print(f"smoke: {len(servers)} live server pods and {workers} worker pods ran from the manifests; "
              "servers drained and wrote their shutdown checkpoints on SIGTERM")
        # A server pod restarted on its volume, with no other server of its
        # shard alive, restores its checkpoint and serves.
        proc, data = start_pod(standby)
        printed = read_until(proc, f"restarted {standby}", ["primary of shard 0 at epoch "])
        rows = [line for line in printed if line.startswith("restored ") and " rows in " in line]
        origin = [line for line in printed if line.startswith("restored from ")]
        if not rows or int(rows[0].split()[1]) == 0 or not origin or not origin[0].endswith("shutdown"):
            fail(f"the restarted server {standby} did not restore its shutdown checkpoint: {printed!r}")
        print(f"smoke: the restarted server pod {standby} {rows[0]} ({origin[0]}) and serves ({printed[-1]})")
    finally:
        for proc, _ in running:
            if proc.poll() is None:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


def run_container(container, config_maps, path, rewrites, extra_env):
    """A pod's container as a local process (stdout piped), its flag values
    rewritten as `rewrites` says."""
    env = container_env(container, config_maps, {
        "PATH": path,
        "RUST_LOG": "warn",
        "PS_SMOKE_REWRITES": json.dumps(rewrites),
        **extra_env,
    })
    return subprocess.Popen(container["command"] + container["args"], env=env,
                            stdout=subprocess.PIPE, text=True)


def serving(config_maps, shards, etcd_dns, path, work, tokens, pods):
    """The followers (one per shard, following the primaries etcd names)
    and a serving pod, as follower.yaml and serve.yaml run them: the pod
    answers its probes' path without a token, refuses a prediction without
    one, and answers one carrying the Secret's token."""
    follower = load("follower.yaml", "StatefulSet")
    container = follower["spec"]["template"]["spec"]["containers"][0]
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    ports = [free_port() for _ in range(shards)]
    for i in range(shards):
        rewrites = {
            "--listen": {f"0.0.0.0:{port}": f"127.0.0.1:{ports[i]}"},
            "--etcd": etcd_dns,
            "--metrics-listen": {"0.0.0.0:9100": "127.0.0.1:0"},
            "--peer-token-file": tokens,
            "--auth-token-file": tokens,
        }
        pod = f"{follower['metadata']['name']}-{i}"
        proc = run_container(container, config_maps, path, rewrites, {"HOSTNAME": pod})
        pods.append((proc, None))
        until_listening(proc, f"follower {i}")
    service = follower["spec"]["serviceName"]
    dns = {f"ps-follower-{i}.{service}:{port}": f"127.0.0.1:{p}" for i, p in enumerate(ports)}
    deployment = load("serve.yaml", "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    http_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "http")
    args = container["args"][0].split()
    model = args[args.index("--model-name") + 1]
    for name, flags in [("follower.yaml", follower["spec"]["template"]["spec"]["containers"][0]["args"][0]),
                        ("serve.yaml", container["args"][0])]:
        if "--auth-token-file /etc/ps-auth/token" not in flags:
            fail(f"{name}: the followers' reads need the workers' token (--auth-token-file)")
    probe = container["readinessProbe"]["httpGet"]["path"]
    with open(tokens["/etc/ps-predict/token"]) as f:
        bearer = f"Bearer {f.read()}"
    rewrites = {
        "--predict-token-file": tokens,
        "--auth-token-file": tokens,
        "--servers": dns,
        "--config": {"/etc/ps/job.toml": os.path.join(work, "job.toml")},
        "--listen": {f"0.0.0.0:{http_port}": "127.0.0.1:0"},
        "--grpc-listen": {"0.0.0.0:8500": "127.0.0.1:0"},
    }
    proc = run_container(container, config_maps, path, rewrites, {})
    pods.append((proc, None))
    line = proc.stdout.readline()
    if " on http://" not in line:
        fail(f"the serving pod printed {line!r}")
    addr = line.strip().rsplit("http://", 1)[1]
    with urllib.request.urlopen(f"http://{addr}{probe}", timeout=10) as answer:
        if answer.status != 200:
            fail(f"the serving pod's probe path {probe} answered {answer.status}")
    url = f"http://{addr}/v1/models/{model}:predict"
    body = json.dumps({"instances": ["3:1 11:1 14:1 19:1 39:1"]}).encode()
    try:
        urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=10)
        fail("the serving pod answered a prediction without the token")
    except urllib.error.HTTPError as e:
        if e.code != 401:
            fail(f"the serving pod answered {e.code}, not 401, to a request without the token")
    deadline = time.time() + 60
    while True:
        request = urllib.request.Request(url, data=body, headers={"Authorization": bearer})
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                predictions = json.load(answer)["predictions"]
                break
        except urllib.error.HTTPError as e:
            if time.time() > deadline:
                fail(f"the serving pod answered {e.code}: {e.read()!r}")
            time.sleep(0.2)
    if len(predictions) != 1 or not 0.0 < predictions[0] < 1.0:
        fail(f"the serving pod predicted {predictions!r}")
    print(f"smoke: {shards} follower pods and a serving pod answered POST "
          f"/v1/models/{model}:predict with {predictions[0]:.4f} (with the token; 401 without)")


if __name__ == "__main__":
    main()
