"""Encoding of authenticated messages: the only place that pickles protocol messages.

Messages are pickled (protocol 5) but decoded with a restricted unpickler that can build only
the dataclasses in :data:`~clusterpy.protocol.messages.MESSAGE_TYPES` and plain builtins, so
even an authenticated peer cannot make the daemon construct arbitrary objects while decoding a
message. User objects are opaque blobs inside messages, unpickled only where they are meant
to run (a worker) or be returned (the client).

Large blobs travel as pickle-5 out-of-band buffers (:mod:`.outofband`): :func:`encode_parts`
returns them as separate parts, written to the socket as they are, never copied into the
pickle, and :func:`decode` hands the unpickler read-only views of them inside the received
payload, so a decoded message's large blobs are views, not copies.

The per-job messages (:class:`~.messages.SubmitJobs`, :class:`~.messages.JobDone`,
:class:`~.messages.JobsDone`) travel as plain tuples, ``(tag, *fields)``, their jobs or
reports nested as tuples of fields (a JobsDone's reports without the ``comp_id`` they share),
and :func:`decode` rebuilds the dataclasses. A pickled class costs the pickler an import of
its module to check it, per class and per pickle, and the unpickler a ``find_class`` call: a
SubmitJobs of one job took ~31k instructions to encode as dataclasses, ~15k as tuples; a
JobDone ~24k and ~18k.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from ..errors import ProtocolError
from . import messages, outofband
from .messages import MESSAGE_TYPES
from .outofband import Part

__all__ = ["encode", "encode_parts", "decode", "Part"]

_MODULE = "clusterpy.protocol.messages"
# Tags of the messages sent as tuples (see the module's docstring).
_SUBMIT_JOBS, _JOB_DONE, _JOBS_DONE = 1, 2, 3
_MARK = bytes((outofband.MARK,))
_IN_PLACE = 64 * 1024


class _ViewReader:
    """The file interface the unpickler uses, over a buffer it does not copy: large bytes
    objects inside the pickle are filled straight from it with ``readinto``."""

    __slots__ = ("_view", "_pos")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        start = self._pos
        end = len(self._view) if n is None or n < 0 else min(start + n, len(self._view))
        self._pos = end
        return self._view[start:end].tobytes()

    def readinto(self, buffer: Any) -> int:
        with memoryview(buffer) as target:
            n = min(target.nbytes, len(self._view) - self._pos)
            target.cast("B")[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def readline(self) -> bytes:
        start = self._pos
        end = self._view[start:].tobytes().find(b"\n")
        self._pos = len(self._view) if end < 0 else start + end + 1
        return self._view[start : self._pos].tobytes()


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == _MODULE and name in MESSAGE_TYPES:
            return MESSAGE_TYPES[name]
        raise ProtocolError(f"message refers to a type that is not a clusterpy message: {module}.{name}")


# Messages that can carry user bytes (arguments, results, output, files). pickle.dumps grows
# its output by reallocation, which costs ~400 us per MB once it is large (3 MB: 1.7 ms,
# against 0.4 ms for a Pickler writing into a BytesIO); below a few hundred KB it is the
# faster one, by ~1 us for a small message.
_BULKY = frozenset({messages.DeployComputation, messages.FileChunk, messages.SubmitJobs, messages.JobDone,
                    messages.JobsDone, messages.JobProgress, messages.JobFile})
# A batch of at most this many jobs pickles small: in band, a blob is under OUT_OF_BAND_MIN
# (a larger one is an out-of-band buffer), so the pickle stays under ~512 KB (a JobsDone's
# reports carry up to four blobs each, but the node holds at most ~64 KB of their data in one).
_SMALL_BATCH = 8


def _small_pickle(message: object) -> bool:
    """Whether a bulky message surely pickles small (see above): a batch of a few jobs, a
    job's report without a traceback (a report's only text of unbounded size), a few such
    reports, one piece of data."""
    kind = type(message)
    if kind is messages.JobDone:
        return message.traceback is None  # type: ignore[attr-defined]
    if kind is messages.SubmitJobs:
        return len(message.jobs) <= _SMALL_BATCH  # type: ignore[attr-defined]
    if kind is messages.JobsDone:
        reports = message.reports  # type: ignore[attr-defined]
        if len(reports) > _SMALL_BATCH:
            return False
        for report in reports:
            if report.traceback is not None:
                return False
        return True
    return kind is messages.JobProgress or kind is messages.FileChunk


_request_fields = messages.PICKLED_FIELDS[messages.JobRequest]
_report_fields = messages.PICKLED_FIELDS[messages.JobDone]


def _as_tuple(message: object) -> object:
    """What ``message`` pickles as: a tuple for the per-job messages (see the module's
    docstring), the message itself for any other.

    Raises:
        ValueError: a JobsDone holds a report of another computation (it has no field for it).
    """
    kind = type(message)
    if kind is messages.SubmitJobs:
        return (_SUBMIT_JOBS, message.comp_id,  # type: ignore[attr-defined]
                tuple([_request_fields(job, 5) for job in message.jobs]))  # type: ignore[attr-defined]
    if kind is messages.JobDone:
        return (_JOB_DONE, *_report_fields(message, 5))
    if kind is messages.JobsDone:
        comp_id = message.comp_id  # type: ignore[attr-defined]
        reports = [_report_fields(report, 5) for report in message.reports]  # type: ignore[attr-defined]
        for fields in reports:
            if fields[0] != comp_id:
                raise ValueError(f"a JobsDone of computation {comp_id!r} holds a report of {fields[0]!r}")
        return (_JOBS_DONE, comp_id, tuple([fields[1:] for fields in reports]))
    return message


def _from_tuple(fields: tuple[Any, ...]) -> object:
    """The message a tuple from :func:`_as_tuple` stands for.

    Raises:
        ProtocolError: an unknown tag, or jobs or reports that are not tuples of fields.
        TypeError, ValueError: fields that do not fit the message (the caller's ProtocolError).
    """
    tag = fields[0] if fields else None
    if tag == _JOB_DONE:
        return messages.JobDone(*fields[1:])
    if tag == _JOBS_DONE:
        _, comp_id, reports = fields
        job_done = messages.JobDone
        built = tuple([job_done(comp_id, *report) for report in reports if type(report) is tuple])
        if type(reports) is not tuple or len(built) != len(reports):
            raise ProtocolError("JobsDone holds reports that are not tuples of fields")
        return messages.JobsDone(comp_id, built)
    if tag == _SUBMIT_JOBS:
        _, comp_id, jobs = fields
        request = messages.JobRequest
        requests = tuple([request(*job) for job in jobs if type(job) is tuple])
        if type(jobs) is not tuple or len(requests) != len(jobs):
            raise ProtocolError("SubmitJobs holds jobs that are not tuples of fields")
        return messages.SubmitJobs(comp_id, requests)
    raise ProtocolError(f"payload decoded to a tuple tagged {tag!r:.40}, not a clusterpy message")


def encode_parts(message: object) -> list[Part]:
    """Serialize one message (a dataclass from :mod:`.messages`) as the parts of its payload,
    to be sent in order. Large blobs are parts of their own, not copies: they must not change
    until sent."""
    if type(message) not in _BULKY:
        return [pickle.dumps(message, protocol=5)]
    obj = _as_tuple(message)
    if _small_pickle(message):
        buffers: list[pickle.PickleBuffer] = []
        data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
        return [data] if not buffers else outofband.assemble(data, buffers)
    return outofband.dumps(obj)


def encode(message: object) -> bytes:
    """Serialize one message as one ``bytes`` payload (see :func:`encode_parts`)."""
    parts = encode_parts(message)
    return parts[0] if len(parts) == 1 else b"".join(parts)  # type: ignore[return-value]


def _reader(data: bytes | bytearray | memoryview) -> io.BytesIO | _ViewReader:
    return io.BytesIO(data) if type(data) is bytes or len(data) < _IN_PLACE else _ViewReader(data)


_CLASSES = frozenset(MESSAGE_TYPES.values())


def decode(payload: bytes | bytearray | memoryview) -> Any:
    """Rebuild one message from an authenticated payload.

    Raises:
        ProtocolError: the payload is not a well-formed clusterpy message.
    """
    # BytesIO copies anything but bytes; a large bytearray or view is read in place instead.
    try:
        if type(payload) is bytes and payload[:1] != _MARK:  # a small in-band message: most of them
            message = _RestrictedUnpickler(io.BytesIO(payload)).load()
        else:
            message = outofband.load(_RestrictedUnpickler, payload, _reader)
        if type(message) is tuple:  # a per-job message (see the module's docstring)
            return _from_tuple(message)
    except ProtocolError:
        raise
    except Exception as exc:  # any malformed pickle is the peer's fault, never ours
        raise ProtocolError(f"undecodable message: {exc!r}") from None
    kind = type(message)
    if kind not in _CLASSES:
        raise ProtocolError(f"payload decoded to {type(message).__name__}, not a clusterpy message")
    if kind is messages.JobsDone:
        _check_reports(message)
    return message


def _check_reports(message: messages.JobsDone) -> None:
    """Refuse a batch of reports a receiver could not handle as reports that came alone: its
    reports must be a tuple of JobDone s of its own computation (the restricted unpickler
    builds any message type, and any builtin container, wherever the pickle says).

    Raises:
        ProtocolError: the batch holds something else.
    """
    reports, comp_id = message.reports, message.comp_id
    if type(reports) is not tuple:
        raise ProtocolError(f"JobsDone holds a {type(reports).__name__}, not a tuple of reports")
    for report in reports:
        if type(report) is not messages.JobDone:
            raise ProtocolError(f"JobsDone holds a {type(report).__name__}, not a JobDone")
        if report.comp_id != comp_id:
            raise ProtocolError(f"JobsDone of computation {comp_id!r:.80} holds a report of {report.comp_id!r:.80}")
