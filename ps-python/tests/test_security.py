"""The bearer token and (mutual) TLS, through the Rust client's own code."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from conftest import Servers
from ps_client import Client, PsError

SPEC = dict(kind="sparse", dim=2, initializer={"kind": "zeros"}, optimizer={"kind": "sgd", "lr": 1.0})


def test_a_token_is_required_and_the_right_one_works(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token-0123456789\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token-000000000\n")
    servers = Servers(2, tmp_path, ["--auth-token-file", str(token)])
    try:
        for file in (None, wrong):
            with pytest.raises(PsError) as e:
                Client(servers.addrs, token_file=file, connect_timeout=2)
            assert e.value.code == "UNAUTHENTICATED", e.value
        client = Client(servers.addrs, token_file=token)
        client.create_table("emb", **SPEC)
        client.push("emb", [1], np.ones((1, 2), np.float32))
        client.flush()
        np.testing.assert_array_equal(client.pull("emb", [1]), [[-1.0, -1.0]])
    finally:
        servers.stop()


def make_certificates(d):
    """A CA, and a certificate for 127.0.0.1 it signed (server and client use)."""
    if shutil.which("openssl") is None:
        pytest.skip("SKIPPED (no openssl to make test certificates)")

    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", *ec, "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=localhost")
    (d / "ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
    )
    run("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "node.pem", "-days", "1", "-extfile", "ext")
    return {"ca": d / "ca.pem", "cert": d / "node.pem", "key": d / "node.key"}


def test_mutual_tls(tmp_path):
    tls = make_certificates(tmp_path)
    servers = Servers(
        2, tmp_path,
        ["--tls-cert", str(tls["cert"]), "--tls-key", str(tls["key"]), "--tls-ca", str(tls["ca"]),
         "--tls-require-client-cert"],
    )
    try:
        with pytest.raises(PsError):  # no client certificate
            Client(servers.addrs, tls={"ca": tls["ca"]}, connect_timeout=2)
        client = Client(servers.addrs, tls=tls)
        client.create_table("emb", **SPEC)
        assert client.pull("emb", [5]).shape == (1, 2)
    finally:
        servers.stop()


def test_a_missing_tls_file_is_named():
    with pytest.raises(PsError) as e:
        Client(["127.0.0.1:1"], tls={"ca": "/nonexistent/ca.pem"})
    assert "/nonexistent/ca.pem" in e.value.message
