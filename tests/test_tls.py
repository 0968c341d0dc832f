"""TLS and keygen: contexts, option resolution, keygen files, TLS under the handshake, real nodes.

The hostile TLS cases (no certificate, another CA's, an expired one) are in test_hostile.py.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import ssl
import stat
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

import clusterpy
from clusterpy import keygen, tls
from clusterpy.errors import (
    AuthenticationError,
    ConfigurationError,
    ConnectionClosedError,
    VersionMismatchError,
)
from clusterpy.node import NodeServer
from clusterpy.protocol import codec
from clusterpy.protocol import messages as m
from clusterpy.secret import load_secret
from clusterpy.identity import local_info
from clusterpy.transport.stream import Connection, accept, connect

from ._tls_material import Material, make_material
from .conftest import REPO, SECRET

KEY = SECRET.encode()
INFO = local_info()
TLS_ENV = (tls.ENV_CERTFILE, tls.ENV_KEYFILE, tls.ENV_CAFILE)


@pytest.fixture(scope="module")
def mat(tmp_path_factory) -> Material:
    return make_material(tmp_path_factory.mktemp("tls"))


@pytest.fixture(autouse=True)
def _no_tls_env(monkeypatch):
    for var in TLS_ENV:
        monkeypatch.delenv(var, raising=False)


def _square(x):
    return x * x


# --- keygen ------------------------------------------------------------------------------


def test_keygen_certificates_have_the_right_names_usages_and_limits():
    ca = keygen.make_ca()
    assert ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    node = keygen.make_cert(ca, "n1", hosts=["10.0.0.5", "Node1.LAN", "[fe80::1]"])
    san = node.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "fe80::1"]
    assert san.get_values_for_type(x509.DNSName) == ["node1.lan"]
    eku = node.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    client = keygen.make_cert(ca, "alice", kind="client")
    eku = client.cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]  # a client key cannot act as a node
    assert not client.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert client.cert.issuer == ca.cert.subject
    ca.cert.public_key().verify(client.cert.signature, client.cert.tbs_certificate_bytes,
                                ec.ECDSA(client.cert.signature_hash_algorithm))
    lifetime = client.cert.not_valid_after_utc - client.cert.not_valid_before_utc
    assert datetime.timedelta(days=keygen.CERT_DAYS) <= lifetime <= datetime.timedelta(days=keygen.CERT_DAYS, hours=1)
    with pytest.raises(ValueError, match="at least one host"):
        keygen.make_cert(ca, "n", kind="node")
    with pytest.raises(ValueError, match="neither an IP"):
        keygen.make_cert(ca, "n", hosts=["bad host!"])
    with pytest.raises(ValueError, match="kind"):
        keygen.make_cert(ca, "n", hosts=["x"], kind="ca")
    assert len(keygen.make_secret()) == 64 and keygen.make_secret() != keygen.make_secret()


def test_write_cluster_modes_reuse_force_and_rotation(tmp_path):
    d = tmp_path / "keys"
    layout = keygen.write_cluster(d, nodes=[("n1", ["127.0.0.1"])], clients=["alice"])
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for path in (layout.ca_key, layout.secret, *layout.nodes["n1"][1:2], layout.clients["alice"][1]):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for path in (layout.ca_cert, layout.nodes["n1"][0], layout.clients["alice"][0]):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    ca_before, secret_before = layout.ca_cert.read_bytes(), layout.secret.read_bytes()
    assert len(secret_before.strip()) == 64
    # The secret loads with the project's strict loader (mode and length checks).
    assert load_secret(secret_file=layout.secret) == secret_before.strip()

    # Again in the same directory: the CA and the secret are reused, new certificates join it.
    again = keygen.write_cluster(d, clients=["bob"])
    assert again.reused_ca and again.reused_secret
    assert layout.ca_cert.read_bytes() == ca_before and layout.secret.read_bytes() == secret_before
    bob = x509.load_pem_x509_certificate(again.clients["bob"][0].read_bytes())
    assert bob.issuer == x509.load_pem_x509_certificate(ca_before).subject

    # Existing certificates are not overwritten without force, and nothing is half-written.
    with pytest.raises(ConfigurationError, match="already exists"):
        keygen.write_cluster(d, clients=["carol", "alice"])
    assert not (d / "client-carol.pem").exists()
    old_alice = layout.clients["alice"][0].read_bytes()
    keygen.write_cluster(d, clients=["alice"], force=True)
    assert layout.clients["alice"][0].read_bytes() != old_alice
    assert stat.S_IMODE(layout.clients["alice"][1].stat().st_mode) == 0o600

    # Rotation: a new secret replaces the old one, still 0600.
    keygen.write_cluster(d, new_secret=True)
    assert layout.secret.read_bytes() != secret_before
    assert stat.S_IMODE(layout.secret.stat().st_mode) == 0o600


def test_keygen_refuses_to_write_through_a_symlink(tmp_path):
    d = tmp_path / "keys"
    d.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (d / "client-eve.key").symlink_to(victim)
    with pytest.raises(ConfigurationError, match="already exists"):
        keygen.write_cluster(d, clients=["eve"])
    # --force replaces the link itself (rename), never the file it points to.
    keygen.write_cluster(d, clients=["eve"], force=True)
    assert victim.read_text() == "precious"
    assert not (d / "client-eve.key").is_symlink()
    assert stat.S_IMODE((d / "client-eve.key").stat().st_mode) == 0o600


def test_keygen_command_line_and_clusterpy_subcommand(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "clusterpy.keygen", "--dir", str(tmp_path / "k"), "--node", "n1=127.0.0.1,localhost",
         "--node", "10.0.0.6", "--client", "alice"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "copy to every node and client" in out.stdout and "--certfile node-n1.pem" in out.stdout
    assert (tmp_path / "k" / "node-10.0.0.6.pem").exists()
    # The same through `clusterpy keygen` (the dispatch in clusterpy.cli), in-process.
    from clusterpy.cli import main as cli_main

    assert cli_main(["keygen", "--dir", str(tmp_path / "k"), "--client", "bob"]) == 0
    assert (tmp_path / "k" / "client-bob.key").exists()
    assert cli_main(["keygen", "--dir", str(tmp_path / "k"), "--client", "bob"]) == 1  # exists
    assert cli_main(["keygen", "--dir", str(tmp_path / "k"), "--node", "=,"]) == 1
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["keygen", "--days", "0"])
    assert exit_info.value.code == 2


# --- option resolution and contexts ---------------------------------------------------------


def test_resolve_files_precedence_and_partial_configurations(mat, monkeypatch):
    assert tls.resolve_files() is None  # nothing given: TLS off
    monkeypatch.setenv(tls.ENV_CERTFILE, mat.path("client.pem"))
    monkeypatch.setenv(tls.ENV_KEYFILE, mat.path("client.key"))
    monkeypatch.setenv(tls.ENV_CAFILE, mat.ca)
    files = tls.resolve_files()
    assert files == tls.TLSFiles(mat.path("client.pem"), mat.path("client.key"), mat.ca)
    files = tls.resolve_files(certfile=mat.path("node.pem"), keyfile=mat.path("node.key"))
    assert files is not None and files.certfile.endswith("node.pem") and files.cafile == mat.ca
    assert tls.resolve_files(environ={}) is None  # the environment can be ignored
    with pytest.raises(ConfigurationError, match="CA certificate"):
        tls.resolve_files(certfile=mat.path("client.pem"), environ={})
    with pytest.raises(ConfigurationError, match="this side's certificate"):
        tls.resolve_files(cafile=mat.ca, environ={})
    assert tls.resolve_files(cafile=mat.ca, require_cert=False, environ={}) == tls.TLSFiles(None, None, mat.ca)
    with pytest.raises(ConfigurationError, match="does not exist"):
        tls.resolve_files(certfile="/nonexistent.pem", cafile=mat.ca, environ={})


def test_contexts_enforce_the_policy(mat):
    server = mat.server_context()
    client = mat.client_context()
    for ctx in (server, client):
        assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.options & ssl.OP_NO_COMPRESSION
        # Only the cluster CA is trusted: no system store.
        assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "clusterpy cluster CA"),),)]
    assert client.check_hostname
    relaxed = tls.server_context(mat.path("node.pem"), mat.path("node.key"), mat.ca, require_client_cert=False)
    assert relaxed.verify_mode == ssl.CERT_OPTIONAL


def test_bad_key_material_is_a_configuration_error(mat, tmp_path):
    with pytest.raises(ConfigurationError, match="does the key belong"):
        tls.server_context(mat.path("node.pem"), mat.path("client.key"), mat.ca)
    with pytest.raises(ConfigurationError, match="cluster CA"):
        tls.client_context(mat.path("client.key"))
    from cryptography.hazmat.primitives import serialization

    encrypted = keygen.make_cert(keygen.make_ca(), "x", kind="client")
    (tmp_path / "enc.pem").write_bytes(encrypted.cert_pem)
    (tmp_path / "enc.key").write_bytes(encrypted.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw")))
    # Never a terminal prompt (it would hang a daemon): a clear error instead.
    with pytest.raises(ConfigurationError, match="encrypted private keys"):
        tls.client_context(mat.ca, tmp_path / "enc.pem", tmp_path / "enc.key")
    with pytest.raises(ConfigurationError, match="CA certificate"):
        NodeServer(secret=KEY, port=0, certfile=mat.path("node.pem"), keyfile=mat.path("node.key"))
    with pytest.raises(ConfigurationError, match="CA certificate"):
        clusterpy.JobCluster(_square, nodes=["127.0.0.1:1"], certfile=mat.path("client.pem"))


def test_exposed_key_file_is_warned_about(mat, tmp_path, caplog):
    key = tmp_path / "loose.key"
    key.write_bytes(open(mat.path("client.key"), "rb").read())
    key.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="clusterpy.tls"):
        tls.client_context(mat.ca, mat.path("client.pem"), key)
    assert "chmod 600" in caplog.text


# --- TLS under the handshake, over real sockets ----------------------------------------------


class TLSServer:
    """A node-like server doing TLS inside accept(); records the handshake errors."""

    def __init__(self, server_ssl, **accept_kw) -> None:
        self.ssl = server_ssl
        self.accept_kw = {"secret": KEY, "role": "node", "info": INFO,
                          "expected_peer_roles": {"client"}, "ssl": server_ssl, **accept_kw}
        self.errors: list[Exception] = []
        self.conns: list[Connection] = []
        self.tasks: set[asyncio.Task] = set()
        self.changed = asyncio.Event()

    async def __aenter__(self) -> "TLSServer":
        self.server = await asyncio.start_server(self._on_connect, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for conn in self.conns:
            await conn.aclose()
        await self.server.wait_closed()

    def _on_connect(self, reader, writer) -> None:
        writer.transport.pause_reading()  # before asyncio's first read: see stream.accept
        self.tasks.add(asyncio.ensure_future(self._handle(reader, writer)))

    async def _handle(self, reader, writer) -> None:
        try:
            conn = await accept(reader, writer, **self.accept_kw)
        except Exception as exc:  # noqa: BLE001 - recorded for the test
            self.errors.append(exc)
        else:
            self.conns.append(conn)
            try:
                while True:
                    conn.send(await conn.recv())  # echo
            except Exception:  # noqa: BLE001
                pass
        self.changed.set()

    async def next_error(self) -> Exception:
        async with asyncio.timeout(5):
            while not self.errors:
                self.changed.clear()
                await self.changed.wait()
        return self.errors.pop(0)


async def test_tls_and_hmac_layers_are_both_on(mat):
    async with TLSServer(mat.server_context()) as srv:
        conn = await connect("127.0.0.1", srv.port, secret=KEY, role="client", info=INFO,
                             expected_peer_roles={"node"}, ssl=mat.client_context())
        async with conn:
            assert conn.tls is not None and conn.tls["version"] in ("TLSv1.2", "TLSv1.3")
            assert conn.tls["peer"] == "node"
            for size in (0, 10, 1 << 20):
                conn.send(b"x" * size)
                assert await conn.recv() == b"x" * size
            assert srv.conns[0].tls["peer"] == "client"  # the server saw the client certificate
        # A valid certificate does not replace the secret: the HMAC handshake still runs.
        with pytest.raises(AuthenticationError, match="secret"):
            await connect("127.0.0.1", srv.port, secret=b"w" * 32, role="client", info=INFO,
                          ssl=mat.client_context())
        assert isinstance(await srv.next_error(), AuthenticationError)


async def test_tls_1_1_is_refused(mat):
    old = mat.client_context()
    old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    with pytest.warns(DeprecationWarning):
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")  # OpenSSL 3 would not even offer TLS 1.1 otherwise
    async with TLSServer(mat.server_context()) as srv:
        with pytest.raises((VersionMismatchError, ConnectionClosedError)):
            await connect("127.0.0.1", srv.port, secret=KEY, role="client", info=INFO, ssl=old)
        error = await srv.next_error()
        assert isinstance(error, VersionMismatchError) and "TLS" in str(error)


async def test_client_checks_the_node_certificate(mat):
    # A node certificate that does not name the address dialled.
    async with TLSServer(mat.server_context("wrongnode")) as srv:
        with pytest.raises(AuthenticationError, match="IP address mismatch"):
            await connect("127.0.0.1", srv.port, secret=KEY, role="client", info=INFO, ssl=mat.client_context())
    # A node certificate from another CA.
    async with TLSServer(mat.server_context("foreign-node")) as srv:
        with pytest.raises(AuthenticationError, match="certificate"):
            await connect("127.0.0.1", srv.port, secret=KEY, role="client", info=INFO, ssl=mat.client_context())
    # A *client* certificate of this cluster used as a node's: no serverAuth usage.
    async with TLSServer(tls.server_context(mat.path("client.pem"), mat.path("client.key"), mat.ca,
                                            require_client_cert=False)) as srv:
        with pytest.raises(AuthenticationError, match="certificate"):
            await connect("127.0.0.1", srv.port, secret=KEY, role="client", info=INFO,
                          ssl=tls.client_context(mat.ca, check_hostname=False))


async def test_plain_and_tls_peers_get_a_clear_mismatch(mat):
    # TLS client -> plain server.
    async def plain(reader, writer):
        try:
            await accept(reader, writer, secret=KEY, role="node", info=INFO)
        except Exception:  # noqa: BLE001
            pass

    server = await asyncio.start_server(plain, "127.0.0.1", 0)
    try:
        with pytest.raises(VersionMismatchError, match="does not speak TLS"):
            await connect("127.0.0.1", server.sockets[0].getsockname()[1], secret=KEY, role="client",
                          info=INFO, ssl=mat.client_context())
    finally:
        server.close()
        await server.wait_closed()
    # Plain client -> TLS server: the server says why; the client is told to look there.
    async with TLSServer(mat.server_context()) as srv:
        with pytest.raises(ConnectionClosedError):
            await connect("127.0.0.1", srv.port, secret=KEY, role="client", info=INFO)
        error = await srv.next_error()
        assert isinstance(error, VersionMismatchError) and "does not speak TLS" in str(error)


async def test_handshake_timeout_covers_the_tls_handshake(mat):
    async with TLSServer(mat.server_context(), handshake_timeout=0.3) as srv:
        loop = asyncio.get_running_loop()
        # Silent, and dripping a TLS record header byte by byte: both cut at the deadline.
        for drip in (b"", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"):
            start = loop.time()
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            for byte in drip:
                writer.write(bytes([byte]))
                await asyncio.sleep(0.02)
            error = await srv.next_error()
            assert isinstance(error, ConnectionClosedError) and "timed out after 0.3 s" in str(error)
            assert 0.25 < loop.time() - start < 2
            assert await asyncio.wait_for(reader.read(), 2) == b""  # closed, no plain-text refusal
            writer.close()


async def test_accept_with_tls_needs_a_paused_transport(mat):
    errors = []

    async def late(reader, writer):  # an async callback: asyncio may already have read bytes
        try:
            await accept(reader, writer, secret=KEY, role="node", info=INFO, ssl=mat.server_context())
        except ValueError as exc:
            errors.append(exc)

    server = await asyncio.start_server(late, "127.0.0.1", 0)
    try:
        with pytest.raises(ConnectionClosedError):
            await connect("127.0.0.1", server.sockets[0].getsockname()[1], secret=KEY, role="client",
                          info=INFO, ssl=mat.client_context(), handshake_timeout=2)
        assert errors and "pause_reading" in str(errors[0])
    finally:
        server.close()
        await server.wait_closed()


# --- real nodes ---------------------------------------------------------------------------


def test_node_process_with_tls_flags_and_client_from_environment(start_node, mat, monkeypatch):
    node = start_node(extra=["--certfile", mat.path("node.pem"), "--keyfile", mat.path("node.key"),
                             "--cafile", mat.ca])
    assert "mutual TLS" in node.log()
    monkeypatch.setenv(tls.ENV_CERTFILE, mat.path("client.pem"))
    monkeypatch.setenv(tls.ENV_KEYFILE, mat.path("client.key"))
    monkeypatch.setenv(tls.ENV_CAFILE, mat.ca)
    with clusterpy.JobCluster(_square, nodes=[node.address]) as cluster:
        assert [cluster.submit(i)() for i in range(5)] == [0, 1, 4, 9, 16]
    assert "over TLSv1.3 as 'client'" in node.log()
    # The same node refuses a client without TLS, and a client of another cluster's CA.
    monkeypatch.delenv(tls.ENV_CERTFILE)
    monkeypatch.delenv(tls.ENV_KEYFILE)
    monkeypatch.delenv(tls.ENV_CAFILE)

    async def plain():
        return await connect(node.host, node.port, secret=KEY, role="client", info=INFO)

    with pytest.raises(ConnectionClosedError):
        asyncio.run(plain())
    assert node.alive()


def test_node_environment_variables_turn_tls_on(start_node, mat):
    env = {tls.ENV_CERTFILE: mat.path("node.pem"), tls.ENV_KEYFILE: mat.path("node.key"), tls.ENV_CAFILE: mat.ca}
    node = start_node(env=env)
    assert "mutual TLS" in node.log()
    with clusterpy.JobCluster(_square, nodes=[node.address], **mat.client_files()) as cluster:
        assert cluster.submit(7)() == 49


def test_node_security_flags_and_environment(mat, monkeypatch):
    from clusterpy.node import build_parser

    args = build_parser().parse(["--certfile", mat.path("node.pem"), "--keyfile", mat.path("node.key"),
                                 "--handshake-timeout", "2.5", "--max-pending-handshakes", "8",
                                 "--max-file-size", "1M", "--quota", "2G"], environ={tls.ENV_CAFILE: mat.ca})
    options = tls.daemon_security_options(args)
    assert options == {"certfile": mat.path("node.pem"), "keyfile": mat.path("node.key"), "cafile": mat.ca,
                       "handshake_timeout": 2.5, "max_pending_handshakes": 8, "max_file_size": 1 << 20,
                       "quota": 2 << 30}
    node = NodeServer(secret=KEY, port=0, **options)
    assert node.ssl is not None and node.ssl.verify_mode == ssl.CERT_REQUIRED
    defaults = tls.daemon_security_options(build_parser().parse([], environ={}))
    assert defaults == {"certfile": None, "keyfile": None, "cafile": None, "handshake_timeout": 10.0,
                        "max_pending_handshakes": 64, "max_file_size": None, "quota": None}
    assert NodeServer(secret=KEY, port=0, **defaults).ssl is None


def test_node_refuses_a_partial_tls_configuration(tmp_path, mat):
    out = subprocess.run([sys.executable, "-m", "clusterpy.node", "--port", "0", "--no-discovery",
                          "--dest-path", str(tmp_path / "n"), "--certfile", mat.path("node.pem")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "CA certificate" in out.stderr


def test_local_embedded_node_stays_plain_while_remote_nodes_use_tls(start_node, mat):
    node = start_node(extra=["--certfile", mat.path("node.pem"), "--keyfile", mat.path("node.key"),
                             "--cafile", mat.ca])
    with clusterpy.JobCluster(_square, nodes=[node.address], local=True, local_cpus=1,
                              **mat.client_files()) as cluster:
        jobs = [cluster.submit(i) for i in range(12)]
        assert [job() for job in jobs] == [i * i for i in range(12)]
        assert len(cluster.nodes()) == 2


def test_tls_example_runs():
    out = subprocess.run([sys.executable, str(REPO / "examples" / "tls_cluster.py")],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "squares over mutual TLS" in out.stdout and "[0, 1, 4, 9, 16, 25, 36, 49]" in out.stdout


async def test_in_process_node_with_tls_serves_protocol_clients(tmp_path, mat):
    async with NodeServer(secret=KEY, port=0, cpus=1, dest_path=tmp_path / "n", discovery=False,
                          **mat.node_files()) as node:
        conn = await connect("127.0.0.1", node.port, secret=KEY, role="client", info=INFO,
                             expected_peer_roles={"node"}, ssl=mat.client_context())
        async with conn:
            conn.send(codec.encode(m.Ping(1.5)))
            await conn.drain()
            assert codec.decode(await conn.recv()) == m.Pong(1.5)


_CRASHING_TLS_CLIENT = """
import os, signal, sys, time
import clusterpy

