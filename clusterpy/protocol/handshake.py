"""Mutual HMAC-SHA256 challenge-response handshake (sans-IO).

Both peers hold the cluster secret; neither ever sends it.  Four messages, each one frame body
of at most :data:`~clusterpy.protocol.framing.PREAUTH_MAX_FRAME` bytes, JSON only (nothing is
unpickled before authentication)::

    client                                                        server
      B1 = {"t":"hello", proto, alg, role, nonce_c, info}   ------>
                                                            <------  B2 + mac2
           B2 = {"t":"hello", proto, alg, role, nonce_s, info}
           mac2 = HMAC(secret, "clusterpy/1 server-proof\\0" + H(B1) + H(B2))
      B3 + mac3                                             ------>
           B3 = {"t":"proof"}
           mac3 = HMAC(secret, "clusterpy/1 client-proof\\0" + H(B1) + H(B2) + H(B3))
                                                            <------  B4 + mac4
           B4 = {"t":"welcome"}
           mac4 = HMAC(secret, "clusterpy/1 welcome\\0" + H(B1) + H(B2) + H(B3) + H(B4))

``H`` is SHA-256 of the exact JSON bytes, so roles, versions, algorithm and both nonces are
bound into every MAC: a downgrade, a reflected message or a replay from another handshake
fails.  The labels differ per direction, so a server's proof is never a valid client proof.
Session keys: ``master = HMAC(secret, "clusterpy/1 session\\0" + nonce_c + nonce_s)``,
``c2s = HMAC(master, "c2s")``, ``s2c = HMAC(master, "s2c")``.

Instead of its next message a peer may send ``{"t":"refused","reason":..., "kind":...}``
(no MAC; ``kind`` is one of ``"auth"``, ``"version"``, ``"protocol"``).

Failure protocol ("send the refusal, then close"): a failing :meth:`receive` (or
:meth:`abort`) moves the state machine to FAILED, stores the error in :attr:`error` and, when
telling the peer is useful, a refusal frame body in :attr:`refusal`; then it raises the error.
The I/O shell catches the error, sends :attr:`refusal` if it is not None, closes, and
re-raises.  Raising (rather than returning the refusal) means a shell that forgets the
courtesy still fails loudly.  Calls that are illegal in the current state raise
:class:`HandshakeStateError` and leave the state unchanged.

Errors: malformed/oversized input -> :class:`~clusterpy.errors.ProtocolError`; wrong secret,
bad MAC or unaccepted role -> :class:`~clusterpy.errors.AuthenticationError`; protocol,
algorithm, Python or cloudpickle version differences ->
:class:`~clusterpy.errors.VersionMismatchError`.

This module does no I/O; nonces are passed in by the caller.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, NoReturn

from ..errors import AuthenticationError, ProtocolError, VersionMismatchError
from .framing import PREAUTH_MAX_FRAME

__all__ = ["PROTOCOL", "ALGORITHM", "NONCE_SIZE", "HandshakeStateError", "ClientHandshake",
           "ServerHandshake"]

# /2: the per-job messages travel as tuples of fields (codec), which /1 peers cannot decode.
PROTOCOL = "clusterpy/2"
ALGORITHM = "hmac-sha256+aes256-gmac"
NONCE_SIZE = 32
_MAC_SIZE = 32
_MAX_INFO_ENTRIES = 32
_MAX_INFO_VALUE = 256
_MAX_REASON = 512

_SERVER_PROOF = b"clusterpy/1 server-proof\0"
_CLIENT_PROOF = b"clusterpy/1 client-proof\0"
_WELCOME = b"clusterpy/1 welcome\0"
_SESSION = b"clusterpy/1 session\0"

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_NONCE_RE = re.compile(r"[0-9a-f]{64}")
_HELLO_KEYS = frozenset({"t", "proto", "alg", "role", "nonce", "info"})
_REFUSAL_KEYS = frozenset({"t", "reason", "kind"})
_REQUIRED_INFO = ("python", "cloudpickle")
_WRONG_SECRET = "authentication failed: wrong secret?"
_KIND_ERRORS: Mapping[str, type[ProtocolError]] = {
    "auth": AuthenticationError,
    "version": VersionMismatchError,
    "protocol": ProtocolError,
}


class HandshakeStateError(RuntimeError):
    """A handshake method was called in a state that does not allow it (a local bug)."""


class _State(enum.Enum):
    START = "start"
    AWAIT_HELLO = "await-hello"
    AWAIT_PROOF = "await-proof"
    AWAIT_WELCOME = "await-welcome"
    DONE = "done"
    FAILED = "failed"


class _Reject(Exception):
    """Internal: a failure whose reason for the peer differs from the local message.

    (Handlers may also raise a plain ProtocolError: its message is then the reason.)
    """

    def __init__(self, error: ProtocolError, reason: str) -> None:
        super().__init__(str(error))
        self.error = error
        self.reason = reason


@dataclass(frozen=True)
class _Hello:
    role: str
    nonce: bytes
    info: dict[str, str]


# --- encoding and strict validation -------------------------------------------------------


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _mac(secret: bytes, label: bytes, *hashes: bytes) -> bytes:
    return hmac.digest(secret, label + b"".join(hashes), "sha256")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        # Duplicate keys would let two parsers disagree on what a message says.
        raise ValueError("duplicate key in JSON object")
    return result


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not allowed")


def _loads(raw: bytes) -> dict[str, object]:
    """Parse one JSON object strictly; any problem is a ProtocolError."""
    try:
        obj = json.loads(
            raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant
        )
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(f"handshake message is not valid JSON: {_short(str(exc))}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("handshake message is not a JSON object")
    return obj


def _check_role(value: object, exc: type[Exception]) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise exc(f"role must be 1-64 characters of [A-Za-z0-9_.-], not {_short(value)}")
    return value


def _check_info(value: object, exc: type[Exception]) -> dict[str, str]:
    if not isinstance(value, dict):
        raise exc(f"info must be an object of strings, not {_short(value)}")
    if len(value) > _MAX_INFO_ENTRIES:
        raise exc(f"info has {len(value)} entries; at most {_MAX_INFO_ENTRIES} are allowed")
    for key, item in value.items():
        if not isinstance(key, str) or not _NAME_RE.fullmatch(key):
            raise exc(f"info key must be 1-64 characters of [A-Za-z0-9_.-], not {_short(key)}")
        if not isinstance(item, str) or len(item) > _MAX_INFO_VALUE or not item.isprintable():
            raise exc(
                f"info[{key!r}] must be a printable string of at most {_MAX_INFO_VALUE} "
                f"characters, not {_short(item)}"
            )
    for key in _REQUIRED_INFO:
        if key not in value:
            raise exc(f"info lacks the required entry {key!r}")
    return dict(value)


def _parse_hello(raw: bytes) -> _Hello:
    """Validate a hello message (B1 or B2 without its MAC).

    Raises:
        VersionMismatchError: the peer speaks another protocol or MAC algorithm.
        ProtocolError: anything else is malformed.
    """
    obj = _loads(raw)
    if obj.get("t") != "hello":
        raise ProtocolError(f"expected a hello message, got t={_short(obj.get('t'))}")
    for key, ours, what in (("proto", PROTOCOL, "protocol"), ("alg", ALGORITHM, "algorithm")):
        theirs = obj.get(key)
        if not isinstance(theirs, str):
            raise ProtocolError(f"hello message has no valid {key!r} field")
        if theirs != ours:
            raise VersionMismatchError(
                f"peer speaks {what} {_short(theirs)}, this side speaks {ours!r}: "
                "install the same clusterpy version on every machine of the cluster"
            )
    if obj.keys() != _HELLO_KEYS:
        raise ProtocolError(f"hello message has fields {_short(sorted(obj))}, "
                            f"expected {sorted(_HELLO_KEYS)}")
    role = _check_role(obj["role"], ProtocolError)
    nonce = obj["nonce"]
    if not isinstance(nonce, str) or not _NONCE_RE.fullmatch(nonce):
        raise ProtocolError(f"nonce must be {NONCE_SIZE} bytes as lowercase hex")
    info = _check_info(obj["info"], ProtocolError)
    return _Hello(role=role, nonce=bytes.fromhex(nonce), info=info)


def _parse_refusal(body: bytes) -> tuple[ProtocolError, str] | None:
    """Return (error, reason) if ``body`` is a refusal, else None.

    A refusal is bare JSON; an authenticated message ends in 32 raw MAC bytes and so never
    parses as JSON, which is how the two are told apart.
    """
    try:
        obj = _loads(body)
    except ProtocolError:
        return None
    if obj.get("t") != "refused":
        return None
    reason, kind = obj.get("reason"), obj.get("kind", "protocol")
    if not obj.keys() <= _REFUSAL_KEYS or not isinstance(reason, str):
        return ProtocolError("peer sent a malformed refusal"), "malformed refusal"
    # The reason is unauthenticated text headed for logs: keep it short and printable.
    reason = "".join(c if c.isprintable() else "?" for c in reason[:_MAX_REASON])
    cls = _KIND_ERRORS.get(kind, ProtocolError) if isinstance(kind, str) else ProtocolError
    return cls(f"peer refused the handshake: {reason}"), reason


def _refusal_body(reason: str, error: BaseException) -> bytes:
    if isinstance(error, AuthenticationError):
        kind = "auth"
    elif isinstance(error, VersionMismatchError):
        kind = "version"
    else:
        kind = "protocol"
    return _dumps({"t": "refused", "reason": reason[:_MAX_REASON], "kind": kind})


def _major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def _version_problem(
    server: tuple[str, Mapping[str, str]], client: tuple[str, Mapping[str, str]]
) -> str | None:
    """Return a message naming both sides' versions if they cannot work together."""
    (s_role, s_info), (c_role, c_info) = server, client
    s_py, c_py = _major_minor(s_info["python"]), _major_minor(c_info["python"])
    s_cp, c_cp = s_info["cloudpickle"], c_info["cloudpickle"]
    if s_py == c_py and s_cp == c_cp:
        return None
    return (
        f"version mismatch: server ({s_role}) has Python {s_py} and cloudpickle {s_cp}, "
        f"client ({c_role}) has Python {c_py} and cloudpickle {c_cp}; install the same "
        "Python major.minor version and the same cloudpickle version on every machine "
        "of the cluster"
    )


