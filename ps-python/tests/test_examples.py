"""The examples reach their AUCs; the numpy LR matches the Rust LR."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO, binary


def run_example(script: str, servers, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "python" / script), "--servers", ",".join(servers.addrs), *args],
        check=True, capture_output=True, text=True, timeout=600,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_the_torch_deepfm_example_reaches_auc_0_90_on_a9a(servers):
    pytest.importorskip("torch")
    report = run_example("deepfm_torch.py", servers)
    assert report["examples"] == 16281
    assert report["val_auc"] >= 0.90, report


def test_the_numpy_lr_matches_the_rust_lr_within_0_002(servers):
    report = run_example("numpy_lr.py", servers)
    rust = subprocess.run(
        [binary("ps-worker"), "local", "--config", str(REPO / "examples" / "a9a-lr.toml"), "--workers", "1"],
        check=True, capture_output=True, text=True, timeout=600,
    )
    auc = float(re.search(r"validation \(16281 examples\): auc (\S+)", rust.stdout + rust.stderr).group(1))
    assert abs(report["val_auc"] - auc) <= 0.002, (report, auc)
