"""Who may use the monitor: the access token, the Host check, the method rule. Pure decisions.

The HTTP shell (``_server.py``) gathers the facts of a request and asks :meth:`Guard.check`;
the answer is None (go ahead) or a :class:`Refusal` with the status to send. Rules:

* Every route needs the token. A GET may carry it as ``?token=``, an ``Authorization: Bearer``
  or ``X-Clusterpy-Token`` header, or the cookie the page sets; a POST only in the header or the
  query: a cookie alone never authorizes a change (cross-site requests carry cookies, not
  headers). The token is compared in constant time.
* The Host header must name the address the monitor is bound to (or ``localhost`` for a
  loopback one): a page on an attacker's domain that resolves to 127.0.0.1 (DNS rebinding) is
  refused, as is a missing Host.
* A POST whose Origin header (if any) is not the monitor's own is refused.
* Only GET/HEAD read, only POST changes state; routes enforce the method (405 otherwise).
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Iterable

__all__ = ["Guard", "Refusal", "host_forms", "allowed_hosts_for", "COOKIE_PREFIX"]

COOKIE_PREFIX = "clusterpy_monitor_"


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    reason: str


def host_forms(host: str, port: int) -> set[str]:
    """The Host header values that name ``host`` on ``port`` (lower case)."""
    host = host.lower().strip("[]")
    try:
        bracketed = f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        bracketed = host
    forms = {f"{bracketed}:{port}"}
    if port == 80:
        forms.add(bracketed)
    return forms


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _local_addresses() -> set[str]:
    """Every address of this machine's interfaces, and its names (for a wildcard bind)."""
    out = {"127.0.0.1", "::1", "localhost", socket.gethostname(), socket.getfqdn()}
    try:
        import netifaces

        for iface in netifaces.interfaces():
            for family in (netifaces.AF_INET, netifaces.AF_INET6):
                for entry in netifaces.ifaddresses(iface).get(family, []):
                    out.add(entry["addr"].split("%")[0])
    except (ImportError, OSError, ValueError):
        pass
    return out


def allowed_hosts_for(host: str, port: int, extra: Iterable[str] = ()) -> frozenset[str]:
    """Host header values accepted for a monitor bound to ``host:port``.

    Loopback binds accept ``127.0.0.1``/``[::1]``/``localhost``; a wildcard bind (``0.0.0.0``,
    ``::``, ``""``) accepts this machine's addresses and names; any other bind, that address.
    ``extra`` adds names (``"monitor.example.org"`` or ``"name:port"``), for a reverse proxy.
    """
    names: set[str] = set()
    if host in ("", "0.0.0.0", "::"):
        names |= _local_addresses()
    else:
        names.add(host)
        if _is_loopback(host):
            names |= {"127.0.0.1", "::1", "localhost"}
    forms: set[str] = set()
    for name in names:
        forms |= host_forms(name, port)
    for name in extra:
        name = name.lower()
        forms |= {name} if re.fullmatch(r"(\[[0-9a-f:.]+\]|[^:\[\]]+):\d+", name) else host_forms(name, port)
    return frozenset(forms)


class Guard:
    """Decides whether one request may proceed.

    Args:
        token: the access token (from ``secrets.token_urlsafe``).
        allowed_hosts: accepted Host header values (see :func:`allowed_hosts_for`).
    """

    def __init__(self, token: str, allowed_hosts: Iterable[str]) -> None:
        if len(token) < 16:
            raise ValueError("the monitor's token must be at least 16 characters")
        self.token = token
        self.allowed_hosts = frozenset(h.lower() for h in allowed_hosts)
        self.origins = frozenset(f"http://{h}" for h in self.allowed_hosts)

    def _matches(self, candidate: str | None) -> bool:
        return candidate is not None and hmac.compare_digest(candidate.encode(), self.token.encode())

    def check(self, *, method: str, host: str | None, origin: str | None = None,
              query_token: str | None = None, header_token: str | None = None,
              cookie_token: str | None = None) -> Refusal | None:
        """None if the request may go on, else why not (and the HTTP status to answer)."""
        if host is None or host.lower() not in self.allowed_hosts:
            return Refusal(403, "Host header not allowed (the monitor answers only to its own address)")
        if method in ("GET", "HEAD"):
            offered = [t for t in (header_token, query_token, cookie_token) if t is not None]
        else:
            if origin is not None and origin.lower() not in self.origins:
                return Refusal(403, "cross-origin request refused")
            offered = [t for t in (header_token, query_token) if t is not None]
        if not offered:
            if method not in ("GET", "HEAD") and cookie_token is not None:
                return Refusal(403, "a change needs the token in the X-Clusterpy-Token header")
            return Refusal(401, "the access token is missing: open the URL the monitor printed")
        # The most explicit one decides (header, then query, then cookie): a stale cookie
        # from an earlier monitor on this port must not hide a fresh ?token= (the page then
        # replaces the cookie).
        if not self._matches(offered[0]):
            return Refusal(403, "wrong access token")
        return None
