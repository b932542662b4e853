"""Train with embedding tables held on ``ps`` parameter servers.

The client is the workers' own Rust ``PsClient``: routing by jump hash,
de-duplication, chunking, asynchronous pushes, retries, failover, auth and
TLS are the Rust ones. Tables live on the servers and are updated there by
their server-side optimizers; a training loop pulls the rows a batch
touches and pushes their gradients.

>>> import numpy as np, ps_client
>>> client = ps_client.Client(["127.0.0.1:50051", "127.0.0.1:50052"])
>>> client.create_table("emb", kind="sparse", dim=8,
...                     initializer={"kind": "normal", "std": 0.01},
...                     optimizer={"kind": "adagrad", "lr": 0.05})
>>> ids = np.array([3, 17, 3], dtype=np.uint64)
>>> rows = client.pull("emb", ids)            # (3, 8) float32
>>> client.push("emb", ids, np.ones_like(rows))
>>> client.flush()

``ps_client.torch`` holds the PyTorch embedding module.
"""

from ._client import Client
from .data import load_libsvm
from .errors import PsError

__all__ = ["Client", "PsError", "load_libsvm"]
