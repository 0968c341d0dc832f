"""TLS for clusterpy connections: building the ``ssl.SSLContext`` of each side.

TLS is optional and sits *under* the HMAC handshake, never instead of it::

    TCP -> TLS (certificates, encryption) -> clusterpy handshake (shared secret) -> sealed frames

so a peer needs both a certificate signed by the cluster CA and the cluster secret. TLS adds
confidentiality (the HMAC layer only authenticates) and a second, independent credential.

Policy (the same for every daemon and client):

* TLS 1.2 or newer, OpenSSL's default cipher list (forward-secret AEAD suites), no compression.
* Only the cluster CA (``cafile``) is trusted, never the system's CA store: a certificate from
  a public CA proves nothing about membership in this cluster.
* Mutual by default: a server requires a client certificate signed by the cluster CA
  (the daemons always require it; :func:`server_context` has ``require_client_cert=False``
  for programs that embed a server and authenticate clients by the secret alone).
* A client checks that the server's certificate names the host or IP it dialled
  (``check_hostname``), so a stolen *client* key cannot impersonate a node; node certificates
  made by :mod:`clusterpy.keygen` carry the serverAuth usage, client certificates do not.

Where the files come from, first match wins, per file: the API argument or command-line flag,
then the environment variables :data:`ENV_CERTFILE`, :data:`ENV_KEYFILE`, :data:`ENV_CAFILE`.
TLS is on when a certificate or a CA file is given; a partial configuration is an error, not
a silent fall-back to plain TCP.
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .config import OptionParser, byte_size, positive_float, positive_int
from .errors import ConfigurationError

__all__ = [
    "ENV_CERTFILE",
    "ENV_KEYFILE",
    "ENV_CAFILE",
    "MINIMUM_VERSION",
    "TLSFiles",
    "resolve_files",
    "server_context",
    "client_context",
    "server_context_from",
    "client_context_from",
    "add_tls_arguments",
    "add_daemon_security_arguments",
    "daemon_security_options",
    "classify_ssl_error",
    "describe_ssl_error",
]

log = logging.getLogger("clusterpy.tls")

ENV_CERTFILE = "CLUSTERPY_CERTFILE"
ENV_KEYFILE = "CLUSTERPY_KEYFILE"
ENV_CAFILE = "CLUSTERPY_CAFILE"
#: The oldest protocol version either side accepts.
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2

# OpenSSL reasons (also inside alert names such as SSLV3_ALERT_BAD_CERTIFICATE) that mean a
# certificate, or the lack of one, was not accepted, here or by the peer.
_CERT_REASONS = (
    "CERTIFICATE_VERIFY_FAILED",
    "CERTIFICATE_REQUIRED",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE",
    "BAD_CERTIFICATE",
    "UNKNOWN_CA",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_REVOKED",
    "CERTIFICATE_UNKNOWN",
    "UNSUPPORTED_CERTIFICATE",
    "ACCESS_DENIED",
)
# Reasons seen when one side speaks plain TCP, or a TLS version the other refuses.
_MISMATCH_REASONS = ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "RECORD_LAYER_FAILURE",
                     "PACKET_LENGTH_TOO_LONG", "UNKNOWN_PROTOCOL", "RECORD_TOO_LARGE",
                     "UNSUPPORTED_PROTOCOL", "PROTOCOL_VERSION", "NO_PROTOCOLS_AVAILABLE",
                     "VERSION_TOO_LOW")


@dataclass(frozen=True)
class TLSFiles:
    """The files of one side's TLS configuration (``keyfile`` None: the key is in ``certfile``)."""

    certfile: str | None
    keyfile: str | None
    cafile: str


def resolve_files(
    certfile: str | os.PathLike[str] | None = None,
    keyfile: str | os.PathLike[str] | None = None,
    cafile: str | os.PathLike[str] | None = None,
    *,
    require_cert: bool = True,
    environ: Mapping[str, str] | None = None,
) -> TLSFiles | None:
    """Merge arguments with the environment; None means TLS is off (nothing was given).

    Args:
        require_cert: the side must present a certificate (servers always; clients unless
            the server was configured without ``require_client_cert``).
        environ: defaults to ``os.environ``; pass ``{}`` to ignore the environment.
    Raises:
        ConfigurationError: a partial configuration (a certificate without a CA file or the
            other way round, a key without a certificate) or a file that does not exist.
    """
    env = os.environ if environ is None else environ

    def pick(value: str | os.PathLike[str] | None, var: str) -> str | None:
        if value is not None:
            return os.fspath(value)
        found = env.get(var, "").strip()
        return found or None

    cert, key, ca = pick(certfile, ENV_CERTFILE), pick(keyfile, ENV_KEYFILE), pick(cafile, ENV_CAFILE)
    if cert is None and key is None and ca is None:
        return None
    if ca is None:
        raise ConfigurationError(
            f"TLS needs the cluster CA certificate too: pass cafile= / --cafile or set ${ENV_CAFILE}"
        )
    if cert is None and (require_cert or key is not None):
        raise ConfigurationError(
            f"TLS needs this side's certificate: pass certfile= / --certfile or set ${ENV_CERTFILE} "
            "(make one with `clusterpy keygen`)"
        )
    for label, path in (("certfile", cert), ("keyfile", key), ("cafile", ca)):
        if path is not None and not os.path.isfile(path):
            raise ConfigurationError(f"TLS {label} {path!r} does not exist or is not a file")
    return TLSFiles(cert, key, ca)


