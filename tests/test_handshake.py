"""The handshake state machines paired directly: no sockets, no event loop."""

import hashlib
import hmac
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterpy.errors import AuthenticationError, ProtocolError, VersionMismatchError
from clusterpy.protocol.handshake import (
    ALGORITHM,
    PROTOCOL,
    ClientHandshake,
    HandshakeStateError,
    ServerHandshake,
)

SECRET = b"cluster secret"
INFO = {"python": "3.11", "cloudpickle": "3.0.0", "host": "alpha"}
_counter = iter(range(1, 10**9))


def nonce() -> bytes:
    return next(_counter).to_bytes(32, "big")


def client(secret=SECRET, role="client", info=INFO, **kw) -> ClientHandshake:
    return ClientHandshake(secret, role=role, info=info, nonce=kw.pop("nonce", None) or nonce(),
                           **kw)


def server(secret=SECRET, role="node", info=INFO, **kw) -> ServerHandshake:
    return ServerHandshake(secret, role=role, info=info, nonce=kw.pop("nonce", None) or nonce(),
                           **kw)


def run(c: ClientHandshake, s: ServerHandshake) -> list[bytes]:
    """Run a full handshake and return the four messages."""
    b1 = c.start()
    b2 = s.receive(b1)
    b3 = c.receive(b2)
    assert b3 is not None
    b4 = s.receive(b3)
    assert c.receive(b4) is None
    return [b1, b2, b3, b4]


