"""Per-frame authentication driven directly: no sockets, no event loop."""

import struct

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from clusterpy.errors import AuthenticationError
from clusterpy.protocol.session import OVERHEAD, SessionCipher

K1, K2, K3 = b"1" * 32, b"2" * 32, b"3" * 32


def pair(a: bytes = K1, b: bytes = K2) -> tuple[SessionCipher, SessionCipher]:
    """Two ends of one session: a sends with key a, b receives with it, and vice versa."""
    return SessionCipher(a, b), SessionCipher(b, a)


def test_round_trip_both_ways():
    left, right = pair()
    for i in range(100):
        payload = f"message {i}".encode()
        assert right.open(left.seal(payload)) == payload
        assert left.open(right.seal(payload[::-1])) == payload[::-1]
    assert left.sent == left.received == right.sent == right.received == 100


def test_empty_and_one_mib_payloads():
    left, right = pair()
    big = bytes(range(256)) * 4096
    assert right.open(left.seal(b"")) == b""
    assert right.open(left.seal(big)) == big


def test_body_layout_matches_the_spec():
    left, _ = pair()
    left.seal(b"first")
    body = left.seal(b"payload")
    seq = struct.pack(">Q", 1)
    # GMAC computed independently, with the streaming GCM interface: nonce = 4 zero bytes + seq.
    encryptor = Cipher(algorithms.AES(K1), modes.GCM(bytes(4) + seq)).encryptor()
    encryptor.authenticate_additional_data(b"payload")
    encryptor.finalize()
    assert body == seq + b"payload" + encryptor.tag
    assert len(body) == len(b"payload") + OVERHEAD


def test_the_tag_binds_the_sequence_number():
    left, right = pair()
    body = bytearray(left.seal(b"first"))
    body[7] = 1  # claim seq 1: the header is not MACed as data, but it is the nonce
    with pytest.raises(AuthenticationError, match="MAC"):
        right.open(bytes(body))


def test_seal_parts_does_not_copy_the_payload():
    left, right = pair()
    payload = b"p" * 100_000
    parts = left.seal_parts(payload)
    assert any(part is payload for part in parts)
    assert right.open(b"".join(parts)) == payload


def test_a_payload_sealed_from_parts_is_the_same_frame_as_the_joined_payload():
    # Out-of-band buffers are sealed where they are (streaming GMAC); the receiver sees one payload.
    left, right = pair()
    twin, _ = pair()
    parts = [b"header", memoryview(bytes(range(256)) * 400), b"", memoryview(b"tail")]
    sealed = left.seal_parts(parts)
    assert sealed[1] is parts[0] and sealed[2] is parts[1]  # not copied
    joined = b"".join(bytes(p) for p in parts)
    assert b"".join(sealed) == twin.seal(joined)
    assert right.open(bytearray(b"".join(sealed))) == joined
    assert right.open(left.seal([b"only one part"])) == b"only one part"


def test_bit_flip_anywhere_fails():
    left, _ = pair()
    body = left.seal(b"authenticate me")
    for bit in range(len(body) * 8):
        tampered = bytearray(body)
        tampered[bit // 8] ^= 1 << (bit % 8)
        _, receiver = pair()  # fresh receiver expecting seq 0
        with pytest.raises(AuthenticationError):
            receiver.open(bytes(tampered))


def test_truncated_and_extended_frames_fail():
    left, right = pair()
    body = left.seal(b"abc")
    for bad in (b"", body[:OVERHEAD - 1], body[:-1], body + b"\x00", body[1:]):
        with pytest.raises(AuthenticationError):
            right.open(bad)
    assert right.open(body) == b"abc"  # failures did not advance the sequence


def test_replayed_frame_fails():
    left, right = pair()
    body = left.seal(b"once")
    assert right.open(body) == b"once"
    with pytest.raises(AuthenticationError, match="sequence"):
        right.open(body)


def test_reordered_frames_fail():
    left, right = pair()
    first, second = left.seal(b"1"), left.seal(b"2")
    with pytest.raises(AuthenticationError, match="expected 0"):
        right.open(second)
    assert right.open(first) == b"1"
    assert right.open(second) == b"2"


def test_dropped_frame_fails():
    left, right = pair()
    left.seal(b"lost")
    with pytest.raises(AuthenticationError):
        right.open(left.seal(b"after"))


def test_frame_from_another_session_fails():
    other, _ = pair(K3, K2)
    _, right = pair()
    with pytest.raises(AuthenticationError, match="MAC"):
        right.open(other.seal(b"foreign"))


def test_reflected_frame_fails():
    left, _ = pair()
    with pytest.raises(AuthenticationError):
        left.open(left.seal(b"echo"))  # our own frame sent back to us


def test_short_keys_rejected():
    with pytest.raises(ValueError):
        SessionCipher(b"short", K2)