def _refuse_password() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal, which hangs a daemon.
    raise ConfigurationError("encrypted private keys are not supported: use an unencrypted key with mode 0600")


def _warn_if_exposed(keyfile: str) -> None:
    try:
        mode = os.stat(keyfile).st_mode
    except OSError:
        return
    if mode & 0o077:
        log.warning("private key %s is accessible by group or others (mode %04o): run `chmod 600 %s`",
                    keyfile, stat.S_IMODE(mode), keyfile)


def _base(purpose_server: bool, cafile: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose_server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = MINIMUM_VERSION
    ctx.options |= ssl.OP_NO_COMPRESSION  # CRIME; OpenSSL's default, made explicit
    try:
        ctx.load_verify_locations(cafile=cafile)  # the cluster CA only: no system CAs
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"cannot load the cluster CA from {cafile!r}: {exc}") from exc
    return ctx


def _load_chain(ctx: ssl.SSLContext, certfile: str, keyfile: str | None) -> None:
    try:
        ctx.load_cert_chain(certfile, keyfile, password=_refuse_password)
    except ConfigurationError:
        raise
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"cannot load the TLS certificate {certfile!r} with key {keyfile or certfile!r}: {exc} "
            "(does the key belong to the certificate?)"
        ) from exc
    _warn_if_exposed(keyfile or certfile)


def server_context(
    certfile: str | os.PathLike[str],
    keyfile: str | os.PathLike[str] | None,
    cafile: str | os.PathLike[str],
    *,
    require_client_cert: bool = True,
) -> ssl.SSLContext:
    """The context of a listening daemon (node, scheduler, relay).

    Raises:
        ConfigurationError: a file cannot be loaded, or the key does not match the certificate.
    """
    ctx = _base(True, os.fspath(cafile))
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    _load_chain(ctx, os.fspath(certfile), None if keyfile is None else os.fspath(keyfile))
    return ctx


