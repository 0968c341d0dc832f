"""Property-based fuzzing of what an attacker controls first: the frame decoder, the session
cipher and the handshake state machines (sans-IO: no sockets, no event loop).

Complements test_framing.py (round trips of valid streams) and test_handshake.py (one
hostile message at a time): here arbitrary streams are checked against a reference decoder
with a buffering bound, and whole handshakes run through an active attacker who may alter,
replace, replay, duplicate or drop every message. About 3,000 examples, a few seconds.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clusterpy.core.admission import Admission
from clusterpy.errors import AuthenticationError, FrameTooLargeError, ProtocolError
from clusterpy.protocol.framing import FrameDecoder, encode_frame
from clusterpy.protocol.handshake import ClientHandshake, ServerHandshake
from clusterpy.protocol.session import SessionCipher

SECRET = b"the cluster secret of the fuzz tests"
INFO = {"python": "3.11", "cloudpickle": "3.0.0"}
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- frame decoder ---------------------------------------------------------------------------


def reference_decode(stream: bytes, cap: int) -> tuple[list[bytes], bool, int]:
    """(complete bodies, whether a header over ``cap`` is reached, bytes of the unfinished
    frame a decoder holds: the partial header, or the body received after a full header)."""
    bodies, pos = [], 0
    while len(stream) - pos >= 4:
        (length,) = struct.unpack_from(">I", stream, pos)
        if length > cap:
            return bodies, True, 0
        if len(stream) - pos - 4 < length:
            return bodies, False, len(stream) - pos - 4
        bodies.append(stream[pos + 4:pos + 4 + length])
        pos += 4 + length
    return bodies, False, len(stream) - pos


framed = st.lists(st.binary(max_size=300), max_size=8).map(lambda bodies: b"".join(map(encode_frame, bodies)))
streams = st.one_of(
    st.binary(max_size=1500),
    st.tuples(framed, st.binary(max_size=40)).map(lambda t: t[0] + t[1]),  # frames, then junk
    st.tuples(framed, st.integers(0, 2**32 - 1)).map(lambda t: t[0] + struct.pack(">I", t[1])),
)


@settings(FUZZ, max_examples=800)
@given(stream=streams, cuts=st.lists(st.integers(0, 1600), max_size=12), cap=st.integers(0, 400))
def test_frame_decoder_matches_the_reference_and_never_over_buffers(stream, cuts, cap):
    expected, oversized, left = reference_decode(stream, cap)
    decoder = FrameDecoder(cap)
    got: list[bytes] = []
    raised = False
    bounds = sorted({0, len(stream), *(c for c in cuts if c <= len(stream))})
    for start, end in zip(bounds, bounds[1:]):
        try:
            got.extend(decoder.feed(stream[start:end]))
        except FrameTooLargeError:
            raised = True
            break
        # Never more than one unfinished frame, and never more of it than the cap allows.
        assert decoder.buffered <= max(cap, 3)
    assert raised == oversized
    if raised:
        assert decoder.failed and expected[:len(got)] == got  # bodies of the failing chunk are dropped
        assert decoder.buffered == 0
    else:
        assert got == expected and decoder.buffered == left


# --- session cipher ---------------------------------------------------------------------------


def _cipher_pair() -> tuple[SessionCipher, SessionCipher]:
    a, b = os.urandom(32), os.urandom(32)
    return SessionCipher(a, b), SessionCipher(b, a)


@settings(FUZZ, max_examples=500)
@given(body=st.binary(max_size=200))
def test_cipher_refuses_arbitrary_bodies_without_moving(body):
    _, receiver = _cipher_pair()
    try:
        receiver.open(body)
    except AuthenticationError:
        pass
    else:  # pragma: no cover - a forgery
        raise AssertionError("an arbitrary body passed the MAC check")
    assert receiver.received == 0


@settings(FUZZ, max_examples=500)
@given(payloads=st.lists(st.binary(max_size=64), min_size=1, max_size=5), data=st.data())
def test_cipher_refuses_every_alteration_of_a_real_stream(payloads, data):
    sender, receiver = _cipher_pair()
    bodies = [sender.seal(p) for p in payloads]
    index = data.draw(st.integers(0, len(bodies) - 1))
    for body, payload in zip(bodies[:index], payloads[:index]):
        assert receiver.open(body) == payload
    body = bytearray(bodies[index])
    how = data.draw(st.sampled_from(["flip", "truncate", "extend", "replay", "skip"]))
    if how == "flip":
        bit = data.draw(st.integers(0, len(body) * 8 - 1))
        body[bit // 8] ^= 1 << (bit % 8)
    elif how == "truncate":
        del body[data.draw(st.integers(0, len(body) - 1)):]
    elif how == "extend":
        body += data.draw(st.binary(min_size=1, max_size=8))
    elif how == "replay":
        if index == 0:
            return
        body = bytearray(bodies[index - 1])
    elif how == "skip":
        if index == len(bodies) - 1:
            return
        body = bytearray(bodies[index + 1])
    try:
        receiver.open(bytes(body))
    except AuthenticationError:
        assert receiver.received == index
    else:  # pragma: no cover
        raise AssertionError(f"{how} of frame {index} was accepted")


# --- handshake against an active attacker -------------------------------------------------------

ACTIONS = ["pass", "pass", "pass", "flip", "truncate", "extend", "random", "replay", "duplicate", "drop"]


def _recorded_handshake() -> list[bytes]:
    """Messages of an earlier, successful handshake with the same secret (for replays)."""
    c = ClientHandshake(SECRET, role="client", info=INFO, nonce=os.urandom(32))
    s = ServerHandshake(SECRET, role="node", info=INFO, nonce=os.urandom(32))
    b1 = c.start()
    b2 = s.receive(b1)
    b3 = c.receive(b2)
    b4 = s.receive(b3)
    c.receive(b4)
    return [b1, b2, b3, b4]


RECORDED = _recorded_handshake()


@settings(FUZZ, max_examples=1000)
@given(plan=st.lists(st.tuples(st.sampled_from(ACTIONS), st.integers(0, 10**6), st.binary(max_size=120)),
                     min_size=4, max_size=4))
def test_handshake_survives_an_active_attacker(plan):
    """Whatever the attacker does to the four messages: only ProtocolErrors, no side is done
    unless every message it received was untouched, and done sides agree on their keys."""
    client = ClientHandshake(SECRET, role="client", info=INFO, nonce=os.urandom(32))
    server = ServerHandshake(SECRET, role="node", info=INFO, nonce=os.urandom(32))
    receivers = [server, client, server, client]  # who receives message 1..4
    untouched = [True] * 4

    def tamper(i: int, body: bytes) -> bytes | None:
        action, n, junk = plan[i]
        if action == "pass" or action == "duplicate":
            return body
        untouched[i] = False
        if action == "flip":
            bit = n % (len(body) * 8)
            return body[:bit // 8] + bytes([body[bit // 8] ^ (1 << bit % 8)]) + body[bit // 8 + 1:]
        if action == "truncate":
            return body[:n % len(body)]
        if action == "extend":
            return body + (junk or b"x")
        if action == "random":
            return junk
        if action == "replay":
            return RECORDED[i]
        return None  # drop

    def deliver(i: int, body: bytes) -> bytes | None:
        """Message i+1 through the attacker; returns the receiver's answer, or None when the
        exchange stops (dropped, refused). A refusal goes back to the other side, as the
        shell does, and must fail it too."""
        receiver = receivers[i]
        other = client if receiver is server else server
        sent = tamper(i, body)
        if sent is None:
            return None
        try:
            reply = receiver.receive(sent)
        except ProtocolError:
            assert receiver.failed
            if receiver.refusal is not None and not other.failed and not other.done and other is client:
                try:
                    client.receive(receiver.refusal)
                except ProtocolError:
                    assert client.failed
                else:  # pragma: no cover
                    raise AssertionError("a refusal completed the client") from None
            return None
        if plan[i][0] == "duplicate" and not receiver.done:
            # The same message again must be refused, never accepted as the next one.
            try:
                receiver.receive(sent)
            except ProtocolError:
                assert receiver.failed
                return None
            raise AssertionError(f"message {i + 1} was accepted twice")
        return reply

    b2 = deliver(0, client.start())
    b3 = deliver(1, b2) if b2 is not None else None
    b4 = deliver(2, b3) if b3 is not None else None
    if b4 is not None:
        deliver(3, b4)

    if server.done:
        assert untouched[0] and untouched[2], plan
    if client.done:
        assert untouched[1] and untouched[3], plan
    if server.done and client.done:
        assert client.send_key == server.recv_key and client.recv_key == server.send_key
    if all(action == "pass" for action, _, _ in plan):
        assert client.done and server.done
    for side in (client, server):
        assert side.done or side.failed or side.state in ("await-hello", "await-proof", "await-welcome")


# --- admission of unauthenticated connections ---------------------------------------------------


def test_admission_drops_the_oldest_and_reports_at_most_once_a_second():
    adm: Admission[str] = Admission(2)
    assert adm.admit("a", 0.0) is None and adm.admit("b", 1.0) is None
    assert adm.admit("c", 3.0) == ("a", 3.0)  # the oldest goes, with its age
    adm.finished("b")
    assert adm.admit("d", 3.5) is None and len(adm) == 2 and "a" not in adm
    assert adm.report_due(3.5) == 1
    assert adm.admit("e", 4.0) == ("c", 1.0) and adm.admit("f", 4.5) == ("d", 1.0)
    assert adm.report_due(4.4) == 0  # within the interval: quiet, counted for later
    assert adm.report_due(4.6) == 2 and adm.report_due(9.0) == 0
    assert adm.evicted == 3
    adm.finished("unknown")  # harmless
    with pytest.raises(ValueError):
        adm.admit("f", 5.0)
    with pytest.raises(ValueError):
        Admission(0)


@settings(FUZZ, max_examples=200)
@given(limit=st.integers(1, 5), ops=st.lists(st.tuples(st.booleans(), st.integers(0, 12)), max_size=60))
def test_admission_invariants(limit, ops):
    adm: Admission[int] = Admission(limit)
    model: list[int] = []  # pending keys, oldest first
    for now, (add, key) in enumerate(ops):
        if add and key not in model:
            victim = adm.admit(key, float(now))
            if len(model) >= limit:
                assert victim is not None and victim[0] == model.pop(0)
            else:
                assert victim is None
            model.append(key)
        elif not add:
            adm.finished(key)
            if key in model:
                model.remove(key)
        assert len(adm) == len(model) <= limit