def sha(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


def mac(secret: bytes, label: bytes, *parts: bytes) -> bytes:
    return hmac.digest(secret, label + b"".join(sha(p) for p in parts), "sha256")


def forge_b3(secret: bytes, b1: bytes, b2_json: bytes, label=b"clusterpy/1 client-proof\0"):
    b3 = b'{"t":"proof"}'
    return b3 + mac(secret, label, b1, b2_json, b3)


def refusal_of(body: bytes) -> dict:
    obj = json.loads(body)
    assert obj["t"] == "refused"
    return obj


# --- success ------------------------------------------------------------------------------


def test_success_gives_matching_directional_keys():
    c, s = client(), server()
    run(c, s)
    assert c.done and s.done and not c.failed and not s.failed
    assert c.send_key == s.recv_key and c.recv_key == s.send_key
    assert c.send_key != c.recv_key
    assert c.peer_role == "node" and s.peer_role == "client"
    assert c.peer_info == INFO and s.peer_info == INFO


def test_messages_and_keys_follow_the_spec():
    nc, ns = b"\x01" * 32, b"\x02" * 32
    c, s = client(nonce=nc), server(nonce=ns)
    b1, b2, b3, b4 = run(c, s)
    hello = json.loads(b1)
    assert hello == {"t": "hello", "proto": PROTOCOL, "alg": ALGORITHM, "role": "client",
                     "nonce": nc.hex(), "info": INFO}
    b2j = b2[:-32]
    assert json.loads(b2j)["nonce"] == ns.hex() and json.loads(b2j)["role"] == "node"
    assert b2[-32:] == mac(SECRET, b"clusterpy/1 server-proof\0", b1, b2j)
    assert b3 == forge_b3(SECRET, b1, b2j)
    assert json.loads(b4[:-32]) == {"t": "welcome"}
    assert b4[-32:] == mac(SECRET, b"clusterpy/1 welcome\0", b1, b2j, b3[:-32], b4[:-32])
    master = hmac.digest(SECRET, b"clusterpy/1 session\0" + nc + ns, "sha256")
    assert c.send_key == hmac.digest(master, b"c2s", "sha256")
    assert c.recv_key == hmac.digest(master, b"s2c", "sha256")
    assert all(len(m) <= 4096 for m in (b1, b2, b3, b4))


def test_expected_roles_accept_listed_peers():
    c = client(role="scheduler", expected_peer_roles=frozenset({"node"}))
    s = server(expected_peer_roles={"client", "scheduler"})
    run(c, s)
    assert s.peer_role == "scheduler"


def test_python_patch_level_is_ignored():
    run(client(info={**INFO, "python": "3.11.7"}), server(info={**INFO, "python": "3.11.2"}))


# --- wrong secret -------------------------------------------------------------------------


def test_wrong_secret_detected_by_client_and_told_to_server():
    c, s = client(secret=b"wrong"), server()
    b2 = s.receive(c.start())
    with pytest.raises(AuthenticationError,
                       match="peer 'node' failed to prove it knows the cluster secret: wrong secret?"):
        c.receive(b2)
    assert c.failed and not c.done and isinstance(c.error, AuthenticationError)
    assert refusal_of(c.refusal)["kind"] == "auth"
    with pytest.raises(AuthenticationError, match="wrong secret"):
        s.receive(c.refusal)
    assert s.failed and s.refusal is None  # a refusal is never answered
    assert s.refusal_reason == "authentication failed: wrong secret?"


def test_wrong_secret_detected_by_server():
    s = server()
    b1 = client().start()
    b2 = s.receive(b1)
    with pytest.raises(AuthenticationError, match="peer 'client' failed to prove"):
        s.receive(forge_b3(b"wrong", b1, b2[:-32]))
    assert s.failed
    refusal = refusal_of(s.refusal)
    assert refusal == {"t": "refused", "reason": "authentication failed: wrong secret?",
                       "kind": "auth"}
    # The client side turns that refusal into a clear error.
    c = client(secret=b"wrong")
    c.start()
    with pytest.raises(AuthenticationError, match="refused the handshake: authentication failed"):
        c.receive(s.refusal)
    assert c.refusal_reason == "authentication failed: wrong secret?"


# --- tampering, downgrade, reflection, replay ---------------------------------------------


def run_tampered(index: int, bit: int) -> None:
    c, s = client(), server()
    msgs = [c.start()]
    steps = [s.receive, c.receive, s.receive, c.receive]
    for step_no, step in enumerate(steps):
        body = msgs[-1]
        if step_no == index:
            flipped = bytearray(body)
            flipped[bit // 8] ^= 1 << (bit % 8)
            body = bytes(flipped)
        msgs.append(step(body))
    assert not (c.done and s.done), "tampered handshake completed"


@pytest.mark.parametrize("index", [0, 1, 2, 3], ids=["B1", "B2", "B3", "B4"])
def test_every_bit_flip_fails(index):
    c, s = client(), server()
    length = len(run(c, s)[index])
    for bit in range(length * 8):
        with pytest.raises(ProtocolError):
            run_tampered(index, bit)


def rewrite(body: bytes, **changes) -> bytes:
    obj = json.loads(body)
    obj.update(changes)
    return json.dumps(obj, separators=(",", ":")).encode()


@pytest.mark.parametrize("field,value", [("proto", "clusterpy/0"), ("alg", "hmac-md5")])
def test_client_hello_downgrade_refused(field, value):
    s = server()
    with pytest.raises(VersionMismatchError, match=value):
        s.receive(rewrite(client().start(), **{field: value}))
    assert refusal_of(s.refusal)["kind"] == "version"


@pytest.mark.parametrize("field,value", [("proto", "clusterpy/0"), ("alg", "hmac-md5")])
def test_server_hello_downgrade_fails(field, value):
    c, s = client(), server()
    b2 = s.receive(c.start())
    with pytest.raises(VersionMismatchError):
        c.receive(rewrite(b2[:-32], **{field: value}) + b2[-32:])


def test_downgrade_with_consistent_rewrite_still_fails_the_mac():
    # An attacker who rewrites B1 to another (accepted) role changes the transcript.
    c, s = client(), server()
    b2 = s.receive(rewrite(c.start(), role="scheduler"))
    with pytest.raises(AuthenticationError):
        c.receive(b2)


def test_server_refuses_unexpected_client_role():
    c = client(role="node")
    s = server(expected_peer_roles=frozenset({"client", "scheduler"}))
    b3 = c.receive(s.receive(c.start()))
    with pytest.raises(AuthenticationError, match="'node' is not accepted"):
        s.receive(b3)
    assert "does not accept peers with role 'node'" in refusal_of(s.refusal)["reason"]
    with pytest.raises(AuthenticationError, match="refused"):
        c.receive(s.refusal)


def test_client_refuses_unexpected_server_role():
    c = client(expected_peer_roles=frozenset({"node"}))
    s = server(role="scheduler")
    with pytest.raises(AuthenticationError, match="'scheduler' is not accepted"):
        c.receive(s.receive(c.start()))


def test_server_proof_is_not_a_client_proof():
    s = server()
    b1 = client().start()
    b2 = s.receive(b1)
    with pytest.raises(AuthenticationError):
        s.receive(forge_b3(SECRET, b1, b2[:-32], label=b"clusterpy/1 server-proof\0"))


def test_reflected_hello_is_refused():
    c = client()
    b1 = c.start()
    # A "server" that echoes B1 with a valid MAC still fails: that is our own nonce.
    with pytest.raises(ProtocolError, match="own nonce"):
        c.receive(b1 + mac(SECRET, b"clusterpy/1 server-proof\0", b1, b1))
    # And a server's B2 reflected to another server is not a hello.
    b2 = server().receive(client().start())
    with pytest.raises(ProtocolError):
        server().receive(b2)


def test_replayed_b3_against_a_new_server_nonce_fails():
    c, s = client(), server()
    b1, _, b3, _ = run(c, s)
    s2 = server()
    s2.receive(b1)  # the attacker replays B1 too; s2 answers with a fresh nonce
    with pytest.raises(AuthenticationError):
        s2.receive(b3)


def test_replayed_b2_against_a_new_client_nonce_fails():
    _, b2, _, _ = run(client(), server())
    c2 = client()
    c2.start()
    with pytest.raises(AuthenticationError):
        c2.receive(b2)


# --- versions -----------------------------------------------------------------------------


def test_version_mismatch_names_both_versions_on_both_sides():
    c = client(info={**INFO, "python": "3.12"})
    s = server(info={**INFO, "cloudpickle": "2.2.1"})
    b2 = s.receive(c.start())
    with pytest.raises(VersionMismatchError) as info:
        c.receive(b2)
    msg = str(info.value)
    for text in ("Python 3.11", "Python 3.12", "cloudpickle 2.2.1", "cloudpickle 3.0.0",
                 "install the same"):
        assert text in msg
    with pytest.raises(VersionMismatchError, match="Python 3.12"):
        s.receive(c.refusal)


def test_version_mismatch_detected_by_server_after_authentication():
    s = server()
    b1 = client(info={**INFO, "cloudpickle": "2.0.0"}).start()
    b2 = s.receive(b1)
    with pytest.raises(VersionMismatchError, match="cloudpickle 2.0.0"):
        s.receive(forge_b3(SECRET, b1, b2[:-32]))
    assert refusal_of(s.refusal)["kind"] == "version"


def test_version_mismatch_not_reported_before_authentication():
    # With the wrong secret the peer only learns that authentication failed.
    c = client(secret=b"wrong", info={**INFO, "python": "3.12"})
    with pytest.raises(AuthenticationError):
        c.receive(server().receive(c.start()))


# --- strict validation --------------------------------------------------------------------


def hello(**changes) -> bytes:
    return rewrite(client().start(), **changes)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b'{"t":"hello"}',
        b"\xff\xfe",
        b"[" * 3000 + b"]" * 3000,
        b'{"t":"hello","t":"hello"}',
        hello(nonce="AB" * 32),
        hello(nonce="ab" * 31),
        hello(nonce=1),
        hello(role=""),
        hello(role="x" * 65),
        hello(role="bad role"),
        hello(info=[]),
        hello(info={"python": "3.11"}),
        hello(info={**INFO, "n": 5}),
        hello(info={**INFO, "x": "a" * 257}),
        hello(info={**INFO, "x": "line\nbreak"}),
        hello(info={**INFO, **{f"k{i}": "v" for i in range(30)}}),
        hello(extra=True),
        hello(t="proof"),
        hello(proto=1),
        rewrite(client().start(), info={**INFO, "n": float("nan")}).replace(b"NaN", b"NaN"),
        client().start() + b" " * 4000,
    ],
)
def test_malformed_hello_refused_with_protocol_error(body):
    s = server()
    with pytest.raises(ProtocolError):
        s.receive(body)
    assert s.failed and refusal_of(s.refusal)["kind"] in ("protocol", "version")
    assert len(s.refusal) <= 4096