def work(x):
    import time
    time.sleep(0.05 if x < 3 else 0.5)
    return x * 10

cluster = clusterpy.JobCluster(work, nodes=[sys.argv[1]], recover_file=sys.argv[2])  # TLS from the environment
jobs = [cluster.submit(i) for i in range(6)]
for job in jobs[:3]:
    job()
print("three done", flush=True)
time.sleep(0.1)  # the journal reaches the file at the end of a loop turn
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_recover_jobs_over_tls(start_node, mat, tmp_path):
    node = start_node(extra=["--certfile", mat.path("node.pem"), "--keyfile", mat.path("node.key"),
                             "--cafile", mat.ca])
    script, journal = tmp_path / "client.py", tmp_path / "journal"
    script.write_text(_CRASHING_TLS_CLIENT)
    env = {**os.environ, tls.ENV_CERTFILE: mat.path("client.pem"), tls.ENV_KEYFILE: mat.path("client.key"),
           tls.ENV_CAFILE: mat.ca}
    out = subprocess.run([sys.executable, str(script), node.address, str(journal)], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path, env=env)
    assert "three done" in out.stdout, out.stderr
    # Without TLS the node cannot be reached (tried on a copy: recovery writes to its journal)...
    copy = tmp_path / "journal-copy"
    copy.write_bytes(journal.read_bytes())
    copy.chmod(0o600)
    lost = clusterpy.recover_jobs(copy, wait=False)
    assert all(j.status is not clusterpy.JobStatus.Finished for j in lost[3:])
    # ...with it every job is collected.
    jobs = clusterpy.recover_jobs(journal, timeout=30, **mat.client_files())
    assert [j.result for j in jobs if j.status is clusterpy.JobStatus.Finished] == [0, 10, 20, 30, 40, 50]


