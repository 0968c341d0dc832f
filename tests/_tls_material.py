"""Certificates for the TLS tests, made in memory by clusterpy.keygen and written to a temp dir."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from clusterpy import keygen, tls


@dataclass(frozen=True)
class Material:
    """A cluster CA with a node and a client, plus hostile extras, as files in ``dir``."""

    dir: Path

    def path(self, name: str) -> str:
        return str(self.dir / name)

    @property
    def ca(self) -> str:
        return self.path("ca.pem")

    def node_files(self) -> dict[str, str]:
        """NodeServer / CLI arguments for the node certificate (valid for 127.0.0.1 and localhost)."""
        return {"certfile": self.path("node.pem"), "keyfile": self.path("node.key"), "cafile": self.ca}

    def client_files(self, stem: str = "client") -> dict[str, str]:
        return {"certfile": self.path(f"{stem}.pem"), "keyfile": self.path(f"{stem}.key"), "cafile": self.ca}

    def server_context(self, stem: str = "node"):
        return tls.server_context(self.path(f"{stem}.pem"), self.path(f"{stem}.key"), self.ca)

    def client_context(self, stem: str | None = "client", *, cafile: str | None = None):
        if stem is None:
            return tls.client_context(cafile or self.ca)
        return tls.client_context(cafile or self.ca, self.path(f"{stem}.pem"), self.path(f"{stem}.key"))


def make_material(directory: Path) -> Material:
    """ca, node (127.0.0.1, localhost), client, and: foreign (another CA's client), expired
    (our CA, expired), wrongnode (our CA, names 10.9.9.9 only), other-ca.pem."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = keygen.make_ca()
    ca.write(directory, "ca")
    keygen.make_cert(ca, "node", hosts=["127.0.0.1", "localhost"]).write(directory, "node")
    keygen.make_cert(ca, "client", kind="client").write(directory, "client")
    other = keygen.make_ca("another cluster")
    (directory / "other-ca.pem").write_bytes(other.cert_pem)
    keygen.make_cert(other, "intruder", kind="client").write(directory, "foreign")
    keygen.make_cert(other, "fake-node", hosts=["127.0.0.1"]).write(directory, "foreign-node")
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=1)
    keygen.make_cert(ca, "expired", kind="client", not_before=past - datetime.timedelta(days=30),
                     not_after=past).write(directory, "expired")
    keygen.make_cert(ca, "wrongnode", hosts=["10.9.9.9"]).write(directory, "wrongnode")
    return Material(directory)