def test_refusal_reason_is_sanitised():
    c = client()
    c.start()
    body = json.dumps({"t": "refused", "reason": "evil\n\x1b[31m" + "x" * 3000}).encode()
    with pytest.raises(ProtocolError) as info:
        c.receive(body)
    assert c.refusal_reason.isprintable() and len(c.refusal_reason) <= 512
    assert "\n" not in str(info.value)


def test_unknown_refusal_kind_is_a_protocol_error():
    c = client()
    c.start()
    with pytest.raises(ProtocolError):
        c.receive(b'{"t":"refused","reason":"x","kind":"weird"}')


# --- state machine discipline ---------------------------------------------------------------


def test_illegal_calls_raise_and_leave_state_unchanged():
    c, s = client(), server()
    with pytest.raises(HandshakeStateError):
        c.receive(b"x")
    assert c.state == "start"
    with pytest.raises(HandshakeStateError):
        c.send_key
    with pytest.raises(HandshakeStateError):
        c.peer_role
    run(c, s)
    for call in (c.start, lambda: c.receive(b"x"), lambda: s.receive(b"x")):
        with pytest.raises(HandshakeStateError):
            call()
    assert c.done and s.done
    with pytest.raises(HandshakeStateError):
        s.abort(ProtocolError("late"))


def test_failed_handshake_stays_failed():
    s = server()
    with pytest.raises(ProtocolError):
        s.receive(b"garbage")
    with pytest.raises(HandshakeStateError):
        s.receive(client().start())
    assert s.failed
    with pytest.raises(HandshakeStateError):
        s.send_key