# --- the state machines -------------------------------------------------------------------


class _Handshake:
    """Shared state and accessors of both sides."""

    #: Legal (state, call) -> next state.  Anything missing raises HandshakeStateError.
    _TRANSITIONS: ClassVar[Mapping[tuple[_State, str], _State]]
    _INITIAL: ClassVar[_State]

    def __init__(
        self,
        secret: bytes,
        *,
        role: str,
        info: Mapping[str, str],
        nonce: bytes,
        expected_peer_roles: frozenset[str] | set[str] | None = None,
    ) -> None:
        if not isinstance(secret, bytes) or not secret:
            raise ValueError("the cluster secret must be non-empty bytes")
        if not isinstance(nonce, bytes) or len(nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be exactly {NONCE_SIZE} random bytes")
        self._secret = secret
        self._role = _check_role(role, ValueError)
        self._info = _check_info(dict(info), ValueError)
        self._nonce = nonce
        self._expected = (
            None
            if expected_peer_roles is None
            else frozenset(_check_role(r, ValueError) for r in expected_peer_roles)
        )
        self._hello = _dumps(
            {"t": "hello", "proto": PROTOCOL, "alg": ALGORITHM, "role": self._role,
             "nonce": nonce.hex(), "info": self._info}
        )
        if len(self._hello) + _MAC_SIZE > PREAUTH_MAX_FRAME:
            raise ValueError(f"role and info too large for a {PREAUTH_MAX_FRAME}-byte hello")
        self._state = self._INITIAL
        self._hashes: list[bytes] = []
        self._peer: _Hello | None = None  # set once the peer has proved the secret
        self._keys: tuple[bytes, bytes] | None = None  # (send, recv) once done
        #: The error that failed the handshake, if it failed.
        self.error: Exception | None = None
        #: A frame body to send to the peer before closing, after a failure (or None).
        self.refusal: bytes | None = None
        #: The reason the peer gave when it refused us (or None).
        self.refusal_reason: str | None = None

    # -- accessors

    @property
    def state(self) -> str:
        """The current state's name (for logs and tests)."""
        return self._state.value

    @property
    def done(self) -> bool:
        """True once the handshake succeeded; the keys are then available."""
        return self._state is _State.DONE

    @property
    def failed(self) -> bool:
        """True once the handshake failed; see :attr:`error` and :attr:`refusal`."""
        return self._state is _State.FAILED

    @property
    def peer_authenticated(self) -> bool:
        """True once the peer has proved it knows the secret (peer_role/peer_info valid)."""
        return self._peer is not None

    def _authenticated_peer(self) -> _Hello:
        if self._peer is None:
            raise HandshakeStateError("the peer has not authenticated yet")
        return self._peer

    @property
    def peer_role(self) -> str:
        """The peer's role. Raises HandshakeStateError before the peer authenticated."""
        return self._authenticated_peer().role

    @property
    def peer_info(self) -> dict[str, str]:
        """The peer's info (a copy). Raises HandshakeStateError before it authenticated."""
        return dict(self._authenticated_peer().info)

    def _done_keys(self) -> tuple[bytes, bytes]:
        if self._keys is None or self._state is not _State.DONE:
            raise HandshakeStateError(f"no session keys: handshake is {self.state}")
        return self._keys

    @property
    def send_key(self) -> bytes:
        """Key for frames this side sends. Raises HandshakeStateError unless done."""
        return self._done_keys()[0]

    @property
    def recv_key(self) -> bytes:
        """Key for frames this side receives. Raises HandshakeStateError unless done."""
        return self._done_keys()[1]

    # -- machinery

    def _next_state(self, call: str) -> _State:
        try:
            return self._TRANSITIONS[(self._state, call)]
        except KeyError:
            raise HandshakeStateError(
                f"{type(self).__name__}.{call}() is not allowed in state {self.state!r}"
            ) from None

    def _run(
        self, body: bytes, handler: Callable[[bytes], bytes | None], *, answer: bool = True
    ) -> bytes | None:
        """Apply one received message: advance on success, fail (and raise) otherwise.

        ``answer=False``: the peer no longer listens, so failures produce no refusal.
        """
        next_state = self._next_state("receive")
        body = bytes(body)
        try:
            if len(body) > PREAUTH_MAX_FRAME:
                raise ProtocolError(f"handshake message of {len(body)} bytes is over the "
                                    f"{PREAUTH_MAX_FRAME}-byte limit")
            refused = _parse_refusal(body)
            if refused is not None:
                self.refusal_reason = refused[1]
                answer = False  # never answer a refusal with a refusal
                raise refused[0]
            out = handler(body)
        except _Reject as rej:
            self._set_failed(rej.error, rej.reason if answer else None)
            raise rej.error from None
        except ProtocolError as exc:
            self._set_failed(exc, str(exc) if answer else None)
            raise
        self._state = next_state
        return out

    def _set_failed(self, error: Exception, reason: str | None) -> None:
        self._state = _State.FAILED
        self.error = error
        self.refusal = None if reason is None else _refusal_body(reason, error)

    def abort(self, error: Exception) -> bytes | None:
        """Fail the handshake for a reason found outside it (framing error, timeout).

        Returns:
            A refusal body telling the peer ``str(error)``, or None if the handshake had
            already failed (the first failure is kept).
        Raises:
            HandshakeStateError: the handshake is already done.
        """
        if self._state is _State.DONE:
            raise HandshakeStateError("cannot abort a completed handshake")
        if self._state is _State.FAILED:
            return None
        self._set_failed(error, str(error))
        return self.refusal

    @staticmethod
    def _split(body: bytes, kind: str) -> tuple[bytes, bytes]:
        """Split ``{"t": kind}`` + MAC, checking the JSON part is exactly that."""
        raw, mac = body[:-_MAC_SIZE], body[-_MAC_SIZE:]
        if len(body) <= _MAC_SIZE or _loads(raw) != {"t": kind}:
            raise ProtocolError(f"expected a {kind} message")
        return raw, mac

    def _verify(self, mac: bytes, label: bytes, peer_role: str) -> None:
        expected = _mac(self._secret, label, *self._hashes)
        if not hmac.compare_digest(expected, mac):
            raise _Reject(
                AuthenticationError(
                    f"peer {peer_role!r} failed to prove it knows the cluster secret: "
                    "wrong secret?"
                ),
                _WRONG_SECRET,
            )

    def _accept_peer(self, hello: _Hello, server: _Hello, client: _Hello) -> None:
        """Record the now-authenticated peer; check its role and versions."""
        self._peer = hello
        if self._expected is not None and hello.role not in self._expected:
            raise _Reject(
                AuthenticationError(
                    f"peer role {hello.role!r} is not accepted by this {self._role} "
                    f"(accepted: {', '.join(sorted(self._expected))})"
                ),
                f"this {self._role} does not accept peers with role {hello.role!r}",
            )
        problem = _version_problem((server.role, server.info), (client.role, client.info))
        if problem is not None:
            raise _Reject(VersionMismatchError(problem), problem)

    def _derive_keys(self, nonce_c: bytes, nonce_s: bytes, *, client: bool) -> None:
        master = hmac.digest(self._secret, _SESSION + nonce_c + nonce_s, "sha256")
        c2s = hmac.digest(master, b"c2s", "sha256")
        s2c = hmac.digest(master, b"s2c", "sha256")
        self._keys = (c2s, s2c) if client else (s2c, c2s)

    def _own(self) -> _Hello:
        return _Hello(role=self._role, nonce=self._nonce, info=self._info)

    def _parse_peer_hello(self, raw: bytes) -> _Hello:
        hello = _parse_hello(raw)
        if hello.nonce == self._nonce:
            # Only a reflected message carries our own nonce back.
            raise ProtocolError("peer sent our own nonce back: reflected message")
        return hello


class ClientHandshake(_Handshake):
    """The connecting side: :meth:`start`, then :meth:`receive` B2 and B4.

    Args:
        secret: the cluster secret (non-empty bytes).
        role: this side's role label, e.g. ``"client"``.
        info: at least ``"python"`` (major.minor) and ``"cloudpickle"`` versions.
        nonce: exactly 32 fresh random bytes.
        expected_peer_roles: server roles accepted (None: any).
    Raises:
        ValueError: an argument is invalid (also: role + info too large for a hello).
    """

    _INITIAL = _State.START
    _TRANSITIONS = {
        (_State.START, "start"): _State.AWAIT_HELLO,
        (_State.AWAIT_HELLO, "receive"): _State.AWAIT_WELCOME,
        (_State.AWAIT_WELCOME, "receive"): _State.DONE,
    }

    def start(self) -> bytes:
        """Return B1, the first message to send.

        Raises:
            HandshakeStateError: called twice.
        """
        self._state = self._next_state("start")
        self._hashes = [_sha(self._hello)]
        return self._hello

    def receive(self, body: bytes) -> bytes | None:
        """Process the server's next message.

        Returns:
            B3 + mac3 to send after B2; None after B4 (the handshake is then :attr:`done`).
        Raises:
            ProtocolError: (or a subclass) the message is bad or is a refusal; the handshake
                is then failed and :attr:`refusal` may hold a body to send before closing.
            HandshakeStateError: not expecting a message now (state unchanged).
        """
        if self._state is _State.AWAIT_HELLO:
            return self._run(body, self._on_hello)
        # The server already considers itself done: it would not read a refusal.
        return self._run(body, self._on_welcome, answer=False)

    def _on_hello(self, body: bytes) -> bytes:
        if len(body) <= _MAC_SIZE:
            raise ProtocolError("hello message is too short")
        raw, mac = body[:-_MAC_SIZE], body[-_MAC_SIZE:]
        hello = self._parse_peer_hello(raw)
        self._hashes.append(_sha(raw))
        self._verify(mac, _SERVER_PROOF, hello.role)
        self._accept_peer(hello, server=hello, client=self._own())
        proof = _dumps({"t": "proof"})
        self._hashes.append(_sha(proof))
        mac3 = _mac(self._secret, _CLIENT_PROOF, *self._hashes)
        return proof + mac3

    def _on_welcome(self, body: bytes) -> None:
        raw, mac = self._split(body, "welcome")
        peer = self._authenticated_peer()
        self._hashes.append(_sha(raw))
        self._verify(mac, _WELCOME, peer.role)
        self._derive_keys(self._nonce, peer.nonce, client=True)


class ServerHandshake(_Handshake):
    """The accepting side: :meth:`receive` B1 and B3.

    Args: as for :class:`ClientHandshake` (``expected_peer_roles``: client roles accepted).
    Raises:
        ValueError: an argument is invalid.
    """

    _client_hello: _Hello  # the client's (not yet authenticated) B1, set in AWAIT_PROOF
    _INITIAL = _State.AWAIT_HELLO
    _TRANSITIONS = {
        (_State.AWAIT_HELLO, "receive"): _State.AWAIT_PROOF,
        (_State.AWAIT_PROOF, "receive"): _State.DONE,
    }

    def receive(self, body: bytes) -> bytes:
        """Process the client's next message.

        Returns:
            B2 + mac2 after B1; B4 + mac4 after B3 (the handshake is then :attr:`done`).
        Raises:
            ProtocolError: (or a subclass) the message is bad, is a refusal, or the client
                failed authentication or the role/version checks; the handshake is then
                failed and :attr:`refusal` usually holds a body to send before closing.
            HandshakeStateError: not expecting a message now (state unchanged).
        """
        handler = self._on_hello if self._state is _State.AWAIT_HELLO else self._on_proof
        out = self._run(body, handler)
        assert out is not None  # both server handlers always answer
        return out

    def _on_hello(self, body: bytes) -> bytes:
        self._client_hello = self._parse_peer_hello(body)
        self._hashes = [_sha(body), _sha(self._hello)]
        mac2 = _mac(self._secret, _SERVER_PROOF, *self._hashes)
        return self._hello + mac2

    def _on_proof(self, body: bytes) -> bytes:
        client = self._client_hello
        raw, mac = self._split(body, "proof")
        self._hashes.append(_sha(raw))
        self._verify(mac, _CLIENT_PROOF, client.role)
        self._accept_peer(client, server=self._own(), client=client)
        welcome = _dumps({"t": "welcome"})
        self._hashes.append(_sha(welcome))
        mac4 = _mac(self._secret, _WELCOME, *self._hashes)
        self._derive_keys(client.nonce, self._nonce, client=False)
        return welcome + mac4
