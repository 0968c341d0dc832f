"""Tools of the hostile-input suite (test_hostile.py): an unpickling spy, a record-free log
handler, and a hand-driven attacking peer."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import os
import pickle

import cloudpickle
import pytest

from clusterpy.identity import local_info
from clusterpy.protocol import codec
from clusterpy.protocol import messages as m
from clusterpy.protocol.framing import FrameDecoder, encode_frame
from clusterpy.protocol.handshake import ClientHandshake
from clusterpy.protocol.session import SessionCipher

from .conftest import SECRET

KEY = SECRET.encode()
INFO = local_info()


class UnpickleSpy:
    """Records every deserialization entry point called while :attr:`armed`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, bool]] = []  # (entry point, restricted to clusterpy messages)
        self.armed = False
        spy = self

        def wrap(name: str, fn, restricted: bool = False):
            @functools.wraps(fn)
            def recorder(*args, **kwargs):
                if spy.armed:
                    spy.calls.append((name, restricted))
                return fn(*args, **kwargs)
            return recorder

        for module in (pickle, cloudpickle):
            for fn in ("loads", "load"):
                monkeypatch.setattr(module, fn, wrap(f"{module.__name__}.{fn}", getattr(module, fn)))

        class RecordingUnpickler(pickle.Unpickler):
            def load(self):
                if spy.armed:
                    spy.calls.append(("pickle.Unpickler.load", False))
                return super().load()

        monkeypatch.setattr(pickle, "Unpickler", RecordingUnpickler)
        restricted_load = codec._RestrictedUnpickler.load
        monkeypatch.setattr(codec._RestrictedUnpickler, "load",
                            wrap("codec restricted unpickler", restricted_load, restricted=True))
        monkeypatch.setattr(codec, "decode", wrap("codec.decode", codec.decode, restricted=True))

    @property
    def unrestricted(self) -> list[str]:
        return [name for name, restricted in self.calls if not restricted]

    def arm(self) -> None:
        self.calls.clear()
        self.armed = True


class LogLines(logging.Handler):
    """The ``clusterpy`` log as formatted lines. Unlike caplog (and pytest's report capture)
    it keeps no records: a record's arguments (an exception, its traceback, the frames, their
    read buffers) would otherwise stay alive and skew the memory measurement."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


class Raw:
    """A hand-driven TCP peer: exact bytes out, frames in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder(1 << 21)
        self.frames: list[bytes] = []
        self.cipher: SessionCipher | None = None
        self.sent: list[bytes] = []  # every frame body sent, for replays

    @classmethod
    async def open(cls, port: int) -> "Raw":
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    def send_frame(self, body: bytes) -> None:
        self.sent.append(body)
        self.writer.write(encode_frame(body))

    async def frame(self, timeout: float = 5.0) -> bytes:
        async with asyncio.timeout(timeout):
            while not self.frames:
                data = await self.reader.read(65536)
                if not data:
                    raise EOFError
                self.frames.extend(self.decoder.feed(data))
        return self.frames.pop(0)

    async def handshake(self, secret: bytes = KEY, **hello) -> ClientHandshake:
        hs = ClientHandshake(secret, role="client", info=INFO, nonce=os.urandom(32))
        self.send_frame(hs.start())
        self.send_frame(hs.receive(await self.frame()))
        assert hs.receive(await self.frame()) is None and hs.done
        self.cipher = SessionCipher(hs.send_key, hs.recv_key)
        return hs

    def send_sealed(self, payload: bytes) -> bytes:
        assert self.cipher is not None
        body = self.cipher.seal(payload)
        self.send_frame(body)
        return body

    async def closed_by_peer(self, timeout: float = 5.0) -> list[bytes]:
        """Read until the node closes; return the frames it sent first (a refusal, say)."""
        frames = []
        async with asyncio.timeout(timeout):
            while True:
                try:
                    frames.append(await self.frame(timeout))
                except (EOFError, ConnectionError):
                    return frames

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


def refusal(frames: list[bytes]) -> dict:
    assert frames, "the node closed without a refusal"
    obj = json.loads(frames[0])
    assert obj["t"] == "refused"
    return obj


async def deploy(raw: Raw, comp_id: str, files: list[tuple[str, bytes]], dest_path: str | None = None) -> object:
    metas = tuple(m.FileMeta(name, hashlib.sha256(data).hexdigest(), len(data), 0o644) for name, data in files)
    raw.send_sealed(codec.encode(m.DeployComputation(comp_id, "program", metas, None, ("run.sh",),
                                                     dest_path=dest_path)))
    reply = codec.decode(raw.cipher.open(await raw.frame()))
    if isinstance(reply, m.FilesNeeded):
        for name, data in files:
            sha = hashlib.sha256(data).hexdigest()
            if sha in reply.sha256s:
                raw.send_sealed(codec.encode(m.FileChunk(comp_id, sha, data, True)))
        reply = codec.decode(raw.cipher.open(await raw.frame()))
    return reply
