"""``clusterpy keygen``: a cluster CA, node and client certificates, and the cluster secret.

One command makes everything a TLS cluster needs, in one directory::

    python -m clusterpy.keygen --dir keys --node node1=node1.lan,10.0.0.5 --node 10.0.0.6 --client alice

    keys/                      (mode 0700)
      ca.pem                   the cluster CA certificate: every node and client trusts it
      ca.key        0600       the CA's private key: keep it offline; only issues certificates
      node-node1.pem/.key      one per node: its host names and IP addresses are in the certificate
      client-alice.pem/.key    one per client (user or machine)
      secret        0600       the cluster secret (the HMAC layer stays on inside TLS)

Running it again in the same directory reuses the CA (and the secret), so new certificates
join the same cluster; existing certificate files are not overwritten without ``--force``;
``--new-secret`` replaces the secret (rotation, see docs/SECURITY.md).

Keys are ECDSA P-256, signatures SHA-256. Node certificates allow both TLS server and client
use (a node or scheduler also dials out); client certificates allow client use only, so a
client's key cannot impersonate a node. Every private key and the secret are created with
``O_EXCL | O_NOFOLLOW`` and mode 0600 (no window where another user could read them).

:func:`make_ca`, :func:`make_cert` and :func:`make_secret` work in memory, for tests and for
programs that manage their own storage; :func:`write_cluster` is what the command runs.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import secrets
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .config import OptionParser, positive_int
from .errors import ConfigurationError

__all__ = [
    "CertKey",
    "Layout",
    "make_ca",
    "make_cert",
    "make_secret",
    "parse_node_spec",
    "write_cluster",
    "main",
]

#: Default lifetime of the CA, in days (ten years: re-issuing a CA means touching every machine).
CA_DAYS = 3650
#: Default lifetime of node and client certificates, in days.
CERT_DAYS = 825
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# A certificate is valid from a little before "now" so that small clock skew between machines
# does not make a fresh certificate "not yet valid".
_BACKDATE = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class CertKey:
    """A certificate and its private key, in memory."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM (protect it with file modes)."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, directory: str | os.PathLike[str], stem: str, *, force: bool = False) -> tuple[Path, Path]:
        """Write ``stem.pem`` (0644) and ``stem.key`` (0600) into ``directory``.

        Returns:
            (certificate path, key path).
        Raises:
            ConfigurationError: a file exists (and ``force`` is false), or cannot be written.
        """
        directory = Path(directory)
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        _write_file(key_path, self.key_pem, 0o600, force=force)
        _write_file(cert_path, self.cert_pem, 0o644, force=force)
        return cert_path, key_path


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def make_ca(common_name: str = "clusterpy cluster CA", *, days: int = CA_DAYS) -> CertKey:
    """Create a self-signed cluster CA that can sign only end-entity certificates.

    Raises:
        ValueError: ``days`` is not positive.
    """
    if days <= 0:
        raise ValueError("days must be positive")
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        # path_length=0: the CA signs nodes and clients, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertKey(cert, key)


def _san(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip().strip("[]")
        if not host:
            continue
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.*-]{0,251}[A-Za-z0-9])?", host):
                raise ValueError(f"{host!r} is neither an IP address nor a host name") from None
            names.append(x509.DNSName(host.lower()))
    return names


def make_cert(
    ca: CertKey,
    name: str,
    *,
    hosts: Sequence[str] = (),
    kind: str = "node",
    days: int = CERT_DAYS,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> CertKey:
    """Create a certificate signed by ``ca``.

    Args:
        name: the common name (a node or user name; shown in logs).
        hosts: host names and IP addresses clients dial to reach this node (its
            subjectAltName; clients check it). Optional for clients.
        kind: ``"node"`` (TLS server and client use) or ``"client"`` (client use only).
        days: lifetime from now; ``not_before``/``not_after`` override it (tests make expired
            certificates this way).
    Raises:
        ValueError: unknown ``kind``, a host that is neither an IP nor a host name, a node
            without hosts, or an empty validity period.
    """
    if kind not in ("node", "client"):
        raise ValueError(f"kind must be 'node' or 'client', not {kind!r}")
    san = _san(hosts)
    if kind == "node" and not san:
        raise ValueError(f"node {name!r} needs at least one host name or IP address: clients check it")
    key = _new_key()
    now = _now()
    start = not_before if not_before is not None else now - _BACKDATE
    end = not_after if not_after is not None else now + datetime.timedelta(days=days)
    if end <= start:
        raise ValueError("the certificate would never be valid (not_after <= not_before)")
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if kind == "node":
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"clusterpy {kind}"),
        ]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return CertKey(builder.sign(ca.key, hashes.SHA256()), key)


