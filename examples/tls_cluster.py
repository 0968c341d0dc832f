"""Mutual TLS in one script: make the cluster's keys, start a node with TLS, run jobs over TLS.

    python examples/tls_cluster.py

The same steps on real machines:

1. ``clusterpy keygen --dir keys --node node1=node1.lan,10.0.0.5 --client alice`` makes a
   cluster CA, a certificate per node (naming the addresses clients dial), one per client, and
   the cluster secret; it prints what to copy where.
2. On the node: ``clusterpy-node --host 0.0.0.0 --certfile node-node1.pem --keyfile
   node-node1.key --cafile ca.pem --secret-file secret``.
3. On the client: ``JobCluster(compute, nodes=["10.0.0.5"], certfile="client-alice.pem",
   keyfile="client-alice.key", cafile="ca.pem", secret_file="secret")`` (or the environment
   variables CLUSTERPY_CERTFILE, CLUSTERPY_KEYFILE, CLUSTERPY_CAFILE, CLUSTERPY_SECRET_FILE).

Both layers are on: TLS (certificates, encryption) and, inside it, the secret-based handshake.
Everything here runs on 127.0.0.1 in a temporary directory.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

import clusterpy
from clusterpy import keygen


def compute(n: int) -> tuple[int, str]:
    import socket

    return n * n, socket.gethostname()


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="clusterpy-tls-") as tmp:
        keys = Path(tmp) / "keys"
        layout = keygen.write_cluster(keys, nodes=[("node1", ["127.0.0.1"])], clients=["alice"])
        print(layout.instructions(), "\n")
        node_cert, node_key, _hosts = layout.nodes["node1"]
        node = subprocess.Popen(
            [sys.executable, "-m", "clusterpy.node", "--port", "0", "--cpus", "2", "--no-discovery",
             "--dest-path", str(Path(tmp) / "node"), "--certfile", str(node_cert), "--keyfile", str(node_key),
             "--cafile", str(layout.ca_cert), "--secret-file", str(layout.secret)],
            stdout=subprocess.PIPE, text=True,
        )
        try:
            assert node.stdout is not None
            line = node.stdout.readline()
            match = re.search(r"listening on ([\d.]+):(\d+)", line)
            if not match:
                print(f"the node did not start: {line!r}", file=sys.stderr)
                return 1
            address = f"{match[1]}:{match[2]}"
            cert, key = layout.clients["alice"]
            with clusterpy.JobCluster(compute, nodes=[address], certfile=cert, keyfile=key,
                                      cafile=layout.ca_cert, secret_file=layout.secret) as cluster:
                jobs = [cluster.submit(i) for i in range(8)]
                results = [job()[0] for job in jobs]
            print(f"squares over mutual TLS from {address}: {results}")
            return 0 if results == [i * i for i in range(8)] else 1
        finally:
            node.terminate()
            node.wait(15)


if __name__ == "__main__":
    sys.exit(main())