def test_abort_returns_a_refusal_once():
    s = server()
    refusal = s.abort(ProtocolError("frame too large"))
    assert refusal_of(refusal)["reason"] == "frame too large"
    assert s.failed and s.abort(ProtocolError("again")) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"secret": b""},
        {"secret": "text"},
        {"nonce": b"short"},
        {"role": "has space"},
        {"info": {"python": "3.11"}},
        {"info": {**INFO, "big": "v" * 300}},
        {"info": {**INFO, **{f"key{i}": "v" * 250 for i in range(20)}}},
        {"expected_peer_roles": {"bad role"}},
    ],
)
def test_constructor_validates_arguments(kwargs):
    with pytest.raises(ValueError):
        client(**kwargs)


# --- fuzzing ------------------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=12)
json_values = scalars | st.lists(scalars, max_size=3) | st.dictionaries(
    st.text(max_size=8), scalars, max_size=3)
hello_like = st.fixed_dictionaries(
    {},
    optional={
        "t": st.sampled_from(["hello", "proof", "refused"]) | json_values,
        "proto": st.just(PROTOCOL) | json_values,
        "alg": st.just(ALGORITHM) | json_values,
        "role": st.just("client") | json_values,
        "nonce": st.just("ab" * 32) | json_values,
        "info": st.just(INFO) | json_values,
        "reason": json_values,
        "kind": json_values,
    },
).map(lambda d: json.dumps(d).encode())


def fuzz_step(handshake, body, *, prepare=None) -> None:
    if prepare:
        prepare(handshake)
    try:
        out = handshake.receive(body)
    except ProtocolError:
        assert handshake.failed
        assert handshake.refusal is None or len(handshake.refusal) <= 4096
    else:
        assert out is None or isinstance(out, bytes)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_server_first_message_bytes(body):
    fuzz_step(server(), body)


@settings(max_examples=300, deadline=None)
@given(hello_like)
def test_fuzz_server_first_message_json(body):
    fuzz_step(server(), body)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300) | hello_like.map(lambda b: b + b"m" * 32))
def test_fuzz_server_second_message(body):
    s = server()
    s.receive(client().start())
    fuzz_step(s, body)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=600) | hello_like | hello_like.map(lambda b: b + b"m" * 32))
def test_fuzz_client_messages(body):
    fuzz_step(client(), body, prepare=lambda c: c.start())


def test_mutated_messages_only_raise_protocol_errors():
    # Cheap, deterministic mutation fuzzing of valid messages (hypothesis is slow per example).
    rng = random.Random(1234)
    c, s = client(), server()
    b1, b2, b3, _ = run(c, s)
    for _ in range(3000):
        target, base = rng.choice([("b1", b1), ("b3", b3)])
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            op, pos = rng.randrange(3), rng.randrange(len(data) + 1)
            if op == 0 and pos < len(data):
                data[pos] = rng.randrange(256)
            elif op == 1:
                data[pos:pos] = bytes([rng.randrange(256)])
            else:
                del data[pos : pos + rng.randint(1, 8)]
        s2 = server()
        if target == "b3":
            s2.receive(b1)
        fuzz_step(s2, bytes(data))