def make_secret() -> bytes:
    """A new random cluster secret: 32 random bytes as 64 hex digits (what secret files hold)."""
    return secrets.token_hex(32).encode("ascii")


def parse_node_spec(spec: str) -> tuple[str, list[str]]:
    """``"name=host,host"`` -> (name, hosts); a bare ``"host"`` names itself.

    The name becomes part of file names, so characters other than ``[A-Za-z0-9_.-]`` become
    ``_`` (``"fe80::1"`` -> ``"fe80__1"``).

    Raises:
        ValueError: empty name or no hosts.
    """
    name, sep, rest = spec.partition("=")
    hosts = [h for h in (rest if sep else name).split(",") if h.strip()]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", name.strip())[:64]
    if not name or not hosts:
        raise ValueError(f"node spec {spec!r} must be NAME=HOST[,HOST...] or HOST")
    return name, hosts


def _check_name(name: str, what: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"{what} name {name!r} must be 1-64 characters of [A-Za-z0-9_.-]")
    return name


# --- files ---------------------------------------------------------------------------------


def _write_file(path: Path, data: bytes, mode: int, *, force: bool) -> None:
    """Create ``path`` with ``mode`` from the start (O_EXCL, O_NOFOLLOW); ``force`` replaces
    an existing file atomically through a new temporary file."""
    target = path
    if force and os.path.lexists(path):
        target = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except FileExistsError:
        raise ConfigurationError(f"{path} already exists; pass --force to replace it") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot create {path}: {exc.strerror}") from exc
    try:
        os.fchmod(fd, mode)  # the mode given to open() is filtered by the umask
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if target != path:
        os.replace(target, path)