def client_context(
    cafile: str | os.PathLike[str],
    certfile: str | os.PathLike[str] | None = None,
    keyfile: str | os.PathLike[str] | None = None,
    *,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """The context of a connecting side (client, or a daemon dialling another).

    Without ``certfile`` no certificate is presented (only servers with
    ``require_client_cert=False`` accept that).

    Raises:
        ConfigurationError: a file cannot be loaded, or the key does not match the certificate.
    """
    ctx = _base(False, os.fspath(cafile))
    ctx.check_hostname = check_hostname
    ctx.verify_mode = ssl.CERT_REQUIRED
    if certfile is not None:
        _load_chain(ctx, os.fspath(certfile), None if keyfile is None else os.fspath(keyfile))
    return ctx


def server_context_from(
    certfile: str | os.PathLike[str] | None = None,
    keyfile: str | os.PathLike[str] | None = None,
    cafile: str | os.PathLike[str] | None = None,
    *,
    require_client_cert: bool = True,
    environ: Mapping[str, str] | None = None,
) -> ssl.SSLContext | None:
    """:func:`server_context` from arguments and the environment; None when TLS is off."""
    files = resolve_files(certfile, keyfile, cafile, environ=environ)
    if files is None:
        return None
    assert files.certfile is not None
    return server_context(files.certfile, files.keyfile, files.cafile, require_client_cert=require_client_cert)


def client_context_from(
    certfile: str | os.PathLike[str] | None = None,
    keyfile: str | os.PathLike[str] | None = None,
    cafile: str | os.PathLike[str] | None = None,
    *,
    check_hostname: bool = True,
    environ: Mapping[str, str] | None = None,
) -> ssl.SSLContext | None:
    """:func:`client_context` from arguments and the environment; None when TLS is off."""
    files = resolve_files(certfile, keyfile, cafile, environ=environ)
    if files is None:
        return None
    return client_context(files.cafile, files.certfile, files.keyfile, check_hostname=check_hostname)


def _option(target: argparse.ArgumentParser | OptionParser, group: Any, *flags: str, help: str,
            default: Any = None, type: Callable[[Any], Any] | None = None, env: str | bool = False) -> None:
    """Declare one option on a plain argparse parser or on a :class:`~clusterpy.config.OptionParser`
    (which adds the environment and config-file sources)."""
    if isinstance(target, OptionParser):
        target.add(*flags, help=help, default=default, type=type, env=env, group=group)
    else:
        extra = ([f"env {env}"] if isinstance(env, str) else []) + ([f"default {default}"] if default is not None else [])
        shown = f"{help} ({'; '.join(extra)})" if extra else help
        group.add_argument(*flags, default=default, type=type, help=shown.replace("%", "%%"))


def _group(target: argparse.ArgumentParser | OptionParser, title: str, description: str | None = None) -> Any:
    parser = target.parser if isinstance(target, OptionParser) else target
    return parser.add_argument_group(title, description)


def add_tls_arguments(target: argparse.ArgumentParser | OptionParser) -> None:
    """Add ``--certfile``, ``--keyfile``, ``--cafile``; resolve them with :func:`resolve_files`
    (which also reads :data:`ENV_CERTFILE` etc. for a plain argparse parser)."""
    group = _group(target, "TLS", "Mutual TLS under the secret-based authentication; make the files with "
                   "`clusterpy keygen`")
    _option(target, group, "--certfile", env=ENV_CERTFILE,
            help="this machine's certificate (PEM); turns TLS on")
    _option(target, group, "--keyfile", env=ENV_KEYFILE,
            help="its private key (PEM, mode 0600), if not in --certfile")
    _option(target, group, "--cafile", env=ENV_CAFILE,
            help="the cluster CA certificate (PEM): the only CA trusted")


def add_daemon_security_arguments(target: argparse.ArgumentParser | OptionParser) -> None:
    """Add the TLS flags and the limits every listening daemon has (see docs/SECURITY.md);
    :func:`daemon_security_options` turns the parsed flags into constructor arguments."""
    add_tls_arguments(target)
    group = _group(target, "limits on peers")
    env = isinstance(target, OptionParser)  # OptionParser derives CLUSTERPY_<NAME>
    _option(target, group, "--handshake-timeout", type=positive_float, default=10.0, env=env,
            help="seconds a new connection has to finish TLS and the handshake")
    _option(target, group, "--max-pending-handshakes", type=positive_int, default=64, env=env,
            help="unauthenticated connections at once; past it the oldest is dropped")
    _option(target, group, "--max-file-size", type=byte_size, env=env,
            help="largest file a client may send: bytes, or 512M, 2G... (default 1G)")
    _option(target, group, "--quota", type=byte_size, env=env,
            help="bytes the node's file cache may hold, transfers included (default 10G)")


def daemon_security_options(args: argparse.Namespace, *, limits: bool = True) -> dict[str, Any]:
    """Keyword arguments for a daemon from :func:`add_daemon_security_arguments`'s flags (only
    the TLS files with ``limits=False``, for :func:`add_tls_arguments`), with the TLS
    environment variables applied.

    Raises:
        ConfigurationError: an incomplete TLS configuration.
    """
    files = resolve_files(args.certfile, args.keyfile, args.cafile)
    tls_options = {
        "certfile": None if files is None else files.certfile,
        "keyfile": None if files is None else files.keyfile,
        "cafile": None if files is None else files.cafile,
    }
    if not limits:
        return tls_options
    return {
        **tls_options,
        "handshake_timeout": args.handshake_timeout,
        "max_pending_handshakes": args.max_pending_handshakes,
        "max_file_size": args.max_file_size,
        "quota": args.quota,
    }


def classify_ssl_error(exc: BaseException) -> str:
    """Sort a TLS failure: ``"certificate"`` (ours or the peer's was not accepted: retrying will
    not help), ``"mismatch"`` (one side speaks plain TCP or a refused TLS version),
    ``"eof"`` (the peer just went away), or ``"other"``."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "certificate"
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return "eof"
    text = f"{getattr(exc, 'reason', None) or ''} {exc}".upper()
    if any(reason in text for reason in _CERT_REASONS):
        return "certificate"
    if any(reason in text for reason in _MISMATCH_REASONS):
        return "mismatch"
    return "other"


def describe_ssl_error(exc: BaseException) -> str:
    """A one-line, actionable description of a TLS failure for logs and error messages."""
    reason = getattr(exc, "reason", None) or str(exc)
    kind = classify_ssl_error(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"certificate rejected: {exc.verify_message or reason} (signed by the cluster CA? "
                "still valid? a node's: does it name the address dialled?)")
    if kind == "certificate":
        who = "the peer rejected our certificate" if "ALERT" in reason.upper() else "certificate rejected"
        return f"{who} ({reason}): is it signed by the cluster CA and still valid?"
    if kind == "mismatch":
        return (f"TLS handshake failed ({reason}): the peer does not speak TLS, or not a version of "
                f"at least {MINIMUM_VERSION.name} (give both sides --certfile/--keyfile/--cafile)")
    return f"TLS failure ({reason})"
