"""Real ``ps-server`` processes on 127.0.0.1 for the tests.

The binary is ``$PS_SERVER``, or the workspace's ``target/debug/ps-server``
(``cargo build -p ps-server``), or ``target/release/ps-server``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def binary(name: str) -> str:
    env = os.environ.get(name.upper().replace("-", "_"))
    if env:
        return env
    for profile in ("debug", "release"):
        path = REPO / "target" / profile / name
        if path.exists():
            return str(path)
    pytest.fail(f"no {name} binary: run `cargo build -p {name.split('-')[0]}-{name.split('-')[1]}` first")


class Servers:
    """``count`` shards of one job, each a ps-server process."""

    def __init__(self, count: int, tmp: Path, extra: list[str] | None = None):
        self.procs: list[subprocess.Popen] = []
        self.addrs: list[str] = []
        self.checkpoint_dir = tmp / "checkpoints"
        for shard in range(count):
            proc = subprocess.Popen(
                [
                    binary("ps-server"),
                    "--listen", "127.0.0.1:0",
                    "--shard-id", str(shard),
                    "--num-shards", str(count),
                    "--memory-budget", "1GiB",
                    "--checkpoint-dir", str(self.checkpoint_dir),
                    *(extra or []),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            self.procs.append(proc)
            self.addrs.append(self._address(proc))

    @staticmethod
    def _address(proc: subprocess.Popen) -> str:
        deadline = time.monotonic() + 60
        seen = []
        assert proc.stdout is not None
        for line in proc.stdout:
            seen.append(line)
            m = re.search(r"listening on (\S+)", line)
            if m:
                # Keep draining the pipe so the server never blocks on it.
                threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
                return m.group(1)
            if time.monotonic() > deadline:
                break
        proc.kill()
        raise RuntimeError("ps-server did not start:\n" + "".join(seen))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _drain(stream) -> None:
    for line in stream:
        if os.environ.get("PS_TEST_SERVER_LOGS"):
            sys.stderr.write(line)


@pytest.fixture
def servers(tmp_path):
    """Two shards, stopped after the test."""
    s = Servers(2, tmp_path)
    yield s
    s.stop()