def _load_ca(directory: Path) -> CertKey | None:
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    if not cert_path.exists() and not key_path.exists():
        return None
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigurationError(
            f"cannot reuse the CA in {directory} (ca.pem + ca.key): {exc}; "
            "move them away to create a new CA"
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigurationError(f"{key_path} is not an ECDSA key made by clusterpy keygen")
    return CertKey(cert, key)


@dataclass
class Layout:
    """What :func:`write_cluster` wrote (or reused), for printing and for tests."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    secret: Path | None
    nodes: dict[str, tuple[Path, Path, list[str]]] = field(default_factory=dict)
    clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    reused_ca: bool = False
    reused_secret: bool = False

    def instructions(self) -> str:
        """Human-readable "what to copy where", as the command prints it."""
        d = self.directory
        lines = [f"In {d}:"]
        lines.append(f"  ca.pem   {'(existing) ' if self.reused_ca else ''}cluster CA certificate: "
                     "copy to every node and client (not secret)")
        lines.append("  ca.key   CA private key (0600): keep it here or offline; copy it nowhere. "
                     "It is needed only to issue more certificates (run keygen again in this directory)")
        if self.secret is not None:
            lines.append(f"  secret   {'(existing) ' if self.reused_secret else ''}cluster secret (0600): "
                         "copy to every node and client, keep mode 0600 "
                         "(e.g. ~/.config/clusterpy/secret, or point --secret-file / CLUSTERPY_SECRET_FILE at it)")
        for name, (cert, key, hosts) in self.nodes.items():
            lines.append(f"  {cert.name}, {key.name}   for node {name} ({', '.join(hosts)}): copy both "
                         "(keep the key 0600) with ca.pem and secret, then run")
            lines.append(f"      clusterpy-node --host 0.0.0.0 --certfile {cert.name} --keyfile {key.name} "
                         f"--cafile ca.pem --secret-file secret")
        for name, (cert, key) in self.clients.items():
            lines.append(f"  {cert.name}, {key.name}   for client {name}: copy both (keep the key 0600) "
                         "with ca.pem and secret, then use")
            lines.append(f"      JobCluster(..., certfile='{cert.name}', keyfile='{key.name}', "
                         f"cafile='ca.pem', secret_file='secret')")
            lines.append(f"      or CLUSTERPY_CERTFILE={cert.name} CLUSTERPY_KEYFILE={key.name} "
                         "CLUSTERPY_CAFILE=ca.pem CLUSTERPY_SECRET_FILE=secret")
        return "\n".join(lines)


def write_cluster(
    directory: str | os.PathLike[str],
    *,
    nodes: Iterable[tuple[str, Sequence[str]]] = (),
    clients: Iterable[str] = (),
    secret: bool = True,
    new_secret: bool = False,
    force: bool = False,
    days: int = CERT_DAYS,
) -> Layout:
    """Create (or extend) a cluster's key directory; see the module docstring.

    Args:
        nodes: (name, hosts) for each node certificate.
        clients: a name for each client certificate.
        secret: create the secret file if it does not exist.
        new_secret: replace an existing secret file (rotation).
        force: replace existing node/client certificate files.
    Raises:
        ConfigurationError: a file exists (without ``force``), or the existing CA cannot be read.
        ValueError: a bad name or host.
    """
    d = Path(directory)
    nodes, clients = list(nodes), list(clients)
    for name, _hosts in nodes:
        _check_name(name, "node")
    for name in clients:
        _check_name(name, "client")
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigurationError(f"cannot create {d}: {exc.strerror}") from exc
    if not force:  # refuse before writing anything, not halfway through
        stems = [f"node-{name}" for name, _ in nodes] + [f"client-{name}" for name in clients]
        for path in (d / f"{stem}{ext}" for stem in stems for ext in (".pem", ".key")):
            if os.path.lexists(path):
                raise ConfigurationError(f"{path} already exists; pass --force to replace it")
    ca = _load_ca(d)
    layout = Layout(d, d / "ca.pem", d / "ca.key", None, reused_ca=ca is not None)
    if ca is None:
        ca = make_ca()
        ca.write(d, "ca")
    if secret or new_secret:
        layout.secret = d / "secret"
        if os.path.lexists(layout.secret) and not new_secret:
            layout.reused_secret = True
        else:
            _write_file(layout.secret, make_secret() + b"\n", 0o600, force=new_secret)
    for name, hosts in nodes:
        cert, key = make_cert(ca, name, hosts=hosts, kind="node", days=days).write(d, f"node-{name}", force=force)
        layout.nodes[name] = (cert, key, list(hosts))
    for name in clients:
        cert, key = make_cert(ca, name, kind="client", days=days).write(d, f"client-{name}", force=force)
        layout.clients[name] = (cert, key)
    return layout


def build_parser(prog: str = "clusterpy keygen") -> OptionParser:
    """The options of ``clusterpy keygen`` (also ``python -m clusterpy.keygen``)."""
    opts = OptionParser(
        prog, "clusterpy.keygen",
        "Create a cluster CA, node and client certificates, and a random cluster secret.",
        epilog="Run it again with the same --dir to add nodes or clients: the CA and the secret are reused.\n"
               "Example: clusterpy keygen --dir keys --node node1=node1.lan,10.0.0.5 --node 10.0.0.6 --client alice",
    )
    opts.add("--dir", default="clusterpy-keys", env=False, metavar="DIR",
             help="output directory (created with mode 0700)")
    opts.add("--node", many=True, env=False, metavar="NAME=HOST[,HOST...]",
             help="a node certificate for these host names / IP addresses (repeatable); a bare HOST is also the name")
    opts.add("--client", many=True, env=False, metavar="NAME", help="a client certificate (repeatable)")
    opts.add("--days", type=positive_int, default=CERT_DAYS, env=False, help="certificate lifetime in days")
    opts.add("--secret", flag=True, default=True, env=False, help="create the secret file if there is none")
    opts.add("--new-secret", flag=True, default=False, env=False,
             help="replace an existing secret file (rotation: see docs/SECURITY.md)")
    opts.add("--force", flag=True, default=False, env=False, help="replace existing node/client certificate files")
    return opts


def run(opts: OptionParser, args: argparse.Namespace) -> int:
    """Run the parsed command; prints what to copy where. Exit status 0, or 1 with one line on stderr."""
    try:
        nodes = [parse_node_spec(spec) for spec in args.node]
        layout = write_cluster(args.dir, nodes=nodes, clients=args.client, secret=args.secret,
                               new_secret=args.new_secret, force=args.force, days=args.days)
    except (ValueError, ConfigurationError) as exc:
        print(f"{opts.prog}: {exc}", file=sys.stderr)
        return 1
    print(layout.instructions())
    return 0


def main(argv: Sequence[str] | None = None, *, prog: str = "clusterpy keygen") -> int:
    """Command-line entry point; returns the exit status (2 for a bad command line)."""
    opts = build_parser(prog)
    return run(opts, opts.parse(argv))


if __name__ == "__main__":
    sys.exit(main(prog="python -m clusterpy.keygen"))
