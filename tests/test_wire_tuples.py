"""The per-job messages travel as tuples of fields (clusterpy.protocol.codec).

SubmitJobs, JobDone and JobsDone pickle with no class reference at all (a pickled class costs
the pickler an import per class and per pickle, the unpickler a find_class call), in band or
with their large blobs out of band, and decode to the very dataclasses; a JobsDone's reports
all get its comp_id. Forged tuples (an unknown tag, jobs or reports that are not tuples of
fields, fields that do not fit) and globals hidden inside a tuple are ProtocolErrors. Every
other message still pickles as its dataclass.
"""

from __future__ import annotations

import os
import pickle
import pickletools

import pytest

from clusterpy.errors import ProtocolError
from clusterpy.protocol import codec, outofband
from clusterpy.protocol import messages as m


def done(job_id: str, result: object = b"\x80\x05K\x02.", comp_id: str = "c1", traceback: str | None = None) -> m.JobDone:
    return m.JobDone(comp_id, job_id, 1, "finished", result, None, None, None, traceback, b"out", b"", 1.0, 2.0,
                     0.1, None)


def pickle_of(parts: list[outofband.Part]) -> bytes:
    """The pickle inside an encoded payload (either form)."""
    payload = b"".join(parts)
    if outofband.is_out_of_band(payload):
        return bytes(outofband.split(payload)[0])
    return payload


def opcodes(data: bytes) -> set[str]:
    return {op.name for op, _arg, _pos in pickletools.genops(data)}


BIG = os.urandom(outofband.MIN_SIZE + 1)
PER_JOB = [
    m.SubmitJobs("c1", (m.JobRequest("1", 1, b"args", None, 1), m.JobRequest("2", 3, b"more", 5.0, 2))),
    m.SubmitJobs("c1", tuple(m.JobRequest(str(i), 1, os.urandom(50), None, 1) for i in range(40))),
    m.SubmitJobs("c1", (m.JobRequest("1", 1, BIG, None, 1), m.JobRequest("2", 1, (b"pickle", BIG), None, 1))),
    done("7"), done("7", None), done("7", BIG), done("7", (b"pickle", BIG)), done("7", traceback="x" * 100_000),
    m.JobsDone("c1", (done("1"), done("2", BIG), done("3", None))),
    m.JobsDone("c1", tuple(done(str(i)) for i in range(40))),
]


@pytest.mark.parametrize("message", PER_JOB, ids=lambda msg: type(msg).__name__)
def test_per_job_messages_pickle_as_plain_tuples_and_decode_to_the_dataclasses(message):
    parts = codec.encode_parts(message)
    ops = opcodes(pickle_of(parts))
    assert not ops & {"GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "NEWOBJ", "INST", "OBJ"}, ops
    for part in parts[1:]:
        assert len(part) >= outofband.MIN_SIZE  # large blobs still travel as parts of their own
    decoded = codec.decode(b"".join(parts))
    assert type(decoded) is type(message) and decoded == message
    if type(message) is m.JobsDone:
        assert all(type(r) is m.JobDone and r.comp_id == "c1" for r in decoded.reports)
    if type(message) is m.SubmitJobs:
        assert all(type(job) is m.JobRequest for job in decoded.jobs)


def test_other_messages_still_pickle_as_their_dataclasses():
    for message in (m.Ping(1.5), m.CancelJob("c1", "7", 2), m.FileChunk("c1", "ab" * 32, b"chunk", True)):
        parts = codec.encode_parts(message)
        assert "STACK_GLOBAL" in opcodes(pickle_of(parts))
        assert codec.decode(b"".join(parts)) == message


FORGED = {
    "unknown-tag": (99, "c1"),
    "empty": (),
    "report-not-a-tuple": (codec._JOBS_DONE, "c1", (codec._report_fields(done("1"), 5)[1:], ["a", 1])),
    "reports-a-list": (codec._JOBS_DONE, "c1", [codec._report_fields(done("1"), 5)[1:]]),
    "reports-a-string": (codec._JOBS_DONE, "c1", ""),
    "job-not-a-tuple": (codec._SUBMIT_JOBS, "c1", ({"job_id": "1"},)),
    "jobs-a-list": (codec._SUBMIT_JOBS, "c1", [("1", 1, b"", None, 1)]),
    "too-few-fields": (codec._JOB_DONE, "c1", "7"),
    "too-many-fields": (codec._SUBMIT_JOBS, "c1", (("1", 1, b"", None, 1, "extra"),)),
    "missing-batch": (codec._JOBS_DONE, "c1"),
}


@pytest.mark.parametrize("forged", FORGED.values(), ids=FORGED.keys())
def test_forged_tuples_are_protocol_errors(forged):
    with pytest.raises(ProtocolError):
        codec.decode(pickle.dumps(forged, protocol=5))  # as a hostile peer would make it


def test_a_global_inside_a_tuple_is_refused_before_anything_is_built():
    forged = pickle.dumps((codec._JOB_DONE, os.system), protocol=5)
    with pytest.raises(ProtocolError, match="not a clusterpy message"):
        codec.decode(forged)


def test_a_jobs_done_holding_a_report_of_another_computation_is_not_encoded():
    # The tuple form gives a batch's reports its comp_id: a report of another one cannot be sent.
    with pytest.raises(ValueError, match="another|holds a report of"):
        codec.encode_parts(m.JobsDone("c1", (done("1"), done("2", comp_id="c2"))))
