"""The client's append-only recovery journal (``JobCluster(recover_file=...)``).

File layout::

    b"CLPYJRN1" | nonce (16) | header length (4) | header JSON | header MAC (32)
    then records: length (4) | MAC (32) | payload (pickle of a tuple)

Every MAC is HMAC-SHA256 under a key derived from the cluster secret and the file's nonce,
over the record's sequence number and payload, so records cannot be altered, dropped or
reordered unnoticed, and a record is unpickled only after its MAC verified (authenticate,
then deserialize, for files as for the network). The header carries the Python, cloudpickle
and clusterpy versions. A torn last record (a crash mid-write) ends the journal quietly.

Durability policy: records are handed to the OS (``os.write``) at the end of the event-loop
turn that produced them, so a client killed by SIGKILL loses at most that turn's records;
``fsync`` runs at most once per ``sync_interval`` (default 1 s), which bounds what a machine
crash can lose. The cost is one ``write`` per loop turn plus the pickling and HMAC of each
record (a few microseconds per job event).
"""

from __future__ import annotations

import hmac
import json
import os
import pickle
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import cloudpickle

from . import __version__
from .errors import ConfigurationError, ProtocolError

__all__ = ["JournalWriter", "read_journal", "JournalContents", "JournalError"]

MAGIC = b"CLPYJRN1"
_LEN = struct.Struct(">I")
_MAC = 32
_MAX_RECORD = 1 << 31


class JournalError(ProtocolError):
    """The journal is not a clusterpy journal, was written with another secret, or was altered."""


def _key(secret: bytes, nonce: bytes) -> bytes:
    return hmac.digest(secret, b"clusterpy/1 journal\0" + nonce, "sha256")


def _mac(key: bytes, seq: int, payload: bytes) -> bytes:
    return hmac.digest(key, seq.to_bytes(8, "big") + payload, "sha256")


class JournalWriter:
    """Appends records; the owner calls :meth:`flush` once per loop turn and :meth:`sync` now and then."""

    def __init__(self, path: str | os.PathLike[str], secret: bytes, *, comp_id: str, computation: str) -> None:
        self.path = os.fspath(path)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            raise ConfigurationError(
                f"recovery journal {self.path!r} already exists: recover its jobs with "
                f"clusterpy.recover_jobs({self.path!r}) or delete it") from None
        except OSError as exc:
            raise ConfigurationError(f"cannot create recovery journal {self.path!r}: {exc}") from exc
        nonce = os.urandom(16)
        self._key = _key(secret, nonce)
        self._seq = 0
        self._pending: list[bytes] = []
        self._last_sync = time.monotonic()
        header = json.dumps({
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "cloudpickle": cloudpickle.__version__, "clusterpy": __version__,
            "comp_id": comp_id, "computation": computation, "created": time.time(),
        }).encode()
        os.write(self._fd, MAGIC + nonce + _LEN.pack(len(header)) + header + _mac(self._key, 0, header))
        os.fsync(self._fd)

    @classmethod
    def resume(cls, path: str | os.PathLike[str], secret: bytes, contents: "JournalContents") -> "JournalWriter":
        """Append to an existing journal (recovery records what it collects), dropping a torn tail."""
        self = cls.__new__(cls)
        self.path = os.fspath(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW)
        os.ftruncate(self._fd, contents.valid_length)
        os.lseek(self._fd, 0, os.SEEK_END)
        self._key = _key(secret, contents.nonce)
        self._seq = len(contents.records)
        self._pending = []
        self._last_sync = time.monotonic()
        return self

    def append(self, *record: Any) -> None:
        """Queue one record (a tuple of picklable values); it reaches the file at the next flush."""
        payload = cloudpickle.dumps(record, protocol=5)
        self._seq += 1
        self._pending.append(_LEN.pack(len(payload)) + _mac(self._key, self._seq, payload) + payload)

    def flush(self) -> None:
        if self._pending and self._fd >= 0:
            data = b"".join(self._pending)
            self._pending.clear()
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]

    def sync(self, interval: float = 1.0) -> None:
        """fsync if the last one is older than ``interval`` seconds."""
        self.flush()
        now = time.monotonic()
        if self._fd >= 0 and now - self._last_sync >= interval:
            os.fsync(self._fd)
            self._last_sync = now

    def close(self, *, remove: bool = False) -> None:
        if self._fd < 0:
            return
        self.flush()
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        if remove:
            os.unlink(self.path)


@dataclass
class JournalContents:
    header: dict[str, Any]
    records: list[tuple[Any, ...]] = field(default_factory=list)
    torn: bool = False  # the last record was incomplete (the writer died mid-write)
    nonce: bytes = b""
    valid_length: int = 0  # bytes up to the end of the last good record


def _records(data: bytes, key: bytes, offset: int) -> Iterator[tuple[tuple[Any, ...], int] | None]:
    seq = 0
    while offset < len(data):
        if offset + _LEN.size + _MAC > len(data):
            yield None
            return
        (size,) = _LEN.unpack_from(data, offset)
        start = offset + _LEN.size + _MAC
        if size > _MAX_RECORD or start + size > len(data):
            yield None
            return
        mac, payload = data[offset + _LEN.size:start], data[start:start + size]
        seq += 1
        if not hmac.compare_digest(mac, _mac(key, seq, payload)):
            if start + size == len(data):
                yield None  # a torn last record can also end in garbage
                return
            raise JournalError(f"journal record {seq} failed its MAC check: the file was altered or damaged")
        offset = start + size
        yield pickle.loads(payload), offset


def read_journal(path: str | os.PathLike[str], secret: bytes) -> JournalContents:
    """Verify and read a journal.

    Raises:
        JournalError: not a journal, wrong secret, or altered before its last record.
        ConfigurationError: the file cannot be read.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigurationError(f"cannot read recovery journal {os.fspath(path)!r}: {exc}") from exc
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 16 + _LEN.size:
        raise JournalError(f"{os.fspath(path)!r} is not a clusterpy recovery journal")
    nonce = data[len(MAGIC):len(MAGIC) + 16]
    offset = len(MAGIC) + 16
    (hlen,) = _LEN.unpack_from(data, offset)
    offset += _LEN.size
    header, mac = data[offset:offset + hlen], data[offset + hlen:offset + hlen + _MAC]
    key = _key(secret, nonce)
    if len(header) != hlen or not hmac.compare_digest(mac, _mac(key, 0, header)):
        raise JournalError(f"recovery journal {os.fspath(path)!r} was written with another secret, or is damaged")
    contents = JournalContents(json.loads(header), nonce=nonce, valid_length=offset + hlen + _MAC)
    for item in _records(data, key, offset + hlen + _MAC):
        if item is None:
            contents.torn = True
            break
        record, contents.valid_length = item
        contents.records.append(record)
    return contents