def test_shared_cluster_through_a_tls_scheduler(start_node, mat, tmp_path):
    """client -TLS-> clusterpy-scheduler -TLS-> node: the scheduler serves clients and dials
    nodes with one node certificate (it carries both usages)."""
    tls_flags = ["--certfile", mat.path("node.pem"), "--keyfile", mat.path("node.key"), "--cafile", mat.ca]
    node = start_node(extra=tls_flags)
    log = open(tmp_path / "scheduler.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "clusterpy.scheduler", "--port", "0", "--pulse-interval", "0.2",
                             "-n", node.address, *tls_flags], stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, (tmp_path / "scheduler.log").read_text()
        address = line.split("listening on ")[1].split()[0]
        with clusterpy.SharedJobCluster(_square, scheduler_host=address, **mat.client_files()) as cluster:
            assert [cluster.submit(i)() for i in range(6)] == [i * i for i in range(6)]
        # A client without TLS is refused by the scheduler.
        host, port = address.rsplit(":", 1)
        with pytest.raises(ConnectionClosedError):
            asyncio.run(connect(host, int(port), secret=KEY, role="client", info=INFO, handshake_timeout=5))
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()
    assert "over TLSv1.3 as 'node'" in node.log()  # the scheduler's certificate, seen by the node
    assert "does not speak TLS" in (tmp_path / "scheduler.log").read_text()
